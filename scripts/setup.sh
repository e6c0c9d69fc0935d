#!/usr/bin/env bash
# Installs, with apt, whatever of hfq's Debian 12 packages is missing.
# Idempotent: when everything is present it only checks and returns.
set -euo pipefail

packages=(
  cmake g++ ninja-build pkg-config
  libdnnl-dev ocl-icd-opencl-dev          # oneDNN 2.6.3 (its CMake config needs OpenCL's)
  libopencv-core-dev libopencv-imgproc-dev libopencv-imgcodecs-dev
  libturbojpeg0-dev libtbb-dev zlib1g-dev
  doctest-dev libcli11-dev nlohmann-json3-dev
  clang libclang-rt-14-dev                # libFuzzer target for the safetensors reader
  dataset-fashion-mnist                   # the default data set
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
