"""The text cache: every distinct caption encoded once per node by the frozen text encoder,
mapped from disk (its batches: `diffusion.conditioning.text.TextCondition`).

Generic over a `TextEncoder` (what has a fingerprint and turns captions into sequence
embeddings, a pooled embedding and an attention mask; `diffusion.text_encoders.TextEncoder`
is one). The cache is keyed by the encoder's fingerprint (its weights, config, tokenizer and
maximum length), the captions (each distinct one, `Captions.fingerprint`) and the stored
dtype: another encoder, other weights, another length or other captions is another cache.

The cache is a folder of raw `.npy` arrays, row i the encoding of caption i and the last row
the empty prompt's (what caption dropout trains on and guidance contrasts with):
`hidden.npy` (N + 1, L, D), `pooled.npy` (N + 1, P), `mask.npy` (N + 1, L) uint8, and a
`manifest.json` written last. It is built as the latent cache is, by the same code
(`ddp_utils.data.node_cache`): chunks of TEXT_ROWS captions shared by the node's processes,
each on its own device, in a build folder beside the cache, recorded once flushed; an
interrupted build is continued; the local main process publishes it. Every process maps the
files read-only: one copy per node in the page cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np
import torch
from accelerate import Accelerator

from ddp_utils.data.captions import Captions
from ddp_utils.data.decode import cache_fix, default_cache_dir
from ddp_utils.data.node_cache import (
    CANNOT_WRITE,
    MANIFEST,
    EncodeProgress,
    NodeBuild,
    bytes_on_disk,
    chunk_records,
    disk_free,
    first_nonfinite_row,
    publish_build,
    record_chunk,
    share_build,
)
from ddp_utils.errors import InputError, OutputError
from ddp_utils.files import format_bytes

logger = logging.getLogger("ddp_diffusion")

TEXT_CACHE_VERSION = 1
TEXT_ROWS = 1024  # captions per chunk: the unit of work shared among the node's processes
WAIT_SECONDS = 5.0  # how often processes poll for the build folder, chunk records, the cache
CacheDtype = Literal["float16", "float32"]
ARRAYS = ("hidden", "pooled", "mask")
EMPTY_PROMPT = ""


class TextEncoder(Protocol):
    fingerprint: str  # changes whenever the encoding would (weights, tokenizer, length, dtype)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sequence embeddings (n, L, D), pooled (n, P), attention mask (n, L)) on the CPU."""
        ...

    def facts(self) -> dict[str, Any]:
        """What a checkpoint records of the encoder (its source, class, length, fingerprint)."""
        ...


@dataclass
class TextEmbeddings:
    """The encodings of every distinct caption (row i: `Captions.texts[i]`), the empty prompt's
    last: arrays mapped from the cache, in its dtype (the mask in uint8)."""

    hidden: np.ndarray  # (N + 1, L, D)
    pooled: np.ndarray  # (N + 1, P)
    mask: np.ndarray  # (N + 1, L)
    folder: Path
    encoder: dict[str, Any] = field(default_factory=dict)  # the encoder's facts

    @property
    def empty_row(self) -> int:
        """The row of the empty prompt's encoding."""
        return len(self.hidden) - 1


def text_cache_key(captions: Captions, encoder: TextEncoder, dtype: CacheDtype) -> str:
    key = {
        "version": TEXT_CACHE_VERSION,
        "captions": captions.fingerprint(),
        "num_captions": len(captions.texts),
        "encoder": encoder.fingerprint,
        "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def read_text_cache(folder: Path, key: str, warn: bool = True) -> TextEmbeddings | None:
    """The cached arrays, memory-mapped, or None when missing, of another key, or damaged (then
    it is rebuilt). Checks the manifest against each file's header and size, and the values
    for NaN/inf."""
    if not (folder / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("key") != key:
            return None
        arrays = {}
        for name in ARRAYS:
            expected = manifest["arrays"][name]
            path = folder / f"{name}.npy"
            if path.stat().st_size != expected["size"]:
                raise ValueError(f"{path.name} has {path.stat().st_size} bytes")
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            if list(array.shape) != expected["shape"] or str(array.dtype) != expected["dtype"]:
                raise ValueError(f"{path.name} holds {array.dtype} {array.shape}")
            arrays[name] = array
        for name in ("hidden", "pooled"):
            row = first_nonfinite_row(arrays[name], TEXT_ROWS)
            if row is not None:
                raise ValueError(f"{name}.npy holds non-finite values (NaN/inf) in row {row}")
        return TextEmbeddings(arrays["hidden"], arrays["pooled"], arrays["mask"], folder)
    except (OSError, KeyError, TypeError, ValueError) as err:
        if warn:
            logger.warning("text cache %s is damaged (%s); rebuilding it", folder, err)
        return None


@dataclass
class TextBuild(NodeBuild):
    """One text cache being encoded by the node's processes (`ddp_utils.data.node_cache`):
    rows are the distinct captions, then the empty prompt."""

    texts: list[str]
    encoder: TextEncoder
    dtype: CacheDtype
    key: str
    folder: Path
    shapes: dict[str, tuple[int, ...]]  # each array's row shape: hidden (L, D), ...
    what = "text"
    unit = "captions"

    @property
    def num_rows(self) -> int:
        return len(self.texts)

    @property
    def chunk_size(self) -> int:
        return TEXT_ROWS

    @property
    def wait_seconds(self) -> float:
        return WAIT_SECONDS

    def arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {
            name: ((self.num_rows, *shape), np.dtype("uint8" if name == "mask" else self.dtype))
            for name, shape in self.shapes.items()
        }

    def layout(self) -> dict[str, Any]:
        return {
            "key": self.key, "version": TEXT_CACHE_VERSION, "rows": self.num_rows,
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "dtype": self.dtype, "text_rows": TEXT_ROWS,
        }  # fmt: skip

    def is_published(self) -> bool:
        return read_text_cache(self.folder, self.key, warn=False) is not None


def encode_chunks(
    build: TextBuild, arrays: dict[str, np.memmap], chunks: list[int],
    progress: EncodeProgress | None,
) -> None:  # fmt: skip
    """Encode `chunks` of the captions into the arrays, flushed, then record each."""
    for chunk in chunks:
        rows = build.chunk_rows(chunk)
        hidden, pooled, mask = build.encoder.encode(build.texts[rows.start : rows.stop])
        for name, values in (("hidden", hidden), ("pooled", pooled), ("mask", mask)):
            stored = arrays[name][rows.start : rows.stop]
            stored[:] = values.numpy()
            row = first_nonfinite_row(stored, TEXT_ROWS) if name != "mask" else None
            if row is not None:
                raise InputError(
                    f"the text encoder gave non-finite embeddings (NaN/inf) for caption "
                    f"{build.texts[rows.start + row]!r} in {build.dtype}: nothing of it is "
                    "cached. An encoder overflowing in float16 does this (T5 does: encode in "
                    "bf16 or fp32, --mixed-precision), or its weights are broken",
                    "text_encoder",
                )
        for array in arrays.values():
            array.flush()
        record_chunk(build, chunk, {"rows": len(rows)})
        if progress is not None:
            progress.log()


def finish_build(build: TextBuild, progress: EncodeProgress) -> None:
    """Once every chunk is recorded, the manifest last and the cache published."""
    chunk_records(build, progress)
    arrays = {}
    for name, (shape, dtype) in build.arrays().items():
        size = (build.partial / f"{name}.npy").stat().st_size
        arrays[name] = {"shape": list(shape), "dtype": str(dtype), "size": size}
    publish_build(build, {
        "key": build.key, "version": TEXT_CACHE_VERSION, "arrays": arrays,
        "num_captions": build.num_rows - 1,
    })  # fmt: skip


def load_text_embeddings(
    captions: Captions,
    encoder: TextEncoder,
    accelerator: Accelerator | None = None,
    cache_dir: Path | None = None,
    dtype: CacheDtype = "float16",
) -> TextEmbeddings:
    """Every distinct caption's encoding and the empty prompt's, memory-mapped: encoded once
    per node (shared by its processes, continued when interrupted), or mapped from the cache."""
    assert dtype in get_args(CacheDtype), dtype
    key = text_cache_key(captions, encoder, dtype)
    folder = (default_cache_dir() if cache_dir is None else cache_dir) / f"text-{key}"
    local_main = accelerator is None or accelerator.is_local_main_process
    if read_text_cache(folder, key, warn=local_main) is None:
        texts = [*captions.texts, EMPTY_PROMPT]
        hidden, pooled, mask = encoder.encode(texts[:1])  # the shapes
        shapes = {"hidden": hidden.shape[1:], "pooled": pooled.shape[1:], "mask": mask.shape[1:]}
        build = TextBuild(texts, encoder, dtype, key, folder, shapes)
        try:
            if read_text_cache(folder, key, warn=False) is None:
                needed = build.num_bytes() - bytes_on_disk(build.partial)
                if needed > disk_free(folder.parent):
                    raise InputError(
                        f"the text cache needs {format_bytes(needed)} in {folder.parent}, more "
                        f"than is free there: {cache_fix()}"
                    )
            share_build(
                build,
                accelerator,
                lambda arrays, chunks, progress: encode_chunks(build, arrays, chunks, progress),
                lambda progress: finish_build(build, progress),
            )
        except OSError as err:
            if err.errno not in CANNOT_WRITE:
                raise
            raise OutputError(
                f"could not write the text cache {folder}: {err.strerror}. A text-conditional "
                f"run reads its embeddings from it: {cache_fix()} (it needs "
                f"{format_bytes(build.num_bytes())}), then run the same command again"
            ) from None
    embeddings = read_text_cache(folder, key)
    if embeddings is None:
        raise RuntimeError(f"text cache {folder} could not be read after it was written")
    embeddings.encoder = encoder.facts()
    per_caption = sum(a.nbytes for a in (embeddings.hidden, embeddings.pooled, embeddings.mask))
    logger.info(
        "text: %d captions and the empty prompt, %s per caption, in %s",
        embeddings.empty_row, format_bytes(math.ceil(per_caption / len(embeddings.hidden))),
        folder,
    )  # fmt: skip
    return embeddings
