"""Class labels for class-conditional training and sampling with classifier-free guidance.

Training (Ho & Salimans 2022): each label is replaced by the "no class" index C with
probability `label_dropout`, so one network learns p(x | c) and p(x); sampling then guides
with eps(x, null) + w (eps(x, c) - eps(x, null)) (`pipeline_code.pipelines`).

Sample k of a class-balanced set has class k mod C: any number of samples covers the classes
evenly, and image k does not depend on how many images are drawn or on which process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ddp_utils.config import option, require
from ddp_utils.errors import InputError

# Guidance (w > 1) only at noise levels sigma in (low, high]: EDM2's interval (Kynkaanniemi
# et al. 2024). On the digits at w = 4 it took the DiT's FID from 1.67x w = 1's to 1.40x.
DEFAULT_GUIDANCE_INTERVAL = "0.28,5.42"
SECTION = "Class-conditional generation (classifier-free guidance, Ho & Salimans 2022)"


@dataclass
class ConditioningOptions:
    """Class conditioning's section of the training config."""

    class_conditional: bool = option(
        False,
        "train on the dataset's class labels (digits, MNIST, CIFAR-10, an image folder with one "
        "subfolder per class) and sample with classifier-free guidance",
        section=SECTION,
    )
    label_dropout: float = option(
        0.1, "share of labels replaced by 'no class' (what guidance needs)", section=SECTION
    )
    sample_guidance_scale: float = option(
        1.5,
        "guidance w of the grids and --eval-every, stored in the export "
        "(0: unconditional, 1: conditional, > 1: more like the class; 1.5 measured best on "
        "digits: FID as w = 1, the asked class 99.6% of the time)",
        section=SECTION,
    )

    sample_guidance_interval: str = option(
        DEFAULT_GUIDANCE_INTERVAL,
        "noise levels 'LOW,HIGH' (sigma in (LOW, HIGH]) where w > 1 applies, the conditional "
        "output elsewhere (Kynkaanniemi et al. 2024), stored in the export; 'all': every step",
        section=SECTION,
    )

    def check_conditioning_options(self) -> None:
        parse_guidance_interval(self.sample_guidance_interval, "sample_guidance_interval")
        require(
            0 <= self.label_dropout < 1,
            f"--label-dropout must be in [0, 1), got {self.label_dropout}",
        )
        require(
            self.sample_guidance_scale >= 0,
            f"--sample-guidance-scale must be >= 0, got {self.sample_guidance_scale}",
        )


@dataclass(frozen=True)
class Conditioning:
    """The classes of a class-conditional model (`num_classes` 0: unconditional)."""

    class_names: tuple[str, ...] = ()
    label_dropout: float = 0.0
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] | None = None  # None: guidance at every step

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def null_label(self) -> int:
        """The "no class" index, the UNet's last class embedding."""
        return self.num_classes

    def training_labels(
        self, labels: torch.Tensor | None, generator: torch.Generator
    ) -> torch.Tensor | None:
        """The batch's labels with a `label_dropout` share replaced by "no class"."""
        if not self.num_classes:
            return None
        assert labels is not None, "a class-conditional method needs batches with labels"
        drop = torch.rand(labels.shape, generator=generator, device=labels.device)
        return torch.where(drop < self.label_dropout, self.null_label, labels)

    def sample_labels(self, indices: Sequence[int]) -> torch.Tensor | None:
        """Class k mod C for sample k: class-balanced, whatever the number of samples."""
        if not self.num_classes:
            return None
        return torch.tensor([k % self.num_classes for k in indices], dtype=torch.long)


def parse_guidance_interval(text: str, flag: str) -> tuple[float, float] | None:
    """'LOW,HIGH' -> (low, high) with 0 <= low < high; 'all' -> None (every step)."""
    if text.strip().lower() == "all":
        return None
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise InputError(
            f"takes 'LOW,HIGH' (noise levels, e.g. 0.28,5.42) or 'all'; got {text!r}", flag
        ) from None
    if not 0 <= low < high:
        raise InputError(f"needs 0 <= LOW < HIGH; got {text!r}", flag)
    return low, high
