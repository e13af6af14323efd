"""What careless and hostile use must not do: two writers in one run directory, a diverged
run shipped, silent corruption, lost work on Ctrl-C, a refused run that already wrote, a full
disk answered by a traceback, sizes that cannot fit."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ddp_utils.checkpoint import find_resume_checkpoint, list_checkpoints
from ddp_utils.errors import OUTPUT_EXIT_CODE, STOP_EXIT_CODE, InputError
from ddp_utils.export import write_checksums
from ddp_utils.lock import LOCK_FILE, RunLock
from tests.faulty_runs import Launch, run
from tests.tiny_runs import fresh_accelerate_state, trained_basic

REPO = Path(__file__).resolve().parents[1]
BASIC = [
    "--resolution", "8", "--batch-size", "8", "--max-steps", "6", "--checkpoint-every", "3",
    "--log-every", "1", "--sample-every", "0", "--num-sample-images", "4",
    "--sample-steps", "2", "--report-to", "none", "--max-images", "64",
]  # fmt: skip


def python(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


# --------------------------------------------------------------------------- one writer


def test_the_run_directory_lock_names_its_holder_and_is_released(tmp_path: Path) -> None:
    lock = RunLock.acquire(tmp_path)
    with pytest.raises(InputError, match=rf"in use by another run \(pid {os.getpid()} on host"):
        RunLock.acquire(tmp_path)  # another open file description: as a second process would
    lock.release()
    RunLock.acquire(tmp_path).release()
    # A lock file left by a process that died (its flock died with it) is simply taken over.
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "gone", "pid": 999999, "since": 0}))
    RunLock.acquire(tmp_path).release()


def test_a_second_run_into_the_same_directory_is_refused_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*BASIC, "--max-steps", "100000", "--checkpoint-every", "1000", "--output-dir", str(out)]
    first = Launch(tmp_path, "train_basic.py", args, 1)
    deadline = time.monotonic() + 120
    while not (out / "config.yaml").exists():  # the first run holds the lock from here on
        assert time.monotonic() < deadline and first.proc.poll() is None
        time.sleep(0.2)
    config = (out / "config.yaml").read_text()
    # A flag a resume may change (so a checkpoint the first run wrote meanwhile does not get
    # the second refused for another reason), which config.yaml would show if it were written.
    second = run(tmp_path, "train_basic.py", [*args, "--log-every", "7"])
    assert second.returncode == 2, second.output[-2000:]
    assert f"is in use by another run (pid {first.proc.pid} on host" in second.output
    assert "Traceback" not in second.output
    assert (out / "config.yaml").read_text() == config  # the refused run wrote nothing
    os.kill(first.proc.pid, signal.SIGTERM)
    result = first.wait()
    assert result.returncode == STOP_EXIT_CODE, result.output[-2000:]
    assert "log_every: 1" in (out / "config.yaml").read_text()


# --------------------------------------------------------------------------- nothing diverged shipped


def test_a_run_ending_in_non_finite_steps_exports_nothing_and_fails(tmp_path: Path) -> None:
    """Steps 5 and 6 have NaN losses (a streak shorter than --max-nonfinite-steps 10)."""
    out = tmp_path / "run"
    result = run(
        tmp_path, "train_basic.py", [*BASIC, "--output-dir", str(out)], faults="nan-from@4"
    )
    assert result.returncode == 1, result.output[-2000:]
    assert "the run ended in 2 step(s) in a row with a non-finite loss" in result.output
    assert "Last good checkpoint: checkpoint-3" in result.output
    # Resuming it as it is would repeat the same steps: a new run from it, with other flags.
    assert f"--resume {out / 'checkpoints' / 'checkpoint-3'} --output-dir <a new folder>" in (
        result.output
    )
    assert not (out / "model").exists()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-3"]


def test_weights_that_diverge_with_a_finite_loss_are_never_saved(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run(
        tmp_path, "train_basic.py", [*BASIC, "--output-dir", str(out)], faults="poison-weights@3"
    )
    assert result.returncode == 1, result.output[-2000:]
    assert "after step 3 the model tensors hold non-finite values" in result.output
    assert "checkpoint-3 was not written" in result.output and "No checkpoint yet" in result.output
    assert "(with no checkpoint it starts over)" in result.output
    assert "resumes from that checkpoint" not in result.output
    assert not list_checkpoints(out / "checkpoints") and not (out / "model").exists()


def test_sample_refuses_non_finite_weights_and_non_finite_samples(tmp_path_factory, tmp_path):
    export = trained_basic(tmp_path_factory) / "model"
    weights_file = "diffusion_pytorch_model.safetensors"
    for name, poison in (("nan", float("nan")), ("huge", 1e30)):
        broken = tmp_path / name
        shutil.copytree(export, broken)
        weights = load_file(broken / weights_file)
        weights = {k: v * poison if k.endswith("weight") else v for k, v in weights.items()}
        save_file(weights, broken / weights_file)
        write_checksums(broken)  # written so (a bug, another tool): its checksums match
        result = python("sample.py", str(broken), "--num-samples", "3", "--num-steps", "2",
                        "--output-dir", str(tmp_path / f"out-{name}"))  # fmt: skip
        assert result.returncode == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        if name == "nan":
            assert "hold non-finite values (NaN/inf): that model diverged" in result.stderr
        else:  # finite weights whose activations overflow: every sample is NaN
            assert "3 of 3 samples came out non-finite" in result.stderr
        assert not (tmp_path / f"out-{name}" / "samples.npz").exists()


# --------------------------------------------------------------------------- stopping


@pytest.mark.parametrize(
    ("fault", "code", "message"),
    [
        ("int@5", STOP_EXIT_CODE, "stopped after step 3/6: SIGINT (1 of 1 rank(s) signalled)"),
        ("int-twice@5", 130, "interrupted: quit at once, without saving (a second Ctrl-C)"),
    ],
)
def test_ctrl_c_saves_and_stops_and_a_second_quits(tmp_path, fault, code, message) -> None:
    out = tmp_path / "run"
    args = [*BASIC, "--gradient-accumulation-steps", "2", "--checkpoint-every", "100"]
    result = run(tmp_path, "train_basic.py", [*args, "--output-dir", str(out)], faults=fault)
    assert result.returncode == code, result.output[-2000:]
    assert message in result.output and "Traceback" not in result.output
    saved = [p.name for p in list_checkpoints(out / "checkpoints")]
    assert saved == (["checkpoint-3"] if code == STOP_EXIT_CODE else [])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signal_name", "launcher_codes"), [("SIGTERM", (1, 143)), ("SIGINT", (1, 130))]
)
def test_a_signal_to_the_launcher_saves_on_every_worker(tmp_path, signal_name, launcher_codes):
    """torchrun forwards SIGTERM (or Ctrl-C's SIGINT) to the workers, which agree on a step,
    save and exit 75."""
    out = tmp_path / "run"
    args = [*BASIC, "--max-steps", "40", "--checkpoint-every", "100", "--output-dir", str(out)]
    fault = {"SIGTERM": "term-launcher", "SIGINT": "int-launcher"}[signal_name]
    launch = Launch(tmp_path, "train_basic.py", args, 2, faults=f"{fault}@5:1")
    stopped = launch.wait()
    # The launcher's own status is a race, not behaviour: depending on where the signal finds
    # torchrun's agent, accelerate exits 128 + the signal (its re-raised SignalException) or
    # 1 (the workers reported as failed). Both have been seen; what the workers did is the test.
    assert stopped.returncode in launcher_codes, stopped.output[-3000:]
    exits = {p.name: p.read_text() for p in launch.pid_dir.glob("worker-*.exit")}
    assert exits == {"worker-0.exit": "75", "worker-1.exit": "75"}, stopped.output[-3000:]
    pattern = rf"stopped after step (\d+)/40: {signal_name} \((\d) of 2"
    match = re.search(pattern, stopped.output)
    assert match and stopped.output.count("stopped after step") == 1, stopped.output[-3000:]
    step = int(match.group(1))
    # The one checkpoint is complete (resuming from it: tests/test_resume.py).
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"checkpoint-{step}"]
    assert find_resume_checkpoint(out / "checkpoints", "latest").step == step


@pytest.mark.slow
def test_workers_stop_when_their_launcher_is_killed(tmp_path: Path) -> None:
    """kill -9 of `accelerate launch` alone (an OOM killer, a hasty kill): its workers, each in
    a session of its own, must not train on unseen holding the lock. They save at the next
    boundary and exit 75, so the same command can be run again at once."""
    out = tmp_path / "run"
    args = [*BASIC, "--max-steps", "100000", "--checkpoint-every", "4", "--output-dir", str(out)]
    launch = Launch(tmp_path, "train_basic.py", args, 2, faults="kill-launcher@9:1")
    # The workers hold the output pipe: it closes when both are gone (orphans: a timeout).
    stopped = launch.wait(timeout=240)
    assert stopped.returncode == -signal.SIGKILL
    exits = {p.name: p.read_text() for p in launch.pid_dir.glob("worker-*.exit")}
    assert exits == {"worker-0.exit": "75", "worker-1.exit": "75"}, stopped.output[-3000:]
    assert "the launcher (pid " in stopped.output and "has died" in stopped.output
    RunLock.acquire(out).release()  # a rerun would be accepted
    newest = find_resume_checkpoint(out / "checkpoints", "latest")
    assert newest is not None and newest.step >= 8, stopped.output[-3000:]
    assert newest.path == list_checkpoints(out / "checkpoints")[-1]  # the newest is intact
    assert f"stopped after step {newest.step}/100000: SIGTERM" in stopped.output


@pytest.mark.parametrize("script", ["train_basic.py", "train_ddpm.py", "sample.py", "evaluate.py"])
def test_ctrl_c_while_the_libraries_load_exits_130_quietly(tmp_path: Path, script: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Arguments that are refused (exit 2) if the script got as far as reading them.
    proc = subprocess.Popen([sys.executable, script, "--batch-size", "0", str(tmp_path)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    # Interrupt while torch is loading (~3 s; the script's handler comes before any import).
    deadline = time.monotonic() + 60
    while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]


WORKER_WITH_A_DEAD_PEER = """
import os, signal, time
os.environ["TORCHELASTIC_RUN_ID"] = "test"  # as under torchrun: the parent is the launcher
from ddp_utils.guard import watch_launcher
signal.signal(signal.SIGTERM, lambda *_: None)  # the flag is set, but no boundary ever comes
watch_launcher(poll_s=0.05, grace_s=1)
print("watching", flush=True)
time.sleep(600)
"""


def test_a_worker_that_cannot_save_after_its_launcher_died_exits_anyway() -> None:
    """The launcher dies and the worker cannot reach a boundary (a peer is gone too, so the
    collective never returns): after the grace period it exits without saving."""
    launcher = (
        "import subprocess, sys, time\n"
        f"worker = {WORKER_WITH_A_DEAD_PEER!r}\n"
        "subprocess.Popen([sys.executable, '-c', worker], start_new_session=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", launcher], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    timer = threading.Timer(120, proc.kill)  # a worker that never starts fails, not hangs
    timer.start()
    assert proc.stdout.readline() == "watching\n"
    timer.cancel()
    proc.kill()  # the launcher alone; the worker, in its own session, lives on
    # The worker holds the pipes: they close when it is gone.
    _, err = proc.communicate(timeout=180)
    assert f"the launcher (pid {proc.pid}) has died: stopping this worker as on SIGTERM" in err
    assert "1 s after the launcher died this worker has not stopped" in err
    assert "exiting without saving; rerun to resume from the newest checkpoint" in err


@pytest.mark.slow
def test_a_worker_that_loses_its_peer_says_so_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*BASIC, "--max-steps", "100000", "--output-dir", str(out)]
    launch = Launch(tmp_path, "train_basic.py", args, 2, faults="die@9:1")  # rank 1: SIGKILL
    result = launch.wait(timeout=240)
    assert (launch.pid_dir / "worker-0.exit").read_text() == "1", result.output[-3000:]
    assert "error: another process of this run died or stopped (" in result.output
    # The launcher prints its own report (ChildFailedError); the surviving worker, none.
    assert "[rank0]: Traceback" not in result.output and "gloo" not in result.output


# --------------------------------------------------------------------------- refused early


def test_a_refused_run_leaves_the_existing_run_untouched(tmp_path_factory, tmp_path) -> None:
    out = tmp_path / "run"
    shutil.copytree(trained_basic(tmp_path_factory), out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for bad in (["--dataset", "digitz"], ["--model", "unet"], ["--max-steps", "1"]):
        result = python("train_basic.py", "--output-dir", str(out), "--resolution", "8",
                        "--report-to", "wandb", *bad)  # fmt: skip
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert "beyond --max-steps 1" in result.stderr  # the checkpoint is at step 2
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and not (out / "wandb").exists()


def test_sizes_that_cannot_fit_are_refused_before_allocating(tmp_path: Path) -> None:
    result = python("train_ddpm.py", "--resolution", "100000", "--output-dir", str(tmp_path / "r"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--resolution: one batch of 64 images at 100000x100000 needs" in result.stderr
    assert not (tmp_path / "r").exists()


def test_sample_checks_its_destination_before_sampling(tmp_path_factory, tmp_path) -> None:
    export = trained_basic(tmp_path_factory) / "model"
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    result = python("sample.py", str(export), "--output-dir", str(target))
    assert result.returncode == 2 and "--output-dir: " in result.stderr
    assert "is a file, not a folder" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- full and read-only disks


def mount_tmpfs(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True)  # fmt: skip
    return done.returncode == 0


@pytest.mark.parametrize("kind", ["full", "read-only"])
def test_a_disk_that_fills_up_or_is_read_only_gives_a_message(tmp_path: Path, kind: str) -> None:
    disk = tmp_path / "disk"
    # A full disk: ~13 MB per digits-small checkpoint, so 30 MB fills at the third save.
    options = "size=30m" if kind == "full" else "ro,size=1m"
    if not mount_tmpfs(disk, options):
        pytest.skip("needs root and tmpfs to make a small or read-only disk")
    try:
        out = disk / "run"
        args = ["--max-steps", "6", "--checkpoint-every", "1", "--checkpoints-total-limit", "none",
                "--log-every", "1", "--sample-every", "0", "--num-sample-images", "2",
                "--sample-steps", "1", "--report-to", "none", "--output-dir", str(out)]  # fmt: skip
        result = python("train_ddpm.py", *args, timeout=300)
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        if kind == "full":
            assert result.returncode == OUTPUT_EXIT_CODE, result.stderr[-3000:]
            assert "No space left on device" in result.stderr
            assert "The earlier checkpoints are intact (newest: checkpoint-" in result.stderr
            assert "run the same command again: it resumes from there" in result.stderr
            newest = list_checkpoints(out / "checkpoints")[-1]
            assert torch.isfinite(load_file(newest / "model.safetensors")["conv_in.weight"]).all()
        else:
            assert result.returncode == 2 and "--output-dir: " in result.stderr
            assert "Read-only file system" in result.stderr
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_sample_on_a_full_disk_exits_74_with_one_message(tmp_path_factory, tmp_path, capsys):
    import sample
    from ddp_utils.cli import cli_main

    export = trained_basic(tmp_path_factory) / "model"
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "size=256k"):
        pytest.skip("needs root and tmpfs to make a small disk")
    try:
        free = os.statvfs(disk)
        (disk / "filler").write_bytes(bytes(free.f_bavail * free.f_frsize - 4096))  # 1 page left
        fresh_accelerate_state()
        argv = [str(export), "--num-samples", "64", "--num-steps", "2", "--output-dir",
                str(disk / "out")]  # fmt: skip
        with pytest.raises(SystemExit) as stopped:
            cli_main(lambda: sample.main(argv))
        assert stopped.value.code == OUTPUT_EXIT_CODE
        err = capsys.readouterr().err
        assert err.count("error: ") == 1, err
        assert f"could not write the samples into {disk / 'out'}: No space left" in err
        assert not (disk / "out" / "samples.npz").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# --------------------------------------------------------------------------- small ones


def test_metrics_are_strict_json_and_no_grad_norm_without_clipping(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run(tmp_path, "train_basic.py",
                 [*BASIC, "--max-grad-norm", "none", "--output-dir", str(out)], faults="nan@4")  # fmt: skip
    assert result.returncode == 0, result.output[-2000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = [
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
        for line in lines
    ]
    assert not any("grad_norm" in r for r in rows)
    assert "loss" not in rows[4] and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_checkpoints_beyond_the_limit_are_pruned_when_a_run_starts(tmp_path_factory, tmp_path):
    """A kill between a save's rename and its pruning leaves one checkpoint too many; the
    next run of the same command prunes it even when it has nothing left to train."""
    out = tmp_path / "run"
    shutil.copytree(trained_basic(tmp_path_factory), out)
    for step in (0, 1):
        shutil.copytree(
            out / "checkpoints" / "checkpoint-2", out / "checkpoints" / f"checkpoint-{step}"
        )
    config = json.loads((out / "checkpoints" / "checkpoint-2" / "state.json").read_text())["config"]
    args = [f"--{k.replace('_', '-')}={v}" for k, v in config.items()
            if k in ("resolution", "max_images", "max_steps", "batch_size", "sample_steps")]  # fmt: skip
    result = python("train_basic.py", *args, "--report-to", "none", "--sample-every", "0",
                    "--checkpoints-total-limit", "1", "--output-dir", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]


def test_small_input_errors_name_the_flag_the_user_typed(tmp_path_factory, tmp_path, capsys):
    import sample
    import train_basic
    from ddp_utils.checkpoint import find_resume_checkpoint
    from ddp_utils.config import parse_config

    for config, argv, message in (
        (train_basic.BasicConfig, ["--seed", "-1"], "--seed must be >= 0, got -1"),
        (sample.SampleConfig, [str(tmp_path), "--seed", "-1"], "--seed must be >= 0, got -1"),
        (sample.SampleConfig, [str(tmp_path), "--num-inference-steps", "0"],
         "--num-steps (--num-inference-steps) must be >= 1, got 0"),
    ):  # fmt: skip
        with pytest.raises(SystemExit):
            parse_config(config, argv)
        assert message in capsys.readouterr().err
    # --resume given a run directory means its checkpoints.
    run_dir = trained_basic(tmp_path_factory)
    assert find_resume_checkpoint(tmp_path, str(run_dir)).path.parent.name == "checkpoints"


def test_a_pipeline_without_its_weights_is_named(tmp_path_factory, tmp_path: Path) -> None:
    from tests.tiny_runs import trained_ddpm

    pipeline = tmp_path / "pipeline"
    shutil.copytree(trained_ddpm(tmp_path_factory) / "pipeline", pipeline)
    (pipeline / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    result = python("sample.py", str(pipeline), "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "unet/diffusion_pytorch_model.safetensors is missing" in result.stderr
