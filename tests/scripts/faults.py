"""Run a training script with faults injected at exact points (tests only).

    FAULTS="kill@11:1,term@15" python tests/scripts/faults.py train_basic.py --output-dir ...
    FAULTS=... accelerate launch ... tests/scripts/faults.py train_ddpm.py ...

`FAULTS` is a comma-separated list of `kind@N[:rank]` (rank defaults to 0); N is the micro-step
(the argument of `BatchSource.get`, i.e. when that micro-batch is fetched) except for `kill-in-save`:

- kill: SIGKILL every process of the run (the launcher and all workers; torchrun puts each
  worker in its own session, so killing one process group is not enough). Workers record
  their pids in `$FAULT_PID_DIR` (and, when they exit, their exit status: worker-R.exit).
- term / usr1 / int: send SIGTERM / SIGUSR1 / SIGINT to this worker only.
- int-twice: two SIGINTs (Ctrl-C Ctrl-C): quit at once.
- term-launcher / usr1-launcher / int-launcher: send it to the launcher (the worker's parent;
  int-launcher: Ctrl-C in the launcher's terminal).
- kill-launcher: SIGKILL the launcher alone (its workers live on, orphaned).
- die: SIGKILL this worker alone (its peers find it gone at their next collective).
- nan: this micro-batch's images become NaN on this rank (so its loss is non-finite).
- nan-from: every micro-batch from N on is NaN on this rank.
- kill-in-save: SIGKILL everything while checkpoint-N is half written (after its first file;
  sharded: after this rank wrote its shard, before state.json).
- poison-weights: after optimizer step N (1-based) the weights become NaN, although that
  step's loss was finite (an update that diverged).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

import torch

import ddp_utils.checkpoint as checkpoint
from ddp_utils import loop
from ddp_utils.data import BatchSource

RANK = int(os.environ.get("RANK", "0"))
PID_DIR = Path(os.environ.get("FAULT_PID_DIR", "."))
FAULTS: list[tuple[str, int]] = []
for item in filter(None, os.environ.get("FAULTS", "").split(",")):
    kind, _, where = item.partition("@")
    at, _, rank = where.partition(":")
    if int(rank or 0) == RANK:
        FAULTS.append((kind, int(at)))


def kill_everything() -> None:
    pids = {int(p.read_text()) for p in PID_DIR.glob("worker-*.pid")}
    if "LOCAL_RANK" in os.environ:  # launched by torchrun: the parent is the launcher
        pids.add(os.getppid())
    for pid in sorted(pids - {os.getpid()}):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.kill(os.getpid(), signal.SIGKILL)


original_save_file = checkpoint.save_file


def with_faults(original_get):
    """A batch source's `get` that first does the faults of its micro-step."""

    def get(self, micro_step: int, generator):
        return faulty_get(original_get, self, micro_step, generator)

    return get


def faulty_get(original_get, self, micro_step: int, generator):
    nan = False
    for kind, at in FAULTS:
        if kind == "nan-from" and micro_step >= at or kind == "nan" and micro_step == at:
            nan = True
        if micro_step != at:
            continue
        if kind == "kill":
            kill_everything()
        elif kind in ("term", "usr1", "int"):
            signum = {"term": signal.SIGTERM, "usr1": signal.SIGUSR1, "int": signal.SIGINT}[kind]
            os.kill(os.getpid(), signum)
        elif kind == "int-twice":
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        elif kind in ("term-launcher", "usr1-launcher", "int-launcher"):
            signum = {"term": signal.SIGTERM, "usr1": signal.SIGUSR1, "int": signal.SIGINT}
            os.kill(os.getppid(), signum[kind.removesuffix("-launcher")])
        elif kind == "kill-launcher":
            os.kill(os.getppid(), signal.SIGKILL)
        elif kind == "die":
            os.kill(os.getpid(), signal.SIGKILL)
    batch = original_get(self, micro_step, generator)
    if nan:
        batch.images = batch.images * float("nan")
    return batch


def save_file(tensors, path, *args, **kwargs):
    folder = Path(path).parent
    for kind, at in FAULTS:
        if kind == "kill-in-save" and folder.name.startswith(f".checkpoint-{at}."):
            if any(folder.iterdir()):
                kill_everything()
    return original_save_file(tensors, path, *args, **kwargs)


original_file_record = checkpoint.file_record


def file_record(path):
    """A shard of a sharded checkpoint is written and about to be hashed."""
    for kind, at in FAULTS:
        if kind == "kill-in-save" and Path(path).parent.name.startswith(f".checkpoint-{at}."):
            kill_everything()
    return original_file_record(path)


original_guarded_step = loop.guarded_step
optimizer_steps = 0


def guarded_step(optimizer, ok, scaler):
    global optimizer_steps
    original_guarded_step(optimizer, ok, scaler)
    optimizer_steps += 1
    if ("poison-weights", optimizer_steps) in FAULTS:
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.fill_(float("nan"))


def with_subclasses(cls: type) -> list[type]:
    return [cls, *(c for sub in cls.__subclasses__() for c in with_subclasses(sub))]


# Every source's own `get` (latent batches have theirs, the others the base class's).
for source in with_subclasses(BatchSource):
    if "get" in vars(source):
        source.get = with_faults(vars(source)["get"])
checkpoint.save_file = save_file
checkpoint.file_record = file_record
loop.guarded_step = guarded_step

if __name__ == "__main__":
    PID_DIR.mkdir(parents=True, exist_ok=True)
    (PID_DIR / f"worker-{RANK}.pid").write_text(str(os.getpid()))
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(sys.argv[0]).resolve().parent))
    status: object = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as done:
        status = done.code or 0
        raise
    except BaseException:
        status = 1
        raise
    finally:
        (PID_DIR / f"worker-{RANK}.exit").write_text(str(status))
