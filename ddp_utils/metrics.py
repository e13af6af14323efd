"""Training statistics reported by name and reduced across ranks once per log window.

The loop and the method `report` values as they are computed (a loss per micro-batch, a loss
per sample and timestep bin, a gradient norm); sums and counts stay on the device, so reporting
never waits for the GPU. At the end of an optimizer step the loop `commit`s the step's values,
or drops them when the step was skipped (a non-finite loss must not poison the window's mean).
`reduce` then sums every name over all ranks in one all-reduce and reads the result once: a
name with nothing counted in the window is left out, never logged as NaN.

Every rank must report the same names (a name may carry a count of 0 on some rank).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator


class MetricWindow:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pending: dict[str, torch.Tensor] = {}  # this step's (sum, count) per name
        self._totals: dict[str, torch.Tensor] = {}  # the window's committed (sum, count)

    def add(self, name: str, total: torch.Tensor, count: torch.Tensor | float) -> None:
        """Add a sum of `count` values to `name` for the current step."""
        if not isinstance(count, torch.Tensor):  # a fill on the device, not a host-to-device copy
            count = torch.full((), float(count), device=self.device)
        pair = torch.stack([total.detach().float().reshape(()), count.float().reshape(())])
        if name in self._pending:
            self._pending[name] += pair
        else:
            self._pending[name] = pair

    def report(self, name: str, values: torch.Tensor) -> None:
        """Add every element of `values` (a scalar, or one value per sample) to `name`."""
        values = values.detach()
        self.add(name, values.float().sum(), values.numel())

    def commit(self, keep: bool | torch.Tensor = True) -> None:
        """End of an optimizer step: count its values in the window, unless `keep` is false.

        `keep` may be a 0-dim bool tensor on the device (no host read needed).
        """
        for name, pair in self._pending.items():
            if isinstance(keep, torch.Tensor):
                # where(), not a multiplication: NaN * 0 is NaN.
                pair = torch.where(keep, pair, torch.zeros_like(pair))
            elif not keep:
                pair = torch.zeros_like(pair)  # the name still takes part in every reduce
            if name in self._totals:
                self._totals[name] += pair
            else:
                self._totals[name] = pair
        self._pending.clear()

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        """Window means over all ranks, then a new window (collective: call on every rank)."""
        names = sorted(self._totals)
        if not names:
            return {}
        stacked = torch.stack([self._totals[name] for name in names])
        if accelerator.num_processes > 1:
            stacked = accelerator.reduce(stacked.contiguous(), reduction="sum")
        values = stacked.tolist()  # the one host read of the window
        for total in self._totals.values():
            total.zero_()
        return {name: s / c for name, (s, c) in zip(names, values) if c > 0}
