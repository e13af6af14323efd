"""Checkpoints that are atomic, self-describing and never run code when loaded.

Layout of `<output-dir>/checkpoints/checkpoint-<step>/`:
- `model.safetensors`, `ema.safetensors` (if any), `optimizer.safetensors`: tensors only;
  or, for a sharded run (`--sharding fsdp`, `"format": "sharded"` in state.json), one
  `shard-<r>-model-00001-of-00001.safetensors` per process, written by torch's distributed
  checkpoint (DCP) with its safetensors writer: each process's shard of the tensors
  `model.<name>`, `ema.<name>` and `optimizer.<parameter>.<state>`, the shard's offsets in the
  file's header; any number of processes reads them back (`read_shards`);
- `state.json`: step, config, model config, optimizer hyper-parameters, grad-scaler state,
  the list of files with their sizes and xxh3-128 checksums, and `state_checksum`, the
  checksum of state.json's own content (all verified on load; weights must also be finite).

A checkpoint is written to a temporary folder and renamed into place only when complete, so
a crash mid-save leaves the previous one loadable and `latest` never names a partial one;
pruning (`--checkpoints-total-limit`) happens after the rename and counts intact checkpoints
only (a damaged one never takes a good one's place). Nothing is unpickled:
Accelerate's `save_state` would write pickles (`optimizer.bin`, `custom_checkpoint_*.pkl`,
the latter loaded with `weights_only=False`), which is why it is not used here; nor is DCP's
default file format, whose `.metadata` file is a pickle its reader unpickles (the safetensors
reader rebuilds the same metadata from the files' headers).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.futures import Future

from ddp_utils.errors import CheckpointError
from ddp_utils.export import check_value_range
from ddp_utils.files import CHECKSUM, atomic_dir, checksum, file_checksum

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "state.json"
STATE_CHECKSUM = "state_checksum"  # state.json's field holding the checksum of the rest
FORMAT, SHARDED = "format", "sharded"  # state.json of a sharded checkpoint: "format": "sharded"
PARTS = ("model", "ema", "optimizer")  # a sharded checkpoint's tensors: "<part>.<name>"


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]  # file stem -> tensors; {} when sharded

    @property
    def sharded(self) -> bool:
        """Written in shards (`--sharding fsdp`): its tensors are read with `read_shards`."""
        return self.state.get(FORMAT) == SHARDED


# --------------------------------------------------------------------------- optimizer state


def optimizer_to_safetensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (safetensors) and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, values in meta.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(values)
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------- the network


def trained_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of a network: its state dict, or, when part of it is frozen (an
    adapter on a pretrained base), the parameters that train (the base is read again from
    where it came, and checked)."""
    params = dict(model.named_parameters())
    if all(p.requires_grad for p in params.values()):
        return model.state_dict()
    return {name: p.detach() for name, p in params.items() if p.requires_grad}


def load_trained_weights(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path
) -> None:
    """Load what `trained_weights` saved: the whole state dict, or exactly the trainable
    parameters of a partly frozen network (a CheckpointError names what does not match)."""
    params = dict(model.named_parameters())
    if all(p.requires_grad for p in params.values()):
        model.load_state_dict(tensors)
        return
    trained = {name for name, p in params.items() if p.requires_grad}
    missing, extra = sorted(trained - set(tensors)), sorted(set(tensors) - trained)
    if missing or extra:
        raise CheckpointError(
            f"{where} does not hold this network's trained parameters (an adapter of another "
            f"shape?): missing {missing[:3]}, unexpected {extra[:3]}"
        )
    model.load_state_dict(tensors, strict=False)


# --------------------------------------------------------------------------- saving


def write_checkpoint(
    checkpoints_dir: Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    total_limit: int | None = None,
) -> Path:
    """Write `checkpoint-<step>` atomically, then prune. Call on the writing process only.

    Everything goes into a hidden temporary folder, which replaces `checkpoint-<step>` only
    once every file is on disk (`ddp_utils.files.atomic_dir`); a save that fails removes its
    temporary folder and leaves the existing checkpoints untouched. `state.json` records each
    file's size and checksum, so damage that keeps a file's size is found on load.
    """
    final = checkpoints_dir / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        files = {}
        for stem, named in tensors.items():
            path = tmp / f"{stem}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in named.items()}, path)
            data = path.read_bytes()  # from the page cache: ~10 GB/s of hashing
            files[path.name] = {"bytes": len(data), CHECKSUM: checksum(data)}
        write_state(tmp, step, files, state)
    if total_limit is not None:
        prune(checkpoints_dir, total_limit, keep=(final,))
    return final


def write_state(folder: Path, step: int, files: dict[str, Any], state: dict[str, Any]) -> None:
    """A checkpoint's state.json, the last file written into its temporary folder: `state`
    with the step, the files' records and its own checksum."""
    full = json.loads(json.dumps({**state, "step": step, "files": files}))  # as read back
    full[STATE_CHECKSUM] = state_checksum(full)
    (folder / STATE_FILE).write_text(json.dumps(full, indent=2))


def file_record(path: Path) -> dict[str, Any]:
    """What state.json records of a file: its size and checksum."""
    return {"bytes": path.stat().st_size, CHECKSUM: file_checksum(path)}


@contextlib.contextmanager
def _single_process_quietly() -> Iterator[None]:
    """DCP warns each time it reads or writes without a process group, which is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


class _ShardWriter(HuggingFaceStorageWriter):
    """DCP's safetensors writer, every process writing its own file; remembers its files."""

    def __init__(self, folder: Path) -> None:
        super().__init__(str(folder), save_distributed=True)
        self.written: list[str] = []

    def write_data(self, plan: Any, planner: Any) -> Future:
        future = super().write_data(plan, planner)
        self.written = sorted({result.storage_data.relative_path for result in future.wait()})
        return future


def write_shards(
    folder: Path, tensors: Mapping[str, torch.Tensor], distributed: bool
) -> dict[str, dict[str, Any]]:
    """Write this process's shard of `tensors` (a DTensor's local part; a whole tensor on one
    process only) into `folder` with DCP; return the records of the files this process wrote.
    Collective when `distributed`: every process calls it with the same names."""
    writer = _ShardWriter(folder)
    with _single_process_quietly():
        dcp.save(dict(tensors), storage_writer=writer, no_dist=not distributed)
    return {name: file_record(folder / name) for name in writer.written}


def read_shards(path: Path, tensors: Mapping[str, torch.Tensor], distributed: bool) -> None:
    """Fill `tensors` in place from a sharded checkpoint: a DTensor gets its shard, a whole
    tensor all of it, whatever the number of processes that wrote it (DCP reads the slices
    that overlap). Collective when `distributed`. The checkpoint was verified by
    `read_checkpoint`; the safetensors reader unpickles nothing."""
    missing = sorted(set(tensors) - set(shard_metadata(path)))
    if missing:
        raise CheckpointError(f"{path} has no {missing[0]} ({len(missing)} tensors missing)")
    with _single_process_quietly():
        dcp.load(
            dict(tensors),
            storage_reader=HuggingFaceStorageReader(str(path)),
            no_dist=not distributed,
        )


def shard_metadata(path: Path) -> dict[str, Any]:
    """{name: DCP's TensorStorageMetadata (size, dtype)} of a sharded checkpoint's tensors."""
    return HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata


def whole_tensors(checkpoint: Checkpoint) -> dict[str, dict[str, torch.Tensor]]:
    """A checkpoint's tensors by part (`model`, `ema`, `optimizer`), whole, on the CPU: its
    files' for an unsharded one, the shards put together for a sharded one (one process;
    the optimizer's keyed by parameter name there)."""
    if not checkpoint.sharded:
        return checkpoint.tensors
    tensors = {
        name: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in shard_metadata(checkpoint.path).items()
    }
    read_shards(checkpoint.path, tensors, distributed=False)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        part, _, key = name.partition(".")
        parts.setdefault(part, {})[key] = tensor
    return parts


def state_checksum(state: dict[str, Any]) -> str:
    """The checksum of a state.json's content: its canonical JSON without `state_checksum`."""
    rest = {k: v for k, v in state.items() if k != STATE_CHECKSUM}
    return checksum(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())


def prune(checkpoints_dir: Path, total_limit: int, keep: tuple[Path, ...] = ()) -> list[Path]:
    """Keep the newest `total_limit` intact checkpoints (those in `keep` among them, never
    removed) and delete the older ones; return what was deleted.

    A damaged checkpoint (`damage`: what can be seen without reading the tensors) does not
    count toward the limit, so it never costs a good one its place; it is deleted once it is
    older than every checkpoint kept (nothing would resume from it then), and left alone while
    it is newer: a file may be damaged for a while only (a copy in progress) or worth a look,
    and the save of its step, or later ones, replaces it or moves past it. With no intact
    checkpoint at all nothing is deleted.
    """
    found = list_checkpoints(checkpoints_dir)
    kept = {k for k in keep if k.parent == checkpoints_dir}
    problems = {p: None if p in kept else damage(p) for p in found}
    intact = [p for p in found if p not in kept and problems[p] is None]
    room = max(0, total_limit - len(kept))
    kept |= set(intact[max(0, len(intact) - room) :] if room else [])
    if not kept:
        return []
    oldest_kept = min(_step_of(p) for p in kept)
    removed = []
    for path in found:
        if path in kept or (problems[path] is not None and _step_of(path) > oldest_kept):
            continue
        if problems[path] is not None:
            logger.warning("removing damaged %s, older than the checkpoints kept: %s",
                           path.name, problems[path])  # fmt: skip
        shutil.rmtree(path)
        removed.append(path)
    return removed


def _step_of(path: Path) -> int:
    match = CHECKPOINT_RE.match(path.name)
    assert match, path
    return int(match.group(1))


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint that can be seen without reading its tensors (None:
    nothing): state.json missing, unparsable, edited, or a file missing or of another size than
    written. Cheap (one small read and a stat per file): pruning asks it at every save."""
    try:
        state = _read_state(path)
        _check_file_sizes(path, state)
    except CheckpointError as err:
        return str(err)
    return None


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, oldest first (temporary folders are ignored)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in checkpoints_dir.iterdir()
        if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
    ]
    return [p for _, p in sorted(found)]


# --------------------------------------------------------------------------- loading


def read_checkpoint(path: Path) -> Checkpoint:
    """Load and verify every file of a checkpoint; `CheckpointError` names what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    state = _read_state(path)
    if state.get(FORMAT) == SHARDED:
        _verify_shards(path, state)
        return Checkpoint(path=path, step=state["step"], state=state, tensors={})
    tensors = {}
    for name, (size, digest) in _check_file_sizes(path, state).items():
        file = path / name
        data = file.read_bytes()
        if len(data) != size:
            raise CheckpointError(f"{file} has {len(data)} bytes, {size} were written: truncated?")
        if digest is not None and checksum(data) != digest:
            raise CheckpointError(
                f"{file} does not match the checksum recorded when it was written: its content "
                "changed on disk (a bad copy, failing storage)"
            )
        try:
            named = load_safetensors(data)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file} is not a valid safetensors file: {err}") from None
        # Checksums prove the bytes are those written, not that they are sound: weights from
        # another tool (or a bug) may hold NaN/inf, and would resume or export as a broken model.
        broken = [k for k, t in named.items() if t.is_floating_point() and not t.isfinite().all()]
        if broken:
            raise CheckpointError(
                f"{file} holds non-finite values (NaN/inf) in {len(broken)} tensor(s), e.g. "
                f"{broken[0]}: these weights diverged and cannot be resumed or sampled"
            )
        tensors[name.removesuffix(".safetensors")] = named
    return Checkpoint(path=path, step=state["step"], state=state, tensors=tensors)


def _verify_shards(path: Path, state: dict[str, Any]) -> None:
    """Every shard file of a sharded checkpoint is the one written (size, checksum, read in
    chunks) and holds finite tensors (read one at a time); no other safetensors file is there
    (DCP's reader would take it in)."""
    records = _check_file_sizes(path, state)
    unlisted = sorted(p.name for p in path.glob("*.safetensors") if p.name not in records)
    if unlisted:
        raise CheckpointError(f"{path / unlisted[0]} is not one of the files state.json lists")
    for name, (_, digest) in records.items():
        file = path / name
        if digest is not None and file_checksum(file) != digest:
            raise CheckpointError(
                f"{file} does not match the checksum recorded when it was written: its content "
                "changed on disk (a bad copy, failing storage)"
            )
        try:
            with safe_open(file, framework="pt") as shard:
                for key in shard.keys():  # noqa: SIM118 - safe_open has no __iter__
                    tensor = shard.get_tensor(key)
                    if tensor.is_floating_point() and not tensor.isfinite().all():
                        raise CheckpointError(
                            f"{file} holds non-finite values (NaN/inf) in {key}: these weights "
                            "diverged and cannot be resumed or sampled"
                        )
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file} is not a valid safetensors file: {err}") from None


def _read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json, checked (its structure and its own checksum)."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing: the checkpoint is incomplete")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{state_file} does not parse as JSON: {err}") from None
    _check_state(state, state_file)
    # Checkpoints written before state.json carried its own checksum load without one.
    if STATE_CHECKSUM in state and state[STATE_CHECKSUM] != state_checksum(state):
        raise CheckpointError(
            f"{state_file} does not match the checksum recorded when it was written: it was "
            "edited or damaged on disk"
        )
    return state


def _check_file_sizes(path: Path, state: dict[str, Any]) -> dict[str, tuple[int, str | None]]:
    """Every file state.json lists is there with the size written: {name: (size, checksum)}
    (checkpoints written before checksums were recorded hold the size alone)."""
    records = {}
    for name, record in state["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        size, digest = (
            (record, None) if isinstance(record, int) else (record["bytes"], record[CHECKSUM])
        )
        if file.stat().st_size != size:
            raise CheckpointError(
                f"{file} has {file.stat().st_size} bytes, {size} were written: truncated?"
            )
        records[name] = (size, digest)
    return records


def _check_state(state: Any, state_file: Path) -> None:
    """A state.json with values of the wrong kind is damage too, named like any other."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{state_file} is damaged: {what}")

    if not isinstance(state, dict):
        raise bad("not a JSON object")
    step, files = state.get("step"), state.get("files")
    if type(step) is not int or step < 0:
        raise bad(f"'step' must be a whole number >= 0, got {step!r}")
    match = CHECKPOINT_RE.match(state_file.parent.name)
    if match and int(match.group(1)) != step:
        raise bad(f"'step' is {step} in a folder named {state_file.parent.name}")
    if not isinstance(files, dict) or not files:
        raise bad(f"'files' must list the checkpoint's files, got {files!r}")
    for name, record in files.items():
        ok = (type(record) is int and record >= 0) or (
            isinstance(record, dict)
            and type(record.get("bytes")) is int
            and isinstance(record.get(CHECKSUM), str)
        )
        if not ok or "/" in name or not name.endswith(".safetensors"):
            raise bad(f"the entry for {name!r} is not a file record: {record!r}")
    for key in ("config", "model_config", "optimizer"):
        if key in state and not isinstance(state[key], dict):
            raise bad(f"'{key}' must be a JSON object")
    if "value_range" in state:
        check_value_range(state["value_range"], state_file)


def find_resume_checkpoint(checkpoints_dir: Path, resume: str) -> Checkpoint | None:
    """`none` -> None; a path -> that checkpoint or an error; `latest` -> the newest intact one.

    With `latest`, a damaged checkpoint is skipped with a warning naming the problem, and
    the next older one is tried. A path to a `checkpoints/` folder, or to a run directory,
    means its newest intact checkpoint, and is an error when it has none.
    """
    if resume == "none":
        return None
    if resume != "latest":
        path = Path(resume)
        if (path / "checkpoints").is_dir() and not (path / STATE_FILE).exists():
            path = path / "checkpoints"  # a run directory: its checkpoints
        if (path / STATE_FILE).exists() or not list_checkpoints(path):
            return read_checkpoint(path)
        found = find_resume_checkpoint(path, "latest")
        if found is None:
            raise CheckpointError(f"no intact checkpoint in {path}")
        return found
    for path in reversed(list_checkpoints(checkpoints_dir)):
        try:
            return read_checkpoint(path)
        except CheckpointError as err:
            logger.warning("skipping damaged checkpoint: %s", err)
    return None


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two model configs (ignoring private keys)."""
    keys = sorted(k for k in set(saved) | set(current) if not k.startswith("_"))
    out = []
    for key in keys:
        a, b = saved.get(key), current.get(key)
        if isinstance(a, list | tuple) and isinstance(b, list | tuple):
            a, b = list(a), list(b)
        if a != b:
            out.append(f"{key}: checkpoint has {a!r}, this run has {b!r}")
    return out
