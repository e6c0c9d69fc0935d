// The start-up CPU check (startup/cpu_check.h): the list of missing
// features on this CPU and under the test hook HFQ_PRETEND_CPU_LACKS, and
// every program of apps/ and tests/, run with the hook, stopping with the
// message and exit status 1 before doing anything else.
#include <doctest/doctest.h>

#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "startup/cpu_check.h"
#include "tests/test_data_util.h"

using namespace hfq;
namespace fs = std::filesystem;

namespace {

std::vector<std::string> features_used() {
    std::vector<std::string> out;
    for (const char* const* name = kCpuFeaturesUsed; *name != nullptr; ++name) out.push_back(*name);
    return out;
}

bool used(const std::string& feature) {
    for (const std::string& f : features_used())
        if (f == feature) return true;
    return false;
}

// missing_cpu_features() with HFQ_PRETEND_CPU_LACKS set to `pretend`.
std::string missing_pretending(const char* pretend) {
    setenv("HFQ_PRETEND_CPU_LACKS", pretend, 1);
    const std::string missing = missing_cpu_features();
    unsetenv("HFQ_PRETEND_CPU_LACKS");
    return missing;
}

// The programs built from apps/*.cpp and tests/test_*.cpp, which sit next to
// this test in the build folder.
std::vector<fs::path> programs() {
    const fs::path source = fs::path(HFQ_TEST_DATA_DIR).parent_path().parent_path();
    const fs::path build = fs::read_symlink("/proc/self/exe").parent_path();
    std::vector<fs::path> out;
    for (const char* dir : {"apps", "tests"})
        for (const auto& entry : fs::directory_iterator(source / dir)) {
            const fs::path src = entry.path();
            if (src.extension() == ".cpp" && (std::string(dir) == "apps" || src.stem().string().starts_with("test_")))
                out.push_back(build / src.stem());
        }
    return out;
}

}  // namespace

TEST_CASE("missing_cpu_features: none on this CPU; the test hook takes features away") {
    unsetenv("HFQ_PRETEND_CPU_LACKS");
    // This program runs, so the CPU has what the build uses; a name in
    // kCpuFeaturesUsed that the check does not know would show up here.
    CHECK(std::string(missing_cpu_features()) == "");

    if (used("avx2") && used("fma")) {  // the default build, x86-64-v3
        CHECK(missing_pretending("avx2,fma") == "avx2 fma");
        CHECK(missing_pretending("fma avx2") == "avx2 fma");  // in kCpuFeaturesUsed's order
        CHECK(missing_pretending("fma") == "fma");
        CHECK(missing_pretending("avx") == "avx");  // not also avx2: the words are matched whole
    }
    CHECK(missing_pretending("no-such-feature") == "");  // only features the build uses can be missing
    CHECK(missing_pretending("") == "");

    std::string all, listed;
    for (const std::string& f : features_used()) {
        all += (all.empty() ? "" : ",") + f;
        listed += (listed.empty() ? "" : " ") + f;
    }
    CHECK(missing_pretending(all.c_str()) == listed);
}

TEST_CASE("every program stops at start-up with the message and exit status 1 when the CPU lacks a feature") {
    const std::vector<std::string> used_features = features_used();
    if (used_features.empty()) {
        MESSAGE("this build uses no CPU feature beyond baseline x86-64: nothing can be missing");
        return;
    }
    const std::string lacking = used("avx2") ? "avx2" : used_features.front();
    test::TempDir dir;
    const std::vector<fs::path> all = programs();
    CHECK(all.size() > 10);
    for (const fs::path& program : all) {
        INFO(program.string());
        REQUIRE_MESSAGE(fs::exists(program), "not built");
        const std::string err_file = dir / "stderr.txt";
        // --help: a program that did not stop would exit soon anyway (with 0).
        const int status = std::system(
            ("HFQ_PRETEND_CPU_LACKS=" + lacking + " " + program.string() + " --help >/dev/null 2>" + err_file).c_str());
        REQUIRE(WIFEXITED(status));
        CHECK(WEXITSTATUS(status) == 1);
        std::ifstream in(err_file);
        const std::string err((std::istreambuf_iterator<char>(in)), {});
        INFO(err);
        CHECK(err.starts_with(program.filename().string() + ": hfq was built for "));
        CHECK(err.find(" (CMake option HFQ_ARCH_FLAGS), but this CPU lacks " + lacking + ".\n") != std::string::npos);
        CHECK(err.ends_with("Rebuild it for this CPU: bash scripts/build.sh -DHFQ_ARCH_FLAGS=-march=native\n"));
    }
}
