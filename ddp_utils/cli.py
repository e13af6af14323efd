"""What every script's `main` shares: one log format, and known endings turned into exit codes."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from accelerate import PartialState

from ddp_utils.errors import (
    BAD_INPUT_EXIT_CODE,
    INTERRUPTED_EXIT_CODE,
    OUTPUT_EXIT_CODE,
    STOP_EXIT_CODE,
    CheckpointError,
    InputError,
    NonFiniteError,
    OutputError,
    TrainingStopped,
)

logger = logging.getLogger("ddp_diffusion")


def setup_logging(is_main_process: bool) -> None:
    """INFO on the main process, warnings only elsewhere (one copy of every message)."""
    logging.basicConfig(
        level=logging.INFO if is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    for noisy in ("datasets", "urllib3", "filelock", "PIL", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _is_main_process() -> bool:
    state = PartialState._shared_state
    return not state or PartialState().is_main_process


def lost_a_peer(err: BaseException) -> bool:
    """Did a collective fail because another process of the run is gone (killed, crashed)?"""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    if isinstance(err, dist.DistError):
        return True
    markers = ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer")
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in markers)


def peer_lost_message(err: BaseException) -> str:
    """One line for a collective that failed: what happened, what it said, what to do."""
    first = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip()).split(". ")[0].splitlines()[0]
    return (
        f"another process of this run died or stopped ({first[:160]}): this one cannot go on "
        "without it. If that process said why, it is above; run the same command again to "
        "resume from the newest checkpoint"
    )


def cli_main(fn: Callable[[], Any]) -> None:
    """Run a script's entry point and turn the known endings into exit codes, each with a
    one-line message instead of a traceback:

    - 2: a bad input: `InputError` (a flag, a dataset, a path that is not there, ...) or
      `CheckpointError` (a damaged checkpoint or export, one of another model). A bad flag
      or config file never gets here: the config parser exits 2 itself (`parse_config`).
      Any other exception, a plain `ValueError` or `FileNotFoundError` included, is a bug of
      the toolkit and keeps its traceback (exit 1);
    - 75 (`STOP_EXIT_CODE`): stopped by a signal or --max-train-time after saving; run the
      same command again to continue;
    - 74: an output could not be written (disk full, read-only); earlier files are intact;
    - 1: the run diverged (non-finite losses or weights), or another process of the run
      died (a collective lost it);
    - 130: interrupted before training started, or twice (Ctrl-C Ctrl-C): quit without
      saving. (While the script's imports load, its own SIGINT handler exits 130; from here
      on Ctrl-C is Python's KeyboardInterrupt again, and the training loop's guard.)

    Set DDP_DIFFUSION_DEBUG=1 to see the traceback as well.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    endings: list[tuple[type[BaseException], int, str]] = [
        (TrainingStopped, STOP_EXIT_CODE, "stopped"),
        (OutputError, OUTPUT_EXIT_CODE, "error"),
        (NonFiniteError, 1, "error"),
        ((InputError, CheckpointError), BAD_INPUT_EXIT_CODE, "error"),  # type: ignore[list-item]
        (KeyboardInterrupt, INTERRUPTED_EXIT_CODE, "interrupted"),
    ]
    try:
        fn()
    except BaseException as err:
        if lost_a_peer(err):
            if os.environ.get("DDP_DIFFUSION_DEBUG"):
                raise
            print(f"error: {peer_lost_message(err)}", file=sys.stderr)
            sys.exit(1)
        for kind, code, label in endings:
            if isinstance(err, kind):
                if os.environ.get("DDP_DIFFUSION_DEBUG") and code != STOP_EXIT_CODE:
                    raise
                message = str(err) or "quit at once, without saving"
                # Every rank stops alike: one copy of the message (errors: every rank's own).
                if code != STOP_EXIT_CODE or _is_main_process():
                    print(f"{label}: {message}", file=sys.stderr)
                sys.exit(code)
        raise
