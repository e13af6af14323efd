"""Checkpoints: atomic saves, pruning after success, damaged files named, exact optimizer state."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ddp_utils.checkpoint as checkpoint
from ddp_utils.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    list_checkpoints,
    optimizer_from_safetensors,
    optimizer_to_safetensors,
    read_checkpoint,
    write_checkpoint,
)
from ddp_utils.files import checksum


def _tensors(value: float) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "model": {"w": torch.full((8, 8), value), "b": torch.arange(4.0) + value},
        "optimizer": {"0.exp_avg": torch.full((8, 8), -value)},
    }


def _save(folder: Path, step: int, total_limit: int | None = None) -> Path:
    state = {"config": {"seed": 0}, "optimizer": {"param_groups": []}}
    return write_checkpoint(folder, step, _tensors(float(step)), state, total_limit)


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- atomicity


def test_failed_save_leaves_previous_checkpoint_and_nothing_half_written(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    _save(folder, 10)
    _save(folder, 20, total_limit=2)

    real_save_file = checkpoint.save_file
    calls = []

    def save_file_then_crash(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the first file is written, the second write "runs out of disk"
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file_then_crash)
    with pytest.raises(OSError, match="No space left"):
        _save(folder, 30, total_limit=1)
    monkeypatch.undo()

    # Nothing of step 30 is visible, no temporary folder is left, and pruning did not run:
    # both earlier checkpoints are still there (total_limit=1 would have removed one).
    assert _visible(folder) == ["checkpoint-10", "checkpoint-20"]
    resumed = find_resume_checkpoint(folder, "latest")
    assert resumed is not None and resumed.step == 20
    assert torch.equal(resumed.tensors["model"]["w"], torch.full((8, 8), 20.0))

    # The next successful save prunes, after it is complete.
    _save(folder, 30, total_limit=1)
    assert _visible(folder) == ["checkpoint-30"]


def test_a_save_in_progress_is_invisible_and_no_other_save_removes_it(tmp_path):
    """A hidden temporary folder is another writer's save in progress, or what a SIGKILL left:
    it is never `latest`, and a save removes only its own (the run that takes the directory's
    lock clears leftovers: tests/test_resume.py)."""
    folder = tmp_path / "checkpoints"
    _save(folder, 5)
    partial = folder / ".checkpoint-10.tmp-othernode-123-abcd"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 100)
    assert list_checkpoints(folder) == [folder / "checkpoint-5"]
    assert find_resume_checkpoint(folder, "latest").step == 5
    _save(folder, 10)
    assert _visible(folder) == [
        ".checkpoint-10.tmp-othernode-123-abcd",
        "checkpoint-10",
        "checkpoint-5",
    ]
    assert (partial / "model.safetensors").is_file()


def test_temporary_names_are_unique_per_host_and_process(tmp_path, monkeypatch):
    import socket

    seen = []
    real_mkdir = Path.mkdir

    def spy(self, *args, **kwargs):
        if self.name.startswith(".checkpoint-"):
            seen.append(self.name)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", spy)
    _save(tmp_path, 1)
    _save(tmp_path, 1)  # the same step twice (a save right after a resume) replaces it
    assert len(seen) == 2 and seen[0] != seen[1]
    assert all(socket.gethostname() in name for name in seen)
    assert read_checkpoint(tmp_path / "checkpoint-1").step == 1


def test_pruning_keeps_the_newest(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (100, 200, 300, 400):
        _save(folder, step, total_limit=2)
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-300", "checkpoint-400"]
    # Numeric, not lexicographic, order: checkpoint-1000 is the newest.
    _save(folder, 1000, total_limit=2)
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-400", "checkpoint-1000"]


# --------------------------------------------------------------------------- damaged checkpoints


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-40])


def _same_size_garbage(file: Path) -> None:
    file.write_bytes(b"\xff" * file.stat().st_size)


def _bad_json(file: Path) -> None:
    file.write_text('{"step": 3, "files": ')


def _flip_a_weight(file: Path) -> None:
    """Bit rot that keeps the file a valid safetensors file of the same size: one weight's
    sign bit flips (the last byte holds the sign of the last float32)."""
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x80
    file.write_bytes(bytes(data))


def _edit_state(rechecksum: bool = False, **changes):
    """Change state.json; `rechecksum`: and its own checksum, as a tool that means it would."""

    def edit(file: Path) -> None:
        state = json.loads(file.read_text())
        state.update(changes)
        if rechecksum:
            state["state_checksum"] = checkpoint.state_checksum(state)
        file.write_text(json.dumps(state))

    return edit


def _nan_weights_with_matching_checksums(file: Path) -> None:
    """Weights that hold NaN, written by another tool with every checksum made to match."""
    save_file({"w": torch.full((8, 8), float("nan")), "b": torch.arange(4.0)}, file)
    state_file = file.with_name("state.json")
    state = json.loads(state_file.read_text())
    data = file.read_bytes()
    state["files"][file.name] = {"bytes": len(data), "xxh3_128": checksum(data)}
    state["state_checksum"] = checkpoint.state_checksum(state)
    state_file.write_text(json.dumps(state))


DAMAGE = {
    "truncated safetensors": ("model.safetensors", _truncate, "truncated"),
    "corrupt safetensors": (
        "optimizer.safetensors",
        _same_size_garbage,
        "does not match the checksum",
    ),
    "bit rot, still loadable": ("model.safetensors", _flip_a_weight, "does not match the checksum"),
    "missing file": ("model.safetensors", Path.unlink, "is missing"),
    "missing state": ("state.json", Path.unlink, "is missing"),
    "bad json": ("state.json", _bad_json, "does not parse as JSON"),
    "step not a number": ("state.json", _edit_state(step="abc"), "'step' must be a whole number"),
    "step of another folder": ("state.json", _edit_state(step=7), "'step' is 7 in a folder"),
    "files not a list": ("state.json", _edit_state(files=3), "'files' must list"),
    "config not a mapping": ("state.json", _edit_state(config=[1]), "'config' must be a JSON"),
    "state edited": ("state.json", _edit_state(config={"seed": 1}), "does not match the checksum"),
    "value range of 8-bit pixels": (
        "state.json",
        _edit_state(rechecksum=True, value_range=[0, 255]),
        "its value_range is [0, 255], expected [0, 1] or [-1, 1]",
    ),
    "reversed value range": (
        "state.json",
        _edit_state(rechecksum=True, value_range=[1, -1]),
        "its value_range is [1, -1]",
    ),
    "non-finite weights, checksums match": (
        "model.safetensors",
        _nan_weights_with_matching_checksums,
        "holds non-finite values (NaN/inf) in 1 tensor(s), e.g. w",
    ),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_error_names_the_file(tmp_path, kind, caplog):
    name, damage, problem = DAMAGE[kind]
    folder = tmp_path / "checkpoints"
    _save(folder, 1)
    damaged = _save(folder, 2)
    damage(damaged / name)

    with pytest.raises(CheckpointError) as err:
        read_checkpoint(damaged)
    assert str(damaged / name) in str(err.value) and problem in str(err.value)
    with pytest.raises(CheckpointError, match=name):  # an explicit --resume PATH is refused
        find_resume_checkpoint(folder, str(damaged))

    # --resume latest falls back to the newest intact one, with a warning naming the file.
    with caplog.at_level(logging.WARNING, logger="ddp_utils.checkpoint"):
        resumed = find_resume_checkpoint(folder, "latest")
    assert resumed is not None and resumed.step == 1
    assert "skipping damaged checkpoint" in caplog.text and name in caplog.text


def test_checkpoints_written_before_checksums_still_load(tmp_path):
    saved = _save(tmp_path, 3)
    state = json.loads((saved / "state.json").read_text())
    state["files"] = {name: record["bytes"] for name, record in state["files"].items()}
    del state["state_checksum"]
    (saved / "state.json").write_text(json.dumps(state))
    assert torch.equal(read_checkpoint(saved).tensors["model"]["w"], torch.full((8, 8), 3.0))


def test_state_json_carries_its_own_checksum_and_older_ones_load_without(tmp_path):
    saved = _save(tmp_path, 3)
    state = json.loads((saved / "state.json").read_text())
    assert state["state_checksum"] == checkpoint.state_checksum(state)
    # A checkpoint written by today's code, as one from before the field: it loads.
    del state["state_checksum"]
    (saved / "state.json").write_text(json.dumps(state, indent=2))
    assert read_checkpoint(saved).state["config"] == {"seed": 0}
    # With it, any edit is found (one the structural checks cannot see).
    _edit_state(config={"seed": 0, "learning_rate": 1.0})(saved / "state.json")
    _edit_state(rechecksum=True)(saved / "state.json")
    assert read_checkpoint(saved).state["config"]["learning_rate"] == 1.0
    _edit_state(config={"seed": 0, "learning_rate": 2.0})(saved / "state.json")
    with pytest.raises(CheckpointError, match="state.json does not match the checksum"):
        read_checkpoint(saved)


def test_resume_none_path_and_checkpoints_folder(tmp_path):
    assert find_resume_checkpoint(tmp_path / "nothing", "latest") is None
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    assert find_resume_checkpoint(tmp_path, "none") is None
    assert find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-1")).step == 1
    with pytest.raises(CheckpointError, match="does not exist"):
        find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-7"))
    # --resume runs/x/checkpoints (the folder, not one checkpoint): its newest intact one.
    assert find_resume_checkpoint(tmp_path / "other", str(tmp_path)).step == 2
    (tmp_path / "checkpoint-2" / "state.json").unlink()
    assert find_resume_checkpoint(tmp_path / "other", str(tmp_path)).step == 1
    (tmp_path / "checkpoint-1" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint in"):
        find_resume_checkpoint(tmp_path / "other", str(tmp_path))


# --------------------------------------------------------------------------- optimizer state


def _assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for param_id in a["state"]:
        sa, sb = a["state"][param_id], b["state"][param_id]
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
            else:
                assert sa[key] == sb[key], key


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01),
        lambda p: torch.optim.AdamW(p, lr=3e-4, amsgrad=True),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    ],
    ids=["adam", "adamw-amsgrad", "sgd-momentum"],
)
def test_optimizer_state_round_trips_exactly(tmp_path, make):
    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
        return model, make(model.parameters())

    def train_step(model, optimizer, seed):
        generator = torch.Generator().manual_seed(seed)
        loss = model(torch.randn(16, 5, generator=generator)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model, optimizer = model_and_optimizer()
    for seed in range(3):
        train_step(model, optimizer, seed)
    tensors, meta = optimizer_to_safetensors(optimizer.state_dict())
    saved = write_checkpoint(
        tmp_path,
        3,
        {"model": model.state_dict(), "optimizer": tensors},
        {"optimizer": meta},
    )
    assert sorted(p.name for p in saved.iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]  # no pickles anywhere
    json.loads((saved / "state.json").read_text())

    ckpt = read_checkpoint(saved)
    model2, optimizer2 = model_and_optimizer()
    model2.load_state_dict(ckpt.tensors["model"])
    optimizer2.load_state_dict(
        optimizer_from_safetensors(ckpt.tensors["optimizer"], ckpt.state["optimizer"])
    )
    _assert_state_dicts_equal(optimizer.state_dict(), optimizer2.state_dict())
    # And training continues bit-identically.
    for seed in range(3, 5):
        train_step(model, optimizer, seed)
        train_step(model2, optimizer2, seed)
    for p1, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p1, p2)
