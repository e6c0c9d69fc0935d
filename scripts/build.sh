#!/usr/bin/env bash
# Configures and builds hfq in build/ (Release), or with HFQ_SANITIZE=1 the
# AddressSanitizer + UndefinedBehaviorSanitizer build in build-asan/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${HFQ_SANITIZE:-0}" = 1 ]; then
  dir=build-asan; extra=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DHFQ_SANITIZE=ON)
else
  dir=build; extra=(-DCMAKE_BUILD_TYPE=Release)
fi
cmake -S . -B "$dir" -G Ninja "${extra[@]}" "$@" > "$dir.configure.log" 2>&1 || { cat "$dir.configure.log"; exit 1; }
cmake --build "$dir" -j "$(nproc)"
