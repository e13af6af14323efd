"""Text: the condition of a text-to-image model, captions encoded once by a frozen text encoder.

A batch of captioned images carries each image's row among the captions (`caption_rows`,
`ddp_utils.data.load.CAPTION_ROWS`); the training condition is what a cross-attention network
takes, as diffusers' `UNet2DConditionModel` and `PixArtTransformer2DModel` name it:
`{"encoder_hidden_states": (B, L, D) float32}`, with `"encoder_attention_mask": (B, L) int64`
for the encoders whose mask the network is given (T5's; not CLIP's: `ENCODERS_WITH_MASK`
says why), read from the text cache (`ddp_utils.data.text_cache`).

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

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddp_utils.config import option, require
from ddp_utils.data.captions import Captions
from ddp_utils.data.load import CAPTION_ROWS
from ddp_utils.data.text_cache import TextEmbeddings, TextEncoder
from ddp_utils.errors import InputError
from ddp_utils.images import labels_by_row, rows_by_label
from ddp_utils.model_card import GRID_CAPTION
from diffusion.pipeline_code.core import HIDDEN, Condition, text_condition

DEVICE_BYTES = 256 * 2**20  # a text cache up to this size is copied to the device
SECTION = "Text-to-image (captions encoded once by a frozen text encoder)"
DEFAULT_CAPTION_DROPOUT = 0.1  # Stable Diffusion's
TEXT_TO_IMAGE = "text-to-image"  # a text-conditional model's title (and hub tag)
NUM_DEFAULT_PROMPTS = 4  # the grids' prompts without --validation-prompts: captions of the data


@dataclass
class TextOptions:
    """Text conditioning's section of the training config."""

    text_encoder: str | None = option(
        None,
        "train on captions: the frozen text encoder that encodes them once (cached): a folder "
        "holding a CLIP text model or T5 encoder and its tokenizer (or a pipeline folder with "
        "text_encoder/ and tokenizer/; SDXL's, SD3's or Flux's gives its encoders together), "
        "a hub id (as --vae), or tiny-clip (built in, random "
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
    validation_prompts: list[str] | None = option(
        None,
        "the grids' prompts, one row each with the run's fixed seeds (each value one prompt: "
        "--validation-prompts 'a handwritten seven' 'the digit two'); default: "
        f"{NUM_DEFAULT_PROMPTS} captions of the data",
        section=SECTION,
    )
    validation_prompts_file: str | None = option(
        None, "a text file of the grids' prompts, one per line (blank lines skipped)",
        section=SECTION,
    )  # fmt: skip
    clip_model: str | None = option(
        None,
        "at each --eval-every, the CLIP score of the evaluation's samples against their "
        "prompts (the validation prompts in turn; torchmetrics' 100 * max(cos, 0), mean) beside "
        "FID: a folder holding a transformers CLIPModel (safetensors) with its tokenizer and "
        "image processor, or a hub id (as --text-encoder), e.g. openai/clip-vit-large-patch14",
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
        require(
            self.validation_prompts is None or self.validation_prompts_file is None,
            "--validation-prompts and --validation-prompts-file both give the grids' prompts: "
            "keep one",
        )
        require(
            self.validation_prompts is None or all(p.strip() for p in self.validation_prompts),
            f"--validation-prompts needs at least one prompt, none blank; got "
            f"{self.validation_prompts}",
        )
        if self.validation_prompts_file is not None:
            read_prompts_file(self.validation_prompts_file, "validation_prompts_file")
        if self.text_encoder is None:  # flags that would do nothing are refused
            for name, default in (("text_encoder_max_length", None), ("caption_column", None),
                                  ("caption_dropout", DEFAULT_CAPTION_DROPOUT),
                                  ("validation_prompts", None),
                                  ("validation_prompts_file", None),
                                  ("clip_model", None)):  # fmt: skip
                require(
                    getattr(self, name) == default,
                    f"--{name.replace('_', '-')} applies to text-to-image runs only: add "
                    "--text-encoder, or drop it",
                )
        require(
            self.clip_model is None or getattr(self, "eval_every", 0) > 0,
            "--clip-model scores the samples of each evaluation: give --eval-every N too (and "
            "--eval-num-samples), or drop --clip-model",
        )
        require(
            self.text_encoder is None or not getattr(self, "class_conditional", False),
            "--text-encoder and --class-conditional: a model is conditioned on captions or on "
            "class labels; drop one",
        )

    def validation_prompt_texts(self) -> list[str] | None:
        """The grids' prompts the flags give (None: the default, captions of the data)."""
        if self.validation_prompts_file is not None:
            return read_prompts_file(self.validation_prompts_file, "validation_prompts_file")
        return None if self.validation_prompts is None else list(self.validation_prompts)


def read_prompts_file(path: str, flag: str) -> list[str]:
    """The prompts of a text file, one per line, blank lines skipped; at least one."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}",
                         flag) from None  # fmt: skip
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InputError(f"{path} holds no prompt (one per line)", flag)
    return prompts


# Whose attention mask the network is given: the rule, in one place. Stable Diffusion trained
# its UNet on CLIP's whole padded sequence (77 tokens) with no mask, and StableDiffusionPipeline
# passes none: a CLIP encoder's condition is the padded sequence alone, so that a network
# trained here reads prompts as the stock pipelines give them. PixArt-alpha trained on T5's
# sequence with its mask (PixArtAlphaPipeline passes prompt_attention_mask): a T5 encoder's
# condition carries its mask, and the padded tokens are ignored. Joint encoders (SDXL's,
# SD3's, Flux's: "CLIPTextModel+...") carry none: their pipelines pass none to the network.
ENCODERS_WITH_MASK = frozenset({"T5EncoderModel"})
# The dtype the text cache stores encodings in (`load_text_embeddings`' default): what the
# network trains on, so prompts encoded for sampling are rounded to it too.
EMBEDDING_DTYPE = torch.float16


def takes_attention_mask(encoder: dict[str, Any]) -> bool:
    """Whether the condition of text encoded by `encoder` (its facts) carries the mask."""
    return encoder.get("class") in ENCODERS_WITH_MASK


@dataclass(frozen=True)
class EncodedPrompts:
    """Prompts and their encoding by the run's text encoder, rounded to the cache's dtype as
    the captions the network trained on were."""

    texts: tuple[str, ...]
    hidden: torch.Tensor  # (P, L, D) float32, on the CPU
    mask: torch.Tensor  # (P, L) int64


def encode_prompts(encoder: TextEncoder, texts: Sequence[str]) -> EncodedPrompts:
    """`texts` encoded once by `encoder` (on its device), kept on the CPU."""
    hidden, _, mask = encoder.encode(list(texts))
    return EncodedPrompts(tuple(texts), hidden.to(EMBEDDING_DTYPE).float(), mask)


def quoted(prompts: Sequence[str]) -> str:
    """Prompts for a model card's table: quoted, '|' escaped (it would end the cell)."""
    return "; ".join(json.dumps(p, ensure_ascii=False).replace("|", "\\|") for p in prompts)


def prompts_caption(prompts: Sequence[str]) -> str:
    """What a model card says of a grid of one row per prompt."""
    rows = ", ".join(f"{k + 1}. {json.dumps(p, ensure_ascii=False)}" for k, p in enumerate(prompts))
    return f"{GRID_CAPTION[:-1]}, one row per validation prompt, top to bottom: {rows}."


def default_validation_prompts(captions: Captions, num_images: int) -> list[str]:
    """A few captions of the data for grids of `num_images`: the first caption of each row,
    the first NUM_DEFAULT_PROMPTS distinct ones (at most one per image)."""
    firsts = captions.ids[captions.offsets[:-1]].tolist()  # each row's first caption
    distinct = list(dict.fromkeys(firsts))[: min(NUM_DEFAULT_PROMPTS, num_images)]
    return [captions.texts[i] for i in distinct]


def captions_origin(column: str) -> str:
    """Where captions came from, for a card: a column of the data, or (no column) the run's
    prompts (DreamBooth's)."""
    return f"from column {column!r}" if column else "the DreamBooth prompts"


class PromptCondition:
    """Prompts as the samples' condition (sample k: prompt k mod P) and a negative prompt (the
    empty prompt: what caption dropout trained on) as "no condition": what sample.py draws,
    and a text run's grids."""

    conditional = True
    title = TEXT_TO_IMAGE

    def __init__(self, prompts: EncodedPrompts, negative: EncodedPrompts, with_mask: bool) -> None:
        assert len(prompts.texts) >= 1 and len(negative.texts) == 1
        self.prompts, self.negative, self.with_mask = prompts, negative, with_mask

    def training(self, condition: Condition | None, generator: torch.Generator) -> Condition:
        raise TypeError("prompts are a condition of samples; training draws captions")

    def rows(self, indices: Sequence[int]) -> list[int]:
        return [k % len(self.prompts.texts) for k in indices]

    def labels(self, indices: Sequence[int]) -> torch.Tensor:
        """Sample k's prompt's index (what samples.npz records as its label)."""
        return torch.tensor(self.rows(indices), dtype=torch.long)

    def prompts_of(self, indices: Sequence[int]) -> list[str]:
        """Sample k's prompt, for each k of `indices` (what the CLIP score compares it with)."""
        return [self.prompts.texts[k] for k in self.rows(indices)]

    def for_samples(self, indices: Sequence[int], device: torch.device | str) -> Condition:
        rows = torch.tensor(self.rows(indices), dtype=torch.long)
        condition = text_condition(self.prompts.hidden[rows], self.prompts.mask[rows],
                                   self.with_mask)  # fmt: skip
        return {k: v.to(device) for k, v in condition.items()}

    def null(self, batch_size: int, device: torch.device | str) -> Condition:
        hidden = self.negative.hidden.expand(batch_size, -1, -1)
        mask = self.negative.mask.expand(batch_size, -1)
        return {k: v.to(device) for k, v in text_condition(hidden, mask, self.with_mask).items()}

    def task_info(self) -> dict[str, Any]:
        return {"prompts": list(self.prompts.texts), "negative_prompt": self.negative.texts[0]}

    def card_facts(self) -> list[tuple[str, str]]:
        return [("prompts", quoted(self.prompts.texts))]

    def dropout_fact(self) -> str:
        return ""

    def tags(self) -> list[str]:
        return [TEXT_TO_IMAGE]

    def grid_layout(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """One prompt per row (sample k: prompt k mod P)."""
        return rows_by_label(images, self.rows(range(len(images))), len(self.prompts.texts))

    def grid_caption(self) -> str:
        return prompts_caption(self.prompts.texts)

    def grid_rows(self, num_images: int) -> list[str]:
        """The prompt of each row of the grid of `num_images` samples."""
        rows = labels_by_row(self.rows(range(num_images)), len(self.prompts.texts))
        return [self.prompts.texts[k] for k in rows]


class TextCondition:
    """Captions' encodings as the condition, the empty prompt as "no condition"."""

    conditional = True
    title = TEXT_TO_IMAGE

    def __init__(
        self,
        embeddings: TextEmbeddings,
        captions: Captions,
        caption_dropout: float,
        device: torch.device | str,
        prompts: EncodedPrompts | None = None,
    ) -> None:
        """`prompts`: the conditions of the samples (sample k: prompt k mod P, the grids' rows);
        none: the captions' (k mod N)."""
        assert 0 <= caption_dropout < 1, caption_dropout
        assert len(embeddings.hidden) == len(captions.texts) + 1, "captions of another cache"
        self.embeddings, self.captions = embeddings, captions
        self.caption_dropout = caption_dropout
        self.device = torch.device(device)
        self.encoder_facts = embeddings.encoder  # what task.json and the card say of it
        self.with_mask = takes_attention_mask(self.encoder_facts)
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
        self.prompted: PromptCondition | None = None
        if prompts is not None:  # the empty prompt as the cache holds it
            empty = self.encoded(torch.tensor([self.empty_row], device=self.device))[HIDDEN]
            mask = torch.from_numpy(np.array(embeddings.mask[-1:])).long()
            negative = EncodedPrompts(("",), empty.cpu(), mask)
            self.prompted = PromptCondition(prompts, negative, self.with_mask)

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
        return text_condition(hidden, mask, self.with_mask)

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
        """Sample k's caption (k mod N), without prompts."""
        return [k % len(self.captions.texts) for k in indices]

    def prompts_of(self, indices: Sequence[int]) -> list[str]:
        """Sample k's prompt (or, without prompts, caption), for each k of `indices`."""
        if self.prompted is not None:
            return self.prompted.prompts_of(indices)
        return [self.captions.texts[k] for k in self.sample_rows(indices)]

    def for_samples(self, indices: Sequence[int], device: torch.device | str) -> Condition:
        if self.prompted is not None:
            return self.prompted.for_samples(indices, device)
        rows = torch.tensor(self.sample_rows(indices), dtype=torch.long)
        return {k: v.to(device) for k, v in self.encoded(rows.to(self.device)).items()}

    def null(self, batch_size: int, device: torch.device | str) -> Condition:
        rows = torch.full((batch_size,), self.empty_row, dtype=torch.long, device=self.device)
        return {k: v.to(device) for k, v in self.encoded(rows).items()}

    def task_info(self) -> dict[str, Any]:
        prompts = [] if self.prompted is None else list(self.prompted.prompts.texts)
        return {
            "text_encoder": self.encoder_facts,
            "caption_dropout": self.caption_dropout,
            "prompts": prompts,
        }

    def card_facts(self) -> list[tuple[str, str]]:
        facts = self.encoder_facts
        length = facts.get("max_length")
        tokens = f", {length} tokens per caption" if length else ""
        encoder = (f"{facts.get('class', 'a text model')} {facts.get('source', '')} (frozen"
                   f"{tokens}; in text_encoder/ and tokenizer/)")  # fmt: skip
        rows = [("text encoder", encoder),
                ("captions", f"{len(self.captions.texts)} distinct, "
                             f"{captions_origin(self.captions.column)}")]  # fmt: skip
        if self.prompted is not None:
            rows.append(("validation prompts", quoted(self.prompted.prompts.texts)))
        return rows

    def dropout_fact(self) -> str:
        return f"caption dropout {self.caption_dropout} (to the empty prompt)"

    def tags(self) -> list[str]:
        return [TEXT_TO_IMAGE]

    def grid_layout(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """One prompt per row (sample k: prompt k mod P); without prompts, 8 per row."""
        if self.prompted is None:
            return images, 8
        return self.prompted.grid_layout(images)

    def grid_caption(self) -> str:
        if self.prompted is None:
            return GRID_CAPTION
        return self.prompted.grid_caption()

    def prompt_texts(self) -> list[str]:
        """The grids' prompts (the captions' first ones when none were given)."""
        if self.prompted is not None:
            return list(self.prompted.prompts.texts)
        return list(self.captions.texts[:NUM_DEFAULT_PROMPTS])

    def grid_rows(self, num_images: int) -> list[str]:
        """The prompt of each row; without prompts, none (8 captions per row)."""
        return [] if self.prompted is None else self.prompted.grid_rows(num_images)
