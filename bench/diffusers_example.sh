#!/usr/bin/env bash
# diffusers' own training example beside train_ddpm.py, on one GPU: the same UNet (the
# ddpm-cifar10 preset), the same folder of 32x32 RGB digits, batch 128, bf16, EMA; each side's
# steady images/s. The example's script is diffusers' (examples/unconditional_image_generation/
# train_unconditional.py, Apache-2.0), not part of this repository: bench/gpu_wheels.sh copies
# it into .whl/ when given its path. Its check_min_version line is dropped (it asks for a dev
# release) and it logs to TensorBoard (no wandb on the GPU machine).
#   bash bench/diffusers_example.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/diffusers_example}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$OUT"
$PY - "$OUT" <<'PY'
import sys
from pathlib import Path
from PIL import Image
from sklearn.datasets import load_digits
from diffusion.models import build_ddpm_unet
out = Path(sys.argv[1])
folder = out / "digits32"
folder.mkdir(parents=True, exist_ok=True)
for k, image in enumerate(load_digits().images):  # 8x8, values 0..16
    pixels = Image.fromarray((image * 255 / 16).astype("uint8")).resize((32, 32), Image.BICUBIC)
    pixels.convert("RGB").save(folder / f"{k:05d}.png")
build_ddpm_unet("ddpm-cifar10", 32, 3).save_config(out / "unet")
PY
sed '/check_min_version(/d' .whl/train_unconditional.py > "$OUT/train_unconditional.py"
echo "== diffusers' train_unconditional.py (3 epochs of 1797 images; tqdm's it/s x 128 = img/s)"
timeout 60 $PY -m accelerate.commands.launch --num_processes 1 --mixed_precision bf16 \
    "$OUT/train_unconditional.py" --train_data_dir "$OUT/digits32" --resolution 32 \
    --train_batch_size 128 --num_epochs 3 --use_ema --model_config_name_or_path "$OUT/unet" \
    --output_dir "$OUT/example" --logger tensorboard --mixed_precision bf16 \
    --dataloader_num_workers 8 --save_images_epochs 1000 --save_model_epochs 1000 \
    --checkpointing_steps 1000000 2>&1 | tr '\r' '\n' | grep -E "it/s" | tail -3
echo "== train_ddpm.py on the same folder (metrics.jsonl images_per_s, windows of 20 steps)"
timeout 60 $PY train_ddpm.py --dataset "$OUT/digits32" --resolution 32 --channels 3 \
    --preset ddpm-cifar10 --batch-size 128 --mixed-precision bf16 --max-steps 60 \
    --log-every 20 --sample-every 0 --num-sample-images 1 --sample-steps 1 \
    --checkpoint-every 1000000 --report-to none --resume none --output-dir "$OUT/toolkit" \
    > "$OUT/toolkit.log" 2>&1
grep -o '"images_per_s": [0-9.]*' "$OUT/toolkit/metrics.jsonl"
