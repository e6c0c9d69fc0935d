#!/usr/bin/env bash
# The trainer's QAT step against hfq's float step and against torch.ao's QAT
# (the workplace's torch_ao_qat.py, in ../shared/bench, not part of this
# repository: torchvision's quantizable MobileNetV2, conv + batch norm fused,
# 4-bit per-channel weights), measured one after the other in this run. Run
# it on a quiet machine.
#
#   bash scripts/bench_qat_vs_torch.sh [--models v1,v2] [--res 224] [--rounds 2]
#
# hfq's QAT rows are train_mobilenet's default QAT (folded, per channel,
# 4-bit msqe-po2, first and last layer 8 bits) in its two phases: batch
# statistics from the quantized convolution (quantized-conv) until
# --freeze-bn-at, the moving statistics after it (frozen); "default" is the
# step the trainer's default QAT takes on average (half of each: the time
# per image averaged). float-conv is the former default's batch statistics.
# GFLOP/s is the float step's (3 x 2 x MACs per image x img/s), to hold
# against the FMA peak that the --machine line prints first.
set -euo pipefail
cd "$(dirname "$0")/.."
models=v1,v2; res=224; rounds=2
while (($#)); do case $1 in --models) models=$2; shift 2;; --res) res=$2; shift 2;; --rounds) rounds=$2; shift 2;;
  *) echo "bench_qat_vs_torch: unknown option $1" >&2; exit 2;; esac; done

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
for p in python3-torch python3-torchvision; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$p"
done
bash scripts/build.sh >/dev/null

out=build/bench-qat; mkdir -p "$out"
./build/hfq_bench --machine --models v1 --res 32 --quants none --steps 1 --min-time 0 | grep -i "peak\|copy" || true
for round in $(seq 1 "$rounds"); do
  ./build/hfq_bench --models "$models" --res "$res" --quants none --json "$out/float$round.json" >/dev/null
  ./build/hfq_bench --models "$models" --res "$res" --quants msqe --trainer-qat --bn-stats quantized-conv \
    --json "$out/qconv$round.json" >/dev/null
  ./build/hfq_bench --models "$models" --res "$res" --quants msqe --trainer-qat --bn-frozen \
    --json "$out/frozen$round.json" >/dev/null
  ./build/hfq_bench --models "$models" --res "$res" --quants msqe --trainer-qat --bn-stats float-conv \
    --json "$out/floatconv$round.json" >/dev/null
  for r in ${res//,/ }; do
    /usr/bin/python3 ../shared/bench/torch_ao_qat.py --threads 2 --res "$r" > "$out/torch_ao${round}_$r.json"
  done
done
/usr/bin/python3 - "$out" "$rounds" "$models" "$res" <<'PY'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
models, resolutions = sys.argv[3].split(","), [int(r) for r in sys.argv[4].split(",")]
def rows(name, k):
    return {(r["model"], r["res"]): r for r in json.load(open(f"{out}/{name}{k}.json"))["models"]}
print(f"{'round':5} {'model':5}{'res':>5} {'float':>7} {'qconv':>7} {'frozen':>7} {'default':>8} {'fl-conv':>8}"
      f" {'GFLOP/s':>8} {'float/default':>14} {'torch.ao':>9} {'default/ao':>11} {'MB: float':>10} {'default':>8} {'fl-conv':>8} {'ao':>6}")
for k in range(1, rounds + 1):
    fl, qc, fr, fc = (rows(n, k) for n in ("float", "qconv", "frozen", "floatconv"))
    for m in models:
        for res in resolutions:
            key = (m, res)
            a, b = qc[key]["train_img_s"], fr[key]["train_img_s"]
            default = 2 / (1 / a + 1 / b)  # half the steps each: the mean time per image
            peak = max(qc[key]["peak_rss_mb"], fr[key]["peak_rss_mb"])
            ao = json.load(open(f"{out}/torch_ao{k}_{res}.json")) if m == "v2" else None
            f = fl[key]["train_img_s"]
            print(f"{k:5} {m:5}{res:5} {f:7.1f} {a:7.1f} {b:7.1f} {default:8.1f} {fc[key]['train_img_s']:8.1f}"
                  f" {fl[key]['train_gflop_s']:8.0f} {f / default:14.2f}" +
                  (f" {ao['train_img_s']:9.1f} {default / ao['train_img_s']:11.2f}" if ao else f" {'':9} {'':11}") +
                  f" {fl[key]['peak_rss_mb']:10.0f} {peak:8.0f} {fc[key]['peak_rss_mb']:8.0f}" +
                  (f" {ao['peak_rss_mb']:6.0f}" if ao else ""))
PY
