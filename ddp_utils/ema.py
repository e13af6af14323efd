"""Exponential moving average of model weights, the weights diffusion models are sampled with.

Raw weights of a diffusion model are noisy from step to step; sampling from their EMA gives
visibly cleaner images (Ho et al. 2020 use decay 0.9999; so does EDM's power EMA in spirit).

Under DDP, pass the *unwrapped* module (e.g. `accelerator.unwrap_model(model)`) everywhere:
parameter names then carry no `module.` prefix, and the EMA state dict loads into a bare model.
Every rank holds identical raw weights after the optimizer step, so every rank can update its
own EMA without communicating, and any rank's copy is the EMA.

Under --sharding (FSDP2) the parameters are DTensors, each process holding a shard: the
shadows are DTensors sharded alike (1/N of the EMA per process), and each process updates its
shards from its shards of the weights, again without communicating. Its `state_dict` is then
sharded too (what a sharded checkpoint writes); the whole EMA is gathered only to sample or
export (`ddp_utils.sharding.full_copy`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ddp_utils.sharding import local


def _averaged(
    model: nn.Module,
) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """The named parameters and buffers the EMA holds, in a fixed order (state_dict order). A
    model whose parameters are partly frozen (an adapter on a pretrained base) averages what
    trains: its trainable parameters, no buffers (the frozen base's never change)."""
    params = list(model.named_parameters())
    buffers = list(model.named_buffers())
    if not all(p.requires_grad for _, p in params):
        params, buffers = [(name, p) for name, p in params if p.requires_grad], []
    return params, buffers


def _named_tensors(
    model: nn.Module,
) -> tuple[list[str], list[torch.Tensor], list[str], list[torch.Tensor]]:
    """`_averaged`'s names and tensors (a DTensor's local shard)."""
    params, buffers = _averaged(model)
    return (
        [name for name, _ in params],
        [local(p.detach()) for _, p in params],
        [name for name, _ in buffers],
        [local(b.detach()) for _, b in buffers],
    )


class EMA:
    """float32 shadow weights: shadow <- d * shadow + (1 - d) * weights after each step.

    The decay warms up as d(step) = min(max_decay, (1 + step) / (10 + step)), so early shadows
    track the fast-changing weights instead of remembering the random initialization for
    ~1/(1 - max_decay) steps. Buffers (e.g. BatchNorm statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, max_decay: float = 0.9999) -> None:
        if not 0.0 <= max_decay < 1.0:
            raise ValueError(f"the EMA decay must be in [0, 1); got {max_decay}")
        self.max_decay = max_decay
        params, buffers = _averaged(model)
        self.param_names, self.buffer_names = [n for n, _ in params], [n for n, _ in buffers]
        # DTensors where the model's are (sharded alike); the arithmetic is on `_local`.
        self.shadow_params = [p.detach().float().clone() for _, p in params]
        self.shadow_buffers = [b.detach().clone() for _, b in buffers]
        self._local_params = [local(s) for s in self.shadow_params]
        self._local_buffers = [local(s) for s in self.shadow_buffers]

    def decay(self, step: int) -> float:
        """EMA decay used at optimizer step `step` (0-based), after warmup capped at max_decay."""
        return min(self.max_decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, keep: torch.Tensor | None = None) -> None:
        """Fold the model's current weights into the shadow; call after each optimizer step.

        shadow += w (weights - shadow) with w = 1 - decay, over all parameters at once
        (`_foreach_*`: no per-parameter kernel loop). `keep`, a 0-dim bool on the device,
        multiplies w: a skipped step leaves the shadow exactly as it was, and nothing is read
        on the host (a tensor weight given to `_foreach_lerp_` would be read).
        """
        _, params, _, buffers = _named_tensors(model)
        self._check_same_structure(len(params), len(buffers))
        params = [p if p.dtype == torch.float32 else p.float() for p in params]
        weight: float | torch.Tensor = 1.0 - self.decay(step)
        if keep is not None:
            weight = keep.to(torch.float32) * weight
        deltas = torch._foreach_sub(params, self._local_params)
        torch._foreach_mul_(deltas, weight)
        torch._foreach_add_(self._local_params, deltas)
        if buffers:
            if keep is not None:
                buffers = [torch.where(keep, b, s) for b, s in zip(buffers, self._local_buffers)]
            torch._foreach_copy_(self._local_buffers, buffers)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's weights with the EMA weights (cast to the model's dtypes)."""
        _, params, _, buffers = _named_tensors(model)
        self._check_same_structure(len(params), len(buffers))
        torch._foreach_copy_(params, self._local_params)
        if buffers:
            torch._foreach_copy_(buffers, self._local_buffers)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load EMA weights into `model` (e.g. to sample or save), then restore.

        The raw weights are restored even if the body raises, so training continues unharmed.
        """
        _, params, _, buffers = _named_tensors(model)
        raw_params = [p.clone() for p in params]
        raw_buffers = [b.clone() for b in buffers]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, raw_params)
                if buffers:
                    torch._foreach_copy_(buffers, raw_buffers)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Shadow weights keyed like the model's state_dict: loadable into the bare model, and
        savable with safetensors (contiguous, no shared storage); DTensors when sharded."""
        names = self.param_names + self.buffer_names
        tensors = self.shadow_params + self.shadow_buffers
        return {name: t.detach().contiguous() for name, t in zip(names, tensors)}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Restore shadow weights saved by `state_dict`, checking they belong to this model."""
        names = self.param_names + self.buffer_names
        missing = sorted(set(names) - set(state_dict))
        extra = sorted(set(state_dict) - set(names))
        if missing or extra:
            raise ValueError(
                f"EMA state dict does not match the model: missing keys {missing}, "
                f"unexpected keys {extra}"
            )
        for name, shadow in zip(names, self.shadow_params + self.shadow_buffers):
            if state_dict[name].shape != shadow.shape:
                raise ValueError(
                    f"EMA state dict entry {name!r} has shape {tuple(state_dict[name].shape)}; "
                    f"the model expects {tuple(shadow.shape)}"
                )
        for name, shadow in zip(names, self.shadow_params + self.shadow_buffers):
            shadow.copy_(state_dict[name])

    def _check_same_structure(self, num_params: int, num_buffers: int) -> None:
        if (num_params, num_buffers) != (len(self.shadow_params), len(self.shadow_buffers)):
            raise ValueError(
                f"model has {num_params} parameters and {num_buffers} buffers but the EMA was "
                f"built for {len(self.shadow_params)} and {len(self.shadow_buffers)}: pass the "
                "same unwrapped model the EMA was created from"
            )
