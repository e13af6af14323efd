#!/usr/bin/env bash
# ImageNet-256, class-conditional DiT-XL/2 on the latents of stabilityai/sd-vae-ft-ema: the
# DiT paper's setup (Peebles & Xie 2022) on 1 node x 8 GPUs. README: "ImageNet-256 on GPU nodes".
#
#   DRY_RUN=1 bash recipes/imagenet256_dit_xl2.sh            # print the command, run nothing
#   OUTPUT_DIR=/shared/runs/dit-xl2 bash recipes/imagenet256_dit_xl2.sh [more train_ddpm flags]
#
# Global batch 256 = 8 processes x --batch-size 32; AdamW lr 1e-4 constant, no warmup, no
# weight decay; EMA 0.9999; 400k steps (the paper's table); random flips; labels dropped 10% of
# the time (the toolkit's default --label-dropout, the paper's) for guidance; DDPM epsilon
# prediction on the linear schedule (ADM's, which DiT uses); no gradient clipping.
# Extra arguments are appended (the last occurrence of a flag wins), e.g. --save-on-each-node.
#
# Variables: DATASET (ILSVRC/imagenet-1k: gated, accept its terms and `huggingface-cli login`,
# then pre-download; or an image folder), OUTPUT_DIR (runs/imagenet256-dit-xl2; put it on a
# filesystem every process sees), CONFIG (accelerate_configs/1node_8gpu_bf16.yaml),
# ACCELERATE (accelerate), DRY_RUN (0).
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET=${DATASET:-ILSVRC/imagenet-1k}
OUTPUT_DIR=${OUTPUT_DIR:-runs/imagenet256-dit-xl2}
CONFIG=${CONFIG:-accelerate_configs/1node_8gpu_bf16.yaml}
ACCELERATE=${ACCELERATE:-accelerate}
DRY_RUN=${DRY_RUN:-0}

# The training flags, one place: the README's 8-GPU and SLURM commands are these.
flags=(
    --dataset "$DATASET" --split train --resolution 256 --channels 3 --random-flip
    --vae stabilityai/sd-vae-ft-ema --data-loading stream
    --preset dit-xl-2 --class-conditional
    --beta-schedule linear --prediction-type epsilon
    --batch-size 32 --learning-rate 1e-4 --weight-decay 0 --lr-schedule constant
    --lr-warmup-steps 0 --max-grad-norm none
    --use-ema --ema-max-decay 0.9999 --mixed-precision bf16 --max-steps 400000
    --checkpoint-every 5000 --checkpoints-total-limit 3 --sample-every 10000
    --output-dir "$OUTPUT_DIR"
)
cmd=("$ACCELERATE" launch --config_file "$CONFIG" train_ddpm.py "${flags[@]}" "$@")

if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
