"""Captions: the text of each image, read once from a dataset's caption column and checked.

The column is a string per image, or a list of strings (several captions of one image: one is
drawn per step, `diffusion.conditioning.text`). It is `--caption-column`, else found as the
image column is: the dataset's only text column, or among several the only one named like
captions (text, caption, captions, prompt). An image folder gets one from datasets'
`metadata.jsonl` / `metadata.csv` beside the images (`file_name` and the caption's column).

Every image needs a caption: a row whose caption is missing, empty or not text is refused,
naming the rows, before anything is encoded. Each distinct caption is kept once (`texts`); a
row holds indices into it, so the text cache encodes "a handwritten seven" once however many
images carry it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from ddp_utils.errors import InputError

# Among several text columns, the one with one of these names is the caption column.
CAPTION_NAMES = ("text", "caption", "captions", "prompt")
NUM_ROWS_SHOWN = 5  # rows at fault named in an error


@dataclass(frozen=True)
class Captions:
    """Every row's captions: row r's are `texts[i]` for i in `ids[offsets[r]:offsets[r + 1]]`
    (at least one per row)."""

    texts: tuple[str, ...]  # each distinct caption once, in order of first appearance
    offsets: torch.Tensor  # int64 (num_rows + 1,)
    ids: torch.Tensor  # int64 (offsets[-1],): indices into texts
    column: str  # "" where no column holds them (DreamBooth's instance prompt)

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> torch.Tensor:
        """The number of captions of each row, int64 (num_rows,)."""
        return self.offsets[1:] - self.offsets[:-1]

    def of_row(self, row: int) -> list[str]:
        start, stop = int(self.offsets[row]), int(self.offsets[row + 1])
        return [self.texts[i] for i in self.ids[start:stop].tolist()]

    def fingerprint(self) -> str:
        """The identity of the distinct captions (what an encoding of them depends on)."""
        return hashlib.sha256(json.dumps(self.texts).encode()).hexdigest()[:24]

    def with_rows(self, text: str, num_rows: int) -> Captions:
        """These rows, then `num_rows` more captioned `text` (DreamBooth's class images)."""
        texts = self.texts if text in self.texts else (*self.texts, text)
        added = torch.full((num_rows,), texts.index(text), dtype=torch.int64)
        offsets = self.offsets[-1] + torch.arange(1, num_rows + 1, dtype=torch.int64)
        return Captions(texts, torch.cat([self.offsets, offsets]), torch.cat([self.ids, added]),
                        self.column)  # fmt: skip


def one_caption(num_rows: int, text: str) -> Captions:
    """Every one of `num_rows` rows captioned `text` (DreamBooth's instance prompt; no column)."""
    return Captions((text,), torch.arange(num_rows + 1, dtype=torch.int64),
                    torch.zeros(num_rows, dtype=torch.int64), "")  # fmt: skip


def is_text_feature(feature: Any) -> bool:
    """A string column, or a list of strings."""
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string")
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return is_text_feature(feature.feature)
    return False


def detect_caption_column(ds: Any, caption_column: str | None) -> str:
    """The column holding the captions: the one given, else the only text column, else the
    only text column named like captions (CAPTION_NAMES)."""
    columns = list(ds.features)
    found = f"columns: {', '.join(columns)}"
    if caption_column is not None:
        if caption_column not in columns:
            raise InputError(f"{caption_column!r} is not a column; {found}", "caption_column")
        feature = ds.features[caption_column]
        if not is_text_feature(feature):
            raise InputError(
                f"{caption_column!r} is a {type(feature).__name__} column, not text (captions "
                f"are a string or a list of strings per image); {found}",
                "caption_column",
            )
        return caption_column
    text = [c for c, f in ds.features.items() if is_text_feature(f)]
    if len(text) == 1:
        return text[0]
    if not text:
        raise InputError(
            f"the dataset has no caption column (no column of strings or lists of strings; "
            f"{found}); an image folder takes its captions from a metadata.jsonl or "
            "metadata.csv beside the images (columns file_name and text)",
            "caption_column",
        )
    named = [c for c in text if c.lower() in CAPTION_NAMES]
    if len(named) == 1:
        return named[0]
    raise InputError(
        f"several text columns ({', '.join(text)}) could hold the captions; choose one",
        "caption_column",
    )


def read_captions(ds: Any, caption_column: str | None) -> Captions:
    """Every row's captions from the caption column (`detect_caption_column`); a row without
    one (missing, empty, blank, not text) is an error naming the rows at fault."""
    column = detect_caption_column(ds, caption_column)
    texts: dict[str, int] = {}
    offsets, ids, bad = [0], [], []
    for row, value in enumerate(ds[column]):
        captions = value if isinstance(value, list) else [value]
        if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            bad.append((row, value))
            continue
        ids.extend(texts.setdefault(c.strip(), len(texts)) for c in captions)
        offsets.append(len(ids))
    if bad:
        shown = ", ".join(f"row {row}: {value!r}"[:80] for row, value in bad[:NUM_ROWS_SHOWN])
        more = f", and {len(bad) - NUM_ROWS_SHOWN} more" if len(bad) > NUM_ROWS_SHOWN else ""
        raise InputError(
            f"{len(bad)} of the {len(ds)} rows have no usable caption in column {column!r} "
            f"(each needs a non-empty string or list of non-empty strings): {shown}{more}; "
            f"columns: {', '.join(ds.features)}",
            "caption_column",
        )
    return Captions(
        tuple(texts),
        torch.tensor(offsets, dtype=torch.int64),
        torch.tensor(ids, dtype=torch.int64),
        column,
    )
