// The CPU features the compiler may use in this build (cpu_check.h): those
// the build's -march flags (HFQ_ARCH_FLAGS) turn on, read from the macros the
// compiler predefines for them. This file is compiled with those flags, like
// all of hfq except cpu_check.cpp, and holds data only: the start-up check
// can read it on any CPU. constinit: the list is part of the program image,
// complete before any start-up code runs.
#include "startup/cpu_check.h"

namespace hfq {

constinit const char* const kCpuFeaturesUsed[] = {
#ifdef __SSE3__
    "sse3",
#endif
#ifdef __SSSE3__
    "ssse3",
#endif
#ifdef __SSE4_1__
    "sse4.1",
#endif
#ifdef __SSE4_2__
    "sse4.2",
#endif
#ifdef __POPCNT__
    "popcnt",
#endif
#ifdef __AVX__
    "avx",
#endif
#ifdef __AVX2__
    "avx2",
#endif
#ifdef __BMI__
    "bmi",
#endif
#ifdef __BMI2__
    "bmi2",
#endif
#ifdef __F16C__
    "f16c",
#endif
#ifdef __FMA__
    "fma",
#endif
#ifdef __LZCNT__
    "lzcnt",
#endif
#ifdef __MOVBE__
    "movbe",
#endif
#ifdef __XSAVE__
    "xsave",
#endif
#ifdef __AVX512F__
    "avx512f",
#endif
#ifdef __AVX512BW__
    "avx512bw",
#endif
#ifdef __AVX512CD__
    "avx512cd",
#endif
#ifdef __AVX512DQ__
    "avx512dq",
#endif
#ifdef __AVX512VL__
    "avx512vl",
#endif
    nullptr,
};

}  // namespace hfq
