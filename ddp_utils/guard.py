"""Once per optimizer step, all ranks agree: skip a non-finite update? stop here?

`StepGuard.check` runs on every rank before the optimizer step: one all-reduce of three
numbers and one host sync per step. It answers

- skip: some rank saw a non-finite loss (or, without an fp16 GradScaler, a non-finite
  gradient norm). No rank updates the weights or the EMA; the gradients are dropped; the step
  still counts, so the next one trains on new data. `--max-nonfinite-steps` skips in a row end
  the run with `NonFiniteLossError` and no checkpoint of that state: no checkpoint is written
  while a streak lasts, so the newest one is the last good one.
- stop: some rank got SIGTERM or SIGUSR1, or `--max-train-time` is used up. The step
  finishes, every rank saves a checkpoint at that same step, the tracker is closed, and the
  process exits with `STOP_EXIT_CODE`. Running the same command again resumes from there.

STOP_EXIT_CODE is 75 (EX_TEMPFAIL in sysexits.h: "try again later"). Not 143: a shell reports
143 for a process that SIGTERM killed before it could save, and a job script must be able to
tell "stopped cleanly, rerun me" from that. Under `accelerate launch`/torchrun the workers
exit 75 and the launcher reports them as failed with "exitcode: 75" (its own exit status is 1).

With an fp16 GradScaler, an overflowing *gradient* is the scaler's business (it skips the step
and lowers the scale, which happens routinely early in training); only a non-finite *loss*
counts here, and a skip resets the scaler's per-step state so that its next step works.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator

logger = logging.getLogger("ddp_diffusion")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass(frozen=True)
class Verdict:
    skip: bool  # do not update: a rank saw a non-finite loss
    stop: bool  # save at this step and exit: a rank was signalled or ran out of time
    skip_reason: str = ""
    stop_reason: str = ""


class StepGuard:
    """Signal flags, the time budget and the non-finite streak of one training run."""

    def __init__(
        self,
        accelerator: Accelerator,
        max_train_time_s: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.accelerator = accelerator
        self.max_train_time_s = max_train_time_s
        self.clock = clock
        self.started = clock()
        self.signal_name: str | None = None  # set by the handler, read at the next check
        self.num_nonfinite_steps = 0  # over the whole run (restored on resume)
        self.num_skipped_in_a_row = 0
        self._previous_handlers: dict[int, object] | None = None  # None: not installed yet

    # ------------------------------------------------------------------ signals

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGUSR1 only set a flag: the loop stops at the next step boundary.

        Installed by the first `check` (setup has nothing to save: a signal there still ends
        the process at once) and removed by `restore_signal_handlers` when the run ends.
        """
        self._previous_handlers = {}
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not on the main thread: SIGTERM/SIGUSR1 will not stop training cleanly")
            return
        for sig in STOP_SIGNALS:
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def restore_signal_handlers(self) -> None:
        for sig, handler in (self._previous_handlers or {}).items():
            signal.signal(sig, handler)
        self._previous_handlers = None

    def _on_signal(self, signum: int, frame: object) -> None:
        # No I/O here: the handler may interrupt a write to the same stream.
        self.signal_name = signal.Signals(signum).name

    def out_of_time(self) -> bool:
        return (
            self.max_train_time_s is not None
            and self.clock() - self.started >= self.max_train_time_s
        )

    # ------------------------------------------------------------------ the per-step check

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None) -> Verdict:
        """Agree with every other rank on this step (collective: call on every rank).

        `loss` is this rank's loss for the step (any shape); `grad_norm` the total gradient
        norm, ignored under an fp16 GradScaler (overflowing gradients are its business).
        """
        acc = self.accelerator
        if self._previous_handlers is None:
            self.install_signal_handlers()
        flags = torch.tensor(
            [0.0, 0.0, self.signal_name is not None, self.out_of_time()], device=acc.device
        )
        flags[0] = ~torch.isfinite(loss.detach()).all()
        if grad_norm is not None and acc.scaler is None:
            flags[1] = ~torch.isfinite(grad_norm.detach()).all()
        if acc.num_processes > 1:
            flags = acc.reduce(flags, reduction="sum")
        bad_loss, bad_grad, num_signalled, num_out_of_time = (int(v) for v in flags.tolist())

        skip = bad_loss > 0 or bad_grad > 0
        if skip:
            self.num_nonfinite_steps += 1
            self.num_skipped_in_a_row += 1
        else:
            self.num_skipped_in_a_row = 0
        stop_reason = skip_reason = ""
        if num_signalled:
            here = self.signal_name or "another rank's signal"
            stop_reason = f"{here} ({num_signalled} of {acc.num_processes} rank(s) signalled)"
        elif num_out_of_time:
            stop_reason = f"--max-train-time {self.max_train_time_s:g} s used up"
        if bad_loss:
            skip_reason = f"non-finite loss on {bad_loss} of {acc.num_processes} rank(s)"
        elif skip:
            skip_reason = "non-finite gradient norm"
        return Verdict(skip, bool(stop_reason), skip_reason, stop_reason)


def discard_gradients(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    """Drop this step's gradients without updating (every rank, after a skip verdict).

    Under an fp16 GradScaler, `clip_grad_norm_` has already unscaled this step's gradients;
    the scaler refuses a second `unscale_` until `update()`. Updating with the current scale
    clears that per-step state and leaves the scale alone: a non-finite loss comes from the
    forward pass, which loss scaling does not affect.
    """
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.update(new_scale=scaler.get_scale())
