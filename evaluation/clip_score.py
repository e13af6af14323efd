"""CLIP score: how well images match their prompts, by a CLIP model (Hessel et al. 2021).

The score of an image and its text is torchmetrics' `CLIPScore`: 100 * max(cos, 0), cos the
cosine of CLIP's image and text embeddings (each projected, then normalised); a set's score
is the mean over its pairs. Images go through the model's own image processor (resized and
centre-cropped to its input size, normalised; grayscale repeated to three channels), texts
through its tokenizer (truncated to its positions, as torchmetrics does).

`load_clip_scorer` takes a folder holding a transformers `CLIPModel` (safetensors weights), its
tokenizer and image processor, or a hub id (the cache and offline rules of --vae and
--text-encoder: `diffusion.sources`); nothing of the folder's code runs. `clip_score` scores a
set sharded across processes as FID's features are (`ddp_utils.distributed`'s chunks: chunk k
on rank k % world, the per-image scores gathered in image order, their mean taken once), so 1
and N processes give the same number; `ChunkScores` scores images made on the fly, chunk by
chunk as FID's features are extracted from them, so each image is made once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from ddp_utils.distributed import gather_chunks, map_sharded
from ddp_utils.errors import InputError
from diffusion.sources import resolve_model_source

# What --clip-model reads of a hub repository: the model, its tokenizer and image processor.
CLIP_HUB_FILES = [
    "config.json", "model*.safetensors", "model.safetensors.index.json",
    "preprocessor_config.json", "processor_config.json", "tokenizer.json",
    "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
]  # fmt: skip
CLIP_SOURCES = (
    "a local folder holding a transformers CLIPModel (safetensors), its tokenizer and "
    "preprocessor_config.json, or a hub id such as openai/clip-vit-large-patch14"
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
Prompts = Callable[[range], Sequence[str]]  # the prompts of items `range` (sample k's: item k)


@dataclass
class ClipScorer:
    """A CLIPModel in eval mode, its tokenizer and its image processor."""

    model: CLIPModel
    tokenizer: Any
    image_processor: Any
    source: str  # what --clip-model named

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def scores(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """100 * max(cos, 0) of each uint8 (N, C, H, W) image and its text: float32 (N,) on
        the CPU."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images (N, C, H, W), C in {{1, 3}}, got "
                             f"{images.dtype} {tuple(images.shape)}")  # fmt: skip
        if len(texts) != len(images):
            raise ValueError(f"{len(images)} images and {len(texts)} texts")
        images = images.cpu().expand(-1, 3, -1, -1)  # grayscale: the same value in R, G, B
        pixels = self.image_processor(
            images=list(images), return_tensors="pt", input_data_format="channels_first"
        )["pixel_values"]
        tokens = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        )
        image_embeds = self.model.get_image_features(pixel_values=pixels.to(self.device))
        text_embeds = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        image_embeds = unit(image_embeds.pooler_output.float())
        text_embeds = unit(text_embeds.pooler_output.float())
        cosine = (image_embeds * text_embeds).sum(-1)
        return (100 * cosine.clamp(min=0)).cpu()


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def load_clip_scorer(
    spec: str, device: torch.device | str = "cpu", field: str = "clip_model"
) -> ClipScorer:
    """The CLIP model `spec` names (a folder or a hub id), in eval mode, float32, on `device`.
    Errors name the flag `field`."""
    folder = resolve_model_source(spec, field, CLIP_HUB_FILES, what=CLIP_SOURCES)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise InputError(f"{folder} holds no config.json: give {CLIP_SOURCES}", field) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{config_path} cannot be read as JSON: {err}", field) from None
    names = (config.get("architectures") or []) if isinstance(config, dict) else []
    if CLIPModel.__name__ not in names:
        raise InputError(
            f"{folder} holds a {', '.join(names) or 'model of unknown class'} (its config.json's "
            "architectures); the CLIP score needs a CLIPModel: its image and its text towers",
            field,
        )
    if not any(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.glob("*.bin")]
        raise InputError(
            f"{folder} has no safetensors weights"
            + (f" ({', '.join(pickles)} is a pickle, which can run code when loaded; convert "
               "it once, if you trust it: from_pretrained then save_pretrained)"
               if pickles else ""),
            field,
        )  # fmt: skip
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{folder} holds no tokenizer (tokenizer.json or vocab.json): the "
                         "CLIP model needs the tokenizer it was trained with", field)  # fmt: skip
    if not (folder / "preprocessor_config.json").is_file():
        raise InputError(f"{folder} holds no preprocessor_config.json: the CLIP model needs "
                         "its image processor (input size, normalisation)", field)  # fmt: skip
    model = CLIPModel.from_pretrained(folder, use_safetensors=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=False)
    model = model.to(device, torch.float32).requires_grad_(False).eval()
    return ClipScorer(model, tokenizer, processor, spec)


def clip_score(
    images: torch.Tensor | np.ndarray,
    prompts: Prompts,
    scorer: ClipScorer,
    accelerator: Accelerator | None = None,
    batch_size: int = 250,
) -> float:
    """The mean CLIP score of uint8 (N, C, H, W) `images`, image k against `prompts(items)`'s
    text of item k, sharded in chunks of `batch_size` (collective; the same on every rank)."""
    images = torch.as_tensor(images)

    def chunk(items: range) -> torch.Tensor:
        return scorer.scores(images[items.start : items.stop], prompts(items))

    return mean_score(map_sharded(accelerator, len(images), batch_size, chunk))


class ChunkScores:
    """CLIP scores of images made on the fly, chunk by chunk: `wrap(generate)` scores each chunk
    it makes against its prompts as it passes it on (to FID's features), `mean` gathers them."""

    def __init__(self, scorer: ClipScorer, prompts: Prompts) -> None:
        self.scorer, self.prompts = scorer, prompts
        self.chunks: list[torch.Tensor] = []  # this rank's chunks' scores, in its chunks' order

    def wrap(self, generate: Callable[[range], torch.Tensor]) -> Callable[[range], torch.Tensor]:
        def generate_and_score(items: range) -> torch.Tensor:
            images = generate(items)
            self.chunks.append(self.scorer.scores(images, self.prompts(items)))
            return images

        return generate_and_score

    def mean(self, accelerator: Accelerator | None, num_items: int, chunk_size: int) -> float:
        """The mean over every rank's chunks (collective), then a fresh start."""
        scores = gather_chunks(accelerator, self.chunks, num_items, chunk_size)
        self.chunks = []
        return mean_score(scores)


def mean_score(scores: torch.Tensor) -> float:
    """The mean of per-image scores in image order, in float64: one number for any world."""
    return float(scores.double().mean())
