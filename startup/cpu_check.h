// The start-up CPU check. hfq is compiled for the CPUs HFQ_ARCH_FLAGS names
// (CMakeLists.txt; by default -march=x86-64-v3: AVX2, FMA, BMI2, ...), so on
// a CPU without those features the first such instruction would kill the
// program with "Illegal instruction". Instead, every program that links the
// engine (apps/, tests/, the fuzz targets) checks the CPU before any code
// compiled with those flags runs and, when a feature is missing, prints
//
//   train_mobilenet: hfq was built for -march=x86-64-v3 (CMake option HFQ_ARCH_FLAGS), but this CPU lacks avx2 fma.
//   Rebuild it for this CPU: bash scripts/build.sh -DHFQ_ARCH_FLAGS=-march=native
//
// to stderr and exits with status 1.
//
// Test hook: the environment variable HFQ_PRETEND_CPU_LACKS (feature names,
// comma- or space-separated, e.g. HFQ_PRETEND_CPU_LACKS=avx2,fma) makes the
// check act as if this CPU lacked them (tests/test_cpu_check.cpp).
//
// Only declarations here: an inline function in this header would be
// compiled once for x86-64-v3 and once for the baseline, and the linker
// would keep either.
#pragma once

namespace hfq {

// The CPU features the compiler may use in this build: those HFQ_ARCH_FLAGS
// turns on (sse3 ... movbe for x86-64-v3), ending with nullptr.
extern const char* const kCpuFeaturesUsed[];

// The features of kCpuFeaturesUsed that this CPU lacks, or that
// HFQ_PRETEND_CPU_LACKS names, separated by spaces in that list's order; ""
// when none. The text stays valid until the next call.
const char* missing_cpu_features();

}  // namespace hfq
