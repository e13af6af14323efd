"""Find and load a trained model for sampling, from whatever path a user has at hand.

Accepted paths, told apart by the files they hold:
- a pipeline folder (`model_index.json`, `unet/`, `scheduler/`): what train_ddpm.py exports, for
  DDPM or EDM (its `task.json` says which; a folder without one is taken for DDPM), and what
  diffusers' `DDPMPipeline.save_pretrained` writes; also the flat layout of early hub repos
  (google/ddpm-cifar10-32: the UNet's and the scheduler's configs side by side);
- a `UNet2DModel` folder written by diffusers (`config.json` + safetensors, no `task.json`):
  a DDPM model, with `scheduler_config.json` beside it if there is one;
- a model folder (`config.json` + safetensors, and `task.json`): what train_basic.py exports;
- a LoRA fine-tune's export (`pytorch_lora_weights.safetensors` and `task.json`): the adapter
  on the base pipeline its task.json names (read again, checked by its fingerprint);
- a checkpoint folder (`state.json`): rebuilt from the config stored in the checkpoint (a
  LoRA checkpoint: its adapter on the base pipeline);
- a run directory: its export if present, else its latest intact checkpoint;
- a `checkpoints/` folder: its latest intact checkpoint.
An export or checkpoint of train_autoencoder.py is refused, saying to use it as `--vae`.
Weights are only ever read from safetensors.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DDPMScheduler

from ddp_utils.checkpoint import (
    find_resume_checkpoint,
    load_trained_weights,
    read_checkpoint,
    whole_tensors,
)
from ddp_utils.errors import InputError
from ddp_utils.export import TASK_FILE, check_value_range, read_task_file, verify_checksums
from diffusion.adapters import ADAPTER_FILE, RAW_FOLDER, LoraSpec, add_lora, load_adapter
from diffusion.codecs import LatentCodec, codec_changes, codec_from_export, load_codec
from diffusion.kinds.registry import DIFFUSERS_FOLDER_KIND, kind_named
from diffusion.networks import backbone_of, network_class, prepare_loaded, sample_shape
from diffusion.pipelines import FAMILIES_BY_NAME, read_family, weights_fingerprint
from diffusion.sources import VAE_HUB_FILES, VAE_SOURCES, resolve_model_source
from diffusion.text_encoders import load_text_encoder

logger = logging.getLogger(__name__)
Weights = Literal["ema", "raw"]
_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass
class LoadedModel:
    task: str  # the kind's name (diffusion.kinds)
    model: torch.nn.Module
    scheduler_config: dict[str, Any] | None
    value_range: tuple[float, float]
    channels: int
    resolution: int
    source: Path
    class_names: list[str] | None = None  # a class-conditional model's classes
    guidance_scale: float = 1.0  # the guidance it was exported with
    guidance_interval: tuple[float, float] | None = None  # where w > 1 applies; None: always
    # A latent model's autoencoder: the network denoises its latents, and `channels` and
    # `resolution` are the decoded images'.
    codec: LatentCodec | None = None
    # A text-to-image model's text encoder (its facts: source, class, length, fingerprint) and
    # the prompts of its training grids.
    text_encoder: dict[str, Any] | None = None
    prompts: list[str] | None = None
    # An export's own copy of its text encoder (text_encoder/ and tokenizer/), what sample.py
    # encodes prompts with; None: the one its run recorded.
    text_encoder_folder: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names or ())


def load_model(path: str | Path) -> torch.nn.Module:
    """Load a folder written by `save_pretrained` (config.json + safetensors weights).

    The class comes from the config's `_class_name`, so a sampler needs nothing but the folder.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist or is not a directory")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not an exported model: config.json is missing "
            "(expected a folder written by save_pretrained)"
        )
    if not (folder / _WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not an exported model: {_WEIGHTS_NAME} is missing")
    try:
        class_name = json.loads(config_path.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{config_path} is not a JSON object: {err}") from err
    return prepare_loaded(network_class(class_name).from_pretrained(folder, use_safetensors=True))


def _class_name(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _describe(model: torch.nn.Module) -> tuple[int, int]:
    """(channels, resolution) of a network that records its sample size."""
    channels, height, width = sample_shape(model)
    return channels, height if height == width else 0


def _network_component(folder: Path) -> str:
    """The pipeline component that holds the network: `unet`, or `transformer` (a DiT)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder / 'model_index.json'} cannot be read: {err}") from None
    for name in ("unet", "transformer"):
        entry = index.get(name)
        if isinstance(entry, list) and entry and entry[0] is not None:
            return name
    return "unet"


def _verify_export(folder: Path) -> None:
    """The export's checksums.json, when it has one: bytes changed on disk are refused."""
    try:
        verify_checksums(folder)
    except ValueError as err:
        raise ValueError(
            f"{err}; run the training command again to re-export it, or sample a checkpoint"
        ) from None


def _from_pipeline(folder: Path, weights: Weights, stock_text: bool = True) -> LoadedModel:
    """A pipeline folder. One that diffusers wrote of a family --init-from fine-tunes (Stable
    Diffusion's) is a text-to-image model whose text encoder is its own (`stock_text`)."""
    _verify_export(folder)
    component = _network_component(folder)
    if not (folder / component).is_dir() and (folder / "config.json").is_file():
        return _from_unet_folder(folder)  # the flat layout
    sub = component if weights == "ema" else f"{component}_raw"
    if not (folder / sub).is_dir():
        raise FileNotFoundError(f"{folder / sub} is missing (asked for the {weights} weights)")
    _refuse_pickles(folder / sub)
    for name in ("config.json", _WEIGHTS_NAME):
        if not (folder / sub / name).is_file():
            raise FileNotFoundError(
                f"{folder / sub / name} is missing: the pipeline folder is incomplete "
                "(a copy cut short?); export it again or sample a checkpoint"
            )
    unet = load_model(folder / sub)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise FileNotFoundError(f"{scheduler_file} is missing: not a complete pipeline folder")
    scheduler_config = json.loads(scheduler_file.read_text())
    channels, resolution = _describe(unet)
    info = read_task_file(folder) or {}
    if not info and stock_text and _stock_text_pipeline(folder):
        info = {"text_encoder": load_text_encoder(str(folder)).facts()}
    task = info.get("task", DIFFUSERS_FOLDER_KIND)  # diffusers' own folders
    loaded = LoadedModel(task, unet, scheduler_config, (-1.0, 1.0), channels, resolution, folder)
    _with_codec(loaded, _export_codec(folder, info.get("latent")))
    if info.get("text_encoder") and (folder / "text_encoder").is_dir():
        loaded.text_encoder_folder = str(folder)
    return _with_classes(loaded, info)


def _stock_text_pipeline(folder: Path) -> bool:
    """Whether diffusers wrote `folder` for a text-to-image pipeline --init-from fine-tunes."""
    try:
        return read_family(folder, str(folder)) is not None
    except InputError:  # another family: sampled as far as it goes without its text
        return False


def _export_codec(folder: Path, facts: dict[str, Any] | None) -> LatentCodec | None:
    try:
        return codec_from_export(folder, facts)
    except InputError as err:  # what the VAE check refuses: the export's own vae/
        raise ValueError(f"{folder}'s autoencoder cannot be used: {err}") from None


def _with_codec(loaded: LoadedModel, codec: LatentCodec | None) -> None:
    """A latent model: its codec, and the size and channels of the decoded images."""
    if codec is None:
        return
    loaded.codec = codec
    loaded.channels = codec.channels
    loaded.resolution = loaded.resolution * codec.downsampling


def _checkpoint_codec(
    state: dict[str, Any], where: Path, vae: str | None = None
) -> LatentCodec | None:
    """A latent run's checkpoint names its VAE (--vae): a local folder or a hub id (resolved
    through the hub cache as --vae was), read again and compared by the hash of its weights.
    `vae`: another place of the same VAE (sample.py --vae: moved, or a relative path recorded
    by an older run), compared the same way."""
    saved = state.get("latent")
    if saved is None:
        if vae is not None:
            raise ValueError(f"{where} is not a latent model: it takes no --vae")
        return None
    spec = saved["vae"] if vae is None else vae
    try:
        folder = resolve_model_source(spec, None, VAE_HUB_FILES, what=VAE_SOURCES)
        codec = load_codec(folder, spec)
    except InputError as err:
        raise ValueError(
            f"{where} is a latent model and its VAE {spec} cannot be used: {err}; give "
            "sample.py --vae with the autoencoder it was trained with, or sample the run's "
            "export (pipeline/, which holds the VAE)"
        ) from None
    changed = codec_changes(saved, codec)
    if changed:
        raise ValueError(f"{where}: {changed[0]} (the VAE changed since training)")
    codec.set_scale(saved["scaling_factor"])
    codec.set_channel_statistics(saved.get("latents_mean"), saved.get("latents_std"))
    return codec


def _refuse_pickles(folder: Path) -> None:
    """A folder whose weights exist only as a pickle (`.bin`): say how to convert it."""
    if (
        not (folder / _WEIGHTS_NAME).is_file()
        and (folder / "diffusion_pytorch_model.bin").is_file()
    ):
        raise FileNotFoundError(
            f"{folder} holds its weights only as diffusion_pytorch_model.bin (a pickle, which "
            "can run code when loaded); this toolkit reads safetensors only. Convert it once, "
            "if you trust it: load it with diffusers' UNet2DModel.from_pretrained, then "
            "save_pretrained it (safetensors is diffusers' default)"
        )


def _from_unet_folder(folder: Path) -> LoadedModel:
    """A UNet2DModel folder from diffusers: a DDPM model; its schedule from a
    `scheduler_config.json` beside it, else diffusers' DDPMScheduler defaults."""
    _refuse_pickles(folder)
    unet = load_model(folder)
    scheduler_file = folder / "scheduler_config.json"
    if scheduler_file.is_file():
        scheduler_config = json.loads(scheduler_file.read_text())
    else:
        logger.warning(
            "%s has no noise schedule (scheduler_config.json): assuming diffusers' DDPMScheduler "
            "defaults (linear betas 1e-4..0.02 over 1000 steps, epsilon prediction)",
            folder,
        )
        scheduler_config = dict(DDPMScheduler().config)
    channels, resolution = _describe(unet)
    return LoadedModel(
        DIFFUSERS_FOLDER_KIND, unet, scheduler_config, (-1.0, 1.0), channels, resolution, folder
    )


def _with_classes(loaded: LoadedModel, info: dict[str, Any]) -> LoadedModel:
    """The classes a model was trained on (task.json or a checkpoint's state), or its text
    encoder and prompts, and its guidance; a UNet with class embeddings but no names gets its
    class ids as names."""
    names = info.get("class_names")
    num_classes = backbone_of(loaded.model).num_classes(loaded.model)
    if names is None and num_classes:
        names = [str(k) for k in range(num_classes)]
    loaded.class_names = list(names) if names else None
    loaded.guidance_scale = float(info.get("guidance_scale", 1.0))
    interval = info.get("guidance_interval")  # older exports have none: every step
    loaded.guidance_interval = (
        None if interval is None else (float(interval[0]), float(interval[1]))
    )
    loaded.text_encoder = info.get("text_encoder")
    loaded.prompts = list(info.get("prompts") or []) or None
    return loaded


def _from_export(folder: Path) -> LoadedModel:
    _verify_export(folder)
    task = read_task_file(folder)
    if task is None and _class_name(folder) == "UNet2DModel":
        return _from_unet_folder(folder)
    if task is None:
        raise ValueError(
            f"{folder} has a config.json but no {TASK_FILE}: not an export of this toolkit "
            "(a DDPM export is a pipeline folder with model_index.json)"
        )
    kind_named(task["task"], folder)  # an autoencoder's export is refused here, saying why
    model = load_model(folder)
    channels = int(model.config.in_channels)
    loaded = LoadedModel(
        task["task"],
        model,
        task.get("scheduler_config"),
        check_value_range(task.get("value_range"), folder / TASK_FILE),
        channels,
        int(task["resolution"]),
        folder,
    )
    return _with_classes(loaded, task)


def _base_folder(facts: dict[str, Any], where: Path) -> Path:
    """The base pipeline a LoRA adapter was trained on (its task.json's or state's `base`):
    found again (a folder, or a hub id through the cache) and checked by its denoiser's
    weights."""
    family = FAMILIES_BY_NAME[facts["family"]]
    try:
        folder = resolve_model_source(facts["source"], None, family.hub_files())
    except InputError as err:
        raise ValueError(
            f"{where} is a LoRA adapter of {facts['source']}, which cannot be read now: {err} "
            "(an export made with --export-fused holds the whole pipeline in fused/)"
        ) from None
    if weights_fingerprint(folder / family.denoiser) != facts["fingerprint"]:
        raise ValueError(
            f"{where} is a LoRA adapter of {facts['source']}, whose {family.denoiser} weights "
            "changed since training (another fingerprint): the adapter fits the weights it was "
            "trained on only"
        )
    return folder


def _from_adapter(folder: Path, weights: Weights) -> LoadedModel:
    """A LoRA fine-tune's export: the base pipeline with the adapter loaded as diffusers'
    load_lora_weights loads it (`raw/`: the raw adapter)."""
    _verify_export(folder)
    info = read_task_file(folder)
    if info is None or "base" not in info:
        raise ValueError(
            f"{folder} holds a LoRA adapter ({ADAPTER_FILE}) but no {TASK_FILE} naming its base "
            "pipeline: load it onto its base with diffusers' load_lora_weights"
        )
    loaded = _from_pipeline(_base_folder(info["base"], folder), "ema", stock_text=False)
    load_adapter(loaded.model, folder if weights == "ema" else folder / RAW_FOLDER)
    loaded.task = kind_named(info["task"], folder).name
    loaded.scheduler_config = info.get("scheduler_config")
    loaded.source = folder
    return _with_classes(loaded, info)


def _from_checkpoint(folder: Path, weights: Weights, vae: str | None = None) -> LoadedModel:
    ckpt = read_checkpoint(folder)
    state = ckpt.state
    kind_named(state.get("task"), ckpt.path)  # an autoencoder's checkpoint: refused, saying why
    tensors = whole_tensors(ckpt)  # a sharded checkpoint's shards, put together
    key = "ema" if weights == "ema" and "ema" in tensors else "model"
    if "adapter" in state:  # a LoRA's: the adapter on its base
        base = _base_folder(state["base"], ckpt.path)
        model = load_model(base / FAMILIES_BY_NAME[state["base"]["family"]].denoiser)
        add_lora(model, LoraSpec.from_facts(state["adapter"]))
        load_trained_weights(model, tensors[key], ckpt.path)
    else:
        cls = network_class(state["model_class"])
        model = prepare_loaded(cls.from_config(state["model_config"]))
        # The EMA also holds non-persistent buffers (a DiT's pos_embed), which state_dict
        # leaves out.
        names = set(model.state_dict())
        model.load_state_dict({k: v for k, v in tensors[key].items() if k in names})
    cfg = state["config"]
    loaded = LoadedModel(
        state["task"],
        model,
        state.get("scheduler_config"),
        check_value_range(state.get("value_range"), ckpt.path / "state.json"),
        int(cfg["channels"]),
        int(cfg["resolution"]),
        folder,
    )
    loaded.codec = _checkpoint_codec(state, ckpt.path, vae)  # channels, resolution: the images'
    return _with_classes(loaded, state)


def load_for_sampling(path: Path, weights: Weights = "ema", vae: str | None = None) -> LoadedModel:
    """The model in `path` (module doc). `vae`: where a latent checkpoint's VAE is now, when
    the place it recorded is gone (exports hold theirs)."""
    path = Path(path)
    loaded = _load(path, weights, vae)
    if vae is not None and not (loaded.source / "state.json").is_file():
        raise ValueError(
            f"--vae applies to checkpoints of latent runs; {loaded.source} is an export, which "
            "holds its own VAE (vae/) if it has one: drop --vae"
        )
    return loaded


def _load(path: Path, weights: Weights, vae: str | None) -> LoadedModel:
    if (path / "model_index.json").is_file():
        return _from_pipeline(path, weights)
    if (path / ADAPTER_FILE).is_file():
        return _from_adapter(path, weights)
    if (path / "state.json").is_file():
        return _from_checkpoint(path, weights, vae)
    if (path / "config.json").is_file():
        return _from_export(path)
    if (path / "pipeline" / "model_index.json").is_file():
        return _from_pipeline(path / "pipeline", weights)
    if (path / "pipeline" / ADAPTER_FILE).is_file():
        return _from_adapter(path / "pipeline", weights)
    if (path / "model" / TASK_FILE).is_file():
        return _from_export(path / "model")
    # A run directory without an export, or its checkpoints/ folder: the latest intact one.
    ckpt = find_resume_checkpoint(path / "checkpoints", "latest") or find_resume_checkpoint(
        path, "latest"
    )
    if ckpt is not None:
        return _from_checkpoint(ckpt.path, weights, vae)
    raise ValueError(
        f"{path} is not a model: expected a pipeline folder (model_index.json), an export "
        "(config.json + task.json), a checkpoint (state.json) or a run directory holding one"
    )
