"""Text encoders (`--text-encoder`): a frozen transformers text model and its tokenizer, what
turns captions into the sequence embeddings a text-conditional network attends to.

`load_text_encoder` takes a folder holding the model and its tokenizer (both at its root, or a
pipeline's `text_encoder/` and `tokenizer/`, as Stable Diffusion ships them), a hub id (resolved
through `diffusion.sources`: the cache and offline rules of --vae), or the name of a built-in
encoder. Supported: CLIP's text model with or without its projection (`CLIPTextModel`,
`CLIPTextModelWithProjection`) and T5's encoder (`T5EncoderModel`); weights as safetensors only.
The model is frozen, in eval mode, in the run's precision.

An encoding is (sequence embeddings (n, L, D), pooled embedding (n, P), attention mask (n, L))
at a fixed length L (padded, truncated): CLIP's pooled embedding is its end-of-text token's
state (projected, with the projection); T5 has none, and its pooled embedding is the mean of
the valid tokens' states. `fingerprint` covers whatever changes an encoding (the weights, the
config, the tokenizer, L, the dtype): it keys the text cache (`ddp_utils.data.text_cache`), and
a resumed run compares it (`text_encoder_changes`).

The built-in `tiny-clip` is a CLIP text model of 2 layers and width 32 with a word-level
vocabulary covering the captioned digits' phrasings (`ddp_utils.data.source`), made here from
its config with a fixed seed: no download, and the same weights on every machine with the same
torch. It stays frozen at its random initialisation. That is enough for the digits: distinct
phrasings give distinct embeddings (each word has its own random token embedding, and the
causal attention carries it to the later positions), so the denoiser can learn which phrasings
mean which digit from the training captions alone. It is not language understanding: a
held-out phrasing of a digit ("an image of the digit 7") is not mapped near the trained ones of
the same digit, beyond the words they share; generalising to new phrasings needs a trained
encoder (CLIP, T5).

Several encoders together (`JointTextEncoder`), as Stable Diffusion XL, Stable Diffusion 3 and
Flux combine theirs: a pipeline folder (or hub id) with `text_encoder_2/` and `tokenizer_2/`
(and SD3's `text_encoder_3/`, `tokenizer_3/`) loads them all, read as its pipeline reads them
(`JOINT_RULES`).

Each model is called as the diffusers pipelines call it, so that a network trained here reads
prompts as a stock pipeline gives them: CLIP without the attention mask (its causal attention
keeps the padding out of the real tokens' states; StableDiffusionPipeline passes none), T5 alone
with it (PixArt-alpha's pipeline), T5 beside CLIP without it (SD3's and Flux's pipelines).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedModel,
    T5EncoderModel,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ddp_utils.data.source import (
    DIGIT_HELD_OUT_PHRASINGS,
    DIGIT_PHRASINGS,
    DIGIT_WORDS,
    digit_captions,
)
from ddp_utils.errors import InputError
from diffusion.pipeline_code.core import encode_text
from diffusion.sources import resolve_model_source

ENCODER_CLASSES: dict[str, type[PreTrainedModel]] = {
    cls.__name__: cls for cls in (CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel)
}
# A pipeline's text model and tokenizer live in these subfolders (Stable Diffusion's layout);
# SDXL's, SD3's and Flux's further ones in text_encoder_2/, tokenizer_2/ (and _3).
MODEL_FOLDER, TOKENIZER_FOLDER = "text_encoder", "tokenizer"
JOINT_FOLDERS = tuple((f"{MODEL_FOLDER}{n}", f"{TOKENIZER_FOLDER}{n}") for n in ("", "_2", "_3"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "spiece.model")  # fmt: skip
# What --text-encoder reads of a hub repository: the text model and its tokenizer, at its root
# or in a pipeline's subfolders (not the rest of a pipeline: its UNet is gigabytes).
TEXT_ENCODER_HUB_FILES = [
    f"{prefix}{name}"
    for prefix in ("", *(f"{folder}/" for pair in JOINT_FOLDERS for folder in pair))
    for name in ("config.json", "model*.safetensors", "model.safetensors.index.json",
                 *TOKENIZER_FILES)
]  # fmt: skip
TEXT_ENCODER_SOURCES = (
    "a local folder holding a CLIP text model or T5 encoder and its tokenizer (or a pipeline "
    "folder with text_encoder/ and tokenizer/; SDXL's, SD3's and Flux's, with text_encoder_2/, "
    "give their encoders together), a hub id such as openai/clip-vit-large-patch14, "
    "or tiny-clip (built in, for the captioned digits)"
)
# Config entries that say where a model came from, not how it encodes (saving adds them), and
# use_attention_mask: what Stable Diffusion's pipelines read to give CLIP the mask, which
# `encode` never gives it (exports unset it: `shipped`).
CONFIG_NOT_ENCODING = ("architectures", "transformers_version", "dtype", "torch_dtype",
                       "use_attention_mask")  # fmt: skip
CLIP_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
T5_MAX_LENGTH = 120  # tokens of a T5 caption by default (PixArt-alpha's)
# How an encoding is computed beyond the weights (which model is given the mask, which layer is
# read): in every fingerprint, so that a cache written by other rules is never read as this one.
ENCODING_RULES = "2"

TINY_CLIP = "tiny-clip"
TINY_CLIP_SEED = 0
TINY_CLIP_MAX_LENGTH = 16  # the longest digit phrasing is 9 tokens with its start and end


@dataclass
class TextEncoder:
    """A frozen text model in eval mode, its tokenizer and the length of its encodings."""

    model: PreTrainedModel
    tokenizer: Any
    max_length: int
    source: str  # what --text-encoder named
    fingerprint: str  # weights, config, tokenizer, length, dtype, the rules below
    # Whether the model is given the attention mask (T5 alone: PixArt-alpha's pipeline does;
    # CLIP and the T5 beside CLIP: their pipelines do not), and whether the sequence embeddings
    # are the penultimate layer's states (CLIP in SDXL and SD3) rather than the last's.
    model_mask: bool = False
    penultimate: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> TextEncoder:
        self.model.to(device)
        return self

    @property
    def width(self) -> int:
        """The width D of its sequence embeddings (T5's d_model is its hidden_size too)."""
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sequence embeddings (n, L, D), pooled (n, P), attention mask (n, L)): float32 and
        int64 on the CPU."""
        out, hidden, mask = encode_text(self.model, self.tokenizer, texts, self.max_length,
                                        self.model_mask, self.penultimate)  # fmt: skip
        hidden = hidden.float()
        if getattr(out, "text_embeds", None) is not None:  # CLIP with its projection
            pooled = out.text_embeds
        elif getattr(out, "pooler_output", None) is not None:  # CLIP: the end token's state
            pooled = out.pooler_output
        else:  # T5: the mean of the valid tokens' states
            weights = mask[..., None].to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return hidden.cpu(), pooled.float().cpu(), mask.to(torch.int64).cpu()

    def facts(self) -> dict[str, Any]:
        """What a checkpoint records of its text encoder (resume compares it; sample.py loads
        it again in its dtype, which the fingerprint covers)."""
        return {
            "source": self.source,
            "class": type(self.model).__name__,
            "max_length": self.max_length,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "fingerprint": self.fingerprint,
        }


# How a pipeline with several encoders reads them, by their families in folder order (CLIP:
# CLIPTextModel or CLIPTextModelWithProjection; T5: T5EncoderModel). What each pipeline does:
# - sdxl (CLIP, CLIP): both CLIPs' penultimate states, concatenated along the features (768 +
#   1280 = 2048 wide); pooled: the last CLIP's (StableDiffusionXLPipeline.encode_prompt).
# - sd3 (CLIP, CLIP, T5): the CLIPs as SDXL's, zero-padded to T5's width, then T5's sequence
#   after them (77 + its tokens); pooled: both CLIPs' concatenated (StableDiffusion3Pipeline).
# - flux (CLIP, T5): T5's sequence; pooled: CLIP's (FluxPipeline).
JOINT_RULES = {("clip", "clip"): "sdxl", ("clip", "clip", "t5"): "sd3", ("clip", "t5"): "flux"}


def family(model: PreTrainedModel) -> str:
    return "t5" if isinstance(model, T5EncoderModel) else "clip"


@dataclass
class JointTextEncoder:
    """Several frozen text encoders read as one, by the rule of the pipeline whose layout they
    come in (JOINT_RULES); the same interface as one TextEncoder."""

    parts: list[TextEncoder]
    rule: str  # a value of JOINT_RULES
    max_length: int  # what --text-encoder-max-length set (T5's length, else the CLIPs')
    source: str
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def to(self, device: torch.device | str) -> JointTextEncoder:
        for part in self.parts:
            part.to(device)
        return self

    @property
    def width(self) -> int:
        clip = sum(p.width for p in self.parts if family(p.model) == "clip")
        t5 = [p.width for p in self.parts if family(p.model) == "t5"]
        if self.rule == "sdxl":
            return clip
        return max(clip, t5[0]) if self.rule == "sd3" else t5[0]

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sequence embeddings (n, L, D), pooled (n, P), attention mask (n, L)), combined by
        the rule."""
        encoded = [part.encode(texts) for part in self.parts]
        clips = [e for e, p in zip(encoded, self.parts, strict=True) if family(p.model) == "clip"]
        if self.rule == "flux":
            t5 = encoded[1]
            return t5[0], clips[0][1], t5[2]
        hidden = torch.cat([h for h, _, _ in clips], -1)
        mask = clips[0][2]
        if self.rule == "sdxl":
            return hidden, clips[-1][1], mask
        t5_hidden, _, t5_mask = encoded[2]
        width = self.width
        pad = torch.nn.functional.pad
        hidden = torch.cat([pad(hidden, (0, width - hidden.shape[-1])),
                            pad(t5_hidden, (0, width - t5_hidden.shape[-1]))], 1)  # fmt: skip
        return hidden, torch.cat([p for _, p, _ in clips], -1), torch.cat([mask, t5_mask], 1)

    def facts(self) -> dict[str, Any]:
        """As TextEncoder.facts; the class names every part ("CLIPTextModel+...")."""
        return {
            "source": self.source,
            "class": "+".join(type(p.model).__name__ for p in self.parts),
            "max_length": self.max_length,
            "dtype": str(next(self.parts[0].model.parameters()).dtype).removeprefix("torch."),
            "fingerprint": self.fingerprint,
        }


AnyTextEncoder = TextEncoder | JointTextEncoder


def load_joint(
    folder: Path, spec: str, max_length: int | None, dtype: torch.dtype
) -> JointTextEncoder:
    """The encoders of a pipeline folder with text_encoder_2/ (and _3), read by JOINT_RULES.
    `max_length` is T5's length where there is one (the CLIPs keep their positions), else the
    CLIPs' (default: their positions)."""
    pairs = [(m, t) for m, t in JOINT_FOLDERS if (folder / m / "config.json").is_file()]
    models = [read_model(folder, folder / m, (folder / t, folder / m)) for m, t in pairs]
    families = tuple(family(model) for model, _ in models)
    rule = JOINT_RULES.get(families)
    if rule is None:
        raise InputError(
            f"{folder} holds text encoders of the families {' + '.join(families)} "
            f"({', '.join(m for m, _ in pairs)}); the combinations read are "
            + "; ".join(f"{' + '.join(k)} ({v.upper()}'s)" for k, v in JOINT_RULES.items()),
            "text_encoder",
        )
    has_t5 = "t5" in families
    parts = []
    for (model, tokenizer), name in zip(models, families, strict=True):
        if name == "t5":
            length = max_length or T5_MAX_LENGTH
        else:
            length = (None if has_t5 else max_length) or default_max_length(model)
        parts.append(encoder_of(model, tokenizer, length, spec, dtype, model_mask=False,
                                penultimate=name == "clip" and rule != "flux"))  # fmt: skip
    lengths = {p.max_length for p in parts if family(p.model) == "clip"}
    if rule != "flux" and len(lengths) > 1:
        raise InputError(
            f"{folder}'s CLIP encoders encode {sorted(lengths)} tokens: their sequences are "
            "joined along the features and need one length; give --text-encoder-max-length "
            f"{min(lengths)}",
            "text_encoder_max_length",
        )
    length = parts[-1].max_length
    digest = hashlib.sha256(f"{rule}|".encode())
    for part in parts:
        digest.update(part.fingerprint.encode())
    return JointTextEncoder(parts, rule, length, spec, digest.hexdigest()[:32])


def shipped(encoder: TextEncoder) -> TextEncoder:
    """`encoder` as an export ships it (`text_encoder/`, `tokenizer/`), still encoding the
    same (its fingerprint unchanged): the tokenizer's `model_max_length` is the encoder's
    length (what Stable Diffusion's pipelines pad to), with no padding or truncation left on
    it from encoding (its saved definition would carry them), and a CLIP model's config says
    no `use_attention_mask` (Stable Diffusion's pipelines then call it without the mask, as
    `encode` does: with it the padded positions' embeddings differ from the ones trained on)."""
    encoder.tokenizer.model_max_length = encoder.max_length
    backend = getattr(encoder.tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
    if type(encoder.model).__name__ in CLIP_CLASSES:
        encoder.model.config.use_attention_mask = False
    return encoder


def fingerprint_of(model: PreTrainedModel, tokenizer: Any, max_length: int, rules: str = "") -> str:
    """The hash of whatever changes an encoding: the class, config, every weight (name, dtype,
    shape, bytes), the tokenizer (its full definition), the length and how the model is read
    (`rules`, with ENCODING_RULES)."""
    digest = hashlib.sha256()
    digest.update(f"{ENCODING_RULES}|{rules}|".encode())
    digest.update(type(model).__name__.encode())
    config = {k: v for k, v in model.config.to_dict().items() if k not in CONFIG_NOT_ENCODING
              and not k.startswith("_")}  # fmt: skip
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(tokenizer_definition(tokenizer).encode())
    digest.update(str(max_length).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def tokenizer_definition(tokenizer: Any) -> str:
    """The tokenizer as text: its `tokenizers` JSON (vocabulary, merges, normalisation, special
    tokens), else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    return json.dumps(sorted(tokenizer.get_vocab().items()))


def frozen(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    return model.to(dtype).requires_grad_(False).eval()


def load_text_encoder(
    spec: str, max_length: int | None = None, dtype: torch.dtype = torch.float32
) -> TextEncoder | JointTextEncoder:
    """The text encoder `spec` names (a folder, a hub id or a built-in name), frozen, in eval
    mode, in `dtype`, on the CPU; `max_length` tokens per caption (default: the model's
    positions for CLIP, T5_MAX_LENGTH for T5). A pipeline folder with text_encoder_2/ gives
    its encoders together (`load_joint`). Errors name --text-encoder."""
    if spec == TINY_CLIP:
        model, tokenizer = tiny_clip()
        return encoder_of(model, tokenizer, max_length or TINY_CLIP_MAX_LENGTH, spec, dtype)
    folder = resolve_model_source(
        spec, "text_encoder", TEXT_ENCODER_HUB_FILES, what=TEXT_ENCODER_SOURCES
    )
    if (folder / JOINT_FOLDERS[1][0] / "config.json").is_file():
        return load_joint(folder, spec, max_length, dtype)
    model, tokenizer = read_folder(folder)
    return encoder_of(model, tokenizer, max_length or default_max_length(model), spec, dtype)


def encoder_of(
    model: PreTrainedModel,
    tokenizer: Any,
    length: int,
    spec: str,
    dtype: torch.dtype,
    model_mask: bool | None = None,
    penultimate: bool = False,
) -> TextEncoder:
    """`model` frozen in `dtype` with its tokenizer, encoding `length` tokens (at most its
    positions); `model_mask` by default: T5 is given its mask (PixArt-alpha), CLIP is not."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and length > positions:
        raise InputError(
            f"{spec} encodes at most {positions} tokens, and {length} were asked for: give "
            f"--text-encoder-max-length {positions} or less",
            "text_encoder_max_length",
        )
    if model_mask is None:
        model_mask = isinstance(model, T5EncoderModel)
    model = frozen(model, dtype)
    rules = f"mask={model_mask},penultimate={penultimate}"
    return TextEncoder(model, tokenizer, length, spec,
                       fingerprint_of(model, tokenizer, length, rules), model_mask,
                       penultimate)  # fmt: skip


def default_max_length(model: PreTrainedModel) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or T5_MAX_LENGTH)


def read_folder(folder: Path) -> tuple[PreTrainedModel, Any]:
    """The text model and the tokenizer of `folder` (at its root, or in text_encoder/ and
    tokenizer/), or an InputError saying what is wrong and what to give."""
    model_folder = folder if (folder / "config.json").is_file() else folder / MODEL_FOLDER
    return read_model(folder, model_folder, (folder, folder / TOKENIZER_FOLDER, model_folder))


def read_model(
    folder: Path, model_folder: Path, tokenizer_folders: tuple[Path, ...]
) -> tuple[PreTrainedModel, Any]:
    """The text model of `model_folder` and the tokenizer of the first of `tokenizer_folders`
    holding one (errors name `folder`, what was given)."""
    tokenizer_folder = next(
        (f for f in tokenizer_folders if any((f / name).is_file() for name in TOKENIZER_FILES)),
        None,
    )
    config_path = model_folder / "config.json"
    if not config_path.is_file():
        raise InputError(
            f"{folder} holds no text model (no config.json, nor text_encoder/config.json): "
            f"give {TEXT_ENCODER_SOURCES}",
            "text_encoder",
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{config_path} cannot be read as JSON: {err}", "text_encoder") from None
    names = config.get("architectures") or [] if isinstance(config, dict) else []
    cls = next((ENCODER_CLASSES[n] for n in names if n in ENCODER_CLASSES), None)
    if cls is None:
        raise InputError(
            f"{model_folder} holds a {', '.join(names) or 'model of unknown class'} (its "
            f"config.json's architectures); the text encoders supported are "
            f"{', '.join(ENCODER_CLASSES)}",
            "text_encoder",
        )
    if not any(model_folder.glob("*.safetensors")):
        pickles = [p.name for p in model_folder.glob("*.bin")]
        raise InputError(
            f"{model_folder} has no safetensors weights"
            + (
                f" ({', '.join(pickles)} is a pickle, which can run code when loaded; convert "
                "it once, if you trust it: from_pretrained then save_pretrained)"
                if pickles
                else ""
            ),
            "text_encoder",
        )
    if tokenizer_folder is None:
        raise InputError(
            f"{folder} holds no tokenizer (tokenizer.json, vocab.json, spiece.model, ... at its "
            "root or in tokenizer/): the text model needs the tokenizer it was trained with",
            "text_encoder",
        )
    model = cls.from_pretrained(model_folder, use_safetensors=True)
    # A tokenizer holds no weights (vocabulary and merges files); no code of the folder's runs.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, trust_remote_code=False)
    return model, tokenizer


def tiny_clip_words() -> list[str]:
    """The words of the captioned digits' phrasings (held-out ones too), and the digits."""
    texts = [
        caption
        for digit in range(10)
        for caption in digit_captions(digit, DIGIT_PHRASINGS + DIGIT_HELD_OUT_PHRASINGS)
    ]
    words = {w for text in texts for w in text.replace(",", " , ").split()}
    return sorted(words | set(DIGIT_WORDS) | {str(d) for d in range(10)})


def word_level_clip_tokenizer(words: list[str]) -> CLIPTokenizer:
    """A CLIP tokenizer (byte-level BPE) whose merges spell each of `words` as one token; any
    other text falls back to shorter pieces and single characters (never to unknown)."""
    chars = sorted(set(bytes_to_unicode().values()))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f"{c}</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    for word in words:  # left to right: w, wo, wor, word</w>
        pieces = [*word[:-1], f"{word[-1]}</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            if (current, piece) not in merges:
                merges.append((current, piece))
            current += piece
            vocab.setdefault(current, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_clip() -> tuple[CLIPTextModel, CLIPTokenizer]:
    """The built-in encoder: CLIP's text model at width 32, 2 layers, its random initialisation
    from TINY_CLIP_SEED (the global RNG is left as it was)."""
    tokenizer = word_level_clip_tokenizer(tiny_clip_words())
    vocab = tokenizer.get_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_CLIP_MAX_LENGTH,
        bos_token_id=vocab[tokenizer.bos_token],
        eos_token_id=vocab[tokenizer.eos_token],
        pad_token_id=vocab[tokenizer.pad_token],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_CLIP_SEED)
        model = CLIPTextModel(config)
    return model, tokenizer


def load_as_recorded(facts: Mapping[str, Any], spec: str | None = None) -> AnyTextEncoder:
    """The text encoder a model records (`TextEncoder.facts()`), from `spec` (where it is
    now) or the source it records, in the dtype and at the length it encoded with. An
    InputError when it cannot be loaded; whether it is the same one is `text_encoder_changes`'
    to say."""
    dtype = getattr(torch, facts.get("dtype", "float32"))  # the run's precision
    return load_text_encoder(spec or facts["source"], facts.get("max_length"), dtype)


def text_encoder_changes(saved: dict[str, Any] | None, encoder: AnyTextEncoder | None) -> list[str]:
    """Why a checkpoint trained with the text encoder `saved` (its `facts()`, None: none)
    cannot go on with `encoder`: none, another one, other weights or another length."""
    if saved is None and encoder is None:
        return []
    if saved is None:
        return ["it was trained without a text encoder"]
    if encoder is None:
        return [f"it was trained on captions encoded by {saved['source']}"]
    if saved["fingerprint"] == encoder.fingerprint:
        return []
    if saved.get("max_length") != encoder.max_length:
        return [
            f"it was trained with {saved['max_length']} tokens per caption, not "
            f"{encoder.max_length}"
        ]
    return [
        f"it was trained with the text encoder {saved['source']} ({saved['class']}, "
        f"fingerprint {saved['fingerprint']}), and {encoder.source} has other weights or "
        f"another tokenizer (fingerprint {encoder.fingerprint})"
    ]


def check_resumed_text_encoder(
    saved: dict[str, Any] | None, encoder: AnyTextEncoder | None, checkpoint: str
) -> None:
    """Refuse to resume `checkpoint` (trained with the text encoder `saved`) with `encoder`,
    naming the fix: the encoder it was trained with, or a new run."""
    problems = text_encoder_changes(saved, encoder)
    if problems:
        given = "with this --text-encoder" if encoder is not None else "without --text-encoder"
        raise InputError(
            f"{checkpoint} cannot be resumed {given}: {problems[0]}; pass the --text-encoder "
            "(and --text-encoder-max-length) it was trained with, or --resume none / another "
            "--output-dir to start over",
            "text_encoder",
        )
