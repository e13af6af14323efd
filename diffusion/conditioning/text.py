"""Text: the condition of a text-to-image model, captions encoded once by a frozen text encoder.

A batch of captioned images carries each image's row among the captions (`caption_rows`,
`ddp_utils.data.load.CAPTION_ROWS`); the training condition is what a cross-attention network
takes, as diffusers' `UNet2DConditionModel` and `PixArtTransformer2DModel` name it:
`{"encoder_hidden_states": (B, L, D) float32, "encoder_attention_mask": (B, L) int64}`, read
from the text cache (`ddp_utils.data.text_cache`).

Per step, from the micro-step's seeded generator (so resume and 1 vs N processes stay exact):
first one caption of each image (uniform among its captions), then caption dropout: with
probability `caption_dropout` the caption is replaced by the empty prompt's encoding (Stable
Diffusion's 0.1), so one network learns p(x | text) and p(x), which guidance combines. "No
condition" is the empty prompt, as Stable Diffusion's pipelines have it.

Where the cache is small (DEVICE_BYTES) it sits on the device and a batch is one gather there;
a larger one stays mapped on the host and each batch's rows are read from it (that reads the
drawn rows back to the host: one device sync per step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ddp_utils.config import option, require
from ddp_utils.data.captions import Captions
from ddp_utils.data.load import CAPTION_ROWS
from ddp_utils.data.text_cache import TextEmbeddings
from ddp_utils.images import rows_by_label
from diffusion.pipeline_code.core import Condition

DEVICE_BYTES = 256 * 2**20  # a text cache up to this size is copied to the device
HIDDEN, MASK = "encoder_hidden_states", "encoder_attention_mask"
SECTION = "Text-to-image (captions encoded once by a frozen text encoder)"
DEFAULT_CAPTION_DROPOUT = 0.1  # Stable Diffusion's


@dataclass
class TextOptions:
    """Text conditioning's section of the training config."""

    text_encoder: str | None = option(
        None,
        "train on captions: the frozen text encoder that encodes them once (cached): a folder "
        "holding a CLIP text model or T5 encoder and its tokenizer (or a pipeline folder with "
        "text_encoder/ and tokenizer/), a hub id (as --vae), or tiny-clip (built in, random "
        "weights, for --dataset digits-captioned)",
        section=SECTION,
    )
    text_encoder_max_length: int | None = option(
        None,
        "tokens per caption, padded or truncated (default: CLIP's positions, 77; T5: 120)",
        section=SECTION,
    )
    caption_column: str | None = option(
        None,
        "caption column (a string or a list of strings per image: one is drawn per step); "
        "auto-detected: the only text column, or the one named text/caption/captions/prompt",
        section=SECTION,
    )
    caption_dropout: float = option(
        DEFAULT_CAPTION_DROPOUT,
        "share of captions replaced by the empty prompt (what guidance needs; SD's 0.1)",
        section=SECTION,
    )

    def check_text_options(self) -> None:
        require(
            0 <= self.caption_dropout < 1,
            f"--caption-dropout must be in [0, 1), got {self.caption_dropout}",
        )
        length = self.text_encoder_max_length
        require(
            length is None or length >= 1,
            f"--text-encoder-max-length must be >= 1 or none, got {length}",
        )
        if self.text_encoder is None:  # flags that would do nothing are refused
            for name, default in (("text_encoder_max_length", None), ("caption_column", None),
                                  ("caption_dropout", DEFAULT_CAPTION_DROPOUT)):  # fmt: skip
                require(
                    getattr(self, name) == default,
                    f"--{name.replace('_', '-')} applies to text-to-image runs only: add "
                    "--text-encoder, or drop it",
                )
        require(
            self.text_encoder is None or not getattr(self, "class_conditional", False),
            "--text-encoder and --class-conditional: a model is conditioned on captions or on "
            "class labels; drop one",
        )


class TextCondition:
    """Captions' encodings as the condition, the empty prompt as "no condition"."""

    conditional = True

    def __init__(
        self,
        embeddings: TextEmbeddings,
        captions: Captions,
        caption_dropout: float,
        device: torch.device | str,
        prompts: Sequence[str] = (),
        prompt_encoding: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """`prompts` and their (sequence embeddings, mask), as the text encoder gave them: the
        conditions of the samples (sample k: prompt k mod P); none: the captions'."""
        assert 0 <= caption_dropout < 1, caption_dropout
        assert len(embeddings.hidden) == len(captions.texts) + 1, "captions of another cache"
        assert not prompts or prompt_encoding is not None, "prompts need their encoding"
        self.embeddings, self.captions = embeddings, captions
        self.caption_dropout = caption_dropout
        self.device = torch.device(device)
        self.encoder_facts = embeddings.encoder  # what task.json and the card say of it
        self.prompts = tuple(prompts)
        self.prompt_encoding = prompt_encoding
        self.offsets = captions.offsets.to(self.device)
        self.counts = captions.counts.to(self.device)
        self.ids = captions.ids.to(self.device)
        self.empty_row = embeddings.empty_row
        self.hidden: torch.Tensor | None = None  # on the device, where the cache is small
        self.mask: torch.Tensor | None = None
        if embeddings.hidden.nbytes + embeddings.mask.nbytes <= DEVICE_BYTES:
            # Copies (np.array): the mapped arrays are read-only.
            self.hidden = torch.from_numpy(np.array(embeddings.hidden)).to(self.device)
            self.mask = torch.from_numpy(np.array(embeddings.mask)).to(self.device)

    def encoded(self, rows: torch.Tensor) -> Condition:
        """The condition of cache rows `rows` (captions' indices; `empty_row`: the empty
        prompt), on the device."""
        if self.hidden is not None:
            hidden, mask = self.hidden[rows], self.mask[rows]
        else:  # mapped on the host: read the rows a batch needs
            index = rows.cpu().numpy()
            hidden = torch.from_numpy(np.asarray(self.embeddings.hidden[index]))
            mask = torch.from_numpy(np.asarray(self.embeddings.mask[index]))
            hidden, mask = hidden.to(self.device), mask.to(self.device)
        return {HIDDEN: hidden.float(), MASK: mask.long()}

    def draw_captions(self, image_rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One caption of each image, uniform among its captions, then a `caption_dropout`
        share replaced by the empty prompt: cache rows, drawn from `generator`."""
        counts = self.counts[image_rows]
        u = torch.rand(image_rows.shape, generator=generator, device=image_rows.device)
        pick = torch.minimum((u * counts).long(), counts - 1)  # floor(u * n) < n
        caption = self.ids[self.offsets[image_rows] + pick]
        drop = torch.rand(image_rows.shape, generator=generator, device=image_rows.device)
        return torch.where(drop < self.caption_dropout, self.empty_row, caption)

    def training(self, condition: Condition | None, generator: torch.Generator) -> Condition:
        assert condition is not None, "a text-conditional method needs batches with captions"
        return self.encoded(self.draw_captions(condition[CAPTION_ROWS], generator))

    def sample_rows(self, indices: Sequence[int]) -> list[int]:
        """Sample k's prompt (k mod P), or without prompts its caption (k mod N)."""
        num = len(self.prompts) or len(self.captions.texts)
        return [k % num for k in indices]

    def for_samples(self, indices: Sequence[int], device: torch.device | str) -> Condition:
        rows = torch.tensor(self.sample_rows(indices), dtype=torch.long)
        if not self.prompts:
            return {k: v.to(device) for k, v in self.encoded(rows.to(self.device)).items()}
        hidden, mask = self.prompt_encoding
        return {HIDDEN: hidden[rows].float().to(device), MASK: mask[rows].long().to(device)}

    def null(self, batch_size: int, device: torch.device | str) -> Condition:
        rows = torch.full((batch_size,), self.empty_row, dtype=torch.long, device=self.device)
        return {k: v.to(device) for k, v in self.encoded(rows).items()}

    def task_info(self) -> dict[str, Any]:
        return {
            "text_encoder": self.encoder_facts,
            "caption_dropout": self.caption_dropout,
            "prompts": list(self.prompts),
        }

    def card_facts(self) -> list[tuple[str, str]]:
        source = self.encoder_facts.get("source", "a text encoder")
        length = self.encoder_facts.get("max_length")
        tokens = f", {length} tokens per caption" if length else ""
        return [("text encoder", f"{source} (frozen{tokens})"),
                ("captions", f"{len(self.captions.texts)} distinct, from column "
                             f"{self.captions.column!r}")]  # fmt: skip

    def dropout_fact(self) -> str:
        return f"caption dropout {self.caption_dropout} (to the empty prompt)"

    def tags(self) -> list[str]:
        return ["text-to-image"]

    def grid_layout(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """One prompt per row (sample k: prompt k mod P); without prompts, 8 per row."""
        if not self.prompts:
            return images, 8
        return rows_by_label(images, self.sample_rows(range(len(images))), len(self.prompts))
