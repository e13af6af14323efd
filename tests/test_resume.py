"""Killed, preempted and diverging runs, and checkpoints from elsewhere.

The subprocess runs are shared by module fixtures (each chain of runs is started once):
- a chain is an uninterrupted reference run and the same command interrupted by a SIGKILL at
  an exact micro-step (mid gradient accumulation, mid epoch) or during a save, then stopped by
  a signal or the time budget (exit 75), then rerun to the end; the final checkpoints must be
  bit-identical, for train_basic.py and train_ddpm.py, with 1 and 2 processes;
- faults are injected by tests/scripts/faults.py at exact micro-steps, so nothing races.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddp_utils.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    list_checkpoints,
    read_checkpoint,
)
from ddp_utils.errors import STOP_EXIT_CODE
from ddp_utils.train_config import parse_duration
from tests import tiny_runs
from tests.faulty_runs import Launch, run

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 12

BASIC_ARGS = [
    "--resolution", "8", "--batch-size", "8", "--gradient-accumulation-steps", "2",
    "--max-steps", str(MAX_STEPS), "--checkpoint-every", "2", "--log-every", "1",
    "--sample-every", "0", "--num-sample-images", "8", "--sample-steps", "2",
    "--checkpoints-total-limit", "none",
]  # fmt: skip
TINY_UNET = {**tiny_runs.TINY_UNET, "block_out_channels": [16, 16]}  # narrower still
DDPM_ARGS = [
    "--resolution", "8", "--batch-size", "8", "--max-steps", str(MAX_STEPS),
    "--checkpoint-every", "2", "--log-every", "1", "--lr-warmup-steps", "3",
    "--ema-max-decay", "0.9", "--sample-every", "0", "--num-sample-images", "8",
    "--sample-steps", "2", "--report-to", "none", "--checkpoints-total-limit", "5",
]  # fmt: skip


def checkpoint_files(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    tensors = {f.name: load_file(f) for f in sorted(folder.glob("*.safetensors"))}
    return tensors, json.loads((folder / "state.json").read_text())


def assert_a_kill_continues_bit_for_bit(reference: Path, args: list[str], tmp: Path) -> None:
    """train_ddpm.py `args` (4 steps, accumulation 2, checkpoints every 2, into tmp/run)
    SIGKILLed mid-run (after checkpoint-2, mid accumulation), then the same command: its
    checkpoint-4 is the uninterrupted run `reference`'s, byte for byte (EMA included)."""
    killed = run(tmp, "train_ddpm.py", args, 1, "kill@5")
    assert killed.returncode == -signal.SIGKILL
    final = run(tmp, "train_ddpm.py", args, 1)
    assert final.returncode == 0, final.output[-3000:]
    assert "resumed from" in final.output and "checkpoint-2 (step 2)" in final.output
    expected, saved = checkpoint_files(reference / "checkpoints" / "checkpoint-4")
    resumed, state = checkpoint_files(tmp / "run" / "checkpoints" / "checkpoint-4")
    assert sorted(expected) == sorted(resumed) and "ema.safetensors" in expected
    for name, tensors in expected.items():
        assert all(torch.equal(v, resumed[name][k]) for k, v in tensors.items()), name
    assert state["optimizer"] == saved["optimizer"] and state["step"] == 4


def assert_bit_identical(a: Path, b: Path) -> None:
    tensors_a, state_a = checkpoint_files(a)
    tensors_b, state_b = checkpoint_files(b)
    assert sorted(tensors_a) == sorted(tensors_b)
    for name in tensors_a:
        assert sorted(tensors_a[name]) == sorted(tensors_b[name]), name
        for key, value in tensors_a[name].items():
            assert torch.equal(value, tensors_b[name][key]), f"{name}: {key} differs"
    assert state_a["optimizer"] == state_b["optimizer"]  # hyper-parameters, Adam step counts
    assert state_a["step"] == state_b["step"] == MAX_STEPS


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def chain(
    tmp: Path,
    script: str,
    args: list[str],
    processes: int,
    faults: list[str],
    every_run: str = "",
    start_from: Path | None = None,
) -> dict:
    """Reference run (alongside the first interrupted run), then one run per fault, then the
    final rerun: every run is the same command on the same output dir. `every_run` faults
    (NaN batches) happen in the reference too; `start_from` seeds both output dirs with a
    checkpoint."""
    ref, out = tmp / "reference", tmp / "interrupted"
    if start_from is not None:
        for folder in (ref, out):
            copy_checkpoint(start_from, folder)
    join = lambda fault: ",".join(filter(None, [fault, every_run]))  # noqa: E731
    reference = Launch(tmp, script, [*args, "--output-dir", str(ref)], processes, every_run)
    results = [run(tmp, script, [*args, "--output-dir", str(out)], processes, join(faults[0]))]
    reference_result = reference.wait()
    assert reference_result.returncode == 0, reference_result.output[-3000:]
    for fault in faults[1:]:
        results.append(run(tmp, script, [*args, "--output-dir", str(out)], processes, join(fault)))
    results.append(run(tmp, script, [*args, "--output-dir", str(out)], processes, every_run))
    assert results[-1].returncode == 0, results[-1].output[-3000:]
    return {"reference": ref, "out": out, "results": results, "reference_result": reference_result}


def copy_checkpoint(source: Path, out: Path) -> None:
    shutil.copytree(source, out / "checkpoints" / source.name)


# --------------------------------------------------------------------------- exact resume


@pytest.fixture(scope="module")
def basic_one_process(tmp_path_factory) -> dict:
    # micro-step 11 = second half of step 6 (checkpoint-4 is the newest); after resuming, a
    # SIGTERM as step 7 begins: every micro-step is one of 8 images, 1797 per epoch.
    tmp = tmp_path_factory.mktemp("basic1")
    return chain(tmp, "train_basic.py", BASIC_ARGS, 1, ["kill@11", "term@12"])


@pytest.fixture(scope="module")
def basic_two_processes(tmp_path_factory) -> dict:
    # SIGKILL of every process from rank 1 mid-accumulation, then SIGUSR1 to rank 1 alone;
    # in every run (the reference too) rank 1 alone gets a NaN batch in step 10.
    tmp = tmp_path_factory.mktemp("basic2")
    args = [*BASIC_ARGS, "--report-to", "none"]
    return chain(tmp, "train_basic.py", args, 2, ["kill@11:1", "usr1@14:1"], "nan@18:1")


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preset") / "tiny_unet.json"
    path.write_text(json.dumps(TINY_UNET))
    return path


@pytest.fixture(scope="module")
def ddpm_one_process(tmp_path_factory, tiny_unet) -> dict:
    # Killed while checkpoint-6 is half written; then a time budget that ends at once.
    tmp = tmp_path_factory.mktemp("ddpm1")
    args = [*DDPM_ARGS, "--preset", str(tiny_unet)]
    ref, out = tmp / "reference", tmp / "interrupted"
    reference = Launch(tmp, "train_ddpm.py", [*args, "--output-dir", str(ref)], 1)
    killed = run(tmp, "train_ddpm.py", [*args, "--output-dir", str(out)], 1, "kill-in-save@6")
    left_behind = sorted(p.name for p in (out / "checkpoints").iterdir())
    latest = find_resume_checkpoint(out / "checkpoints", "latest")
    timed = run(tmp, "train_ddpm.py", [*args, "--output-dir", str(out), "--max-train-time", "0.01"])
    final = run(tmp, "train_ddpm.py", [*args, "--output-dir", str(out)])
    reference_result = reference.wait()
    assert reference_result.returncode == 0, reference_result.output[-3000:]
    assert final.returncode == 0, final.output[-3000:]
    return {
        "reference": ref,
        "out": out,
        "results": [killed, timed, final],
        "left_behind": left_behind,
        "latest_after_kill": latest.step if latest else None,
    }


@pytest.fixture(scope="module")
def edm_one_process(tmp_path_factory, tiny_unet) -> dict:
    # The EDM method on the same loop: SIGKILL mid-run (checkpoint-6 is the newest).
    tmp = tmp_path_factory.mktemp("edm1")
    args = [*DDPM_ARGS, "--preset", str(tiny_unet), "--objective", "edm"]
    return chain(tmp, "train_ddpm.py", args, 1, ["kill@7"])


@pytest.fixture(scope="module")
def ddpm_two_processes(tmp_path_factory, tiny_unet, ddpm_one_process) -> dict:
    # Both runs start from the one-process run's checkpoint-4 (same global batch, 4 x 2).
    # Rank 0 kills everything; SIGUSR1 to the launcher, which forwards it to both workers
    # only when told to (PET_SIGNALS_TO_HANDLE, as recipes/slurm_multinode.sbatch sets).
    tmp = tmp_path_factory.mktemp("ddpm2")
    args = [*DDPM_ARGS, "--preset", str(tiny_unet), "--batch-size", "4"]
    start = ddpm_one_process["reference"] / "checkpoints" / "checkpoint-4"
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    try:
        faults = ["kill@7:0", "usr1-launcher@9:1"]
        return chain(tmp, "train_ddpm.py", args, 2, faults, start_from=start)
    finally:
        del os.environ["PET_SIGNALS_TO_HANDLE"]


def test_basic_one_process_resumes_bit_exactly(basic_one_process) -> None:
    killed, stopped, final = basic_one_process["results"]
    out = basic_one_process["out"]
    assert killed.returncode == -signal.SIGKILL
    assert stopped.returncode == STOP_EXIT_CODE, stopped.output[-3000:]
    assert "resumed from" in stopped.output and "checkpoint-4 (step 4)" in stopped.output
    assert "stopped after step 7/12: SIGTERM" in stopped.output
    assert "checkpoint-7 (step 7)" in final.output
    assert_bit_identical(
        basic_one_process["reference"] / "checkpoints" / "checkpoint-12",
        out / "checkpoints" / "checkpoint-12",
    )
    # The logs continue: every step once, and the same wandb run resumed each time.
    assert logged_steps(out) == list(range(1, MAX_STEPS + 1))
    run_id = (out / "wandb_run_id").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 3 and all(r.name.endswith(f"-{run_id}") for r in runs), runs


def test_ddpm_one_process_resumes_bit_exactly_after_a_kill_mid_save(ddpm_one_process) -> None:
    killed, timed, final = ddpm_one_process["results"]
    out = ddpm_one_process["out"]
    assert killed.returncode == -signal.SIGKILL
    # The half-written checkpoint-6 is a hidden temporary folder; "latest" is checkpoint-4.
    left = ddpm_one_process["left_behind"]
    assert "checkpoint-6" not in left and any(n.startswith(".checkpoint-6.tmp") for n in left)
    assert ddpm_one_process["latest_after_kill"] == 4
    # The time budget was used up during setup: one step, a checkpoint, exit 75.
    assert timed.returncode == STOP_EXIT_CODE, timed.output[-3000:]
    assert "stopped after step 5/12: --max-train-time" in timed.output
    assert "checkpoint-5 (step 5)" in final.output
    assert not list((out / "checkpoints").glob(".checkpoint-*"))  # cleaned by the next save
    ref = ddpm_one_process["reference"] / "checkpoints" / "checkpoint-12"
    assert_bit_identical(ref, out / "checkpoints" / "checkpoint-12")
    assert "ema.safetensors" in {p.name for p in ref.iterdir()}
    assert logged_steps(out) == list(range(1, MAX_STEPS + 1))


def test_edm_resumes_bit_exactly_after_a_kill(edm_one_process) -> None:
    killed, final = edm_one_process["results"]
    assert killed.returncode == -signal.SIGKILL
    assert "resumed from" in final.output and "checkpoint-6 (step 6)" in final.output
    out = edm_one_process["out"]
    ref = edm_one_process["reference"] / "checkpoints" / "checkpoint-12"
    assert json.loads((ref / "state.json").read_text())["task"] == "edm"
    assert_bit_identical(ref, out / "checkpoints" / "checkpoint-12")
    assert logged_steps(out) == list(range(1, MAX_STEPS + 1))


@pytest.mark.slow
def test_basic_two_processes_resume_bit_exactly(basic_two_processes) -> None:
    killed, stopped, final = basic_two_processes["results"]
    assert killed.returncode != 0
    assert "batch: per device 8 x 2 processes" in final.output
    # Only rank 1 was signalled; both ranks stopped after the same step and saved there.
    assert "stopped after step 8/12: SIGUSR1 (1 of 2 rank(s) signalled)" in stopped.output
    assert stopped.output.count("stopped after step 8/12") == 1  # one copy, from rank 0
    # The workers exit 75; torchrun reports them failed and exits 1 itself.
    assert stopped.returncode == 1 and re.search(r"exitcode\s*:\s*75", stopped.output)
    assert "checkpoint-8 (step 8)" in final.output
    # The NaN on rank 1 alone: both ranks skipped that update (and saved no checkpoint-10).
    skipped = "step 10: non-finite loss on 1 of 2 rank(s); update skipped (1 in a row, 1 in total)"
    assert skipped in final.output and skipped in basic_two_processes["reference_result"].output
    assert "not saving checkpoint-10" in final.output
    out = basic_two_processes["out"]
    assert_bit_identical(
        basic_two_processes["reference"] / "checkpoints" / "checkpoint-12",
        out / "checkpoints" / "checkpoint-12",
    )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, MAX_STEPS + 1))
    assert [m["nonfinite_steps"] for m in metrics] == [0] * 9 + [1] * 3
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics if m["step"] != 10)
    # The log window of step 10 holds only the skipped step: no loss, rather than a NaN.
    assert "loss" not in metrics[9] and "grad_norm" not in metrics[9] and "lr" in metrics[9]


@pytest.mark.slow
def test_ddpm_two_processes_resume_bit_exactly(ddpm_two_processes) -> None:
    killed, stopped, final = ddpm_two_processes["results"]
    assert killed.returncode != 0
    # The launcher forwards the signal: the step it reaches the workers at is not fixed.
    assert stopped.returncode != 0 and ": SIGUSR1 (" in stopped.output, stopped.output[-3000:]
    assert "resumed from" in final.output
    # A checkpoint made by one process resumed on two (same global batch, half the per-device
    # one: other micro-batches, so it warns).
    assert ("made by 1 process(es) with per-device batch 8 and global batch 8; this run has 2 "
            "with 4 and 8") in killed.output  # fmt: skip
    out = ddpm_two_processes["out"]
    assert_bit_identical(
        ddpm_two_processes["reference"] / "checkpoints" / "checkpoint-12",
        out / "checkpoints" / "checkpoint-12",
    )
    assert logged_steps(out) == list(range(5, MAX_STEPS + 1))


def test_resume_is_exact_across_epochs_with_flips_in_bf16(tmp_path: Path) -> None:
    """The basic model in bf16 autocast with --random-flip, on 40 images in steps of 16 (an
    epoch ends mid-batch every 2.5 steps), killed mid-accumulation in step 5."""
    args = [*BASIC_ARGS, "--max-images", "40", "--random-flip", "--mixed-precision", "bf16",
            "--report-to", "none"]  # fmt: skip
    result = chain(tmp_path, "train_basic.py", args, 1, ["kill@9"])
    killed, final = result["results"]
    assert killed.returncode == -signal.SIGKILL
    assert "checkpoint-4 (step 4)" in final.output and "mixed precision bf16" in final.output
    assert_bit_identical(
        result["reference"] / "checkpoints" / "checkpoint-12",
        result["out"] / "checkpoints" / "checkpoint-12",
    )


def test_streamed_ddpm_with_accumulation_resumes_exactly(tmp_path: Path, tiny_unet: Path) -> None:
    """Class-conditional DDPM (labels and their dropout ride the same batch order),
    --data-loading stream (DataLoader workers decode), gradient accumulation 2, --random-flip,
    40 images in steps of 8: killed in the second micro-batch of step 7."""
    args = [*DDPM_ARGS, "--preset", str(tiny_unet), "--max-images", "40", "--batch-size", "4",
            "--gradient-accumulation-steps", "2", "--random-flip", "--data-loading", "stream",
            "--num-workers", "1", "--class-conditional"]  # fmt: skip
    result = chain(tmp_path, "train_ddpm.py", args, 1, ["kill@13"])
    killed, final = result["results"]
    assert killed.returncode == -signal.SIGKILL
    assert "streaming data" in final.output and "checkpoint-6 (step 6)" in final.output
    assert "classes: 10 (0, 1, 2" in final.output
    assert_bit_identical(
        result["reference"] / "checkpoints" / "checkpoint-12",
        result["out"] / "checkpoints" / "checkpoint-12",
    )


# --------------------------------------------------------------------------- other worlds, NaNs


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_one_and_nans_in_a_row_stop_the_run(
    basic_two_processes, tmp_path
) -> None:
    """From step 7 on every batch is NaN: 3 skipped steps in a row (--max-nonfinite-steps 3)
    end the run with exit 1, and no checkpoint is written after the trouble started."""
    out = tmp_path / "run"
    copy_checkpoint(basic_two_processes["reference"] / "checkpoints" / "checkpoint-4", out)
    args = [*BASIC_ARGS, "--batch-size", "16", "--report-to", "none", "--output-dir", str(out)]
    args += ["--max-nonfinite-steps", "3"]
    result = run(tmp_path, "train_basic.py", args, faults="nan-from@12")
    assert result.returncode == 1, result.output[-3000:]
    assert "made by 2 process(es)" in result.output
    assert "error: steps 7..9: 3 optimizer steps in a row had a non-finite loss" in result.output
    assert "Last good checkpoint: checkpoint-6" in result.output
    assert "not saving checkpoint-8" in result.output
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [
        "checkpoint-4",
        "checkpoint-6",
    ]
    good = read_checkpoint(out / "checkpoints" / "checkpoint-6")
    assert all(torch.isfinite(t).all() for f in good.tensors.values() for t in f.values())
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1]) == {
        "step": 9,
        "nonfinite_steps": 3.0,
    }


# --------------------------------------------------------------------------- refused checkpoints


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def payload_bytes(kind: str, marker: Path, size: int, tmp: Path) -> bytes:
    if kind == "pickle":
        data = pickle.dumps(Payload(marker))
    else:  # what torch.save writes where Accelerate keeps optimizer.bin
        torch.save({"state": Payload(marker)}, tmp / "payload.pt")
        data = (tmp / "payload.pt").read_bytes()
    return data + b"\0" * max(0, size - len(data))  # same size: the size check passes


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
@pytest.mark.parametrize(
    "name", ["model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"]
)
def test_a_pickle_payload_in_any_checkpoint_file_never_runs(
    ddpm_one_process, tmp_path, caplog, name: str, kind: str
) -> None:
    source = ddpm_one_process["out"] / "checkpoints"
    checkpoints = tmp_path / "checkpoints"
    for step in (10, 12):
        shutil.copytree(source / f"checkpoint-{step}", checkpoints / f"checkpoint-{step}")
    marker = tmp_path / "PWNED"
    target = checkpoints / "checkpoint-12" / name
    target.write_bytes(payload_bytes(kind, marker, target.stat().st_size, tmp_path))

    with pytest.raises(CheckpointError, match=str(target).replace(".", r"\.")):
        find_resume_checkpoint(checkpoints, str(checkpoints / "checkpoint-12"))
    # `--resume latest` warns, naming the file, and takes the newest intact checkpoint.
    assert find_resume_checkpoint(checkpoints, "latest").step == 10
    assert str(target) in caplog.text
    assert not marker.exists()


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def test_a_checkpoint_of_another_model_is_refused_naming_the_differences(
    basic_one_process, ddpm_one_process, tiny_unet, tmp_path
) -> None:
    import train_ddpm

    def resume_ddpm(source: Path, preset: str, name: str, *flags: str) -> str:
        out = tmp_path / name
        copy_checkpoint(source, out)
        args = [*DDPM_ARGS, "--preset", preset, "--output-dir", str(out), *flags]
        try:
            with pytest.raises(CheckpointError) as err:
                train_ddpm.main(args)
        finally:
            reset_accelerate()
        return str(err.value)

    basic = basic_one_process["out"] / "checkpoints" / "checkpoint-12"
    message = resume_ddpm(basic, str(tiny_unet), "basic")
    assert "was made for a different model" in message
    assert "model class: checkpoint has 'BasicUNet', this run has 'UNet2DModel'" in message
    assert "task: checkpoint has 'basic', this run has 'ddpm'" in message

    ddpm = ddpm_one_process["out"] / "checkpoints" / "checkpoint-12"
    message = resume_ddpm(ddpm, "digits-small", "ddpm")
    assert "block_out_channels: checkpoint has [16, 16], this run has [32, 32, 64]" in message
    assert "model class" not in message
    # The same network trained for another target: training on would mix two objectives.
    message = resume_ddpm(ddpm, str(tiny_unet), "target", "--prediction-type", "epsilon")
    assert message.count("\n  ") == 1, message  # one difference, and it is the target
    assert "noise schedule prediction_type: checkpoint has 'v_prediction', this run has " in message
    assert "give the flags it was made with" in message


def test_an_incomplete_checkpoint_folder_is_never_latest(ddpm_one_process, tmp_path, caplog):
    """A copy cut short (no state.json) and a save killed mid-way (hidden temp folder)."""
    source = ddpm_one_process["out"] / "checkpoints" / "checkpoint-12"
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(source, checkpoints / "checkpoint-12")
    (checkpoints / "checkpoint-14").mkdir()
    shutil.copy(source / "model.safetensors", checkpoints / "checkpoint-14")
    shutil.copytree(source, checkpoints / ".checkpoint-16.tmp-host-1-abc")
    assert find_resume_checkpoint(checkpoints, "latest").step == 12
    assert "checkpoint-14/state.json is missing" in caplog.text


# --------------------------------------------------------------------------- small pieces


def test_max_train_time_accepts_seconds_units_and_clock_time() -> None:
    assert parse_duration("5400") == 5400
    assert parse_duration("2h30m") == 9000
    assert parse_duration("1.5h") == 5400
    assert parse_duration("90s") == 90
    assert parse_duration("1:30:00") == 5400
    assert parse_duration("45:00") == 2700
    for bad in ("soon", "0", "-5", "2x", "1:2:3:4", ""):
        with pytest.raises(ValueError, match="must be a positive duration"):
            parse_duration(bad)
    from ddp_utils.train_config import TrainConfig

    with pytest.raises(ValueError, match="--max-train-time must be a positive duration"):
        TrainConfig(max_train_time="2 hours")
    with pytest.raises(ValueError, match="--max-nonfinite-steps must be >= 1"):
        TrainConfig(max_nonfinite_steps=0)


def test_nothing_unpickles_checkpoints_or_loads_unsafe_weights() -> None:
    """Source check: torch.load only with weights_only=True, no Accelerate custom-object
    checkpoints (unpickled with weights_only=False), diffusers and transformers load only
    safetensors, and a tokenizer or image processor never runs its folder's code."""
    problems = []
    skip = {".venv", "tests", "runs", "build"}
    for path in sorted(p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts)):
        text = path.read_text()
        for call, needed in (
            ("torch.load(", "weights_only=True"),
            ("from_pretrained(", "use_safetensors=True"),
        ):
            start = text.find(call)
            while start != -1:
                depth, end = 0, start + len(call) - 1
                while end < len(text):  # to the matching closing parenthesis
                    depth += {"(": 1, ")": -1}.get(text[end], 0)
                    if depth == 0:
                        break
                    end += 1
                # A tokenizer or an image processor has no weights to load safely (its files
                # are JSON and vocabularies): it must not run the folder's code.
                before = text[max(0, start - 24) : start].rstrip(".")
                is_tokenizer = before.endswith(("Tokenizer", "ImageProcessor"))
                wanted = "trust_remote_code=False" if is_tokenizer else needed
                if wanted not in text[start:end]:
                    problems.append(f"{path.name}: {text[start : end + 1]}")
                start = text.find(call, end)
        for banned in (
            "register_for_checkpointing",
            "load_state(",
            "pickle.load",
            "allow_pickle=True",
        ):
            if banned in text:
                problems.append(f"{path.name}: {banned}")
    assert not problems, problems
