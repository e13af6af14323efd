"""Skip non-finite updates on the device every step; agree on stopping at window boundaries.

Every optimizer step, `StepGuard.step_ok` decides on the device whether the update may happen:
some rank saw a non-finite loss (or, without an fp16 GradScaler, a non-finite gradient norm)
means no rank updates. The flags are summed over ranks by one tiny all-reduce, which a GPU
runs asynchronously: nothing is read on the host, so the step never waits for the device.
`guarded_step` hands the verdict to the fused Adam/AdamW kernel as its `found_inf` (the same
mechanism a GradScaler uses), the EMA update is weighted by it, and the step's metrics are
dropped with it: a skipped step changes no weight, no EMA and no optimizer state on any rank.
The step still counts, so the next one trains on new data.

At boundaries (every `--log-every` steps, checkpoint steps, the last step), `StepGuard.check`
reads what happened since the previous boundary, once, on every rank alike:

- skipped steps are reported; `--max-nonfinite-steps` skips in a row end the run with
  `NonFiniteError`; no checkpoint is written while a streak lasts, so the newest one is
  the last good one;
- stop: some rank got SIGTERM, SIGUSR1 or SIGINT, or `--max-train-time` is used up. Every rank
  saves a checkpoint at that same step, the tracker is closed, and the process exits with
  `STOP_EXIT_CODE`. A signal is honoured at the next boundary (at most `--log-every` steps).

STOP_EXIT_CODE is 75 (EX_TEMPFAIL in sysexits.h: "try again later"). Not 143: a shell reports
143 for a process that SIGTERM killed before it could save, and a job script must be able to
tell "stopped cleanly, rerun me" from that. Under `accelerate launch`/torchrun the workers
exit 75 and the launcher reports them as failed with "exitcode: 75" (its own exit status is 1).

A worker whose launcher dies (`kill -9` of `accelerate launch`, an OOM killer) would train on
unseen, holding the run directory's lock: torchrun starts each worker in a session of its own,
so nothing else reaches it. `watch_launcher` notices the death and stops the worker as SIGTERM
would (a checkpoint at the next boundary, exit 75), or ends it without saving when that cannot
happen (a peer died too: the boundary's collective would wait for it).

With an fp16 GradScaler, an overflowing *gradient* is the scaler's business (it skips the step
and lowers the scale, which happens routinely early in training); only a non-finite *loss*
counts here. Such a skip is added to the scaler's own `found_inf`, so the scaler also lowers
its scale once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch.amp.grad_scaler import OptState

logger = logging.getLogger("ddp_diffusion")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
LAUNCHER_POLL_S = 1.0  # how often a worker looks whether its launcher is still there
# After the launcher died: time to reach the next boundary and save before giving up on it.
LAUNCHER_GONE_GRACE_S = 180.0
_watchdog: threading.Thread | None = None


@dataclass(frozen=True)
class Verdict:
    """What all ranks agreed on at a boundary."""

    stop: bool = False  # save at this step and exit: a rank was signalled or ran out of time
    stop_reason: str = ""
    num_skipped: int = 0  # non-finite steps since the previous boundary
    skip_report: str = ""  # one line about them, for the log
    streak_too_long: str = ""  # why the run must end (--max-nonfinite-steps), if it must


class StepGuard:
    """Signal flags, the time budget and the non-finite streak of one training run."""

    def __init__(
        self,
        accelerator: Accelerator,
        max_train_time_s: float | None,
        max_nonfinite_steps: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.accelerator = accelerator
        self.max_train_time_s = max_train_time_s
        self.max_nonfinite_steps = max_nonfinite_steps
        self.clock = clock
        self.started = clock()
        self.signal_name: str | None = None  # set by the handler, read at the next boundary
        self.num_interrupts = 0  # SIGINTs: the second one quits at once
        self.num_nonfinite_steps = 0  # over the whole run (restored on resume), as of a boundary
        self.num_skipped_in_a_row = 0  # as of the last boundary
        self._previous_handlers: dict[int, object] | None = None  # None: not installed yet
        # Device state, updated every step and read only at boundaries.
        device = accelerator.device
        self._in_a_row = torch.zeros((), dtype=torch.int64, device=device)
        # Since the last boundary: skipped steps, the step (1-based) a streak first reached
        # --max-nonfinite-steps (0: none), the last skipped step and how many ranks saw it.
        self._window = torch.zeros(4, dtype=torch.int64, device=device)

    # ------------------------------------------------------------------ signals

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGUSR1/SIGINT only set a flag: the loop stops at the next boundary.

        Installed by the first step (setup has nothing to save: a signal there still ends
        the process at once) and removed by `restore_signal_handlers` when the run ends.
        A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once.
        """
        self._previous_handlers = {}
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not on the main thread: signals will not stop training cleanly")
            return
        for sig in STOP_SIGNALS:
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def restore_signal_handlers(self) -> None:
        for sig, handler in (self._previous_handlers or {}).items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous_handlers = None

    def _on_signal(self, signum: int, frame: object) -> None:
        # No I/O here: the handler may interrupt a write to the same stream.
        if signum == signal.SIGINT:
            self.num_interrupts += 1
            if self.num_interrupts > 1:
                raise KeyboardInterrupt("quit at once, without saving (a second Ctrl-C)")
        self.signal_name = signal.Signals(signum).name

    def out_of_time(self) -> bool:
        return (
            self.max_train_time_s is not None
            and self.clock() - self.started >= self.max_train_time_s
        )

    # ------------------------------------------------------------------ every step

    def step_ok(
        self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A 0-dim bool on the device: may optimizer step `step` (0-based) update? (collective)

        `loss` is this rank's loss for the step (any shape); `grad_norm` the total gradient
        norm, ignored under an fp16 GradScaler. Nothing is read on the host.
        """
        acc = self.accelerator
        if self._previous_handlers is None:
            self.install_signal_handlers()
        flags = torch.zeros(2, device=acc.device)
        flags[0] = (~torch.isfinite(loss.detach()).all()).float()
        if grad_norm is not None and acc.scaler is None:
            flags[1] = (~torch.isfinite(grad_norm.detach()).all()).float()
        if acc.num_processes > 1:
            flags = acc.reduce(flags, reduction="sum")
        bad = flags.sum() > 0
        self._in_a_row = torch.where(bad, self._in_a_row + 1, 0)
        reached = (self._in_a_row == self.max_nonfinite_steps) & (self._window[1] == 0)
        step_number = torch.full((), step + 1, dtype=torch.int64, device=acc.device)
        self._window = torch.stack(
            [
                self._window[0] + bad.long(),
                torch.where(reached, step_number, self._window[1]),
                torch.where(bad, step_number, self._window[2]),
                torch.where(bad, flags[0].long(), self._window[3]),
            ]
        )
        return ~bad

    # ------------------------------------------------------------------ at boundaries

    def check(self, step: int) -> Verdict:
        """What happened since the last boundary, agreed by all ranks (collective, one read)."""
        acc = self.accelerator
        # How many ranks got each stop signal, and ran out of time: summed over ranks.
        names = [sig.name for sig in STOP_SIGNALS]
        flags = [self.signal_name == name for name in names] + [self.out_of_time()]
        signals = torch.tensor(flags, device=acc.device).long()
        if acc.num_processes > 1:
            signals = acc.reduce(signals, reduction="sum")
        *by_signal, num_out_of_time, in_a_row, num_skipped, reached_at, last_bad, bad_ranks = (
            torch.cat([signals, self._in_a_row[None], self._window]).tolist()
        )
        self._window.zero_()
        self.num_nonfinite_steps += num_skipped
        self.num_skipped_in_a_row = in_a_row
        stop_reason = ""
        if any(by_signal):
            received = "+".join(name for name, n in zip(names, by_signal) if n)
            stop_reason = f"{received} ({sum(by_signal)} of {acc.num_processes} rank(s) signalled)"
        elif num_out_of_time:
            stop_reason = f"--max-train-time {self.max_train_time_s:g} s used up"
        report = ""
        if num_skipped:
            where = (
                f"step {last_bad}: non-finite loss on {bad_ranks} of {acc.num_processes} rank(s)"
                if bad_ranks
                else f"step {last_bad}: non-finite gradient norm"
            )
            more = f" and {num_skipped - 1} earlier step(s) since the last report" * (
                num_skipped > 1
            )
            report = (
                f"{where}{more}; update skipped ({in_a_row} in a row, "
                f"{self.num_nonfinite_steps} in total)"
            )
        # The streak as the report above counts it: up to this step while it lasts.
        too_long = ""
        if reached_at:
            limit = f"--max-nonfinite-steps {self.max_nonfinite_steps}"
            if in_a_row >= self.max_nonfinite_steps:
                too_long = (
                    f"steps {step - in_a_row + 1}..{step}: {in_a_row} optimizer steps in a row "
                    f"had a non-finite loss ({limit})"
                )
            else:  # the streak ended before this boundary
                first = reached_at - self.max_nonfinite_steps + 1
                too_long = (
                    f"steps {first}..{reached_at}: {self.max_nonfinite_steps} optimizer steps "
                    f"in a row had a non-finite loss ({limit})"
                )
        return Verdict(bool(stop_reason), stop_reason, num_skipped, report, too_long)


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper (what a GradScaler keys its state by)."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def guarded_step(
    optimizer: torch.optim.Optimizer,
    ok: torch.Tensor,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """`optimizer.step()` that updates nothing (weights, moments, step counts) unless `ok`.

    The optimizer must be a fused Adam/AdamW (`ddp_utils.optim.make_optimizer` makes one): its
    kernel takes a `found_inf` tensor and skips on the device. Under a GradScaler, `ok` is
    folded into the scaler's own `found_inf`, which it passes to the fused kernel itself.
    """
    inner = unwrap_optimizer(optimizer)
    not_ok = (~ok).float()
    if scaler is not None and scaler.is_enabled():
        state = scaler._per_optimizer_states[id(inner)]
        if state["stage"] is not OptState.UNSCALED:
            scaler.unscale_(inner)  # what clipping does; needed to get its found_inf
        for found_inf in state["found_inf_per_device"].values():
            torch.maximum(found_inf, not_ok.to(found_inf.device), out=found_inf)
        optimizer.step()
        return
    inner.found_inf = not_ok
    try:
        optimizer.step()
    finally:
        del inner.found_inf


def watch_launcher(
    poll_s: float = LAUNCHER_POLL_S, grace_s: float = LAUNCHER_GONE_GRACE_S
) -> threading.Thread | None:
    """Stop this worker when the torchrun launcher that started it dies (a daemon thread).

    Only under torchrun (`accelerate launch`), where the worker's parent is the launcher: a
    plain `python train.py` whose shell goes away (nohup) trains on. The parent is polled (a
    parent-death signal would be tied to the thread of torchrun's that started the worker, not
    to the launcher's life). When it changes, the worker sends itself SIGTERM: once the run's
    handlers are installed that means "save at the next boundary and exit 75", during setup it
    ends the process at once (nothing to save yet). A boundary needs every rank: if the peers
    died too, the collective never returns, so after `grace_s` the worker exits (1) without
    saving; the newest checkpoint is then the one to resume from.
    """
    global _watchdog
    if "TORCHELASTIC_RUN_ID" not in os.environ or _watchdog is not None:
        return _watchdog
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher and launcher != 1:
            time.sleep(poll_s)
        print(
            f"warning: the launcher (pid {launcher}) has died: stopping this worker as on "
            "SIGTERM (it saves at the next boundary if every rank is still there)",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        print(
            f"error: {grace_s:g} s after the launcher died this worker has not stopped (a peer "
            "is gone too): exiting without saving; rerun to resume from the newest checkpoint",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    _watchdog = threading.Thread(target=watch, name="launcher-watchdog", daemon=True)
    _watchdog.start()
    return _watchdog
