"""A backbone's preset given as a JSON file of its constructor's arguments (an exported
config.json, or one written by hand), checked before anything is built or written.

What the file holds is checked against the network class itself: every key must be one of its
constructor's arguments, every value of the type that argument is annotated with (a whole
number, a finite number, a non-empty list of ...) and, for sizes and counts, in range. Then the
network is built on the meta device (no memory, no compute), so what only diffusers knows (a
block type it does not have, channels a group norm cannot split) is refused at the config
too, naming the file, not after the run has started.
"""

from __future__ import annotations

import inspect
import json
import math
import types
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddp_utils.errors import InputError

# Sizes and counts: at least 1 (lists of them: every item).
POSITIVE = frozenset(
    {
        "block_out_channels", "layers_per_block", "norm_num_groups", "attn_norm_num_groups",
        "attention_head_dim", "time_embedding_dim", "num_class_embeds", "num_train_timesteps",
        "num_layers", "num_attention_heads", "patch_size", "in_channels", "out_channels",
        "sample_size", "num_embeds_ada_norm",
    }
)  # fmt: skip


def read_preset(
    preset: str, presets: Mapping[str, dict[str, Any]], network: type[nn.Module]
) -> dict[str, Any]:
    """A copy of the preset `presets` names `preset`, or the arguments of `network` a JSON file
    at `preset` gives (`read_preset_file`); an InputError naming both ways otherwise."""
    if preset in presets:
        return dict(presets[preset])
    path = Path(preset)
    if not path.is_file():
        raise InputError(
            f"must be one of {', '.join(presets)} or a path to a JSON file with "
            f"{network.__name__} arguments; got {preset!r} (no such file)",
            "preset",
        )
    return read_preset_file(path, network)


def read_preset_file(path: Path, network: type[nn.Module]) -> dict[str, Any]:
    """The arguments a JSON file gives `network`, each checked (the message names the file and
    the key): keys it does not accept, values of the wrong type or out of range."""
    name = network.__name__
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not valid JSON: {err}", "preset") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} must hold a JSON object of {name} arguments", "preset")
    # Keys starting with "_" are diffusers metadata (_class_name, _diffusers_version).
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    signature = inspect.signature(network.__init__).parameters
    allowed = set(signature) - {"self"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise InputError(
            f"{path} has keys {name} does not accept: {unknown}; allowed: {sorted(allowed)}",
            "preset",
        )
    for key, value in config.items():
        problem = _problem(key, signature[key].annotation, value)
        if problem is not None:
            raise InputError(f"{path}: {key!r} must be {problem}, got {value!r}", "preset")
    return config


def check_builds(path: Path, network: type[nn.Module], kwargs: dict[str, Any]) -> None:
    """Build `network(**kwargs)` on the meta device (no memory, no compute: ~20 ms); whatever
    diffusers refuses becomes an InputError naming the file."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
            network(**kwargs)
    except Exception as err:  # noqa: BLE001 - diffusers refuses arguments with any type
        raise InputError(
            f"{path}: {network.__name__} cannot be built from these arguments "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
            "preset",
        ) from None


def _problem(key: str, annotation: Any, value: Any) -> str | None:
    """What `value` must be for `key` (its annotation, its range), or None when it is fine."""
    if not _matches(annotation, value):
        return _describe(annotation)
    numbers = value if isinstance(value, list | tuple) else [value]
    if key in POSITIVE and any(isinstance(v, int) and v < 1 for v in numbers):
        return f"{_describe(annotation)}, each >= 1"
    if key == "dropout" and not 0 <= value < 1:
        return "a number in [0, 1)"
    if key == "norm_eps" and not value > 0:
        return "a number > 0"
    return None


def _matches(tp: Any, value: Any) -> bool:
    """Whether `value` (from JSON) is of the annotated type; types not known here pass (the
    build decides)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(arg, value) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or not value:
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(args[0], v) for v in value)
        return len(args) == len(value) and all(map(_matches, args, value))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    if tp is str:
        return isinstance(value, str)
    return True


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a non-empty list of {_describe(args[0]).removeprefix('a ')}s"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    names = {
        type(None): "null", bool: "true or false", int: "a whole number",
        float: "a finite number", str: "a string",
    }  # fmt: skip
    return names.get(tp, getattr(tp, "__name__", str(tp)))
