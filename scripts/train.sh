#!/usr/bin/env bash
# The main job: set-up, Release build, then train_mobilenet with its defaults
# (Fashion-MNIST, small-input MobileNetV1, float training then 4-bit msqe-po2
# QAT). Extra arguments go to train_mobilenet (see train_mobilenet --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
exec ./build/train_mobilenet "$@"
