#!/usr/bin/env bash
# Training throughput of hfq and of the PyTorch baseline, the workplace's
# script torch_baseline.py (in ../shared/bench, not part of this repository;
# run with its tuned settings: channels-last, jemalloc, OpenBLAS), one after
# the other on this machine, and the ratio hfq / PyTorch for every
# configuration. Run it on a quiet machine.
#
#   bash scripts/bench_vs_torch.sh [--models v1,v2] [--res 224,32] [--quants none,msqe,lsq]
#
# Quantized configurations: 4-bit per-tensor weight quantizers on every conv
# and linear layer in both programs (hfq_bench's header says how they match).
set -euo pipefail
cd "$(dirname "$0")/.."
models=v1,v2; res=224,32; quants=none,msqe,lsq
while (($#)); do case $1 in --models) models=$2; shift 2;; --res) res=$2; shift 2;; --quants) quants=$2; shift 2;;
  *) echo "bench_vs_torch: unknown option $1" >&2; exit 2;; esac; done

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
for p in python3-torch python3-torchvision libjemalloc2; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$p"
done
blas=build/openblas-openmp/usr/lib/x86_64-linux-gnu/openblas-openmp
if [ ! -d "$blas" ]; then  # the baseline's header: OpenBLAS for nn.Linear, not the system's netlib BLAS
  (mkdir -p build/openblas-deb && cd build/openblas-deb && apt-get download -qq libopenblas0-openmp &&
   dpkg -x libopenblas0-openmp_*.deb ../openblas-openmp)
fi
bash scripts/build.sh >/dev/null

out=build/bench; mkdir -p "$out"
./build/hfq_bench --machine --models "$models" --res "$res" --quants "$quants" --json "$out/hfq.json"
/usr/bin/python3 ../shared/bench/torch_baseline.py --models "$models" --res "$res" --quants "$quants" \
  --formats channels_last --mallocs jemalloc --blas-dir "$blas" --min-time 10 --json "$out/torch.json" | tail -n 8
/usr/bin/python3 - "$out/hfq.json" "$out/torch.json" <<'PY'
import json, sys
hfq = {(r["model"], r["res"], r["quant"]): r for r in json.load(open(sys.argv[1]))["models"]}
torch = {(r["model"], r["res"], r["quant"]): r for r in json.load(open(sys.argv[2]))["results"]}
print(f"\n{'model':6}{'res':>5} {'quant':6}{'hfq img/s':>12}{'torch img/s':>13}{'ratio':>8}"
      f"{'hfq MB':>9}{'torch MB':>10}{'MB ratio':>10}")
for key in sorted(hfq):
    if key in torch:
        h, t = hfq[key], torch[key]
        print(f"{key[0]:6}{key[1]:>5} {key[2]:6}{h['train_img_s']:12.1f}{t['train_img_s']:13.1f}"
              f"{h['train_img_s'] / t['train_img_s']:8.2f}{h['peak_rss_mb']:9.0f}{t['peak_rss_mb']:10.0f}"
              f"{h['peak_rss_mb'] / t['peak_rss_mb']:10.2f}")
PY
