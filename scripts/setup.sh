#!/usr/bin/env bash
# Installs, with apt, whatever of hfq's Debian 12 packages is missing.
# Idempotent: when everything is present it only checks and returns.
#
#   bash scripts/setup.sh          # install what is missing
#   bash scripts/setup.sh --list   # print the packages, one a line
#
# `packages` is the list of what a fresh Debian 12 needs for scripts/train.sh
# and scripts/test.sh, a reason per package; `node_packages` are installed only
# when `node` / `npm` are not on PATH (a machine with another Node.js, e.g.
# nodesource's, keeps it: Debian's npm conflicts with it). The README's table
# shows both lists; the ctest setup_packages_in_readme checks that the table
# names exactly these packages (--list prints both).
#
# Then onnxruntime-node, pinned in tests/onnx/package-lock.json, goes into
# tests/onnx/node_modules (test_onnx_export runs export.onnx in it):
# `npm ci --ignore-scripts`, since its install script fetches GPU providers
# from outside the npm registry (and the CPU provider ships in the package).
set -euo pipefail

packages=(
  cmake                    # configures the builds; its ctest runs the tests
  ninja-build              # builds them (-G Ninja in scripts/build.sh and scripts/fuzz.sh)
  g++                      # compiles the Release and sanitizer builds (GCC 12, its ASan and UBSan)
  libdnnl-dev              # oneDNN 2.6.3: the convolution, pooling and matrix-product kernels
  ocl-icd-opencl-dev       # OpenCL, which oneDNN's CMake config requires
  libopencv-core-dev       # OpenCV's core: matrices for decoding, resizing and the plots
  libopencv-imgproc-dev    # OpenCV: resizing, colour conversion, drawing the study's figures
  libopencv-imgcodecs-dev  # OpenCV: decoding non-JPEG images, writing PNG figures
  libturbojpeg0-dev        # libjpeg-turbo: JPEG decoding at a reduced DCT scale
  libtbb-dev               # oneTBB: the data loader's threads
  zlib1g-dev               # reads Fashion-MNIST's gzip files
  doctest-dev              # the test framework
  libcli11-dev             # every program's command-line options
  nlohmann-json3-dev       # JSON: safetensors headers, configs, metrics
  clang                    # the fuzz build (scripts/fuzz.sh): libFuzzer comes with clang
  libclang-rt-14-dev       # libFuzzer and clang's ASan and UBSan runtimes
  libomp-14-dev            # clang's OpenMP runtime (the fuzz build's configure needs OpenMP_CXX)
  dataset-fashion-mnist    # the default data set (scripts/train.sh, the Fashion-MNIST tests)
  python3                  # the walkthrough_references test (standard library only)
  libopenmpi-dev           # Open MPI: data-parallel training (MPI_Allreduce of the gradients)
  openmpi-bin              # mpirun: starts the ranks of a data-parallel run (and the MPI tests)
  libonnx-dev              # ONNX 1.12: export.onnx's generated protobuf classes and its checker
  libprotobuf-dev          # protobuf, which ONNX's classes are built on (and its CMake config needs)
)
node_packages=(
  nodejs                   # runs onnxruntime-node, which test_onnx_export checks export.onnx in
  npm                      # installs onnxruntime-node from tests/onnx/package-lock.json
)

if [ "${1:-}" = --list ]; then
  printf '%s\n' "${packages[@]}" "${node_packages[@]}"
  exit 0
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# onnxruntime-node, unless the installed one is the lock file's (fast when it is).
onnx_dir="$(cd "$(dirname "$0")/.." && pwd)/tests/onnx"
if ! cmp -s "$onnx_dir/package-lock.json" "$onnx_dir/node_modules/.package-lock.json.hfq" 2>/dev/null; then
  echo "setup: installing onnxruntime-node into $onnx_dir/node_modules"
  (cd "$onnx_dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
  cp "$onnx_dir/package-lock.json" "$onnx_dir/node_modules/.package-lock.json.hfq"
fi
