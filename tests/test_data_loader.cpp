// The Loader on a synthetic dataset whose samples record what they were
// loaded from: order, shuffling, resuming, thread-count independence,
// skip-and-count, error propagation, shutdown, and batch parts.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <iostream>
#include <set>
#include <sstream>
#include <thread>

#include "data/loader.h"

using namespace hfq;

namespace {

// Sample i is {i, first uniform of its rng, second uniform} in a 1x3x1 image;
// label i % 3. Chosen indices are unreadable, one may throw something else,
// and each load can take a while.
class RecordingDataset : public Dataset {
public:
    explicit RecordingDataset(int64_t n) : n_(n) {}
    std::set<int64_t> unreadable;
    int64_t failing = -1;
    std::chrono::microseconds delay{0};
    mutable std::atomic<int64_t> loads{0};

    int64_t size() const override { return n_; }
    int num_classes() const override { return 3; }
    Shape sample_shape() const override { return {1, 3, 1}; }
    int32_t label(int64_t i) const override { return static_cast<int32_t>(i % 3); }
    std::string name(int64_t i) const override { return cat("sample", i); }
    void load(int64_t i, Rng& rng, float* out) const override {
        ++loads;
        if (delay.count() > 0) std::this_thread::sleep_for(delay);
        if (unreadable.count(i)) throw UnreadableSample(cat("sample", i, ": bad bytes"));
        if (i == failing) throw std::runtime_error("disk on fire");
        out[0] = static_cast<float>(i);
        out[1] = rng.uniform();
        out[2] = rng.uniform();
    }

private:
    int64_t n_;
};

std::vector<Batch> drain(Loader& loader) {
    std::vector<Batch> batches;
    while (auto b = loader.next()) batches.push_back(std::move(*b));
    return batches;
}

// Silences (and keeps) what the loader logs to stderr.
struct CaptureStderr {
    std::ostringstream text;
    std::streambuf* saved = std::cerr.rdbuf(text.rdbuf());
    ~CaptureStderr() { std::cerr.rdbuf(saved); }
};

}  // namespace

TEST_CASE("epoch_order: a seeded permutation per epoch, or the identity") {
    const auto a = epoch_order(50, 7, 0, true), b = epoch_order(50, 7, 0, true), c = epoch_order(50, 7, 1, true);
    CHECK(a == b);
    CHECK(a != c);
    CHECK(std::set<int64_t>(a.begin(), a.end()).size() == 50);
    CHECK(std::set<int64_t>(c.begin(), c.end()).size() == 50);
    CHECK(epoch_order(50, 8, 0, true) != a);
    const auto identity = epoch_order(5, 7, 3, false);
    CHECK(identity == std::vector<int64_t>{0, 1, 2, 3, 4});
}

TEST_CASE("batches follow the epoch order, with labels, indices, shapes and per-sample random numbers") {
    auto ds = std::make_shared<RecordingDataset>(10);
    LoaderOptions options;
    options.batch_size = 4;
    options.seed = 3;
    options.threads = 2;
    Loader loader(ds, options);
    CHECK(loader.batches_per_epoch() == 3);
    const auto batches = drain(loader);
    REQUIRE(batches.size() == 3);
    CHECK(loader.next() == std::nullopt);  // stays finished
    const auto order = epoch_order(10, 3, 0, true);
    for (const Batch& b : batches) {
        CHECK(b.epoch == 0);
        CHECK(b.images.shape() == Shape{b.size(), 1, 3, 1});
        const std::vector<float> pixels = b.images.to_vector();
        for (int64_t s = 0; s < b.size(); ++s) {
            const int64_t i = order[b.index * 4 + s];
            CHECK(b.indices[s] == i);
            CHECK(b.labels[s] == i % 3);
            Rng rng = Rng::derive(3, {0, static_cast<uint64_t>(i)});
            CHECK(pixels[s * 3 + 0] == static_cast<float>(i));
            CHECK(pixels[s * 3 + 1] == rng.uniform());
            CHECK(pixels[s * 3 + 2] == rng.uniform());
        }
    }
    CHECK(batches[2].size() == 2);
    CHECK(loader.stats().samples == 10);
    CHECK(loader.stats().batches == 3);

    options.drop_last = true;
    options.shuffle = false;
    Loader unshuffled(ds, options);
    const auto full = drain(unshuffled);
    REQUIRE(full.size() == 2);
    CHECK(full[1].indices == std::vector<int64_t>{4, 5, 6, 7});
}

TEST_CASE("several epochs in one loader; resuming mid-epoch reproduces the batches; threads do not matter") {
    auto ds = std::make_shared<RecordingDataset>(23);
    LoaderOptions options;
    options.batch_size = 5;
    options.seed = 11;
    options.threads = 1;
    Loader whole(ds, options, {0, 0}, 3);
    const auto all = drain(whole);
    REQUIRE(all.size() == 15);
    CHECK(all[5].epoch == 1);
    CHECK(all[5].index == 0);
    CHECK(all[4].indices != all[9].indices);  // reshuffled

    options.threads = 2;
    options.prefetch_batches = 1;
    Loader resumed(ds, options, {1, 2}, 3);
    CHECK(resumed.position().epoch == 1);
    CHECK(resumed.position().batch == 2);
    const auto tail = drain(resumed);
    REQUIRE(tail.size() == 8);
    for (size_t k = 0; k < tail.size(); ++k) {
        const Batch& expected = all[7 + k];
        CHECK(tail[k].epoch == expected.epoch);
        CHECK(tail[k].index == expected.index);
        CHECK(tail[k].indices == expected.indices);
        CHECK(tail[k].images.to_vector() == expected.images.to_vector());
    }
    CHECK(resumed.position().epoch == 3);
    CHECK(resumed.position().batch == 0);
}

TEST_CASE("unreadable samples are replaced by the next index and counted; too many stop the run") {
    auto ds = std::make_shared<RecordingDataset>(20);
    ds->unreadable = {4, 11};
    LoaderOptions options;
    options.batch_size = 6;
    options.shuffle = false;
    options.max_bad_fraction = 0.1;  // 2 of 20 allowed
    CaptureStderr log;
    {
        Loader loader(ds, options);
        const auto batches = drain(loader);
        REQUIRE(batches.size() == 4);
        CHECK(batches[0].indices == std::vector<int64_t>{0, 1, 2, 3, 5, 5});  // slot 4 <- 5
        CHECK(batches[0].labels == std::vector<int32_t>{0, 1, 2, 0, 2, 2});
        REQUIRE(batches[0].skipped.size() == 1);
        CHECK(batches[0].skipped[0].index == 4);
        CHECK(batches[0].skipped[0].reason == "sample4: bad bytes");
        CHECK(batches[1].indices[5] == 12);
        // The replacement's random numbers are its own, not sample 5's.
        const std::vector<float> pixels = batches[0].images.to_vector();
        CHECK(pixels[4 * 3 + 1] == Rng::derive(0, {0, 4, 1}).uniform());
        CHECK(pixels[5 * 3 + 1] == Rng::derive(0, {0, 5}).uniform());
        CHECK(loader.stats().unreadable == 2);
        CHECK(loader.stats().replaced == 2);
    }
    CHECK(log.text.str().find("hfq: skipping unreadable image sample4: bad bytes (1 so far; --max-bad-fraction "
                              "0.1 allows 2 of 20)\n") != std::string::npos);
    CHECK(log.text.str().find("hfq: skipping unreadable image sample11: bad bytes (2 so far") != std::string::npos);

    ds->unreadable = {4, 11, 17};  // 3 of 20: over the limit at the batch holding 17
    {
        Loader loader(ds, options);
        CHECK(loader.next().has_value());
        CHECK(loader.next().has_value());
        CHECK_THROWS_WITH_AS(loader.next(),
                             "stopping: 3 of the 20 images could not be read (the first: sample4: bad bytes); "
                             "--max-bad-fraction 0.1 allows 2 of 20. Fix or remove the files, or raise "
                             "--max-bad-fraction.",
                             Error);
        CHECK_THROWS_AS(loader.next(), Error);  // and stays failed
    }

    ds->unreadable = {6, 7, 8};  // a run of more than the limit in a row: the batch holding 6 stops the run
    {
        Loader loader(ds, options);
        CHECK(loader.next().has_value());
        CHECK_THROWS_WITH_AS(loader.next(),
                             doctest::Contains("stopping: 3 of the 20 images could not be read (the "
                                               "first: sample6: bad bytes)"),
                             Error);
    }

    options.max_bad_fraction = 0;  // no tolerance
    ds->unreadable = {19};
    {
        Loader strict(ds, options);
        CHECK(strict.next().has_value());
        CHECK(strict.next().has_value());
        CHECK(strict.next().has_value());
        CHECK_THROWS_WITH_AS(strict.next(),
                             doctest::Contains("1 of the 20 images could not be read (the first: "
                                               "sample19: bad bytes); --max-bad-fraction 0 allows 0 of 20"),
                             Error);
    }

    // Every image unreadable: even a limit of 1 lets one fewer go, so the
    // run stops instead of searching forever.
    options.max_bad_fraction = 1;
    for (int64_t i = 0; i < 20; ++i) ds->unreadable.insert(i);
    {
        Loader hopeless(ds, options);
        CHECK_THROWS_WITH_AS(hopeless.next(),
                             doctest::Contains("20 of the 20 images could not be read (the first: "
                                               "sample0: bad bytes); --max-bad-fraction 1 allows 19 of 20"),
                             Error);
    }

    // The allowed count is the fraction of the size rounded down, without
    // binary rounding losing one: 0.29 * 100 is 28.999999999999996.
    auto hundred = std::make_shared<RecordingDataset>(100);
    for (int64_t i = 0; i < 30; ++i) hundred->unreadable.insert(i);
    options.batch_size = 100;
    options.max_bad_fraction = 0.29;
    {
        Loader loader(hundred, options);
        CHECK_THROWS_WITH_AS(loader.next(), doctest::Contains("--max-bad-fraction 0.29 allows 29 of 100"), Error);
    }
}

TEST_CASE("the parts of N loaders put together are the single loader's batches, bit for bit") {
    // 23 = 3 * 6 + 5 and 25 = 4 * 6 + 1: without drop_last the last batch
    // splits unevenly, and for 25 it leaves parts empty.
    for (const int64_t n : {23, 25}) {
        auto ds = std::make_shared<RecordingDataset>(n);
        ds->unreadable = {7};  // replaced the same way in any part
        for (const bool drop_last : {false, true}) {
            for (const LoaderPosition start : {LoaderPosition{0, 0}, LoaderPosition{0, 2}}) {
                CAPTURE(n);
                CAPTURE(drop_last);
                CAPTURE(start.batch);
                CaptureStderr log;
                LoaderOptions options;
                options.batch_size = 6;
                options.drop_last = drop_last;
                options.seed = 5;
                options.max_bad_fraction = 0.1;
                Loader single(ds, options, start, 2);  // two epochs: the order is reshuffled
                const auto expected = drain(single);
                REQUIRE(expected.size() == size_t(2 * single.batches_per_epoch() - start.batch));
                for (const int parts : {2, 3}) {
                    CAPTURE(parts);
                    std::vector<std::vector<Batch>> got;
                    for (int part = 0; part < parts; ++part) {
                        options.part = part;
                        options.parts = parts;
                        options.threads = 1 + part % 2;
                        Loader loader(ds, options, start, 2);
                        CHECK(loader.batches_per_epoch() == single.batches_per_epoch());
                        CHECK(loader.position().batch == start.batch);
                        got.push_back(drain(loader));
                        CHECK(loader.position().epoch == single.position().epoch);
                        CHECK(loader.position().batch == single.position().batch);
                    }
                    options.part = 0;
                    options.parts = 1;
                    options.threads = 1;
                    int empty = 0;
                    for (size_t b = 0; b < expected.size(); ++b) {
                        std::vector<float> pixels;
                        std::vector<int32_t> labels;
                        std::vector<int64_t> indices, skipped;
                        for (int part = 0; part < parts; ++part) {
                            REQUIRE(got[part].size() == expected.size());
                            const Batch& p = got[part][b];
                            CHECK(p.epoch == expected[b].epoch);
                            CHECK(p.index == expected[b].index);
                            CHECK(p.images.shape() == Shape{p.size(), 1, 3, 1});
                            empty += p.size() == 0;
                            const std::vector<float> v = p.images.to_vector();
                            pixels.insert(pixels.end(), v.begin(), v.end());
                            labels.insert(labels.end(), p.labels.begin(), p.labels.end());
                            indices.insert(indices.end(), p.indices.begin(), p.indices.end());
                            for (const SkippedSample& s : p.skipped) skipped.push_back(s.index);
                        }
                        CHECK(pixels == expected[b].images.to_vector());
                        CHECK(labels == expected[b].labels);
                        CHECK(indices == expected[b].indices);
                        std::vector<int64_t> expected_skipped;
                        for (const SkippedSample& s : expected[b].skipped) expected_skipped.push_back(s.index);
                        CHECK(skipped == expected_skipped);
                    }
                    // The last batch of 1 (n = 25, no drop_last) in each epoch
                    // leaves parts - 1 parts empty.
                    CHECK(empty == (n == 25 && !drop_last ? 2 * (parts - 1) : 0));
                }
            }
        }
    }
}

TEST_CASE("an exception in a loader thread reaches the consumer in order, as hfq::Error") {
    auto ds = std::make_shared<RecordingDataset>(16);
    ds->failing = 9;
    LoaderOptions options;
    options.batch_size = 4;
    options.shuffle = false;
    options.threads = 2;
    Loader loader(ds, options);
    CHECK(loader.next().has_value());
    CHECK(loader.next().has_value());
    CHECK_THROWS_WITH_AS(loader.next(), doctest::Contains("disk on fire"), Error);
    CHECK_THROWS_WITH_AS(loader.next(), doctest::Contains("disk on fire"), Error);
}

TEST_CASE("the loader shuts down promptly when the consumer stops early") {
    auto ds = std::make_shared<RecordingDataset>(2000);
    ds->delay = std::chrono::microseconds(500);
    LoaderOptions options;
    options.batch_size = 8;
    options.threads = 2;
    options.prefetch_batches = 2;
    const auto t0 = std::chrono::steady_clock::now();
    {
        Loader loader(ds, options);
        CHECK(loader.next().has_value());
    }  // queue full or a batch in flight: must not hang
    { Loader never_read(ds, options); }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CHECK(seconds < 0.5);           // 2000 loads would take >= 0.5 s
    CHECK(ds->loads.load() < 200);  // only the prefetched batches were loaded
}

TEST_CASE("bad loader settings fail clearly") {
    auto ds = std::make_shared<RecordingDataset>(10);
    auto make = [&](LoaderOptions o, LoaderPosition start = {}) { Loader loader(ds, o, start); };
    CHECK_THROWS_WITH_AS(make({.batch_size = 0}), doctest::Contains("batch_size must be positive"), Error);
    CHECK_THROWS_WITH_AS(make({.threads = 0}), doctest::Contains("threads must be at least 1"), Error);
    CHECK_THROWS_WITH_AS(make({.prefetch_batches = 0}), doctest::Contains("prefetch_batches"), Error);
    CHECK_THROWS_WITH_AS(make({.max_bad_fraction = 1.5}),
                         doctest::Contains("max_bad_fraction must be in [0, 1], got 1.5"), Error);
    CHECK_THROWS_WITH_AS(make({.max_bad_fraction = -0.1}), doctest::Contains("max_bad_fraction"), Error);
    CHECK_THROWS_WITH_AS(make({.batch_size = 11, .drop_last = true}), doctest::Contains("no full batch"), Error);
    CHECK_THROWS_WITH_AS(make({.batch_size = 4}, {0, 3}), doctest::Contains("outside an epoch of 3 batches"), Error);
    CHECK_THROWS_WITH_AS(make({.part = 2, .parts = 2}), doctest::Contains("part must be in 0..1 for 2 parts, got 2"),
                         Error);
    CHECK_THROWS_WITH_AS(make({.part = -1}), doctest::Contains("part must be in 0..0 for 1 parts, got -1"), Error);
    CHECK_THROWS_WITH_AS(make({.parts = 0}), doctest::Contains("parts must be at least 1, got 0"), Error);
    CHECK_THROWS_WITH_AS(Loader(nullptr, {}), doctest::Contains("no dataset"), Error);
}
