"""The code shipped inside exports, and how it is assembled into one `pipeline.py`.

An export that needs code of its own ships one self-contained `pipeline.py` (torch and diffusers
only), so that

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, use_safetensors=True)

runs it with nothing of this toolkit installed. That file is assembled from `core.py` (the
network call, conditions, guidance, decoding, the pipelines' common part), `samplers.py` (the
samplers written once over a denoiser) and the kind's own `pipeline.py`
(`diffusion/kinds/<name>/pipeline.py`), in that order, with their imports of each other
removed. One file, not a folder of modules: diffusers copies every local custom module into
one shared `diffusers_modules.local` package, where a second export's helper module of the
same name would be served from the first one's cache.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from types import ModuleType

from diffusion.pipeline_code import core, samplers

RUNTIME = (core, samplers)
FUTURE = "from __future__ import annotations"


def _without_imports_of(source: str, prefixes: tuple[str, ...]) -> str:
    """`source` without `from __future__` and without its imports from `prefixes`."""
    lines = source.splitlines(keepends=True)
    drop: set[int] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom) and (
            node.module == "__future__" or (node.module or "").startswith(prefixes)
        ):
            drop.update(range(node.lineno - 1, node.end_lineno))
    return "".join(line for i, line in enumerate(lines) if i not in drop)


def shipped_source(kind_pipeline: ModuleType) -> str:
    """The text of the `pipeline.py` an export of `kind_pipeline`'s pipeline ships."""
    parts = []
    for module in (*RUNTIME, kind_pipeline):
        text = _without_imports_of(inspect.getsource(module), ("diffusion.",))
        name = Path(module.__file__).relative_to(Path(core.__file__).parents[2])
        parts.append(f"# {'-' * 91}\n# From {name}\n# {'-' * 91}\n{text.strip()}\n")
    header = (
        f'"""The pipeline of this folder: run it with\n\n'
        f"    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, "
        f"use_safetensors=True)\n\n"
        f"Assembled by ddp-diffusion from the files named below (torch and diffusers only).\n"
        f'"""\n\n{FUTURE}\n\n'
    )
    return header + "\n\n".join(parts)
