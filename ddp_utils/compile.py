"""torch.compile for training and sampling: the backend, the mode and a cache that outlives /tmp.

`--compile` compiles the network in place (`nn.Module.compile`): its state-dict keys, the
checkpoints and the exports are the same as without it, and the loop's sampling of grids and
FID samples goes through the same compiled module (eval mode and no_grad are one more graph).
The mode picks what inductor does beyond fusing kernels:

- `default`: fused Triton/C++ kernels;
- `reduce-overhead`: the same, replayed as CUDA graphs (one launch per graph instead of one per
  kernel: what a small model's step needs on a GPU, where the host, not the GPU, is the limit);
  CPU tensors are never graph-captured, so on a CPU it is `default`;
- `max-autotune`: also benchmarks kernel choices (long first compile) and uses CUDA graphs;
  `max-autotune-no-cudagraphs` without them.

Shapes are static (`dynamic=False`): a training run has one batch shape, sampling one per
chunk size, so each compiles once and never guards on sizes at every call.

Inductor caches its compiled graphs (FX graph and AOT autograd caches) by default in
/tmp/torchinductor_<user>, which a reboot or a fresh container empties; here they go to the
toolkit's cache folder (`$DDP_DIFFUSION_CACHE/inductor`), so a second run of the same model
starts in seconds instead of minutes. `TORCHINDUCTOR_CACHE_DIR` set by the user wins.
"""

from __future__ import annotations

import logging
import os
import typing
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ddp_utils.data.decode import default_cache_dir

logger = logging.getLogger("ddp_diffusion")

F = typing.TypeVar("F", bound=typing.Callable)
CompileBackend = Literal["inductor", "aot_eager", "eager", "cudagraphs"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES = typing.get_args(CompileMode)


def inductor_cache_dir() -> Path:
    """Where inductor keeps compiled graphs: the user's TORCHINDUCTOR_CACHE_DIR, else ours.

    Inductor writes its own default (/tmp/torchinductor_<user>) into the variable the first
    time it looks: that value is not the user's choice, and is replaced.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(torch_default()):
        return Path(chosen)
    return default_cache_dir() / "inductor"


def check_compile_options(backend: str, mode: str) -> None:
    """A mode other than `default` is inductor's: refuse it with another backend."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"the compile mode must be one of {COMPILE_MODES}; got {mode!r}")
    if mode != "default" and backend != "inductor":
        raise ValueError(
            f"compile mode {mode!r} is inductor's; the backend is {backend!r} "
            "(use the inductor backend, or mode default)"
        )


def _compile_kwargs(backend: CompileBackend, mode: CompileMode) -> dict[str, object]:
    """torch.compile's arguments, with inductor's cache in the toolkit's folder."""
    check_compile_options(backend, mode)
    if backend == "inductor":
        # Read when inductor first compiles (not at import), so setting it here is in time.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())
    kwargs: dict[str, object] = {"backend": backend, "dynamic": False}
    if mode != "default":
        kwargs["mode"] = mode
    return kwargs


def compile_function(fn: F, backend: CompileBackend, mode: CompileMode) -> F:
    """`fn` compiled: a sampler's denoiser (the network, guidance's batched pair and their
    combination, EDM's preconditioning) becomes one graph. Dynamo keys its cache on the code,
    so each new closure of the same function (one per batch of samples) reuses the graph."""
    return typing.cast(F, torch.compile(fn, **_compile_kwargs(backend, mode)))


def compile_network(model: nn.Module, backend: CompileBackend, mode: CompileMode) -> None:
    """Compile `model`'s forward in place, with inductor's cache in the toolkit's folder."""
    model.compile(**_compile_kwargs(backend, mode))
    logger.info(
        "torch.compile: backend %s, mode %s (the first steps compile; cache %s)",
        backend,
        mode,
        inductor_cache_dir() if backend == "inductor" else "none",
    )
