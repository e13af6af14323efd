"""Where `sample.py` writes: the destination checked before any sampling, finite samples
checked on every rank, and the files (samples.npz, grid.png, images/, progression.png,
sample_info.json, sample_config.yaml) written together once the samples exist."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from ddp_utils.config import save_config
from ddp_utils.distributed import raise_together
from ddp_utils.errors import InputError, NonFiniteError
from ddp_utils.files import atomic_file, write_json
from ddp_utils.images import make_grid, rows_by_label, save_png, to_uint8, upscale
from ddp_utils.tracking import MIN_PICTURE_SIDE

logger = logging.getLogger("ddp_diffusion.sample")


def check_output(accelerator: Accelerator, cfg: Any) -> Path:
    """Check the destination before any sampling, writing nothing: a folder, or a place where
    one can be made, that we may write into (collective). Files come with the samples."""
    out, error = Path(cfg.output_dir), None
    if accelerator.is_main_process:
        existing = out
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if out.exists() and not out.is_dir():
            error = InputError(f"{out} is a file, not a folder", "output_dir")
        elif not existing.is_dir():
            error = InputError(f"cannot make {out}: {existing} is a file", "output_dir")
        elif not os.access(existing, os.W_OK | os.X_OK):
            reason = "read-only file system" if _read_only(existing) else "permission denied"
            error = InputError(f"cannot write into {out}: {existing}: {reason}", "output_dir")
    raise_together(accelerator, error, InputError("see the main process's message", "output_dir"))
    return out


def _read_only(folder: Path) -> bool:
    return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)


def check_finite_samples(accelerator: Accelerator, nonfinite: list[int], total: int) -> None:
    """Refuse to write images made of NaN/inf (to_uint8 would turn them black), on every rank."""
    count = torch.tensor([len(nonfinite)], device=accelerator.device)
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, reduction="sum")
    if count.item():
        raise NonFiniteError(
            f"{int(count.item())} of {total} samples came out non-finite (NaN/inf), e.g. "
            f"sample(s) {nonfinite[:5] or '(on another process)'}: the model is broken "
            "(diverged weights?) or --mixed-precision fp16 overflows; no images were written"
        )


def write_outputs(
    cfg: Any,
    out: Path,
    images: np.ndarray,
    labels: np.ndarray | None,
    progression: list[torch.Tensor],
    loaded: Any,
    info: dict[str, Any],
) -> None:
    """samples.npz (images at their native size, and their classes or prompts' indices),
    grid.png (one class or prompt per row for a conditional model), images/, progression.png, sample_info.json, and last
    sample_config.yaml, so that it always describes the samples beside it. A fid.json or
    clip_score.json of earlier samples is removed (--fid, --clip-model write new ones)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "fid.json").unlink(missing_ok=True)
    (out / "clip_score.json").unlink(missing_ok=True)
    with atomic_file(out / "samples.npz") as f:
        arrays = {"arr_0": images} if labels is None else {"arr_0": images, "labels": labels}
        np.savez(f, **arrays)
    shown, per_row = images[: cfg.grid_size], None
    if labels is not None:
        num_rows = len(info.get("prompts") or ()) or loaded.num_classes  # a label per row
        shown, per_row = rows_by_label(shown, labels[: cfg.grid_size].tolist(), num_rows)
    # The grid and strip upscaled (nearest) to a viewable size; samples.npz stays native.
    save_png(upscale(make_grid(shown, nrow=per_row), MIN_PICTURE_SIDE), out / "grid.png")
    if cfg.save_images:
        (out / "images").mkdir(exist_ok=True)
        for k, image in enumerate(images):
            save_png(image, out / "images" / f"{k:06d}.png")
    if progression:
        # Rows: steps, columns: the first (up to 8) samples.
        strip = make_grid(
            to_uint8(torch.cat(progression), loaded.value_range), nrow=len(progression[0])
        )
        save_png(upscale(strip, MIN_PICTURE_SIDE), out / "progression.png")
    write_json(out / "sample_info.json", info)
    save_config(cfg, out / "sample_config.yaml")
    logger.info("wrote %d samples to %s", len(images), out / "samples.npz")
