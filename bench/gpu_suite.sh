#!/usr/bin/env bash
# Every GPU figure in one run, for a lent H100/H200: at most 6 minutes under one deadline, the
# sections in priority order, each with its own timeout (a section that would start after the
# deadline is skipped, one that runs past its timeout is cut). Everything printed is also
# written to $OUT (one file per section; summary.txt collects the table lines).
#
#   here, once:      bash bench/gpu_wheels.sh     # the lent machine reaches no network
#   device tool:     run(command="bash bench/gpu_suite.sh", carry=[".whl"], timeout_s=420)
#                    ($OUT is the device tool's output folder: the files come back)
#   any GPU box:     OUT=gpu-out bash bench/gpu_suite.sh   (uses .venv if present)
#
# Sections: 1. ddpm-cifar10 batch 128 bf16, toolkit vs plain bf16 loop (eager), the headline;
# 2. the step under torch.cuda.set_sync_debug_mode("error"); 3. the same step compiled
# (--compile, then --compile-mode reduce-overhead: CUDA graphs); 4. the default digits run,
# eager and compiled; 5. sampling DDIM-50 at batch 1024 bf16, eager and compiled; 6. a profile
# of the eager step; 7. correctness in fp32/bf16/fp16 and an fp16 resume; 8. diffusers'
# train_unconditional.py on the same UNet and data (when gpu_wheels.sh was given the script);
# 9. latent diffusion: encode, train on latents vs pixels, decode (bench/latent_throughput.py);
# 10. sharding, DDP against FSDP2, on machines of two or more GPUs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_suite}
BUDGET_S=${BUDGET_S:-360}
mkdir -p "$OUT"
start=$SECONDS
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
    # The machine may keep /tmp from an earlier lease: an old wheel there would stay in front.
    rm -rf /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .whl/*.whl || { echo "no wheels: run bench/gpu_wheels.sh here first"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
# Caches and runs stay out of $OUT: only the figures travel back.
export PYTHONUNBUFFERED=1 DDP_DIFFUSION_CACHE=/tmp/gpu_suite_cache
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch, diffusers, datasets, accelerate; print('torch', torch.__version__,
'diffusers', diffusers.__version__, 'datasets', datasets.__version__, 'accelerate',
accelerate.__version__)" || exit 1
    echo "commit $(git rev-parse --short HEAD 2>/dev/null)$(git status --porcelain \
        --untracked-files=no 2>/dev/null | grep -q . && echo ' (uncommitted changes)')"
} 2>&1 | tee "$OUT/machine.txt"

# section NAME TIMEOUT_S COMMAND...: run it if the deadline allows, cut at its timeout.
section() {
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET_S - (SECONDS - start)))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped (deadline)" | tee -a "$OUT/summary.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo; echo "== $name (at $((SECONDS - start)) s, up to $limit s)"
    timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    grep -E '^\|' "$OUT/$name.txt" | sed "s/^/$name: /" >> "$OUT/summary.txt"
    grep -E '^\||passed|failed|^(ok|FAIL)|Error|machine:' "$OUT/$name.txt" | tail -25
    [ $rc -eq 124 ] && echo "$name: cut at $limit s" | tee -a "$OUT/summary.txt"
}
STEP="--models ddpm-cifar10 --batch-sizes 128 --steps 30 --rounds 1 --mixed-precision bf16"

section 1-step-eager 70 $PY bench/train_step.py $STEP --plain-precision bf16
section 2-sync-free 50 $PY -m pytest -q -p no:cacheprovider tests/test_sync_free.py
section 3a-step-compiled 110 $PY bench/train_step.py $STEP --compile
section 3b-step-cudagraphs 110 $PY bench/train_step.py $STEP --compile --compile-mode reduce-overhead
section 4a-digits-eager 30 $PY bench/train_step.py --models digits-small --batch-sizes 64 \
    --resolution 16 --channels 1 --steps 200 --rounds 1
section 4b-digits-cudagraphs 70 $PY bench/train_step.py --models digits-small --batch-sizes 64 \
    --resolution 16 --channels 1 --steps 200 --rounds 1 --compile --compile-mode reduce-overhead
SAMPLE="--preset ddpm-cifar10 --resolution 32 --channels 3 --batch-sizes 1024 --mixed-precision bf16 --samplers ddim:50"
section 5a-sampling-eager 40 $PY bench/sampling.py $SAMPLE
section 5b-sampling-compiled 90 $PY bench/sampling.py $SAMPLE --compile --compile-mode reduce-overhead
section 6-profile 45 $PY bench/profile_step.py --preset ddpm-cifar10 --batch-size 128 \
    --mixed-precision bf16
section 7-correctness 80 $PY bench/gpu_checks.py --out /tmp/gpu_suite_checks --steps 100
if [ -f .whl/train_unconditional.py ]; then
    section 8-diffusers-example 125 bash bench/diffusers_example.sh /tmp/gpu_suite_example
fi
# The trained digits autoencoder when it travels (carry=["runs/ae-digits/model"]), else an
# untrained one of the same preset: the same shapes, the same images/s.
VAE=runs/ae-digits/model
[ -d "$VAE" ] || VAE="--untrained ae-digits"
section 9-latent-throughput 40 $PY bench/latent_throughput.py $VAE \
    --device cuda --mixed-precision bf16 --steps 50 --threads default --num-decode 1024
# 10. Sharding: DDP against FSDP2 on every GPU of the machine (two or more: one GPU is never
# sharded), DiT-B/2 at 256x256 in bf16, peak GPU memory per process and step time.
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$GPUS" -ge 2 ]; then
    SHARD="--num_processes $GPUS --multi_gpu bench/sharding_memory.py measure --preset dit-b-2 --resolution 256 --batch-size 32 --steps 10 --mixed-precision bf16"
    section 10a-sharding-ddp 60 $PY -m accelerate.commands.launch $SHARD --sharding none
    section 10b-sharding-fsdp 60 $PY -m accelerate.commands.launch $SHARD --sharding fsdp
fi
echo; echo "== done in $((SECONDS - start)) s; figures in $OUT (summary.txt)"
