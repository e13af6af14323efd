#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a lent H100/H200 (about 15 minutes of device
# time in all, the machine's start included; this script takes about 7 to 9).
#
#   here, once:      bash bench/gpu_wheels.sh     # the lent machine reaches no network
#   device tool:     run(command="bash bench/gpu_suite.sh", carry=[".whl"], timeout_s=600)
#   any GPU box:     bash bench/gpu_suite.sh 2>&1 | tee gpu_suite.log   (uses .venv if present)
#
# 1. correctness in fp32 / bf16 / fp16 (GradScaler) on digits, and an fp16 resume;
# 2. the training step under torch.cuda.set_sync_debug_mode("error") (no host sync);
# 3. ddpm-cifar10 at batch 128 in bf16: images/s and MFU against plain fp32 and bf16 loops;
# 4. --channels-last and --compile (inductor); 5. the other presets; 6. sampling at batch
# 1024; 7. a profile of the toolkit's step. Figures go in BENCHMARKS.md with the card's name.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "no wheels: run bench/gpu_wheels.sh here first"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
export PYTHONUNBUFFERED=1 DDP_DIFFUSION_CACHE="$OUT/cache"
section() { echo; echo "== $1 ($(date +%T))"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, diffusers, datasets, accelerate; print('torch', torch.__version__,
'diffusers', diffusers.__version__, 'datasets', datasets.__version__, 'accelerate',
accelerate.__version__)" || exit 1
git rev-parse --short HEAD 2>/dev/null || true

section "1. correctness: fp32, bf16, fp16 on digits (200 steps each), fp16 resume"
$PY bench/gpu_checks.py --out "$OUT/checks" --steps 200 2>&1 \
    | grep -E "^(ok|FAIL|machine|all checks|[0-9]+ check)|Error|error"

section "2. no host sync inside the training step"
$PY -m pytest -q -p no:cacheprovider tests/test_sync_free.py 2>&1 | tail -4

section "3. ddpm-cifar10, batch 128, bf16: toolkit vs plain fp32 loop, then vs plain bf16 loop"
$PY bench/train_step.py --models ddpm-cifar10 --batch-sizes 128 --steps 30 --rounds 2 \
    --mixed-precision bf16 --plain-precision no
$PY bench/train_step.py --models ddpm-cifar10 --batch-sizes 128 --steps 30 --rounds 2 \
    --mixed-precision bf16 --plain-precision bf16

section "4. --channels-last, then --compile (inductor), ddpm-cifar10 batch 128 bf16"
$PY bench/train_step.py --models ddpm-cifar10 --batch-sizes 128 --steps 30 --rounds 1 \
    --mixed-precision bf16 --plain-precision bf16 --channels-last
timeout 240 $PY bench/train_step.py --models ddpm-cifar10 --batch-sizes 128 --steps 30 \
    --rounds 1 --mixed-precision bf16 --plain-precision bf16 --compile \
    || echo "compile: did not finish in 240 s"

section "5. the other presets and the basic model, batch 128 bf16"
$PY bench/train_step.py --models unet-18.5m,unet-4.7m,digits-small,basic --batch-sizes 128 \
    --steps 30 --rounds 1 --mixed-precision bf16 --plain-precision bf16

section "5b. --gradient-checkpointing: memory and speed, ddpm-cifar10 batch 128 bf16"
$PY bench/grad_checkpointing.py --preset ddpm-cifar10 --batch-size 128 --steps 20 \
    --mixed-precision bf16

section "6. sampling, ddpm-cifar10 at batch 1024, bf16"
$PY bench/sampling.py --preset ddpm-cifar10 --resolution 32 --channels 3 \
    --batch-sizes 1024 --mixed-precision bf16 --samplers ddim:50,dpm-solver:20

section "7. where the toolkit's step spends its time (ddpm-cifar10, batch 128, bf16)"
$PY bench/profile_step.py --preset ddpm-cifar10 --batch-size 128 --mixed-precision bf16
section "done"
