"""Data sources, bad files and batch order, as a user sees them: shapes, counts, log lines."""

from __future__ import annotations

import json
import logging
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ddp_utils.data import ImageData, MemoryBatches, batch_indices, load_image_data

# --------------------------------------------------------------------------- helpers


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height, with a tiny IDAT: a decompression bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def load(dataset, tmp_path: Path, **kwargs) -> ImageData:
    kwargs.setdefault("resolution", 16)
    kwargs.setdefault("channels", 3)
    return load_image_data(str(dataset), cache_dir=tmp_path / "cache", **kwargs)


# --------------------------------------------------------------------------- digits


def test_digits_built_in(tmp_path):
    data = load("digits", tmp_path, resolution=16, channels=1)
    assert data.images.shape == (1797, 1, 16, 16)
    assert data.images.dtype == torch.uint8
    assert data.num_skipped == 0
    assert data.images.min() == 0 and data.images.max() >= 250  # ink reaches full white
    rgb = load("digits", tmp_path, resolution=32, channels=3)
    assert rgb.images.shape == (1797, 3, 32, 32)
    # Gray replicated into the three channels.
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 1])
    assert torch.equal(rgb.images[:, 1], rgb.images[:, 2])
    # Different resolutions are different cache entries, not a stale hit.
    assert rgb.fingerprint != data.fingerprint


def test_damaged_cache_is_rebuilt(tmp_path, caplog):
    first = load("digits", tmp_path, resolution=8, channels=1)
    (cache_file,) = (tmp_path / "cache").glob("images-*.npz")
    for damage in (b"", b"PK\x03\x04 not really a zip", cache_file.read_bytes()[:500]):
        cache_file.write_bytes(damage)
        with caplog.at_level(logging.WARNING, logger="ddp_diffusion"):
            again = load("digits", tmp_path, resolution=8, channels=1)
        assert torch.equal(again.images, first.images)
        assert "damaged" in caplog.text
        caplog.clear()
    assert not list((tmp_path / "cache").glob("*.tmp")), "temporary cache files left behind"


def test_concurrent_cache_writers_do_not_collide(tmp_path, monkeypatch):
    """Nodes sharing a filesystem each write the cache: temp names must never collide."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    from ddp_utils import files
    from ddp_utils.data import decode

    path = tmp_path / "images-x.npz"
    images = np.random.default_rng(0).integers(0, 255, (64, 1, 8, 8), dtype=np.uint8)
    seen = []
    real_open = open

    def spy_open(file, *args, **kwargs):
        seen.append(Path(file).name)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(files, "open", spy_open, raising=False)
    with ThreadPoolExecutor(4) as pool:
        rows = np.arange(64)
        list(pool.map(lambda _: decode.write_cache(path, "x", images, [], 0, rows), range(8)))
    monkeypatch.undo()
    assert len(set(seen)) == 8 and all(socket.gethostname() in name for name in seen)
    cached = decode.read_cache(path, "x")
    assert cached is not None and np.array_equal(cached[0], images)
    assert [p.name for p in tmp_path.iterdir()] == ["images-x.npz"]


# --------------------------------------------------------------------------- image folders


def _mixed_folder(root: Path) -> dict[str, Path]:
    """Good images of every kind, plus every kind of bad file, in nested folders."""
    good = {
        "gray": save(Image.new("L", (20, 20), 100), root / "a" / "gray.png"),
        "rgba": save(Image.new("RGBA", (20, 20), (255, 0, 0, 0)), root / "a" / "b" / "rgba.png"),
        "rgb": save(Image.new("RGB", (24, 20), (0, 0, 255)), root / "rgb.png"),
        "jpeg": save(Image.new("RGB", (20, 20), (0, 255, 0)), root / "c" / "photo.jpg"),
    }
    bad = {}
    truncated = root / "a" / "truncated.png"
    save(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)), truncated
    )
    truncated.write_bytes(truncated.read_bytes()[:200])
    bad["truncated"] = truncated
    bad["fake"] = root / "b" / "fake.png"
    bad["fake"].parent.mkdir(parents=True, exist_ok=True)
    bad["fake"].write_text("this is not a PNG, only text with a .png name\n" * 10)
    bad["empty"] = root / "a" / "b" / "empty.png"
    bad["empty"].write_bytes(b"")
    bad["bomb"] = root / "c" / "bomb.png"
    bad["bomb"].write_bytes(bomb_png(15000, 15000))
    bad["bomb_warning_zone"] = root / "c" / "bomb2.png"  # PIL only warns for 1x..2x the limit
    bad["bomb_warning_zone"].write_bytes(bomb_png(10000, 10000))
    (root / "notes.txt").write_text("a text file is not an image")
    return {"good": good, "bad": bad}


def test_image_folder_skips_and_names_bad_files(tmp_path, caplog):
    root = tmp_path / "images"
    files = _mixed_folder(root)
    with caplog.at_level(logging.INFO, logger="ddp_diffusion"):
        data = load(root, tmp_path, resolution=16, channels=3)
    assert data.num_images == len(files["good"])
    assert data.images.shape == (len(files["good"]), 3, 16, 16)
    assert data.num_skipped == len(files["bad"])
    # Every bad file is named in the log, no good one is.
    assert f"skipped {len(files['bad'])} unreadable image(s)" in caplog.text
    for path in files["bad"].values():
        assert path.name in caplog.text
    for path in files["good"].values():
        assert path.name not in caplog.text
    assert "notes.txt" not in caplog.text  # not an image file: not even considered
    # Bombs are refused from their header, not decoded (their tiny pixel data would only
    # fail as "truncated" after allocating hundreds of MB).
    for key in ("bomb", "bomb_warning_zone"):
        (entry,) = [s for s in data.skipped if files["bad"][key].name in s]
        assert "decompression bomb refused" in entry
    colours = sorted(tuple(int(c) for c in img[:, 8, 8]) for img in data.images)
    jpeg_green = [c for c in colours if c[1] > 240 and c[0] < 20 and c[2] < 20]  # lossy
    assert sorted([*jpeg_green, (100, 100, 100), (255, 255, 255), (0, 0, 255)]) == colours
    # gray replicated to RGB; fully transparent red composited over white; blue kept


def test_image_folder_grayscale_target(tmp_path):
    root = tmp_path / "images"
    save(Image.new("RGB", (16, 16), (255, 255, 255)), root / "white.png")
    save(Image.new("LA", (16, 16), (0, 0)), root / "transparent_black.png")
    data = load(root, tmp_path, resolution=16, channels=1)
    assert data.images.shape == (2, 1, 16, 16)
    assert (data.images == 255).all()  # white stays white; transparent becomes white


def test_size_and_channels_come_from_the_images_unless_given(tmp_path, caplog):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    gray = tmp_path / "gray"
    for k in range(3):
        save(Image.new("L", (20, 20), 60 * k), gray / f"{k}.png")
    save(Image.new("RGB", (40, 30), (9, 9, 9)), gray / "odd_one.png")  # the majority wins
    rgb = tmp_path / "rgb"
    for k in range(2):
        save(Image.new("RGB", (24, 24), (200, 10 * k, 0)), rgb / f"{k}.jpg")
    images = [Image.new("L", (12, 12), v) for v in (0, 80)]
    Dataset.from_dict({"image": images}).cast_column("image", ImageFeature()).save_to_disk(
        str(tmp_path / "saved")
    )  # as a hub dataset is: rows of PIL images
    with caplog.at_level(logging.INFO, logger="ddp_diffusion"):
        assert load(gray, tmp_path, resolution=None, channels=None).images.shape == (4, 1, 20, 20)
    assert "images: 20x20 (3 of 4 images sampled" in caplog.text
    assert "1 channel(s) (3 of 4 are grayscale)" in caplog.text
    assert load(rgb, tmp_path, resolution=None, channels=None).images.shape == (2, 3, 24, 24)
    saved = load(tmp_path / "saved", tmp_path, resolution=None, channels=None)
    assert saved.images.shape == (2, 1, 12, 12)
    assert load("digits", tmp_path, resolution=None, channels=None).images.shape[1:] == (1, 16, 16)
    # Explicit values win, each on its own.
    assert load(gray, tmp_path, resolution=8, channels=3).images.shape == (4, 3, 8, 8)
    assert load(gray, tmp_path, resolution=None, channels=3).images.shape == (4, 3, 20, 20)
    assert load(rgb, tmp_path, resolution=16, channels=None).images.shape == (2, 3, 16, 16)


def test_a_training_run_takes_its_size_and_channels_from_the_images(tmp_path):
    import yaml

    import train_basic
    from tests.tiny_runs import fresh_accelerate_state

    folder = tmp_path / "gray"
    for k in range(4):
        save(Image.new("L", (20, 20), 60 * k), folder / f"{k}.png")
    common = ["--dataset", str(folder), "--max-steps", "1", "--batch-size", "4",
              "--sample-every", "0", "--num-sample-images", "1", "--sample-steps", "1",
              "--report-to", "none"]  # fmt: skip
    for name, flags, expected in (
        ("default", [], (20, 1)),
        ("given", ["--resolution", "8", "--channels", "3"], (8, 3)),
    ):
        fresh_accelerate_state()
        train_basic.main([*common, *flags, "--output-dir", str(tmp_path / name)])
        config = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        assert (config["resolution"], config["channels"]) == expected
        task = json.loads((tmp_path / name / "model" / "task.json").read_text())
        assert task["resolution"] == expected[0]


def test_small_images_are_upscaled_and_counted(tmp_path, caplog):
    root = tmp_path / "images"
    checker = np.kron([[0, 255], [255, 0]], np.ones((2, 2))).astype(np.uint8)  # 4x4
    save(Image.fromarray(checker), root / "small.png")
    save(Image.new("L", (8, 40), 50), root / "narrow.png")  # shorter side below 16
    save(Image.new("L", (32, 32), 50), root / "big.png")
    with caplog.at_level(logging.INFO, logger="ddp_diffusion"):
        data = load(root, tmp_path, resolution=16, channels=1)
    assert data.num_images == 3 and data.num_skipped == 0
    assert data.num_upscaled == 2
    assert "2 image(s) smaller than the resolution 16 were upscaled" in caplog.text
    small = data.images[[i for i in range(3) if data.images[i].float().std() > 10][0], 0]
    assert small[2, 2] < 60 and small[2, 13] > 200  # the checker pattern survives, enlarged


def test_16_bit_pngs_rescaled_to_8_bits(tmp_path):
    root = tmp_path / "images"
    levels = {"white": 65535, "mid": 32896, "dark": 255}  # 32896 = 128 * 257
    for name, value in levels.items():
        array = np.full((16, 16), value, dtype=np.uint16)
        path = save(Image.fromarray(array), root / f"{name}.png")
        assert Image.open(path).mode.startswith("I")  # really a 16-bit PNG
    data = load(root, tmp_path, resolution=16, channels=1)
    assert data.num_images == 3
    values = sorted(int(img.float().mean()) for img in data.images)
    # 16-bit 255 is almost black (1/257 of full scale), not white as clipping would give.
    assert values == [1, 128, 255]


def test_palette_pngs(tmp_path):
    root = tmp_path / "images"
    palette = [255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254
    opaque = Image.new("P", (16, 16), 0)
    opaque.putpalette(palette)
    opaque.putpixel((0, 0), 1)
    save(opaque, root / "opaque.png")
    transparent = opaque.copy()
    save(transparent, root / "transparent.png", transparency=0)  # index 0 (red) transparent
    data = load(root, tmp_path, resolution=16, channels=3)
    assert data.num_images == 2
    centres = sorted(tuple(int(c) for c in img[:, 8, 8]) for img in data.images)
    assert centres == [(255, 0, 0), (255, 255, 255)]  # red, and transparent red -> white
    corners = sorted(tuple(int(c) for c in img[:, 0, 0]) for img in data.images)
    assert corners == [(0, 0, 255), (0, 0, 255)]  # the opaque blue pixel in both


# --------------------------------------------------------------------------- other sources


def test_save_to_disk_dataset_and_split(tmp_path):
    from datasets import Dataset, DatasetDict
    from datasets import Image as ImageFeature

    images = [Image.new("L", (12, 12), v) for v in (0, 80, 160, 240)]
    ds = Dataset.from_dict({"picture": [*images, None], "label": [0, 1, 2, 3, 4]}).cast_column(
        "picture", ImageFeature()
    )
    ds.save_to_disk(str(tmp_path / "single"))
    data = load(tmp_path / "single", tmp_path, resolution=8, channels=1)
    assert data.images.shape == (4, 1, 8, 8)
    assert data.skipped == ["row 4 (ValueError: the row has no image)"]  # a null row
    assert sorted(int(img[0, 4, 4]) for img in data.images) == [0, 80, 160, 240]
    assert "save_to_disk" in data.source

    DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert load(tmp_path / "dict", tmp_path, resolution=8, split="test").num_images == 1
    with pytest.raises(ValueError, match=r"--split: 'validation' is not a split.*train, test"):
        load(tmp_path / "dict", tmp_path, resolution=8, split="validation")


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as err:
        load("someone/not-cached-anywhere", tmp_path)
    message = str(err.value)
    assert "someone/not-cached-anywhere" in message and "offline" in message
    assert "no local folder someone/not-cached-anywhere" in message  # maybe a mistyped path
    with pytest.raises(ValueError, match="ylecun/mnist.*offline"):
        load("mnist", tmp_path)  # aliases name the hub id they stand for


def test_empty_datasets_are_errors(tmp_path):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(
        ValueError, match="--dataset: the folder .*empty_folder holds no image files"
    ):
        load(tmp_path / "empty_folder", tmp_path)
    Dataset.from_dict({"image": []}, features=None).cast_column(
        "image", ImageFeature()
    ).save_to_disk(str(tmp_path / "empty_saved"))
    with pytest.raises(ValueError, match="empty_saved.*empty"):
        load(tmp_path / "empty_saved", tmp_path)
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    for name in ("x.png", "y.png", "z.png", "zz.png"):
        (only_bad / name).write_text("not an image")
    with pytest.raises(ValueError, match="none of the 4 images could be read") as err:
        load(only_bad, tmp_path)
    # The first few files are named with their errors.
    assert "x.png (UnidentifiedImageError: " in str(err.value)
    assert "z.png (" in str(err.value) and "; ... and 1 more" in str(err.value)
    with pytest.raises(ValueError, match="no such folder"):
        load(tmp_path / "does_not_exist", tmp_path)


def test_image_column_detection(tmp_path):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    pictures = [Image.new("L", (8, 8), 7)] * 2
    two = Dataset.from_dict({"photo": pictures, "mask": pictures, "label": [0, 1]})
    two = two.cast_column("photo", ImageFeature()).cast_column("mask", ImageFeature())
    two.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ValueError, match=r"--image-column: several image columns \(photo, mask\)"):
        load(tmp_path / "two", tmp_path, resolution=8)
    with pytest.raises(
        ValueError, match=r"--image-column: 'nope' is not a column.*photo, mask, label"
    ):
        load(tmp_path / "two", tmp_path, resolution=8, image_column="nope")
    assert load(tmp_path / "two", tmp_path, resolution=8, image_column="mask").num_images == 2

    Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "none"))
    with pytest.raises(ValueError, match=r"no image column found \(columns: text\)"):
        load(tmp_path / "none", tmp_path, resolution=8)


# --------------------------------------------------------------------------- batch order


def test_batch_order_is_seeded_and_disjoint_across_ranks():
    n, per_device, world = 50, 4, 3
    same = [batch_indices(s, n, per_device, world, 1, seed=7) for s in range(10)]
    again = [batch_indices(s, n, per_device, world, 1, seed=7) for s in range(10)]
    other_seed = [batch_indices(s, n, per_device, world, 1, seed=8) for s in range(10)]
    assert all(torch.equal(a, b) for a, b in zip(same, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(same, other_seed, strict=True))
    # Within one epoch the ranks never see the same image, and every image is seen once.
    epoch_steps = n // (per_device * world)  # 4 full steps = 48 images of epoch 0
    seen = torch.cat(
        [
            batch_indices(s, n, per_device, world, r, 7)
            for s in range(epoch_steps)
            for r in range(world)
        ]
    )
    assert len(set(seen.tolist())) == len(seen) == epoch_steps * per_device * world
    # The global batch is the same images for any number of processes.
    for step in range(12):
        one = batch_indices(step, n, per_device * world, 1, 0, 7)
        split = torch.cat([batch_indices(step, n, per_device, world, r, 7) for r in range(world)])
        assert torch.equal(one, split)


def test_in_memory_batches_keep_the_order_on_the_device_one_epoch_at_a_time():
    """The device-side order is the same stream as the host-side one (checkpoints made before
    it resume exactly), and at most the current and the previous epoch's orders are kept."""
    images = torch.arange(30, dtype=torch.uint8).view(30, 1, 1, 1).expand(30, 1, 2, 2).clone()
    data = ImageData(images=images, fingerprint="x", source="test")
    accelerator = SimpleNamespace(num_processes=2, process_index=1, device=torch.device("cpu"))
    batches = MemoryBatches(data, 4, accelerator, 3, (0.0, 1.0), False)
    for step in range(20):  # 8 images per step: batches straddle epochs at steps 3, 7, ...
        on_host = batch_indices(step, 30, 4, 2, 1, 3)
        assert torch.equal(batches.indices(step, 30), on_host)
        assert torch.equal(batches.uint8_images(step)[:, 0, 0, 0].long(), on_host)
        assert len(batches._orders) <= 2


def test_resume_at_step_k_gives_the_same_batches():
    images = torch.arange(30, dtype=torch.uint8).view(30, 1, 1, 1).expand(30, 1, 2, 2).clone()
    data = ImageData(images=images, fingerprint="x", source="test")
    accelerator = SimpleNamespace(num_processes=2, process_index=1, device=torch.device("cpu"))
    uninterrupted = MemoryBatches(data, 4, accelerator, 3, (0.0, 1.0), False)
    stream = [uninterrupted.uint8_images(step) for step in range(20)]  # crosses several epochs
    # A new process after a restart at step 11.
    resumed = MemoryBatches(data, 4, accelerator, 3, (0.0, 1.0), False)
    for step in range(11, 20):
        assert torch.equal(resumed.uint8_images(step), stream[step])


def test_the_cache_honours_xdg_cache_home_and_the_project_variable(tmp_path, monkeypatch):
    from ddp_utils.data.decode import default_cache_dir
    from evaluation import default_cache_dir as stats_cache_dir

    monkeypatch.delenv("DDP_DIFFUSION_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "ddp-diffusion"
    assert stats_cache_dir() == tmp_path / "xdg" / "ddp-diffusion" / "fid-stats"
    monkeypatch.setenv("DDP_DIFFUSION_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


# --------------------------------------------------------------------------- class labels


def test_labels_come_from_every_source(tmp_path):
    import datasets
    from sklearn.datasets import load_digits

    digits = load("digits", tmp_path, channels=1, with_labels=True)
    assert digits.class_names == [str(d) for d in range(10)]
    assert torch.equal(digits.labels, torch.from_numpy(load_digits().target).long())

    # An image folder: one subfolder per class; an unreadable file drops its label too.
    root = tmp_path / "folder"
    for name, shade in (("cat", 10), ("dog", 200)):
        for k in range(3):
            save(Image.new("L", (16, 16), shade + k), root / name / f"{k}.png")
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    folder = load(root, tmp_path, channels=1, with_labels=True)
    assert folder.class_names == ["cat", "dog"] and folder.num_skipped == 1
    brightness = folder.images.float().mean(dim=(1, 2, 3))
    assert torch.equal(folder.labels, (brightness > 100).long())  # each image kept its class

    # A save_to_disk dataset with a ClassLabel column (what hub datasets carry).
    ds = datasets.Dataset.from_dict(
        {
            "photo": [Image.new("RGB", (8, 8), (k * 40, 0, 0)) for k in range(4)],
            "kind": [1, 0, 1, 2],
        },
        features=datasets.Features(
            {"photo": datasets.Image(), "kind": datasets.ClassLabel(names=["a", "b", "c"])}
        ),
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    saved = load(tmp_path / "saved", tmp_path, resolution=8, with_labels=True)
    assert saved.class_names == ["a", "b", "c"] and saved.labels.tolist() == [1, 0, 1, 2]


def test_datasets_without_usable_labels_are_refused(tmp_path):
    import datasets

    plain = tmp_path / "plain"
    for k in range(2):
        save(Image.new("L", (8, 8), k), plain / f"{k}.png")
    with pytest.raises(ValueError, match="--dataset: the dataset has no class labels"):
        load(plain, tmp_path, resolution=8, with_labels=True)
    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("L", (8, 8))] * 3, "label": [0, -1, 1], "n": [1, 2, 3]},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"]),
             "n": datasets.Value("int64")}
        ),
    )  # fmt: skip
    ds.save_to_disk(str(tmp_path / "unlabeled"))
    with pytest.raises(ValueError, match=r"--label-column: 1 row\(s\) have no class .* rows \[1\]"):
        load(tmp_path / "unlabeled", tmp_path, resolution=8, with_labels=True)
    with pytest.raises(ValueError, match="--label-column: 'n' is a Value column, not class"):
        load(tmp_path / "unlabeled", tmp_path, resolution=8, with_labels=True, label_column="n")


def test_labels_travel_with_their_images_in_memory_and_streamed(tmp_path):
    from ddp_utils.data import MemoryBatches, StreamingBatches

    root = tmp_path / "folder"
    for c in range(3):
        for k in range(5):
            save(Image.new("L", (8, 8), 60 * c + k), root / f"class{c}" / f"{k}.png")
    memory = load(root, tmp_path, resolution=8, channels=1, with_labels=True)
    streamed = load(root, tmp_path, resolution=8, channels=1, with_labels=True,
                    data_loading="stream")  # fmt: skip
    accelerator = SimpleNamespace(num_processes=2, process_index=1, device=torch.device("cpu"))
    common = (4, accelerator, 3, (0.0, 1.0), False)
    sources = [
        MemoryBatches(memory, *common),
        StreamingBatches(streamed.stream, *common, num_workers=0),
    ]
    for step in range(6):  # crosses two epochs of 15 images
        (a_images, a_condition), (b_images, b_condition) = (s.fetch(step) for s in sources)
        a_labels, b_labels = a_condition["class_labels"], b_condition["class_labels"]
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
        assert torch.equal(a_labels, (a_images.float().mean(dim=(1, 2, 3)) // 60).long())
