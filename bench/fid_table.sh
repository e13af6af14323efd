#!/usr/bin/env bash
# The README's FID/KID table: samplers of a trained digits DDPM (and of an EDM run of the same
# budget, if given), N samples each (seed 1), against the first 1297 real digits; the floor is
# the 500 held-out real digits against the same set. Every row is one sample.py command.
#   bash bench/fid_table.sh runs/ddpm/pipeline runs/fid [N=500] [runs/edm/pipeline]
# SPECS / EDM_SPECS (name:steps[:eta|:churn] ...) replace the default rows.
set -euo pipefail
cd "$(dirname "$0")/.."
PIPE=${1:?pipeline folder}; OUT=${2:?output folder}; N=${3:-500}; EDM=${4:-}
PY=${PY:-.venv/bin/python}
SPECS=${SPECS:-"ddpm:1000 ddim:50:0 ddim:50:1 ddim:20:0 dpm-solver:20 dpm-solver-2m-karras:20
  dpm-solver-3m-karras:20 unipc:20 euler-karras:20 heun-karras:10"}
EDM_SPECS=${EDM_SPECS:-"edm-heun:18 edm-heun:10 edm-euler:35 edm-heun:18:10"}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
$PY - "$OUT" <<'PY'
import sys, numpy as np
from ddp_utils.data import load_image_data
images = load_image_data("digits", 16, 1).images.permute(0, 2, 3, 1).numpy()
np.savez(f"{sys.argv[1]}/real_heldout.npz", arr_0=images[1297:])
PY
[[ -f "$OUT/real_heldout.json" ]] || $PY evaluate.py --samples "$OUT/real_heldout.npz" \
    --dataset digits --max-reference 1297 --output "$OUT/real_heldout.json"
rows=()
run() {  # model, sampler:steps[:knob], knob flag; skips rows already measured
    local model=$1 name steps knob dir
    IFS=: read -r name steps knob <<< "$2"
    dir="$OUT/$name-$steps${knob:+-$3$knob}"; rows+=("$dir")
    [[ -f "$dir/fid.json" ]] && return
    $PY sample.py "$model" --scheduler "$name" --num-inference-steps "$steps" \
        ${knob:+--$3 "$knob"} --num-samples "$N" --batch-size 250 --seed 1 --fid \
        --dataset digits --max-reference 1297 --output-dir "$dir"
}
for spec in $SPECS; do run "$PIPE" "$spec" eta; done
if [[ -n "$EDM" ]]; then for spec in $EDM_SPECS; do run "$EDM" "$spec" churn; done; fi
$PY - "$OUT" "${rows[@]}" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = [("real held-out digits (floor)", out / "real_heldout.json")]
rows += [(pathlib.Path(d).name, pathlib.Path(d) / "fid.json") for d in sys.argv[2:]]
print("| samples | network evaluations | FID | KID x 1e3 |\n|---|---|---|---|")
for name, path in rows:
    r = json.loads(path.read_text())
    info = path.with_name("sample_info.json")
    evals = json.loads(info.read_text()).get("num_evaluations", "") if info.exists() else ""
    kid = r.get("kid") if "kid" in r else r.get("kid_mean")
    print(f"| {name} | {evals} | {r['fid']:.2f} | {1000 * kid:.2f} |")
PY
