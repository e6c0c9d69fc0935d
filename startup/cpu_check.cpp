// The start-up CPU check (cpu_check.h). This file must run on any x86-64
// CPU, so CMakeLists.txt compiles it for the baseline (-march=x86-64), and it
// uses C library functions only: a C++ template or inline function used here
// would also be compiled in the files built for x86-64-v3, and the linker
// keeps one copy, perhaps that one.
#include "startup/cpu_check.h"

#include <cpuid.h>
#include <errno.h>  // program_invocation_short_name

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__AVX__) || defined(__BMI__) || defined(__LZCNT__) || defined(__MOVBE__)
#error "cpu_check.cpp must be compiled for baseline x86-64: it runs before the CPU is known to have these"
#endif

namespace hfq {
namespace {

struct CpuFeature {
    const char* name;  // as kCpuFeaturesUsed and GCC's -m options spell it
    bool present;
};

// x86-64-v2, -v3 and -v4 add these to the baseline.
constexpr int kFeatures = 19;
struct CpuReport {
    CpuFeature features[kFeatures];
};

// Extended control register 0: which register sets the operating system
// saves on a context switch. Only valid when CPUID reports OSXSAVE.
uint64_t xcr0() {
    uint32_t low, high;
    __asm__("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
    return (static_cast<uint64_t>(high) << 32) | low;
}

// What CPUID says. (Not __builtin_cpu_supports: clang 14's, used by the fuzz
// build, knows neither f16c nor lzcnt nor movbe.)
CpuReport read_cpu() {
    unsigned a = 0, b = 0, c1 = 0, d = 0, b7 = 0, c7 = 0, c8 = 0;
    __get_cpuid(1, &a, &b, &c1, &d);
    __get_cpuid_count(7, 0, &a, &b7, &c7, &d);
    __get_cpuid(0x80000001, &a, &b, &c8, &d);
    // The AVX and AVX-512 registers work only when the operating system
    // saves them: XCR0 bits 1-2 (SSE and AVX state), 5-7 (AVX-512 state).
    const uint64_t saved = (c1 & bit_OSXSAVE) ? xcr0() : 0;
    const bool avx_os = (saved & 0x06) == 0x06;
    const bool avx512_os = (saved & 0xe6) == 0xe6;
    return {{
        {"sse3", (c1 & bit_SSE3) != 0},
        {"ssse3", (c1 & bit_SSSE3) != 0},
        {"sse4.1", (c1 & bit_SSE4_1) != 0},
        {"sse4.2", (c1 & bit_SSE4_2) != 0},
        {"popcnt", (c1 & bit_POPCNT) != 0},
        {"avx", avx_os && (c1 & bit_AVX)},
        {"avx2", avx_os && (b7 & bit_AVX2)},
        {"bmi", (b7 & bit_BMI) != 0},
        {"bmi2", (b7 & bit_BMI2) != 0},
        {"f16c", avx_os && (c1 & bit_F16C)},
        {"fma", avx_os && (c1 & bit_FMA)},
        {"lzcnt", (c8 & bit_LZCNT) != 0},
        {"movbe", (c1 & bit_MOVBE) != 0},
        {"xsave", (c1 & bit_XSAVE) != 0},
        {"avx512f", avx512_os && (b7 & bit_AVX512F)},
        {"avx512bw", avx512_os && (b7 & bit_AVX512BW)},
        {"avx512cd", avx512_os && (b7 & bit_AVX512CD)},
        {"avx512dq", avx512_os && (b7 & bit_AVX512DQ)},
        {"avx512vl", avx512_os && (b7 & bit_AVX512VL)},
    }};
}

// A feature missing from the report (a name added to kCpuFeaturesUsed but
// not here) counts as absent, so test_cpu_check notices it.
bool has(const CpuReport& cpu, const char* name) {
    for (const CpuFeature& f : cpu.features)
        if (std::strcmp(f.name, name) == 0) return f.present;
    return false;
}

// Whether `name` is one of the comma- or space-separated words of `list`.
bool named_in(const char* list, const char* name) {
    if (list == nullptr) return false;
    const size_t length = std::strlen(name);
    for (const char* word = list; *word != '\0';) {
        const char* end = word;
        while (*end != '\0' && *end != ',' && *end != ' ') ++end;
        if (static_cast<size_t>(end - word) == length && std::strncmp(word, name, length) == 0) return true;
        word = *end != '\0' ? end + 1 : end;
    }
    return false;
}

// Runs before anything else of the program. The linker orders the
// executable's start-up functions by priority (0-100 are reserved for the C
// and C++ runtimes), and 101 comes before every C++ static initialiser and
// every constructor of default priority: those are compiled with
// HFQ_ARCH_FLAGS, and an initialiser can use AVX2 (an inlined, vectorised
// loop, or just VEX-encoded copies). Shared libraries (libc, libstdc++,
// oneDNN, oneTBB, OpenCV) initialise before the executable, but they are
// Debian's builds for the baseline. (Sanitizer builds give every file a
// start-up function of a lower priority, which only registers the file's
// globals: a few moves and calls into the sanitizer runtime.)
__attribute__((constructor(101))) void check_cpu_at_startup() {
    const char* missing = missing_cpu_features();
    if (*missing == '\0') return;
    std::fprintf(stderr,
                 "%s: hfq was built for %s (CMake option HFQ_ARCH_FLAGS), but this CPU lacks %s.\n"
                 "Rebuild it for this CPU: bash scripts/build.sh -DHFQ_ARCH_FLAGS=-march=native\n",
                 program_invocation_short_name, HFQ_ARCH_FLAGS, missing);
    std::_Exit(1);  // nothing compiled for HFQ_ARCH_FLAGS may run, not even exit handlers
}

}  // namespace

const char* missing_cpu_features() {
    // Every feature name once, with spaces, is far shorter than this.
    static char missing[kFeatures * 12];
    missing[0] = '\0';
    const CpuReport cpu = read_cpu();
    const char* pretend = std::getenv("HFQ_PRETEND_CPU_LACKS");
    for (const char* const* name = kCpuFeaturesUsed; *name != nullptr; ++name)
        if (!has(cpu, *name) || named_in(pretend, *name)) {
            if (missing[0] != '\0') std::strcat(missing, " ");
            std::strcat(missing, *name);
        }
    return missing;
}

}  // namespace hfq
