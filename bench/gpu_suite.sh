#!/usr/bin/env bash
# Every GPU check and benchmark in one run (a lent H100/H200 has ~15 minutes): correctness in
# bf16 and fp16 (GradScaler path), training throughput/MFU vs the plain loop, sampling.
#   bash bench/gpu_suite.sh 2>&1 | tee gpu_suite.log
# Needs a .venv with the package installed (make setup). Figures go in BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

echo "== correctness: 200 steps of digits-small in fp32, bf16, fp16 (loss must fall, stay finite)"
for mp in no bf16 fp16; do
    $PY train_ddpm.py --output-dir "$OUT/ok-$mp" --resume none --max-steps 200 --log-every 50 \
        --sample-every 0 --num-sample-images 16 --report-to none --mixed-precision $mp \
        > "$OUT/ok-$mp.log" 2>&1 || echo "FAILED: $mp (see $OUT/ok-$mp.log)"
    $PY - "$OUT/ok-$mp" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if "loss" in l]
print(sys.argv[1], [round(r["loss"], 4) for r in rows], "nonfinite", rows[-1].get("nonfinite_steps"))
PY
done

echo "== training throughput, ddpm-cifar10 bf16 vs plain fp32 loop, batch 128 and 256"
$PY bench/train_step.py --models ddpm-cifar10,unet-18.5m,unet-4.7m,basic --batch-sizes 128 \
    --steps 30 --rounds 2 --mixed-precision bf16 --plain-precision no
$PY bench/train_step.py --models ddpm-cifar10 --batch-sizes 256 --steps 20 --rounds 1 \
    --mixed-precision bf16 --plain-precision bf16 --channels-last
$PY bench/train_step.py --models ddpm-cifar10 --batch-sizes 128 --steps 30 --rounds 1 \
    --mixed-precision bf16 --plain-precision bf16 --channels-last --compile

echo "== data path"
$PY bench/data_loading.py --num-batches 40

echo "== sampling"
$PY bench/sampling.py --preset ddpm-cifar10 --resolution 32 --channels 3 \
    --batch-sizes 256,1024 --mixed-precision bf16 --samplers ddim:50,dpm-solver:20
