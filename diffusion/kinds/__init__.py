"""Model kinds, one package each (`diffusion/kinds/<name>/`), looked up by the name task.json
records. `registry.py` says what a kind declares; `common.py` holds what the network kinds'
training methods share. A new kind is a package here that registers itself, and its name in
the import below (the order is --objective's and --help's).
"""

from diffusion.kinds import basic, ddpm, edm, flow  # noqa: F401  (each registers itself)
from diffusion.kinds.registry import (
    KINDS,
    Kind,
    Knob,
    Sampler,
    SamplerChoice,
    choose_sampler,
    kind_named,
    kinds_trained_by,
)

__all__ = [
    "KINDS",
    "Kind",
    "Knob",
    "Sampler",
    "SamplerChoice",
    "choose_sampler",
    "kind_named",
    "kinds_trained_by",
]
