"""Where a model's files are: a local path as it is, or a hub id (`google/ddpm-cifar10-32`)
resolved to the folder of its cached snapshot, downloading its JSON and safetensors files when
online, read from the cache when offline (HF_HUB_OFFLINE=1). Sampling, fine-tuning (--init-from)
and --vae all resolve through `resolve_model_source`, so they follow the same cache and offline
rules and refuse alike, naming the fix.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ddp_utils.errors import InputError

# owner/name as the hub spells it; a path that exists locally always wins over this reading.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What sampling and fine-tuning read: configs and safetensors weights (never pickles).
HUB_FILES = ["*.json", "*.safetensors"]
# What --vae reads of a hub repository: an AutoencoderKL at its root or a pipeline's vae/
# (not the rest of that pipeline: a Stable Diffusion repo's UNet is gigabytes; the hub's
# patterns are fnmatch's, whose * also matches "/", hence the names spelled out).
VAE_HUB_FILES = [
    f"{prefix}{name}"
    for prefix in ("", "vae/")
    for name in ("config.json", "diffusion_pytorch_model.safetensors")
]


def is_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text)) and not text.startswith((".", "~"))


MODEL_SOURCES = (
    "a local folder (an export, a diffusers pipeline or UNet2DModel folder, a checkpoint, a run "
    "directory) or a hub id such as google/ddpm-cifar10-32"
)
VAE_SOURCES = (
    "a local folder holding an AutoencoderKL (a folder it wrote, train_autoencoder.py's export, "
    "a pipeline's vae/) or a hub id such as stabilityai/sd-vae-ft-ema"
)


def resolve_model_source(
    spec: str, field: str | None, patterns: list[str] | None = None, what: str = MODEL_SOURCES
) -> Path:
    """A local folder for `spec`: the path itself if it exists, else the hub snapshot of the
    repository `spec` names (from the cache when offline; its files of `patterns`, default
    HUB_FILES). `field` is the flag's config field, named by the errors; `what` says what may
    be given."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if not is_hub_id(spec):
        raise InputError(f"{spec} does not exist: give {what}", field)
    try:
        return Path(snapshot_download(spec, allow_patterns=patterns or HUB_FILES))
    except LocalEntryNotFoundError as err:
        if constants.HF_HUB_OFFLINE:
            raise InputError(
                f"{spec} is a hub id, the hub is offline here (HF_HUB_OFFLINE=1) and it is not "
                "in the local cache: download it once online (`hf download "
                f"{spec}`), or unset HF_HUB_OFFLINE, or give a local folder",
                field,
            ) from err
        raise InputError(
            f"{spec} is neither a local folder nor in the hub cache, and the hub could not be "
            f"reached ({err.__class__.__name__}): check the network, or give a local folder",
            field,
        ) from err
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
        raise InputError(
            f"{spec} is not a local folder, and the hub has no model repository of that name "
            "that this account can read (a typo? a private or gated repo needs `hf auth login`)",
            field,
        ) from err
