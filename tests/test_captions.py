"""Captions from the data people have: the built-in captioned digits, an image folder with
datasets' metadata.jsonl / metadata.csv, a save_to_disk dataset; the column found when
unambiguous; the errors a user meets, naming columns and rows."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from ddp_utils.data import MemoryBatches, StreamingBatches, load_image_data
from ddp_utils.data.captions import detect_caption_column, read_captions
from ddp_utils.data.source import (
    DIGIT_HELD_OUT_PHRASINGS,
    DIGIT_PHRASINGS,
    digit_captions,
)


def load(dataset, tmp_path: Path, **kwargs):
    return load_image_data(
        str(dataset), 8, 1, cache_dir=tmp_path / "cache", with_captions=True, **kwargs
    )


def image_folder(root: Path, num: int) -> Path:
    for k in range(num):
        root.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 40 * k).save(root / f"{k}.png")
    return root


def test_the_captioned_digits_carry_their_phrasings_and_hold_some_out(tmp_path):
    data = load("digits-captioned", tmp_path, max_images=30)
    target = load_digits().target[:30]
    assert data.captions.column == "text" and data.condition_name == "caption_rows"
    assert data.labels.tolist() == list(range(30))  # each image's row among the captions
    for row in (0, 7, 29):
        assert data.captions.of_row(row) == digit_captions(int(target[row]))
    assert "a handwritten seven" in digit_captions(7)
    assert "the number 7, written by hand" in digit_captions(7)
    # Each distinct caption is kept once: 6 phrasings of the 10 digits.
    assert len(data.captions.texts) == len(DIGIT_PHRASINGS) * len(set(target.tolist()))
    held_out = {c for d in range(10) for c in digit_captions(d, DIGIT_HELD_OUT_PHRASINGS)}
    assert len(held_out) == 20 and not held_out & set(data.captions.texts)
    # The plain digits are unchanged: no captions.
    plain = load_image_data("digits", 8, 1, cache_dir=tmp_path / "cache", max_images=4)
    assert plain.captions is None and plain.condition_name == "class_labels"


def test_an_image_folder_takes_its_captions_from_metadata_jsonl_or_csv(tmp_path):
    root = image_folder(tmp_path / "jsonl", 3)
    rows = [{"file_name": f"{k}.png", "text": [f"shade {k}", "a gray square"],
             "source": "made here"} for k in range(3)]  # fmt: skip
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load(root, tmp_path)
    # Two text columns: the one named like captions is chosen.
    assert data.captions.column == "text"
    shade = data.images.float().mean(dim=(1, 2, 3)).round().long() // 40
    for row in range(3):
        assert data.captions.of_row(row) == [f"shade {int(shade[row])}", "a gray square"]
    assert data.captions.texts.count("a gray square") == 1  # encoded once

    root = image_folder(tmp_path / "csv", 2)
    (root / "metadata.csv").write_text("file_name,description\n0.png,dark\n1.png,light\n")
    data = load(root, tmp_path)
    assert data.captions.column == "description"
    assert sorted(data.captions.texts) == ["dark", "light"]


def test_missing_empty_and_non_text_captions_name_the_columns_and_rows(tmp_path):
    root = image_folder(tmp_path / "bad", 4)
    (root / "metadata.csv").write_text("file_name,caption\n0.png,fine\n1.png,\n2.png, \n3.png,ok\n")
    with pytest.raises(ValueError) as err:
        load(root, tmp_path)
    message = str(err.value)
    assert message.startswith("--caption-column: 2 of the 4 rows have no usable caption")
    assert "row 1: None" in message and "row 2: ' '" in message
    assert "columns: image, caption" in message

    plain = image_folder(tmp_path / "plain", 2)
    with pytest.raises(ValueError, match=r"--caption-column: the dataset has no caption column "
                                         r"\(.*columns: image\); .*metadata.jsonl"):  # fmt: skip
        load(plain, tmp_path)

    ds = datasets.Dataset.from_dict({"image": [None] * 3, "title": ["a", "b", "c"],
                                     "url": ["u", "v", "w"], "n": [1, 2, 3],
                                     "tags": [["x"], [], ["y", ""]]})  # fmt: skip
    with pytest.raises(ValueError, match=r"several text columns \(title, url, tags\)"):
        detect_caption_column(ds, None)
    assert detect_caption_column(ds, "url") == "url"
    with pytest.raises(ValueError, match=r"'alt' is not a column; columns: image, title, url"):
        detect_caption_column(ds, "alt")
    with pytest.raises(ValueError, match=r"'n' is a Value column, not text"):
        detect_caption_column(ds, "n")
    with pytest.raises(ValueError, match=r"2 of the 3 rows .* row 1: \[\], row 2: \['y', ''\]"):
        read_captions(ds, "tags")


def test_captions_travel_with_their_images_in_memory_and_streamed(tmp_path):
    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("L", (8, 8), 20 * k) for k in range(10)],
         "caption": [f"square {k}" for k in range(10)]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )  # fmt: skip
    ds.save_to_disk(str(tmp_path / "saved"))
    memory = load(tmp_path / "saved", tmp_path)
    streamed = load(tmp_path / "saved", tmp_path, data_loading="stream")
    accelerator = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
    common = (4, accelerator, 3, (0.0, 1.0), False)
    sources = [MemoryBatches(memory, *common),
               StreamingBatches(streamed.stream, *common, num_workers=0)]  # fmt: skip
    for step in range(4):  # crosses epochs of 10 images
        (a_images, a_condition), (b_images, b_condition) = (s.fetch(step) for s in sources)
        assert torch.equal(a_images, b_images)
        assert torch.equal(a_condition["caption_rows"], b_condition["caption_rows"])
        shades = (a_images.float().mean(dim=(1, 2, 3)) / 20).round().long()
        captions = [memory.captions.of_row(r)[0] for r in a_condition["caption_rows"].tolist()]
        assert captions == [f"square {k}" for k in shades.tolist()]
