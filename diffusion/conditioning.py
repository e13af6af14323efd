"""Class labels for class-conditional training and sampling with classifier-free guidance.

Training (Ho & Salimans 2022): each label is replaced by the "no class" index C with
probability `label_dropout`, so one network learns p(x | c) and p(x); sampling then guides
with eps(x, null) + w (eps(x, c) - eps(x, null)) (`pipeline_code.ddpm_pipeline`).

Sample k of a class-balanced set has class k mod C: any number of samples covers the classes
evenly, and image k does not depend on how many images are drawn or on which process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Conditioning:
    """The classes of a class-conditional model (`num_classes` 0: unconditional)."""

    class_names: tuple[str, ...] = ()
    label_dropout: float = 0.0
    guidance_scale: float = 1.0

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
