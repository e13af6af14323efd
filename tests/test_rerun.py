"""Running a finished run's command again: the README's recovery path after a crash or a full
disk during export. The export ends complete (its pictures included) and nothing describes
values no step was trained with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_ddpm
from ddp_utils.checkpoint import state_checksum
from ddp_utils.errors import CheckpointError, InputError
from ddp_utils.export import CHECKSUMS_FILE, verify_checksums
from ddp_utils.files import CHECKSUM, checksum
from diffusion.loading import load_for_sampling
from tests.tiny_runs import GLOBAL_BATCH, ddpm_args, fresh_accelerate_state, trained_ddpm

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def copied_run(tmp_path_factory, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the shared 6-step DDPM run, and the command that made it (into the copy)."""
    run = tmp_path / "run"
    shutil.copytree(trained_ddpm(tmp_path_factory), run)
    config = json.loads((run / "checkpoints" / "checkpoint-6" / "state.json").read_text())
    preset = Path(config["config"]["preset"])
    return run, [*ddpm_args(run, preset, GLOBAL_BATCH // 2, 2), "--report-to=none"]


def train(argv: list[str]) -> None:
    fresh_accelerate_state()
    train_ddpm.main(argv)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_rerun_keeps_an_intact_export_and_remakes_a_lost_one_with_its_pictures(
    tmp_path_factory, tmp_path
) -> None:
    run, argv = copied_run(tmp_path_factory, tmp_path)
    export = run / "pipeline"
    original = files_of(export)
    assert verify_checksums(export) and "samples.png" in original
    mtimes = {p: p.stat().st_mtime_ns for p in export.rglob("*")}

    # The same command again (a cadence changed, which a resume may): the export is untouched.
    train([*argv, "--log-every=2"])
    assert files_of(export) == original
    assert {p: p.stat().st_mtime_ns for p in export.rglob("*")} == mtimes

    # A crash during the export: no export, a temporary folder left. The rerun makes it again,
    # the grid drawn again from the checkpoint (the same seeds, the same weights: the same
    # picture), and removes the leftover.
    shutil.rmtree(export)
    leftover = run / ".pipeline.tmp-somehost-123-abcdef12"
    (leftover / "unet").mkdir(parents=True)
    train(argv)
    assert not leftover.exists()
    remade = files_of(export)
    assert remade["samples.png"] == original["samples.png"]
    assert remade[UNET_WEIGHTS] == original[UNET_WEIGHTS]
    assert "![samples](samples.png)" in remade["README.md"].decode()
    assert verify_checksums(export)


def test_an_export_with_flipped_bytes_is_refused_by_sampling_and_remade_by_a_rerun(
    tmp_path_factory, tmp_path, capsys
) -> None:
    run, argv = copied_run(tmp_path_factory, tmp_path)
    weights = run / "pipeline" / UNET_WEIGHTS
    original = weights.read_bytes()
    data = bytearray(original)
    data[-1] ^= 0x80  # a sign bit: still a valid safetensors file of the same size
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{UNET_WEIGHTS} does not match the checksum recorded"):
        load_for_sampling(run / "pipeline")
    with pytest.raises(ValueError, match="run the training command again to re-export it"):
        load_for_sampling(run)  # the run directory resolves to the same export
    train(argv)
    assert "exporting again: " in capsys.readouterr().out  # the log names the damaged file
    assert weights.read_bytes() == original
    assert json.loads((run / "pipeline" / CHECKSUMS_FILE).read_text())["files"][UNET_WEIGHTS]


def test_a_rerun_with_other_training_flags_is_refused_before_writing(
    tmp_path_factory, tmp_path
) -> None:
    run, argv = copied_run(tmp_path_factory, tmp_path)
    before = files_of(run)
    other = [a for a in argv if not a.startswith("--lr-schedule")]
    with pytest.raises(InputError) as refused:
        train([*other, "--learning-rate=1e-3", "--seed=3", "--max-steps=8"])
    message = str(refused.value)
    assert "--learning-rate: checkpoint-6 was trained with 0.0004, this run gives 0.001" in message
    assert "--seed: checkpoint-6 was trained with 0, this run gives 3" in message
    assert "--lr-schedule: checkpoint-6 was trained with 'cosine', this run gives 'constant'" in (
        message
    )
    assert "--max-steps" not in message.split("may change on resume")[0]  # training longer is fine
    assert "another --output-dir" in message and "--resume none" in message
    assert files_of(run) == before  # nothing written: config.yaml, card and export as they were


def test_a_checkpoint_with_non_finite_weights_is_not_resumed(tmp_path_factory, tmp_path, capsys):
    """Weights that hold NaN with every checksum matching (written by another tool, or a bug):
    --resume latest falls back to the older checkpoint and trains again from there; a path to
    it is refused, naming it."""
    run, argv = copied_run(tmp_path_factory, tmp_path)
    newest = run / "checkpoints" / "checkpoint-6"
    good = load_file(newest / "model.safetensors")
    save_file({k: v * float("nan") for k, v in good.items()}, newest / "model.safetensors")
    state = json.loads((newest / "state.json").read_text())
    data = (newest / "model.safetensors").read_bytes()
    state["files"]["model.safetensors"] = {"bytes": len(data), CHECKSUM: checksum(data)}
    state["state_checksum"] = state_checksum(state)
    (newest / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="checkpoint-6/model.safetensors holds non-finite"):
        train([*argv, f"--resume={newest}"])
    train(argv)
    log = capsys.readouterr().out
    assert "skipping damaged checkpoint" in log and "resumed from" in log
    assert "checkpoint-3 (step 3)" in log
    resumed = load_file(newest / "model.safetensors")  # trained again: bit-exact, as before
    assert all(torch.equal(resumed[k], good[k]) for k in good)


def test_another_runs_checkpoint_starts_a_new_run_with_other_flags(
    tmp_path_factory, tmp_path, capsys
) -> None:
    """Going on from a good checkpoint with a lower learning rate (after a divergence) is a new
    run: --resume PATH into another --output-dir; the differences are logged, not refused."""
    run, argv = copied_run(tmp_path_factory, tmp_path)
    branch = tmp_path / "branch"
    checkpoint = run / "checkpoints" / "checkpoint-6"
    args = [a for a in argv if not a.startswith(("--output-dir", "--max-steps"))]
    train([*args, f"--output-dir={branch}", f"--resume={checkpoint}", "--max-steps=7",
           "--learning-rate=1e-4"])  # fmt: skip
    log = capsys.readouterr().out
    assert f"a new run from {checkpoint}, with other training flags:" in log
    assert "--learning-rate: checkpoint-6 was trained with 0.0004, this run gives 0.0001" in log
    assert (branch / "checkpoints" / "checkpoint-7").is_dir()
    assert "learning_rate: 0.0001" in (branch / "config.yaml").read_text()
