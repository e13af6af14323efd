"""The `task.json` every export and checkpoint carries: what the weights are for.

A model folder alone does not say whether it undoes a blend with uniform noise or predicts DDPM
noise, in which value range its pixels live, or at which resolution it was trained; `task.json`
does, so `sample.py` can rebuild the sampler from the folder alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ddp_utils.files import write_json

TASK_FILE = "task.json"


def write_task_file(folder: Path, resolution: int, task_info: dict[str, Any]) -> None:
    """`task_info` holds at least `task` and `value_range`; the resolution is added."""
    write_json(folder / TASK_FILE, {**task_info, "resolution": resolution})


def read_task_file(folder: Path) -> dict[str, Any] | None:
    """The folder's task.json, or None when it has none."""
    path = folder / TASK_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} does not parse as JSON: {err}") from None
    if not isinstance(info, dict) or "task" not in info:
        raise ValueError(f"{path} is not a task file (no 'task')")
    return info
