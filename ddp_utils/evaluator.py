"""FID/KID during training (`--eval-every`): the same seeds every time, sharded over all ranks.

The FID network and the statistics of the training images (the first `--eval-num-reference`,
cached on disk under the data's fingerprint) are prepared once, before the first step, so a
missing `eval` extra fails at once rather than hours in. Each evaluation samples
`--eval-num-samples` images from fixed seeds: rank r makes chunks r, r + world, ... of
`--batch-size` images (the sharding rule of `ddp_utils.distributed`), so the numbers do not
depend on the number of processes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from ddp_utils.errors import InputError
from ddp_utils.run import Run
from evaluation import (
    dataset_reference_stats,
    fid_kid,
    generated_feature_stats,
    load_fid_inception,
)

logger = logging.getLogger("ddp_diffusion")

BEST_DIR, BEST_FILE = "best", "fid.json"  # the lowest-FID export, never pruned


def previous_best_fid(output_dir: Path, resuming: bool) -> float:
    """FID of `<output-dir>/best` when resuming (a fresh start replaces it at its first eval)."""
    best_file = output_dir / BEST_DIR / BEST_FILE
    if not resuming or not best_file.is_file():
        return math.inf
    return float(json.loads(best_file.read_text())["fid"])


class Evaluator:
    def __init__(self, run: Run) -> None:
        cfg, data, acc = run.cfg, run.data, run.accelerator
        self.cfg, self.accelerator = cfg, acc
        try:
            self.extractor = load_fid_inception(acc.device)
        except ImportError as err:
            raise InputError(str(err), "eval_every") from None
        self.reference = dataset_reference_stats(
            data.images[: cfg.eval_num_reference],
            cfg.dataset,
            data.fingerprint,
            extractor=self.extractor,
            accelerator=acc,
            batch_size=cfg.batch_size,
        )
        self.best_fid = previous_best_fid(run.output_dir, run.checkpoint is not None)

    def evaluate(self, generate: Callable[[range], torch.Tensor]) -> dict[str, float]:
        """FID/KID of `generate(items)` (uint8 NCHW) for the evaluation seeds (collective)."""
        cfg, acc = self.cfg, self.accelerator
        stats = generated_feature_stats(
            generate, cfg.eval_num_samples, self.extractor, acc, cfg.batch_size
        )
        metrics = fid_kid(stats, self.reference, seed=cfg.seed, device=acc.device)
        logger.info(
            "FID %.3f, KID %.5f (%d samples)", metrics["fid"], metrics["kid_mean"], stats.num_images
        )
        return {name: float(metrics[name]) for name in ("fid", "kid_mean", "kid_std")}

    def is_best(self, fid: float) -> bool:
        """Whether `fid` beats every evaluation so far (and remember it if so)."""
        if fid < self.best_fid:
            self.best_fid = fid
            return True
        return False
