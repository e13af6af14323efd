"""Training commands in their own process (or `accelerate launch` with 2 processes), with
faults injected by tests/scripts/faults.py at exact micro-steps, so nothing races."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAULTS = REPO / "tests" / "scripts" / "faults.py"
TWO_PROCS = REPO / "accelerate_configs" / "cpu_2proc.yaml"


@dataclass
class Result:
    returncode: int
    output: str


class Launch:
    """One training command in its own session; `wait` kills whatever it left behind."""

    def __init__(self, tmp: Path, script: str, args: list[str], processes: int, faults: str = ""):
        self.pid_dir = tmp / f"pids-{time.monotonic_ns()}"
        env = {
            **os.environ,
            "FAULTS": faults,
            "FAULT_PID_DIR": str(self.pid_dir),
            "ACCELERATE_USE_CPU": "true",
            "HF_HOME": str(tmp / "hf_home"),  # no user accelerate config
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            # faults.py imports ddp_utils before the script's folder is on sys.path: this
            # checkout's, not whichever one the environment has installed (editable).
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        env.pop("WANDB_DIR", None)  # wandb files in <output-dir>/wandb
        command = [str(FAULTS), script, *args]
        if processes >= 2:  # the 2-process CPU config, with as many processes as asked
            accelerate = Path(sys.executable).with_name("accelerate")
            launch = ["launch", "--config_file", str(TWO_PROCS), "--num_processes", str(processes)]
            command = [str(accelerate), *launch, *command]
        else:
            command = [sys.executable, *command]
        self.proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def wait(self, timeout: float = 300) -> Result:
        try:
            output, _ = self.proc.communicate(timeout=timeout)
        finally:
            # Stragglers: the session (wandb-core, a launcher) and torchrun's workers, which
            # run in sessions of their own.
            pids = [int(p.read_text()) for p in self.pid_dir.glob("worker-*.pid")]
            for kill in [lambda: os.killpg(self.proc.pid, signal.SIGKILL)] + [
                (lambda pid=pid: os.kill(pid, signal.SIGKILL)) for pid in pids
            ]:
                try:
                    kill()
                except (ProcessLookupError, PermissionError):
                    pass
        return Result(self.proc.returncode, output)


def run(tmp: Path, script: str, args: list[str], processes: int = 1, faults: str = "") -> Result:
    return Launch(tmp, script, args, processes, faults).wait()
