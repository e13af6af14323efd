#!/usr/bin/env bash
# Every CPU figure of BENCHMARKS.md, one script after the other, on a quiet machine (nothing
# else running: these are timings). Each script's output goes to OUT/<name>.txt.
#   bash bench/cpu_suite.sh [OUT=runs/bench-cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench-cpu}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
mkdir -p "$OUT"
if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
    echo "warning: the tree has uncommitted changes; figures belong to a commit" >&2
fi
git rev-parse --short HEAD > "$OUT/commit.txt"
run() {  # name, command...
    local name=$1; shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "($((SECONDS - start)) s)" | tee -a "$OUT/$name.txt"
}
run host_time $PY bench/host_time.py --steps 100 --rounds 3
run host_time_bf16 $PY bench/host_time.py --steps 100 --rounds 3 --mixed-precision bf16
run train_step $PY bench/train_step.py --steps 8 --rounds 3
run train_step_basic $PY bench/train_step.py --models basic --steps 30 --rounds 5 --resolution 28 --channels 1
run dit_step $PY bench/dit_step.py
run data_loading $PY bench/data_loading.py
run sampling $PY bench/sampling.py
run guidance_cost $PY bench/guidance_cost.py
run grad_checkpointing $PY bench/grad_checkpointing.py
run scaling $PY bench/scaling.py
run compile_start $PY bench/compile_start.py
# The trained digits autoencoder (python train_autoencoder.py --resolution 32 --output-dir
# runs/ae-digits) when there is one, else an untrained one of the same preset (the same images/s).
if [[ -d runs/ae-digits/model ]]; then
    run latent_throughput $PY bench/latent_throughput.py runs/ae-digits/model
else
    run latent_throughput $PY bench/latent_throughput.py --untrained ae-digits
fi
# The text path: encoders of tiny-clip's, CLIP ViT-L/14's and T5-base's sizes (random weights),
# the text cache, training on it vs encoding every step (about 5 minutes of one core).
OMP_NUM_THREADS=1 run text_throughput $PY bench/text_throughput.py
