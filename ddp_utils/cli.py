"""What every script's `main` shares: one log format, and known endings turned into exit codes."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from ddp_utils.errors import (
    BAD_INPUT_EXIT_CODE,
    STOP_EXIT_CODE,
    NonFiniteLossError,
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


def cli_main(fn: Callable[[], Any]) -> None:
    """Run a script's entry point and turn the known endings into exit codes:

    - 2: a bad input (ValueError, missing file), with its message;
    - 75 (`STOP_EXIT_CODE`): stopped by a signal or --max-train-time after saving;
      run the same command again to continue;
    - 1: too many non-finite losses in a row (`NonFiniteLossError`).

    Set DDP_DIFFUSION_DEBUG=1 to see the traceback as well.
    """
    try:
        fn()
    except TrainingStopped as stopped:
        print(f"stopped: {stopped}", file=sys.stderr)
        sys.exit(STOP_EXIT_CODE)
    except NonFiniteLossError as err:
        if os.environ.get("DDP_DIFFUSION_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("DDP_DIFFUSION_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT_CODE)
