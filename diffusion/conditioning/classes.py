"""Class labels: the condition of a class-conditional model.

Training (Ho & Salimans 2022): each label is replaced by the "no class" index C with
probability `label_dropout`, so one network learns p(x | c) and p(x), which guidance combines.
Sample k of a class-balanced set has class k mod C: any number of samples covers the classes
evenly, and image k does not depend on how many images are drawn or on which process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ddp_utils.images import labels_by_row, rows_by_label
from ddp_utils.model_card import GRID_CAPTION
from diffusion.pipeline_code.core import Condition, class_condition


@dataclass(frozen=True)
class ClassLabels:
    """The classes of a class-conditional model; the "no class" index is their number (a UNet's
    last class embedding, a DiT's label table's last row)."""

    class_names: tuple[str, ...]
    label_dropout: float = 0.0
    cycle: tuple[int, ...] | None = None  # sample k's class: cycle[k mod n]; None: every class

    conditional = True
    title = "class-conditional"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def training(self, condition: Condition | None, generator: torch.Generator) -> Condition:
        """The batch's labels with a `label_dropout` share replaced by "no class"."""
        assert condition is not None, "a class-conditional method needs batches with labels"
        labels = condition["class_labels"]
        drop = torch.rand(labels.shape, generator=generator, device=labels.device)
        return class_condition(torch.where(drop < self.label_dropout, self.null_label, labels))

    def labels(self, indices: Sequence[int]) -> torch.Tensor:
        """Sample k's class: k mod C (class-balanced), or the cycle's entry k mod n."""
        cycle = self.cycle or range(self.num_classes)
        return torch.tensor([cycle[k % len(cycle)] for k in indices], dtype=torch.long)

    def for_samples(self, indices: Sequence[int], device: torch.device | str) -> Condition:
        return class_condition(self.labels(indices).to(device))

    def null(self, batch_size: int, device: torch.device | str) -> Condition:
        return class_condition(torch.full((batch_size,), self.null_label, device=device))

    def task_info(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names)}

    def card_facts(self) -> list[tuple[str, str]]:
        return [("classes", ", ".join(self.class_names))]

    def dropout_fact(self) -> str:
        return f"label dropout {self.label_dropout}"

    def tags(self) -> list[str]:
        return ["class-conditional"]

    def grid_layout(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """One class per row (sample k: class k mod C)."""
        labels = self.labels(range(len(images)))
        return rows_by_label(images, labels.tolist(), self.num_classes)

    def grid_caption(self) -> str:
        return GRID_CAPTION

    def grid_rows(self, num_images: int) -> list[str]:
        """The class of each row of the grid of `num_images` samples."""
        labels = self.labels(range(num_images)).tolist()
        return [self.class_names[k] for k in labels_by_row(labels, self.num_classes)]
