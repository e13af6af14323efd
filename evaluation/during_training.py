"""FID/KID during training (`--eval-every`): the evaluator a training script hands to the loop.

The loop (`ddp_utils.loop.train(..., evaluator=...)`) decides when to evaluate and keeps the
lowest-FID export in `best/`; this module says how to score, so `ddp_utils` needs no FID code
and the packages do not import each other in a circle (evaluation imports ddp_utils, and
diffusion.sources for --clip-model's hub ids; neither imports evaluation).

The FID network and the statistics of the training images (the first `--eval-num-reference`,
cached on disk under the data's fingerprint) are prepared once, before the first step, so a
missing `eval` extra fails at once rather than hours in. Each evaluation samples
`--eval-num-samples` images from fixed seeds: rank r makes chunks r, r + world, ... of
`--batch-size` images (the sharding rule of `ddp_utils.distributed`), so the numbers do not
depend on the number of processes; they are scored by `evaluation.score`, as sample.py --fid
and evaluate.py score theirs. With --clip-model (a text run) the same images are scored
against their prompts by a CLIP model as they pass (`evaluation.clip_score`), so each image is
made once; the CLIP model is loaded before any encoding, so a bad one fails at once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from accelerate import Accelerator

from ddp_utils.distributed import main_process_first
from ddp_utils.errors import InputError
from ddp_utils.export import previous_best_fid
from ddp_utils.run import Run
from evaluation.clip_score import ChunkScores, ClipScorer, Prompts, load_clip_scorer
from evaluation.inception import load_fid_inception
from evaluation.reference import Reference, dataset_reference_stats
from evaluation.score import score

logger = logging.getLogger("ddp_diffusion")


class TrainingEvaluator:
    """FID/KID of the run's samples against its training images (`ddp_utils.loop.Evaluator`)."""

    def __init__(
        self,
        reference_images: torch.Tensor,
        dataset: str,
        fingerprint: str,
        accelerator: Accelerator | None,
        num_samples: int,
        batch_size: int,
        seed: int,
        best_fid: float = math.inf,
        clip: ClipScorer | None = None,
        prompts: Prompts | None = None,
    ) -> None:
        """Load the FID network and the reference statistics now (collective).

        `reference_images`: uint8 (N, C, H, W) training images, `fingerprint` the one
        `load_image_data` gave them (the statistics' cache key); `best_fid`: the FID to beat
        (a resumed run's best so far); `clip`: a CLIP model that scores each sample against
        `prompts(items)`, the prompts of the samples `items`."""
        assert clip is None or prompts is not None, "the CLIP score needs the samples' prompts"
        self.clip, self.prompts = clip, prompts
        device = accelerator.device if accelerator is not None else "cpu"
        try:
            self.extractor = load_fid_inception(device)
        except ImportError as err:
            raise InputError(str(err), "eval_every") from None
        self.reference = Reference(
            dataset_reference_stats(
                reference_images,
                dataset,
                fingerprint,
                extractor=self.extractor,
                accelerator=accelerator,
                batch_size=batch_size,
            )
        )
        self.accelerator, self.num_samples = accelerator, num_samples
        self.batch_size, self.seed, self.best_fid = batch_size, seed, best_fid

    def evaluate(self, generate: Callable[[range], torch.Tensor]) -> dict[str, float]:
        """FID/KID (and the CLIP score) of `generate(items)` (uint8 NCHW) for the evaluation
        seeds (collective)."""
        clip = None if self.clip is None else ChunkScores(self.clip, self.prompts)
        metrics = score(
            generate if clip is None else clip.wrap(generate),
            self.reference,
            self.extractor,
            self.accelerator,
            self.batch_size,
            self.seed,
            num_samples=self.num_samples,
        )
        result = {name: float(metrics[name]) for name in ("fid", "kid_mean", "kid_std")}
        if clip is not None:
            result["clip_score"] = clip.mean(self.accelerator, self.num_samples, self.batch_size)
        logger.info(
            "FID %.3f, KID %.5f%s (%d samples)",
            result["fid"],
            result["kid_mean"],
            "" if clip is None else f", CLIP score {result['clip_score']:.3f}",
            metrics["num_samples"],
        )
        return result

    def is_best(self, fid: float) -> bool:
        """Whether `fid` beats every evaluation so far (and remember it if so)."""
        if fid < self.best_fid:
            self.best_fid = fid
            return True
        return False


def run_clip_scorer(run: Run) -> ClipScorer | None:
    """--clip-model's CLIP model on the run's device (None without it), loaded and checked
    before any other work; a hub id is downloaded once, by the main process (collective)."""
    spec = getattr(run.cfg, "clip_model", None)
    if spec is None:
        return None
    return main_process_first(
        run.accelerator,
        lambda: load_clip_scorer(spec, run.accelerator.device),
        InputError(f"{spec} could not be loaded (the main process says why)", "clip_model"),
    )


def training_evaluator(
    run: Run, clip: ClipScorer | None = None, prompts: Prompts | None = None
) -> TrainingEvaluator | None:
    """The evaluator `--eval-every` asks for (None for `--eval-every 0`), prepared before the
    first step (collective); with `clip` (`run_clip_scorer`'s) it also gives the CLIP score of
    the samples against `prompts(items)`."""
    cfg = run.cfg
    if not cfg.eval_every:
        return None
    return TrainingEvaluator(
        run.data.images[: cfg.eval_num_reference],
        cfg.dataset,
        run.data.fingerprint,
        run.accelerator,
        cfg.eval_num_samples,
        cfg.batch_size,
        cfg.seed,
        best_fid=previous_best_fid(run.output_dir, resuming=run.checkpoint is not None),
        clip=clip,
        prompts=prompts,
    )
