// loader_bench: decoded-and-augmented images per second, per core, of the
// ImageFolder + Loader pipeline on a folder of full-size JPEGs, with and
// without JPEG DCT scaling. The counterpart of torchvision's DataLoader as
// measured in docs/speed.md ("Loader speed"); run both on the same folder.
//
//   loader_bench ROOT [--threads 1 2] [--pipelines train eval] [--size 224]
//
// ROOT is a class-folder tree (ROOT/<class>/<image>), e.g. the train/ folder
// make_imagenet_like.py writes. Every file is read once first, so the numbers
// are warm-cache decode throughput, not disk speed.
//
// Each configuration (pipeline x DCT scaling x threads) runs trials: a fresh
// Loader, a few batches of warm-up (the prefetch queue filling), then batches
// taken as fast as they come for --trial-time seconds. Trials of all
// configurations are interleaved round by round, so the drift of a shared
// cloud machine hits them alike, until each has >= --min-trials trials and
// >= --min-time timed seconds. Reported: median images/s over trials (with
// quartiles), that per loader thread, CPU cores this process used and images
// per CPU-second (the per-core efficiency), and 'foreign': cores other
// programs used meanwhile (from /proc/stat) -- above 0.1 the numbers are not
// a clean measurement.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <unistd.h>

#include <CLI/CLI.hpp>

#include "data/image_folder.h"
#include "data/loader.h"

using namespace hfq;

namespace {

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// CPU seconds of this process (all threads).
double own_cpu_s() {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_stime.tv_sec + 1e-6 * (u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

// CPU seconds all programs spent busy (first line of /proc/stat); < 0 if unavailable.
double machine_busy_s() {
    std::ifstream in("/proc/stat");
    std::string cpu;
    double user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
    if (!(in >> cpu >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> steal)) return -1;
    return (user + nice + system + irq + softirq + steal) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

struct Config {
    std::string pipeline;
    bool dct = true;
    int threads = 1;
    std::shared_ptr<const Dataset> dataset;
    std::vector<double> rates;  // images/s per trial
    double wall = 0, own = 0, foreign = 0;
    int64_t images = 0;
};

void run_trial(Config& c, const LoaderOptions& base, double trial_time, int64_t first_epoch) {
    LoaderOptions o = base;
    o.threads = c.threads;
    Loader loader(c.dataset, o, {first_epoch, 0}, first_epoch + 1000000);
    for (int k = 0; k < o.prefetch_batches + 2; ++k) loader.next();  // warm-up: fill, then drain the queue
    const double wall0 = now_s(), own0 = own_cpu_s(), busy0 = machine_busy_s();
    int64_t images = 0;
    double elapsed = 0;
    while (elapsed < trial_time) {
        images += loader.next()->size();
        elapsed = now_s() - wall0;
    }
    const double own = own_cpu_s() - own0, busy = machine_busy_s() - busy0;
    c.rates.push_back(images / elapsed);
    c.wall += elapsed;
    c.own += own;
    c.foreign += std::max(0.0, busy - own);
    c.images += images;
}

double quantile(std::vector<double> v, double q) {
    std::sort(v.begin(), v.end());
    const double pos = q * (v.size() - 1);
    const size_t i = static_cast<size_t>(pos);
    return i + 1 < v.size() ? v[i] + (pos - i) * (v[i + 1] - v[i]) : v[i];
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"Images/s per core of hfq's ImageFolder + Loader pipeline (see the header of loader_bench.cpp)"};
    std::string root;
    std::vector<int> threads = {1, 2};
    std::vector<std::string> pipelines = {"train", "eval"};
    std::vector<std::string> dct_modes = {"on", "off"};
    int size = 224, batch = 32, prefetch = 4, min_trials = 3;
    double min_time = 10, trial_time = 2, max_bad_fraction = kDefaultMaxBadFraction;
    app.add_option("root", root, "class-folder tree ROOT/<class>/<image>")->required();
    app.add_option("--threads", threads, "loader thread counts to measure");
    app.add_option("--pipelines", pipelines, "train (random resized crop + flip) and/or eval (resize + centre crop)")
        ->check(CLI::IsMember({"train", "eval"}));
    app.add_option("--dct", dct_modes, "DCT scaling modes to measure")->check(CLI::IsMember({"on", "off"}));
    app.add_option("--size", size, "output size (size x size x 3)");
    app.add_option("--batch", batch, "batch size");
    app.add_option("--prefetch", prefetch, "prefetched batches");
    app.add_option("--min-time", min_time, "minimum timed seconds per configuration");
    app.add_option("--trial-time", trial_time, "seconds per trial");
    app.add_option("--min-trials", min_trials, "minimum trials per configuration");
    app.add_option("--max-bad-fraction", max_bad_fraction, "unreadable images allowed, as a fraction of the corpus")
        ->check(CLI::Range(0.0, 1.0));
    CLI11_PARSE(app, argc, argv);

    try {
        // Warm the page cache and describe the corpus.
        const ImageFolder probe = ImageFolder::from_class_folders(root, ImageTransformOptions{});
        uintmax_t bytes = 0;
        const double t0 = now_s();
        std::vector<char> data;
        for (const auto& s : probe.samples()) {
            data.resize(std::filesystem::file_size(s.path));
            std::ifstream(s.path, std::ios::binary).read(data.data(), static_cast<std::streamsize>(data.size()));
            bytes += data.size();
        }
        std::printf("corpus: %s: %lld images, %d classes, %.1f MiB (page cache warmed in %.2f s)\n", root.c_str(),
                    static_cast<long long>(probe.size()), probe.num_classes(), bytes / 1048576.0, now_s() - t0);
        std::printf(
            "output %dx%dx3, batch %d, prefetch %d, trials of %.1f s interleaved, >= %d trials and >= %.0f s "
            "per configuration\n\n",
            size, size, batch, prefetch, trial_time, min_trials, min_time);

        std::vector<Config> configs;
        for (const std::string& p : pipelines)
            for (const std::string& d : dct_modes)
                for (int t : threads) {
                    ImageTransformOptions o;
                    o.size = size;
                    o.train = p == "train";
                    o.dct_scaling = d == "on";
                    Config& c = configs.emplace_back();
                    c.pipeline = p;
                    c.dct = o.dct_scaling;
                    c.threads = t;
                    c.dataset = std::make_shared<ImageFolder>(ImageFolder::from_class_folders(root, o));
                }
        LoaderOptions base;
        base.batch_size = batch;
        base.prefetch_batches = prefetch;
        base.max_bad_fraction = max_bad_fraction;
        int round = 0;
        auto done = [&](const Config& c) { return int(c.rates.size()) >= min_trials && c.wall >= min_time; };
        while (!std::all_of(configs.begin(), configs.end(), done)) {
            for (size_t k = 0; k < configs.size(); ++k) {  // rotate the order every round
                Config& c = configs[(k + round) % configs.size()];
                if (!done(c)) run_trial(c, base, trial_time, int64_t{round} * 1000);
            }
            ++round;
        }

        std::printf("%-6s %4s %7s %8s %17s %12s %8s %10s %8s\n", "pipe", "dct", "threads", "img/s", "quartiles",
                    "img/s/thread", "own CPU", "img/CPU-s", "foreign");
        bool noisy = false;
        for (const Config& c : configs) {
            const double median = quantile(c.rates, 0.5), foreign = c.foreign / c.wall;
            noisy |= foreign > 0.1;
            std::printf("%-6s %4s %7d %8.1f %8.1f..%-8.1f %12.1f %8.2f %10.1f %8.2f\n", c.pipeline.c_str(),
                        c.dct ? "on" : "off", c.threads, median, quantile(c.rates, 0.25), quantile(c.rates, 0.75),
                        median / c.threads, c.own / c.wall, c.images / c.own, foreign);
        }
        if (noisy)
            std::printf(
                "\nWARNING: other programs used > 0.1 CPU cores during some measurements (column 'foreign'); "
                "rerun on an idle machine for clean numbers.\n");
    } catch (const Error& e) {
        std::fprintf(stderr, "loader_bench: %s\n", e.what());
        return 1;
    }
    return 0;
}
