#!/usr/bin/env bash
# Rectified flow against v-prediction DDPM and EDM on the built-in digits at the same budget:
# each kind trained by train_ddpm.py with its defaults otherwise (4000 steps of batch 64, EMA,
# 16x16; digits-small UNet or dit-digits DiT), then sampled by each kind's samplers at about
# 10, 20 and 50 network evaluations: FID/KID of 500 samples (seed 1) against the first 1297
# real digits (BENCHMARKS.md, "Kinds at the same budget"). Class-conditional runs: 500
# class-balanced samples at the default guidance (w = 1.5 with its interval), read as the asked
# digit by a classifier of the real digits (bench/guidance_sweep.py).
#   bash bench/kinds_study.sh runs/kinds [unet|dit-cond|all]
# A run whose export exists is not trained again; a row whose fid.json exists is not sampled
# again. Each run's wall and CPU time are in OUT/<run>/time.txt (GNU time).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?output folder}; WHAT=${2:-all}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
mkdir -p "$OUT"

train() {  # name, train_ddpm.py flags
    local name=$1; shift
    [[ -f "$OUT/$name/pipeline/checksums.json" ]] && return
    mkdir -p "$OUT/$name"
    /usr/bin/time -v -o "$OUT/$name/time.txt" $PY train_ddpm.py --output-dir "$OUT/$name" \
        --report-to none "$@" > "$OUT/$name/train.log" 2>&1
}

fid() {  # run, row name, sample.py flags
    local run=$1 row=$2; shift 2
    local dir="$OUT/$run/fid/$row"
    [[ -f "$dir/fid.json" ]] && return
    $PY sample.py "$OUT/$run/pipeline" --num-samples 500 --batch-size 250 --seed 1 --fid \
        --dataset digits --max-reference 1297 --output-dir "$dir" "$@" > /dev/null 2>&1
}

table() {  # runs...: one row per measured sampler
    $PY - "$OUT" "$@" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("| run | sampler, steps | network evaluations | FID | KID x 1e3 |\n|---|---|---|---|---|")
for run in sys.argv[2:]:
    for row in sorted((out / run / "fid").glob("*/fid.json")):
        r, info = json.loads(row.read_text()), json.loads(row.with_name("sample_info.json").read_text())
        knobs = ", ".join(f"{k} {info[k]:g}" for k in ("eta", "churn", "shift") if info.get(k))
        print(f"| {run} | `{info['scheduler']}`, {info['num_steps']}{', ' + knobs if knobs else ''}"
              f" | {info['num_evaluations']} | {r['fid']:.2f} | {1000 * r['kid_mean']:.2f} |")
PY
}

if [[ $WHAT == unet || $WHAT == all ]]; then
    train ddpm
    train edm --objective edm
    train flow --objective flow
    fid ddpm ddim-50-eta1 --scheduler ddim --num-steps 50 --eta 1
    for n in 10 20 50; do
        fid ddpm "dpm2m-karras-$n" --scheduler dpm-solver-2m-karras --num-steps $n
        fid edm "dpm++2m-$n" --scheduler dpm++2m --num-steps $n
        fid flow "euler-$n" --scheduler euler --num-steps $n
        fid flow "dpm++2m-$n" --scheduler dpm++2m --num-steps $n
    done
    fid edm heun-10 --scheduler edm-heun --num-steps 10
    fid flow heun-10 --scheduler heun --num-steps 10
    fid edm heun-18-churn10 --scheduler edm-heun --num-steps 18 --churn 10
    fid flow ancestral-50 --scheduler euler-ancestral --num-steps 50
    table ddpm edm flow
fi
if [[ $WHAT == dit-cond || $WHAT == all ]]; then
    common=(--class-conditional --backbone dit)
    train ddpm-dit-cond "${common[@]}"
    train edm-dit-cond "${common[@]}" --objective edm
    train flow-dit-cond "${common[@]}" --objective flow
    sweep() { $PY bench/guidance_sweep.py "$OUT/$1/pipeline" "$OUT/$1/sweep-$2" --guidance 1.5 "${@:3}"; }
    sweep ddpm-dit-cond ddim-50-eta1 --scheduler ddim --num-steps 50 --eta 1
    sweep ddpm-dit-cond dpm2m-karras-20 --scheduler dpm-solver-2m-karras --num-steps 20
    sweep edm-dit-cond dpm++2m-20 --scheduler dpm++2m --num-steps 20
    sweep flow-dit-cond dpm++2m-20 --scheduler dpm++2m --num-steps 20
fi
