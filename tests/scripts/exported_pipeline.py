"""Run an EDM export the way a user without this toolkit would: diffusers alone.

    python tests/scripts/exported_pipeline.py FOLDER OUTDIR STEPS CHURN[,CHURN...] SEED [SEED ...]

Any import of the toolkit's packages fails here, so the folder's `pipeline.py` must stand alone.
Image k is drawn with a CPU generator seeded with the k-th SEED (sample.py's per-sample seeds),
and saved as uint8 NHWC in OUTDIR/churn-<CHURN>.npz (`arr_0`), rounded like sample.py's
samples.npz: one file per churn value.
"""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder

OURS = {"ddp_utils", "diffusion", "evaluation", "sample", "train_ddpm", "train_basic"}


class BlockToolkit(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        if name.split(".")[0] in OURS:
            raise ImportError(f"the toolkit's module {name} must not be needed")
        return None


sys.meta_path.insert(0, BlockToolkit())

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402

folder, out, steps, churns, *seeds = sys.argv[1:]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, use_safetensors=True)
# The class came from the folder's pipeline.py (diffusers imports it as a dynamic module).
assert type(pipe).__name__ == "EDMPipeline", type(pipe)
assert type(pipe).__module__.startswith("diffusers_modules"), type(pipe).__module__
for churn in churns.split(","):
    images = pipe(
        batch_size=len(seeds),
        generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
        num_inference_steps=int(steps),
        churn=float(churn),
        output_type="np",
    ).images
    np.savez(
        f"{out}/churn-{churn}.npz", arr_0=np.round(images * 255.0).clip(0, 255).astype(np.uint8)
    )
