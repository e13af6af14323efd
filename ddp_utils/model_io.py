"""Find and load a trained model from whatever path a user has at hand.

Accepted paths, told apart by the files they hold:
- a DDPM pipeline folder (`model_index.json`, `unet/`, `scheduler/`): what train_ddpm.py exports;
- a model folder (`config.json` + safetensors, and `task.json`): what train_basic.py exports;
- a checkpoint folder (`state.json`): rebuilt from the config stored in the checkpoint;
- a run directory: its export if present, else its latest intact checkpoint;
- a `checkpoints/` folder: its latest intact checkpoint.
Weights are only ever read from safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddp_utils.checkpoint import find_resume_checkpoint, read_checkpoint

TASK_FILE = "task.json"


@dataclass
class LoadedModel:
    task: str  # "basic" or "ddpm"
    model: torch.nn.Module
    scheduler_config: dict[str, Any] | None
    value_range: tuple[float, float]
    channels: int
    resolution: int
    source: Path


def _model_class(name: str):
    from diffusers import UNet2DModel

    from diffusion.models import BasicUNet

    classes = {"BasicUNet": BasicUNet, "UNet2DModel": UNet2DModel}
    if name not in classes:
        raise ValueError(f"unknown model class {name!r}; expected one of {sorted(classes)}")
    return classes[name]


def _describe(model: torch.nn.Module) -> tuple[int, int]:
    config = model.config
    size = getattr(config, "sample_size", None)
    return int(config.in_channels), int(size if isinstance(size, int) else 0)


def _from_pipeline(folder: Path, weights: str) -> LoadedModel:
    from diffusers import UNet2DModel

    sub = "unet" if weights == "ema" else "unet_raw"
    if not (folder / sub).is_dir():
        raise FileNotFoundError(f"{folder / sub} is missing (asked for --weights {weights})")
    unet = UNet2DModel.from_pretrained(folder / sub, use_safetensors=True)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise FileNotFoundError(f"{scheduler_file} is missing: not a complete pipeline folder")
    scheduler_config = json.loads(scheduler_file.read_text())
    channels, resolution = _describe(unet)
    return LoadedModel("ddpm", unet, scheduler_config, (-1.0, 1.0), channels, resolution, folder)


def _from_export(folder: Path) -> LoadedModel:
    from diffusion.models import load_model

    task_file = folder / TASK_FILE
    if not task_file.is_file():
        raise ValueError(
            f"{folder} has a config.json but no {TASK_FILE}: not an export of this toolkit "
            "(a DDPM export is a pipeline folder with model_index.json)"
        )
    task = json.loads(task_file.read_text())
    model = load_model(folder)
    channels = int(model.config.in_channels)
    return LoadedModel(
        task["task"],
        model,
        task.get("scheduler_config"),
        tuple(task["value_range"]),
        channels,
        int(task["resolution"]),
        folder,
    )


def _from_checkpoint(folder: Path, weights: str) -> LoadedModel:
    ckpt = read_checkpoint(folder)
    state = ckpt.state
    cls = _model_class(state["model_class"])
    model = cls.from_config(state["model_config"])
    key = "ema" if weights == "ema" and "ema" in ckpt.tensors else "model"
    model.load_state_dict(ckpt.tensors[key])
    cfg = state["config"]
    return LoadedModel(
        state["task"],
        model,
        state.get("scheduler_config"),
        tuple(state["value_range"]),
        int(cfg["channels"]),
        int(cfg["resolution"]),
        folder,
    )


def load_for_sampling(path: Path, weights: str = "ema") -> LoadedModel:
    path = Path(path)
    if (path / "model_index.json").is_file():
        return _from_pipeline(path, weights)
    if (path / "state.json").is_file():
        return _from_checkpoint(path, weights)
    if (path / "config.json").is_file():
        return _from_export(path)
    if (path / "pipeline" / "model_index.json").is_file():
        return _from_pipeline(path / "pipeline", weights)
    if (path / "model" / TASK_FILE).is_file():
        return _from_export(path / "model")
    # A run directory without an export, or its checkpoints/ folder: the latest intact one.
    ckpt = find_resume_checkpoint(path / "checkpoints", "latest") or find_resume_checkpoint(
        path, "latest"
    )
    if ckpt is not None:
        return _from_checkpoint(ckpt.path, weights)
    raise ValueError(
        f"{path} is not a model: expected a pipeline folder (model_index.json), an export "
        "(config.json + task.json), a checkpoint (state.json) or a run directory holding one"
    )


def write_task_file(folder: Path, task: str, value_range, resolution: int, **extra: Any) -> None:
    (folder / TASK_FILE).write_text(
        json.dumps(
            {"task": task, "value_range": list(value_range), "resolution": resolution, **extra},
            indent=2,
        )
    )
