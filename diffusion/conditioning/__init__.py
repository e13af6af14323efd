"""Conditioning as a value: what a batch carries to the loss and a sampler to the network.

A condition is a dict of batch-first tensors the network takes as keyword arguments
(`diffusion.pipeline_code.core.Condition`). The loop, the samplers and guidance pass it
through without looking inside; what a condition means is its source's business:

- `ConditionSource` (below): turns the data's per-row condition into the training condition
  (dropping some to "no condition", for guidance), gives sample k's condition, and the "no
  condition" value guidance needs, and describes itself for task.json and the model card;
- `classes.ClassLabels`: class labels; `text.TextCondition`: captions encoded once by a
  frozen text encoder (`encoder_hidden_states`, `encoder_attention_mask`); `Unconditional`:
  none.

`guidance.py` holds classifier-free guidance's scale and interval (any source), and the config
section of conditioning. A new source is a module here and a line in `condition_source`; the
loop, the samplers and guidance do not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from ddp_utils.data.captions import Captions
from ddp_utils.data.text_cache import TextEmbeddings
from ddp_utils.model_card import GRID_CAPTION
from diffusion.conditioning.classes import ClassLabels
from diffusion.conditioning.text import EncodedPrompts, TextCondition
from diffusion.pipeline_code.core import Condition


class ConditionSource(Protocol):
    """Where a model's conditions come from, and what "no condition" is."""

    conditional: bool  # False: an unconditional model (no condition, no guidance)
    title: str  # what the model card calls such a model: "class-conditional", "text-to-image"

    def training(self, condition: Condition | None, generator: torch.Generator) -> Condition | None:
        """The batch's condition as the network trains on it (a share dropped to "no
        condition", drawn from the micro-step's generator)."""
        ...

    def for_samples(self, indices: Sequence[int], device: torch.device | str) -> Condition | None:
        """The condition of samples `indices` (sample k's never depends on the others)."""
        ...

    def null(self, batch_size: int, device: torch.device | str) -> Condition | None:
        """The "no condition" value of a batch, what guidance contrasts the condition with."""
        ...

    def task_info(self) -> dict[str, Any]:
        """What task.json and checkpoints record of the condition (sample.py reads it back)."""
        ...

    def card_facts(self) -> list[tuple[str, str]]:
        """The model card's facts about the condition."""
        ...

    def dropout_fact(self) -> str:
        """How training drops conditions (what guidance needs), in words."""
        ...

    def tags(self) -> list[str]:
        """The model card's hub tags of the condition."""
        ...

    def grid_layout(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """The grid's images (sample k: item k) in order, and images per row."""
        ...

    def grid_caption(self) -> str:
        """What the model card says its grid shows."""

    def grid_rows(self, num_images: int) -> list[str]:
        """What each row of the grid of `num_images` samples shows, top to bottom (its prompt,
        its class): the grid's caption; [] where a row shows nothing in particular."""
        ...


class Unconditional:
    """No condition: every call of the network is unconditional."""

    conditional = False
    title = ""

    def training(self, condition, generator):
        return None

    def for_samples(self, indices, device):
        return None

    def null(self, batch_size, device):
        return None

    def task_info(self) -> dict[str, Any]:
        return {}

    def card_facts(self) -> list[tuple[str, str]]:
        return []

    def dropout_fact(self) -> str:
        return ""

    def tags(self) -> list[str]:
        return []

    def grid_layout(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        return images, 8

    def grid_caption(self) -> str:
        return GRID_CAPTION

    def grid_rows(self, num_images: int) -> list[str]:
        return []


UNCONDITIONAL = Unconditional()


def condition_source(
    cfg: Any,
    class_names: Sequence[str] | None,
    text: TextEmbeddings | None = None,
    captions: Captions | None = None,
    device: torch.device | str = "cpu",
    prompts: EncodedPrompts | None = None,
) -> ConditionSource:
    """A training run's source: the captions' encodings (`text`, the run's text cache, with
    --text-encoder; `prompts`: its grids'), class labels with --class-conditional, else none."""
    if text is not None:
        assert captions is not None, "the text cache encodes the data's captions"
        return TextCondition(text, captions, cfg.caption_dropout, device, prompts)
    if getattr(cfg, "class_conditional", False):
        return ClassLabels(tuple(class_names or ()), cfg.label_dropout)
    return UNCONDITIONAL
