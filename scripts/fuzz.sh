#!/usr/bin/env bash
# Fuzzes the safetensors reader: builds tests/fuzz_safetensors.cpp with clang
# (libFuzzer + AddressSanitizer + UndefinedBehaviorSanitizer) in build-fuzz/,
# then runs it for the given number of seconds (default 30) on a scratch copy
# of the seed corpus tests/data/safetensors_corpus/.
# Exits non-zero when the fuzzer finds a crash, a hang, a sanitizer report or
# an allocation over 64 MB (a lying header); the input that did it is saved as
# build-fuzz/artifacts/crash-* (or timeout-*, oom-*) for replay:
#   build-fuzz/fuzz_safetensors build-fuzz/artifacts/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
dir=build-fuzz

cmake -S . -B "$dir" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHFQ_FUZZ=ON \
  > "$dir.configure.log" 2>&1 || { cat "$dir.configure.log"; exit 1; }
cmake --build "$dir" --target fuzz_safetensors -j "$(nproc)"

# The fuzzer adds the inputs it finds to its corpus folder: keep the
# committed seeds untouched.
corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
cp tests/data/safetensors_corpus/*.safetensors "$corpus/"
mkdir -p "$dir/artifacts"
"$dir/fuzz_safetensors" "$corpus" -dict=tests/data/fuzz_safetensors.dict -max_total_time="$seconds" \
  -timeout=10 -malloc_limit_mb=64 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$dir/artifacts/"
