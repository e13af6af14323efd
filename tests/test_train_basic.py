"""train_basic.py end to end on the built-in digits: what a user finds in the run directory.

One in-process run (wandb offline) that is then resumed by rerunning the same command, one
tiny `--model unet` run, and one real two-process launch through `accelerate launch`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import train_basic
from ddp_utils.config import to_dict
from ddp_utils.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "accelerate"
RES = 16  # digits' default resolution

TINY = [
    "--max-steps", "6",
    "--batch-size", "16",
    "--sample-steps", "2",
    "--num-sample-images", "4",
    "--checkpoint-every", "3",
    "--log-every", "2",
]  # fmt: skip


# --------------------------------------------------------------------------- wandb's file


def wandb_records(path: Path):
    """Records of a `.wandb` file: LevelDB-log framing of `wandb_internal_pb2.Record` protobufs.

    File header: "<4sHB" (b":W&B", magic 0xBEE1, version 0). Then 32 KiB blocks of chunks,
    each "<IHB" (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) plus data; a block
    tail shorter than a chunk header is zero padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a wandb datastore"
    block, offset, pending = 32768, 7, b""
    while offset + 7 <= len(data):
        if block - offset % block < 7:
            offset += block - offset % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        if kind == 0 or offset + 7 + length > len(data):  # end, or a chunk still being written
            break
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def finished_wandb_records(run_file: Path) -> list:
    """The records of a finished run's `.wandb` file. wandb-core (a separate process) may still
    be flushing after `finish()` returned, on a loaded machine: wait for the run's final "exit"
    record (within a minute)."""
    deadline = time.monotonic() + 60
    records = list(wandb_records(run_file))
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, f"{run_file} has no exit record"
        time.sleep(0.2)
        records = list(wandb_records(run_file))
    return records


def wandb_history(wandb_dir: Path, run_id: str = "*") -> tuple[list[dict], str]:
    """(history rows as {key: value}, run id) of the one offline run under `wandb_dir`."""
    (run_file,) = wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    records = finished_wandb_records(run_file)
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows, run_file.stem.removeprefix("run-")


# --------------------------------------------------------------------------- checks


def check_run_dir(run: Path, num_processes: int, wandb_dir: Path | None) -> None:
    """Everything a user is promised in the run directory after `--max-steps 6`."""
    # Checkpoints: safetensors + JSON, nothing pickled, self-describing.
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-3", "checkpoint-6"]
    ckpt = run / "checkpoints" / "checkpoint-6"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 6 and state["num_processes"] == num_processes
    assert not [p for p in run.rglob("*") if p.suffix in (".pkl", ".bin", ".pt")]

    # Export: reloads with the model class alone, with the final weights.
    from diffusion.networks.basic import BasicUNet

    model = BasicUNet.from_pretrained(run / "model", use_safetensors=True)
    weights = load_file(ckpt / "model.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name

    # Sample grid (4 images in one row) and the 3-row corruption panel (8 columns).
    # Written upscaled by a whole factor (nearest) until the longer side reaches 512 pixels.
    grid = np.asarray(Image.open(run / "samples" / "samples-0000006.png"))
    assert grid.shape == (7 * (RES + 4), 7 * (4 * (RES + 2) + 2), 3) and grid.std() > 0
    panel = np.asarray(Image.open(run / "samples" / "corruption_panel-0000006.png"))
    assert panel.shape == (4 * (3 * (RES + 2) + 2), 4 * (8 * (RES + 2) + 2), 3)

    # metrics.jsonl every --log-every steps, and the loss curve.
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [2, 4, 6]
    assert all(np.isfinite(m["loss"]) and 0 < m["loss"] < 1 for m in metrics)
    assert {"loss", "lr", "grad_norm", "images_per_s"} <= set(metrics[0])
    assert (run / "loss.png").is_file()

    # The resolved config, which reruns the same training.
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["max_steps"] == 6 and config["resolution"] == RES

    if wandb_dir is None:
        return
    # wandb offline run: the same losses as metrics.jsonl, and the two pictures.
    rows, run_id = wandb_history(wandb_dir)
    assert run_id == (run / "wandb_run_id").read_text().strip()
    losses = {row["_step"]: row["loss"] for row in rows if "loss" in row}
    assert losses == {m["step"]: pytest.approx(m["loss"]) for m in metrics}
    (last,) = [row for row in rows if "samples/_type" in row]
    assert last["_step"] == 6
    for name in ("samples", "corruption_panel"):
        assert last[f"{name}/_type"] == "image-file"
        media = next(wandb_dir.glob("wandb/offline-run-*")) / "files" / last[f"{name}/path"]
        assert media.is_file()
    assert last["corruption_panel/height"] == panel.shape[0]


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    folder = tmp_path / "wandb_dir"
    folder.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return folder


# --------------------------------------------------------------------------- tests


def test_one_process_end_to_end_then_rerun_resumes(tmp_path, wandb_dir, capsys):
    run = tmp_path / "run"
    argv = [*TINY, "--output-dir", str(run), "--report-to", "wandb"]
    train_basic.main(argv)
    check_run_dir(run, num_processes=1, wandb_dir=wandb_dir)
    config = yaml.safe_load((run / "config.yaml").read_text())
    given = to_dict(train_basic.parse_config(train_basic.BasicConfig, argv))
    assert config == {**given, "resolution": 16, "channels": 1}  # the digits' defaults, filled
    final_weights = load_file(run / "checkpoints" / "checkpoint-6" / "model.safetensors")
    run_id = (run / "wandb_run_id").read_text()

    # A kill after step 6 was logged but before its checkpoint: rerun the same command.
    shutil.rmtree(run / "checkpoints" / "checkpoint-6")
    capsys.readouterr()
    train_basic.main(argv)
    assert "resumed from" in capsys.readouterr().out
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [2, 4, 6]  # steps 4 and 6 not duplicated
    assert (run / "wandb_run_id").read_text() == run_id
    # Both invocations wrote to the same wandb run (a second folder within the same second of
    # the first gets wandb's "-1" suffix).
    pattern = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{run_id.strip()}(-\d+)?")
    folders = [p.name for p in wandb_dir.glob("wandb/offline-run-*")]
    assert len(folders) == 2 and all(pattern.fullmatch(name) for name in folders), folders
    # Noise and data order depend only on (seed, micro-batch): the resumed run ends identical.
    resumed = load_file(run / "checkpoints" / "checkpoint-6" / "model.safetensors")
    for name, value in final_weights.items():
        assert torch.equal(resumed[name], value), name


def test_unet_variant(tmp_path):
    from diffusers import UNet2DModel

    run = tmp_path / "run"
    train_basic.main(
        [
            "--model", "unet",
            "--max-steps", "2",
            "--batch-size", "4",
            "--sample-steps", "1",
            "--num-sample-images", "2",
            "--output-dir", str(run),
            "--report-to", "none",
        ]
    )  # fmt: skip
    state = json.loads((run / "checkpoints" / "checkpoint-2" / "state.json").read_text())
    assert state["model_class"] == "UNet2DModel"
    model = UNet2DModel.from_pretrained(run / "model", use_safetensors=True)
    assert sum(p.numel() for p in model.parameters()) == 1_707_009
    assert (run / "samples" / "samples-0000002.png").is_file()
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [2]
    assert not (run / "wandb").exists()


def test_offline_hub_dataset_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"someone/not-here.*offline"):
        train_basic.main(
            ["--dataset", "someone/not-here", "--output-dir", str(run), "--report-to", "none"]
        )
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_two_processes_through_accelerate_launch(tmp_path, wandb_dir):
    run = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            str(ACCELERATE), "launch",
            "--config_file", str(REPO / "accelerate_configs" / "cpu_2proc.yaml"),
            "train_basic.py", *TINY,
            "--output-dir", str(run),
            "--report-to", "wandb",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "per device 16 x 2 processes" in result.stdout
    check_run_dir(run, num_processes=2, wandb_dir=wandb_dir)


TWO_STEPS = [
    "--max-steps", "2",
    "--batch-size", "4",
    "--sample-steps", "1",
    "--num-sample-images", "2",
    "--report-to", "wandb",
]  # fmt: skip


def test_broken_wandb_never_stops_training(tmp_path, wandb_dir, monkeypatch, capsys):
    import wandb

    def no_network(*args, **kwargs):
        raise RuntimeError("wandb.init: network unreachable")

    monkeypatch.setattr(wandb, "init", no_network)
    run = tmp_path / "run"
    train_basic.main([*TWO_STEPS, "--output-dir", str(run)])
    assert (
        "WARNING ddp_utils.tracking: wandb: could not start even offline" in capsys.readouterr().out
    )
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [2]
    assert (run / "samples" / "samples-0000002.png").is_file()
    assert (run / "checkpoints" / "checkpoint-2").is_dir()


def test_no_wandb_login_falls_back_to_offline(tmp_path, wandb_dir, monkeypatch, capsys):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))  # where wandb keeps its key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_basic.main([*TWO_STEPS, "--output-dir", str(run)])
    # One log line, not a Python warning (which prints the source line that raised it).
    out = capsys.readouterr().out
    assert re.search(
        r"WARNING ddp_utils.tracking: wandb: no API key found .*; logging offline", out
    )
    assert not [w for w in caught if "API key" in str(w.message)]
    rows, _ = wandb_history(wandb_dir)
    assert [row["_step"] for row in rows if "loss" in row] == [2]


def test_no_network_falls_back_to_offline_with_the_same_run_id(tmp_path, wandb_dir):
    # A key is configured but the server is unreachable (a cluster node without internet).
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env.update(
        WANDB_API_KEY="a" * 40,
        WANDB_BASE_URL="http://127.0.0.1:9",  # nothing listens there
        WANDB_INIT_TIMEOUT="4",  # the online attempt waits this long
        WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
        OMP_NUM_THREADS="1",
    )
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train_basic.py", *TWO_STEPS, "--output-dir", str(run)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        "WARNING ddp_utils.tracking: wandb: online init failed; retrying offline" in result.stdout
    )
    # The offline run is the one a resume continues (normally the same id as the online try).
    run_id = (run / "wandb_run_id").read_text().strip()
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert list(wandb_dir.glob(f"wandb/offline-run-*-{run_id}")), output
    rows, _ = wandb_history(wandb_dir, run_id)
    assert [row["_step"] for row in rows if "loss" in row] == [2]


def test_tensorboard_and_wandb_together_with_model_artifacts(tmp_path, wandb_dir):
    """--report-to all: the same scalars and pictures in TensorBoard's event files (read back
    with TensorBoard's own reader) and in wandb, FID summarised by its minimum, and with
    --log-model the export uploaded as a model artifact (kept offline for `wandb sync`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    argv = [*TWO_STEPS, "--report-to", "all", "--log-model", "--log-every", "1",
            "--output-dir", str(run)]  # fmt: skip
    train_basic.main(argv)
    (events_dir,) = (run / "tensorboard").iterdir()
    events = EventAccumulator(str(events_dir), size_guidance={"images": 0})
    events.Reload()
    metrics = read_metrics(run / "metrics.jsonl")
    losses = {e.step: e.value for e in events.Scalars("loss")}
    assert losses == {m["step"]: pytest.approx(m["loss"], rel=1e-6) for m in metrics}
    (picture,) = events.Images("samples")
    png = np.asarray(Image.open(run / "samples" / "samples-0000002.png"))
    assert picture.step == 2 and (picture.height, picture.width) == png.shape[:2]

    (run_file,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = finished_wandb_records(run_file)
    kinds = {r.WhichOneof("record_type") for r in records}
    assert "artifact" in kinds or "use_artifact" in kinds, kinds
    artifact = next(r.artifact for r in records if r.WhichOneof("record_type") == "artifact")
    assert artifact.type == "model" and artifact.name.endswith("-model")
    assert {"best", "final", "latest"} & set(artifact.aliases)
    metric_names = {r.metric.name for r in records if r.WhichOneof("record_type") == "metric"}
    assert {"fid", "kid_mean"} <= metric_names


def test_pictures_are_upscaled_without_smoothing(tmp_path):
    """A 16x16 grid of 2 images is 38 pixels wide: written 14x larger, each pixel a square."""
    from ddp_utils.images import upscale

    image = np.arange(12, dtype=np.uint8).reshape(3, 4, 1).repeat(3, axis=2)
    big = upscale(image, 512)
    assert big.shape == (384, 512, 3)  # factor 128: the longer side reaches 512
    assert np.array_equal(big[::128, ::128], image) and np.array_equal(big[127, 127], image[0, 0])
    assert upscale(np.zeros((600, 10, 3), np.uint8), 512).shape == (600, 10, 3)


def test_images_per_s_leaves_out_the_time_of_pictures(tmp_path, monkeypatch):
    """A grid that takes 2 s at every step: the logged throughput is the steps' own."""
    from ddp_utils import loop
    from tests.tiny_runs import fresh_accelerate_state

    original = loop.log_pictures

    def slow_pictures(*args):
        time.sleep(2.0)
        return original(*args)

    monkeypatch.setattr(loop, "log_pictures", slow_pictures)
    fresh_accelerate_state()
    out = tmp_path / "run"
    train_basic.main(
        [f"--output-dir={out}", f"--resolution={RES}", "--max-images=32", "--max-steps=3",
         "--batch-size=8", "--log-every=1", "--sample-every=1", "--num-sample-images=4",
         "--sample-steps=2", "--report-to=none"]
    )  # fmt: skip
    rates = [m["images_per_s"] for m in read_metrics(out / "metrics.jsonl")]
    assert min(rates[1:]) > 8 / 2.0, rates  # steps 2 and 3 each follow a 2 s picture
