"""The exceptions the toolkit raises on purpose; `ddp_utils.cli` turns them into exit codes.

Library code raises errors about values (`InputError(message, field="image_column")`); the
script that owns the flag names it: the message reads `--image-column: <message>`.

A user's bad input is an `InputError` (or a `CheckpointError`: a saved checkpoint or export
that cannot be used); only these become exit code 2 with a one-line message. A plain
`ValueError` is a bug of the toolkit (an impossible argument between its own functions) and
keeps its traceback, so it is never mistaken for a typo in a flag.
"""

from __future__ import annotations


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field: `batch_size` -> `--batch-size`."""
    return "--" + field_name.replace("_", "-")


class InputError(ValueError):
    """A bad input value. `field` is the config field it came from (the message names its flag)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:
        message = super().__str__()
        return f"{flag_name(self.field)}: {message}" if self.field else message


class CheckpointError(ValueError):
    """A checkpoint or export that cannot be used (damaged, incomplete, of another model); the
    message names the file and the problem."""


class TrainingStopped(Exception):
    """Preempted or out of time: a checkpoint was saved and the tracker closed (exit 75)."""


class NonFiniteError(RuntimeError):
    """Training or sampling produced NaN/inf: a run that diverged, a model that is broken."""


class OutputError(RuntimeError):
    """Writing into the run directory failed (disk full, read-only); earlier files are intact."""


STOP_EXIT_CODE = 75  # EX_TEMPFAIL in sysexits.h: "try again later" (see ddp_utils/guard.py)
OUTPUT_EXIT_CODE = 74  # EX_IOERR: an output could not be written
BAD_INPUT_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130  # what a shell reports for Ctrl-C
