#!/usr/bin/env bash
# The README's FID/KID table for a trained digits DDPM: four samplers, N samples each, against
# the first 1297 real digits; the floor is the 500 held-out real digits against the same set.
#   bash bench/fid_table.sh runs/ddpm/pipeline runs/ddpm/fid   [N=500]
set -euo pipefail
cd "$(dirname "$0")/.."
PIPE=${1:?pipeline folder}; OUT=${2:?output folder}; N=${3:-500}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
$PY - "$OUT" <<'PY'
import sys, numpy as np
from ddp_utils.data import load_image_data
images = load_image_data("digits", 16, 1).images.permute(0, 2, 3, 1).numpy()
np.savez(f"{sys.argv[1]}/real_heldout.npz", arr_0=images[1297:])
PY
$PY evaluate.py --samples "$OUT/real_heldout.npz" --dataset digits --max-reference 1297 \
    --output "$OUT/real_heldout.json"
for spec in ddpm:1000:0 ddim:50:0 ddim:20:0 dpm-solver:20:0 ddim:50:1; do
    IFS=: read -r name steps eta <<< "$spec"
    dir="$OUT/$name-$steps"; [[ $eta == 0 ]] || dir="$dir-eta$eta"
    $PY sample.py "$PIPE" --scheduler "$name" --num-inference-steps "$steps" --eta "$eta" \
        --num-samples "$N" --batch-size 250 --seed 1 --fid --dataset digits \
        --max-reference 1297 --output-dir "$dir"
done
$PY - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = [("real held-out digits (floor)", json.loads((out / "real_heldout.json").read_text()))]
for d in ("ddpm-1000", "ddim-50", "ddim-20", "dpm-solver-20", "ddim-50-eta1"):
    rows.append((d, json.loads((out / d / "fid.json").read_text())))
print("| samples | N | FID | KID x 1e3 |\n|---|---|---|---|")
for name, r in rows:
    n = r.get("num_samples") or r.get("num_images") or r.get("samples", {}).get("count", "")
    kid = r.get("kid") if "kid" in r else r.get("kid_mean")
    print(f"| {name} | {n} | {r['fid']:.2f} | {1000 * kid:.2f} |")
PY
