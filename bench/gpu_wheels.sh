#!/usr/bin/env bash
# Fetch, on this machine, the wheels a lent GPU machine lacks (it reaches no network): the
# packages of ours its image does not hold, at the versions this venv runs. They go to .whl/
# (ignored by git, carried by the device tool: `carry: [".whl"]`); bench/gpu_suite.sh installs
# them there. Python 3.12 on x86-64, which is what the lent machines run.
# No huggingface_hub: the image's transformers (imported by diffusers through peft) refuses
# huggingface-hub >= 2, and the image's 1.33 works with our diffusers and datasets.
#   bash bench/gpu_wheels.sh [PATH/TO/train_unconditional.py]
# With diffusers' example script (from a checkout of its repository), the suite also runs the
# same-data comparison against it (bench/diffusers_example.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
PIP=${PIP:-.venv/bin/pip}
version() { "$PIP" show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
rm -rf .whl && mkdir -p .whl
for name in diffusers datasets accelerate httpx2 httpcore2 truststore dill multiprocess \
    importlib_metadata; do
    "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$name==$(version "$name")"
done
if [ -n "${1:-}" ]; then
    cp "$1" .whl/train_unconditional.py
fi
du -sh .whl && ls .whl
