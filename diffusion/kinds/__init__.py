"""Model kinds (basic, DDPM, EDM), one module each, looked up by the name task.json records.

`registry.py` says what a kind is; `common.py` holds what the network-based kinds share.
A new kind is a module here that registers itself, plus its import below.
"""

from diffusion.kinds import basic, ddpm, edm  # noqa: F401  (each registers itself)
from diffusion.kinds.registry import KINDS, Draw, Kind, SamplerChoice, kind_named

__all__ = ["KINDS", "Draw", "Kind", "SamplerChoice", "kind_named"]
