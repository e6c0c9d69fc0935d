#!/usr/bin/env bash
# The whole test-suite: set-up, Release build + ctest, then the same suite
# built with AddressSanitizer + UndefinedBehaviorSanitizer + ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
(cd build && ctest --output-on-failure -j 2)
HFQ_SANITIZE=1 bash scripts/build.sh
# oneDNN's JIT and OpenMP runtime keep some memory until exit: leak checking
# would report them, so only memory errors fail here.
(cd build-asan && ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -j 2)
# A short fuzzing run of the safetensors reader (libFuzzer, clang); the long
# run's figures are in the README.
bash scripts/fuzz.sh 60
