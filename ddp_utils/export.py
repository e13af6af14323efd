"""The `task.json` every export and checkpoint carries: what the weights are for; and the
`checksums.json` every export carries: what its files held when they were written.

A model folder alone does not say whether it undoes a blend with uniform noise or predicts DDPM
noise, in which value range its pixels live, or at which resolution it was trained; `task.json`
does, so `sample.py` can rebuild the sampler from the folder alone. `checksums.json` lists every
other file of the export with its size and xxh3-128 checksum (as checkpoints' state.json does),
so loading finds bytes changed on disk; folders written by diffusers have none.

`best/` is the export of the lowest FID measured during training (--eval-every), never pruned;
its `fid.json` records that evaluation, so a resumed run knows the FID to beat.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ddp_utils.errors import CheckpointError
from ddp_utils.files import CHECKSUM, checksum, write_json

TASK_FILE = "task.json"
CHECKSUMS_FILE = "checksums.json"
VALUE_RANGES = ([0.0, 1.0], [-1.0, 1.0])  # the pixel ranges the toolkit's models work in
BEST_DIR, BEST_FILE = "best", "fid.json"  # the lowest-FID export, never pruned; its record


def check_value_range(value: Any, where: Path) -> tuple[float, float]:
    """A task's `value_range` as a tuple, or a CheckpointError naming the file: only (0, 1) and
    (-1, 1) are ranges of our models ([0, 255] would give near-black samples)."""
    if not isinstance(value, list | tuple) or [v for v in value if type(v) not in (int, float)]:
        value = None
    if value is None or [float(v) for v in value] not in VALUE_RANGES:
        raise CheckpointError(
            f"{where} is damaged: its value_range is {value!r}, expected [0, 1] or [-1, 1] "
            "(the pixel ranges this toolkit's models work in)"
        )
    return float(value[0]), float(value[1])


def write_task_file(folder: Path, resolution: int, task_info: dict[str, Any]) -> None:
    """`task_info` holds at least `task` and `value_range`; the resolution is added. Written
    canonically (`canonical`): two identical runs write the same bytes (and checksums.json)."""
    write_json(folder / TASK_FILE, canonical({**task_info, "resolution": resolution}))


# Lists diffusers fills from a set (a config's arguments left at their defaults): their order
# changes with Python's string hashing from one process to the next.
SET_VALUED_KEYS = frozenset({"_use_default_values"})


def canonical(value: Any) -> Any:
    """`value` with the lists of SET_VALUED_KEYS sorted, in every nested mapping."""
    if isinstance(value, dict):
        return {
            k: sorted(v) if k in SET_VALUED_KEYS and isinstance(v, list) else canonical(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def read_task_file(folder: Path) -> dict[str, Any] | None:
    """The folder's task.json, or None when it has none."""
    path = folder / TASK_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} does not parse as JSON: {err}") from None
    if not isinstance(info, dict) or "task" not in info:
        raise CheckpointError(f"{path} is not a task file (no 'task')")
    if "value_range" in info:
        info["value_range"] = list(check_value_range(info["value_range"], path))
    return info


def check_task_finite(folder: Path) -> None:
    """A CheckpointError when the folder's task.json holds NaN or Infinity (an export of a run
    given a non-finite flag before flags were checked: its samples would be black)."""
    path = folder / TASK_FILE
    found: list[str] = []
    try:
        json.loads(path.read_text(), parse_constant=found.append)
    except (OSError, ValueError):
        return  # missing or unreadable: verify_checksums and read_task_file say so
    if found:
        raise CheckpointError(f"{path} holds non-finite values ({', '.join(found)})")


def write_checksums(folder: Path) -> None:
    """checksums.json: the size and checksum of every other file under `folder`."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name != CHECKSUMS_FILE:
            data = path.read_bytes()
            files[name] = {"bytes": len(data), CHECKSUM: checksum(data)}
    write_json(folder / CHECKSUMS_FILE, {"files": files})


def verify_checksums(folder: Path) -> bool:
    """Whether `folder` has a checksums.json (False: a folder without one, such as diffusers
    writes); a CheckpointError naming the first listed file that is missing or changed."""
    path = folder / CHECKSUMS_FILE
    if not path.is_file():
        return False
    try:
        files = json.loads(path.read_text())["files"]
        records = {name: (r["bytes"], r[CHECKSUM]) for name, r in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path} is damaged: {err!r}") from None
    for name, (size, digest) in records.items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the export is incomplete")
        data = file.read_bytes()
        if len(data) != size or checksum(data) != digest:
            raise CheckpointError(
                f"{file} does not match the checksum recorded in {CHECKSUMS_FILE} when the "
                "export was written: its content changed on disk (a bad copy, failing storage)"
            )
    return True


def read_best_record(output_dir: Path) -> dict[str, Any] | None:
    """The record of the best evaluation so far (`best/fid.json`), if any."""
    path = output_dir / BEST_DIR / BEST_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def previous_best_fid(output_dir: Path, resuming: bool) -> float:
    """FID of `<output-dir>/best` when resuming (a fresh start replaces it at its first eval)."""
    best_file = output_dir / BEST_DIR / BEST_FILE
    if not resuming or not best_file.is_file():
        return math.inf
    return float(json.loads(best_file.read_text())["fid"])
