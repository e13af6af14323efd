"""Where images come from: one `dataset` name or path -> an HF `datasets.Dataset` and its identity.

Sources:
- `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download);
- `digits-captioned`: the same images with a `text` column: several phrasings of each digit
  ("a handwritten seven", "the number 7, written by hand"), some kept out for evaluation;
- a local folder of images (HF `imagefolder`; nested folders allowed);
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
- a hub dataset id (with a config name and a split), with the aliases `mnist`,
  `fashion_mnist` and `cifar10`.

Each source comes with a fingerprint (the content's identity) that keys the decoded-image
cache and the FID reference statistics.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image
from sklearn.datasets import load_digits

from ddp_utils.errors import InputError

HUB_ALIASES = {
    "mnist": "ylecun/mnist",
    "fashion_mnist": "zalando-datasets/fashion_mnist",
    "cifar10": "uoft-cs/cifar10",
}
# The built-in digits are 8x8: trained at 16 (upscaled 2x) unless --resolution says otherwise,
# the size the presets and the README's figures assume. Other sources: the images' own size.
DIGITS_RESOLUTION = 16
DIGITS_CHANNELS = 1  # 8-bit grayscale
# The size a model trained on these sources has by default, known without reading them: what
# sample.py --fid and evaluate.py compare the samples' size with, to warn about resizing.
NATIVE_RESOLUTION = {
    "digits": DIGITS_RESOLUTION, "digits-captioned": DIGITS_RESOLUTION,
    "mnist": 28, "fashion_mnist": 28, "cifar10": 32,
}  # fmt: skip
BUILT_IN = ("digits", "digits-captioned")  # datasets made here, from scikit-learn's digits

# The captions of `digits-captioned`: each image carries every training phrasing of its digit
# (one is drawn per step); the held-out phrasings are never trained on (evaluation prompts).
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_PHRASINGS = (
    "a handwritten {word}",
    "the number {digit}, written by hand",
    "the digit {word}",
    "a picture of the number {word}",
    "{word}, drawn by hand",
    "a small gray image of a {digit}",
)
DIGIT_HELD_OUT_PHRASINGS = ("an image of the digit {digit}", "a {word} written by hand")


def digit_captions(digit: int, phrasings: tuple[str, ...] = DIGIT_PHRASINGS) -> list[str]:
    """The phrasings of `digit` ("a handwritten seven", "the number 7, written by hand", ...)."""
    return [p.format(word=DIGIT_WORDS[digit], digit=digit) for p in phrasings]


def is_built_in(dataset: str) -> bool:
    """A dataset made here (no file, no download): what a local folder or hub id is not."""
    return dataset in BUILT_IN


@dataclass
class Source:
    """A loaded dataset with its identity; rows are not decoded yet."""

    dataset: Any  # datasets.Dataset
    fingerprint: str  # content identity: keys caches
    description: str  # for people: "image folder data/x", "hub dataset ylecun/mnist (train)"
    resolution: int | None = None  # the default training size, if not the images' own


def check_dataset_name(dataset: str) -> None:
    """What `load_source` refuses without reading any image: a file, a path that is not
    there, a folder without images. Configs call it, so `--dry-run` refuses it too."""
    path = Path(dataset).expanduser()
    if is_built_in(dataset):
        return
    if path.is_dir():
        if not _is_saved_to_disk(path):
            check_holds_images(path)
        return
    if path.exists():
        raise InputError(f"{dataset} is a file; give a folder of images or a hub id", "dataset")
    if _looks_like_path(dataset):
        raise InputError(f"no such folder {dataset}", "dataset")


def load_source(dataset: str, dataset_config: str | None = None, split: str = "train") -> Source:
    """The HF dataset behind a `dataset` name or path (not decoded)."""

    if dataset == "digits":
        return Source(
            _digits(), "sklearn-digits-v1", "scikit-learn digits (built in)", DIGITS_RESOLUTION
        )
    if dataset == "digits-captioned":
        # The phrasings are part of the identity: new ones are a new dataset to the caches.
        phrasings = hashlib.sha256("\n".join(DIGIT_PHRASINGS).encode()).hexdigest()[:12]
        return Source(
            _digits(captioned=True),
            f"sklearn-digits-captioned-{phrasings}",
            "scikit-learn digits with captions (built in)",
            DIGITS_RESOLUTION,
        )
    check_dataset_name(dataset)
    path = Path(dataset).expanduser()
    if path.is_dir():
        if _is_saved_to_disk(path):
            return _saved_to_disk(path, split)
        try:
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
        except datasets.data_files.EmptyDatasetError:
            raise InputError(_no_images(path), "dataset") from None
        except ValueError as err:  # images, but none in this split ("train/", "test/" folders)
            if "corresponds to no data" not in str(err):
                raise
            raise InputError(
                f"the image folder {path} has no images in split {split!r}", "split"
            ) from None
        return Source(ds, folder_fingerprint(path), f"image folder {path}")
    return _from_hub(dataset, dataset_config, split)


IMAGE_EXTENSIONS = frozenset(ImageFolder.EXTENSIONS)  # what `imagefolder` reads


def _is_saved_to_disk(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def check_holds_images(path: Path) -> None:
    """Refuse a folder without a single image file (datasets would say 'Instruction "train"
    corresponds to no data!'), saying what it holds instead. Stops at the first image."""

    def files() -> Iterator[Path]:
        return (p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))

    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files()):
        raise InputError(_no_images(path, list(files())), "dataset")


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _no_images(path: Path, files: list[Path] | None = None) -> str:
    found = ""
    if files is not None:
        kinds = Counter(p.suffix.lower() or "(no extension)" for p in files)
        held = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common(5))
        found = f"; it holds {held} file(s)" if files else "; it is empty"
    return (
        f"the folder {path} holds no image files (looked for .png, .jpg, .jpeg, .webp, ... in "
        f"it and its subfolders{found}): give a folder of images (one subfolder per class "
        "for --class-conditional), a save_to_disk folder, or a hub dataset id"
    )


def _digits(captioned: bool = False) -> datasets.Dataset:
    digits = load_digits()
    # Values are 0..16: scale to 0..255 as 8-bit grayscale.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    features = {
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=[str(d) for d in range(10)]),
    }
    columns = {"image": [Image.fromarray(p, mode="L") for p in pixels], "label": digits.target}
    if captioned:
        features["text"] = datasets.List(datasets.Value("string"))
        columns["text"] = [digit_captions(int(d)) for d in digits.target]
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _saved_to_disk(path: Path, split: str) -> Source:

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - datasets fails on empty folders with IndexError
        raise InputError(
            f"the save_to_disk folder {path} could not be loaded "
            f"({type(err).__name__}: {err}); is the dataset empty or damaged?",
            "dataset",
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(
                f"{split!r} is not a split of the saved dataset {path}; it has: {', '.join(ds)}",
                "split",
            )
        ds = ds[split]
    return Source(ds, ds._fingerprint, f"save_to_disk folder {path}")


def _from_hub(dataset: str, dataset_config: str | None, split: str) -> Source:

    hub_id = HUB_ALIASES.get(dataset, dataset)
    try:
        ds = datasets.load_dataset(hub_id, dataset_config, split=split)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix in the message
        offline = any(
            os.environ.get(name, "0").lower() not in ("0", "", "false", "no", "off")
            for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        )
        hint = (
            "offline mode is on (HF_HUB_OFFLINE) and it is not in the local cache: download it once "
            "with network access, or pass a local folder / save_to_disk path"
            if offline
            else "check the id, the dataset config and split, and your network"
        )
        local = "" if dataset in HUB_ALIASES else f" (and there is no local folder {dataset})"
        raise InputError(
            f"could not load hub dataset {hub_id!r}{local} ({type(err).__name__}: {err}). {hint}",
            "dataset",
        ) from None
    return Source(ds, ds._fingerprint, f"hub dataset {hub_id} ({split})")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and not _is_hub_id(name)


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def folder_fingerprint(path: Path) -> str:
    """Content identity of an image folder: relative paths, sizes and mtimes."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def detect_image_column(ds: Any, image_column: str | None) -> str:
    """The column holding the images: the one given, else the only `Image` feature."""
    columns = list(ds.features)
    if image_column is not None:
        if image_column not in columns:
            raise InputError(
                f"{image_column!r} is not a column; columns: {', '.join(columns)}", "image_column"
            )
        return image_column
    image_columns = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    if len(image_columns) == 1:
        return image_columns[0]
    if not image_columns:
        raise InputError(
            f"no image column found (columns: {', '.join(columns)}); name one", "image_column"
        )
    raise InputError(
        f"several image columns ({', '.join(image_columns)}); choose one", "image_column"
    )


def detect_label_column(ds: Any, label_column: str | None) -> str:
    """The column holding class labels: the one given, else the only `ClassLabel` feature.

    An image folder with one subfolder per class gets one from `datasets` (`label`)."""
    columns = list(ds.features)
    if label_column is not None:
        if label_column not in columns:
            raise InputError(
                f"{label_column!r} is not a column; columns: {', '.join(columns)}", "label_column"
            )
        if not isinstance(ds.features[label_column], datasets.ClassLabel):
            raise InputError(
                f"{label_column!r} is a {type(ds.features[label_column]).__name__} column, not "
                "class labels (a ClassLabel: class ids with names)",
                "label_column",
            )
        return label_column
    label_columns = [c for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)]
    if len(label_columns) == 1:
        return label_columns[0]
    if not label_columns:
        raise InputError(
            f"the dataset has no class labels (no ClassLabel column among {', '.join(columns)}); "
            "an image folder needs one subfolder per class (folder/<class>/image.png)",
            "dataset",
        )
    raise InputError(
        f"several label columns ({', '.join(label_columns)}); choose one", "label_column"
    )
