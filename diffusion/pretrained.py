"""What a run starts from: the network of a train_ddpm.py run (`initial_network`: a new one of its
preset, or --init-from's, checked by `check_init_model` against the data size, channels,
classes and objective; its kind takes what it needs from that model), its --vae (`run_codec`),
its --text-encoder (`run_text`), and the kind's options still unset once the data is known
(`resolve_kind_options`). Hub ids are resolved to local folders by
`diffusion.sources`; `diffusion.loading.load_for_sampling` reads the folders.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ddp_utils.data import load_latents
from ddp_utils.data.batches import default_num_workers
from ddp_utils.data.text_cache import load_text_embeddings
from ddp_utils.distributed import all_finite, derive_seed, local_world_size, main_process_first
from ddp_utils.errors import InputError
from ddp_utils.run import Run
from diffusion.adapters import add_lora
from diffusion.codecs import (
    DTYPES,
    LatentCodec,
    check_against,
    codec_changes,
    load_codec,
    measured_scale,
)
from diffusion.conditioning.text import default_validation_prompts, encode_prompts
from diffusion.kinds import Kind, kinds_trained_by
from diffusion.loading import LoadedModel, load_for_sampling
from diffusion.networks import (
    backbone_of,
    build_backbone,
    check_preset,
    check_text_width,
    network_class,
    prepare_loaded,
)
from diffusion.pipelines import FAMILIES_BY_NAME, BasePipeline
from diffusion.sources import VAE_HUB_FILES, VAE_SOURCES, resolve_model_source
from diffusion.text_encoders import AnyTextEncoder, check_resumed_text_encoder, load_text_encoder

logger = logging.getLogger("ddp_diffusion")
# The standard deviation of pixels in [-1, 1] as EDM assumes it (Karras et al. 2022), which a
# kind whose options follow the data's spread takes for pixel data.
PIXEL_DATA_STD = 0.5


def check_init_model(
    loaded: LoadedModel,
    spec: str,
    *,
    objective: str,
    resolution: int,
    channels: int,
    num_classes: int,
    text_width: int | None = None,
) -> None:
    """Refuse a model that cannot start this run, naming every mismatch and its fix
    (`text_width`: the width of the run's text embeddings; None: no text)."""
    problems = []
    trained_here = [kind.name for kind in kinds_trained_by("train_ddpm.py")]
    if loaded.task not in trained_here:
        problems.append(
            f"it is a {loaded.task} model; train_ddpm.py fine-tunes {', '.join(trained_here)} "
            "networks (train_basic.py trains the basic model)"
        )
    elif loaded.task != objective:
        problems.append(
            f"it was trained with --objective {loaded.task}, this run uses --objective "
            f"{objective}: pass --objective {loaded.task}"
        )
    config = loaded.model.config
    if backbone_of(loaded.model).default_preset is None:
        problems.append(
            f"its network is a {type(loaded.model).__name__}, not a UNet2DModel or a DiT"
        )
    elif int(config.out_channels or config.in_channels) != int(config.in_channels):
        problems.append(
            f"it predicts {config.out_channels} channels from {config.in_channels} (a learned "
            "variance?); only networks whose output has the input's channels are supported"
        )
    width_key = backbone_of(loaded.model).text_width_key
    if width_key is not None and text_width is None:
        problems.append(
            "it attends to text (a text-to-image network) and this run has no text encoder"
        )
    elif width_key is None and text_width is not None:
        problems.append(f"its {type(loaded.model).__name__} takes no text")
    elif width_key is not None and int(config[width_key]) != text_width:
        problems.append(
            f"it attends to {config[width_key]}-wide text embeddings ({width_key}) and the text "
            f"encoder gives {text_width}-wide ones"
        )
    if not all_finite(loaded.model.parameters()):
        problems.append(
            "its weights hold non-finite values (NaN/inf): that model diverged; start from "
            "an earlier checkpoint of it"
        )
    size = loaded.resolution
    if size and size != resolution:
        problems.append(
            f"it is a {size}x{size} model and the data is {resolution}x{resolution}: pass "
            f"--resolution {size}"
        )
    if loaded.channels != channels:
        problems.append(
            f"it takes {loaded.channels}-channel images and the data has {channels}: pass "
            f"--channels {loaded.channels}"
        )
    if loaded.num_classes != num_classes:
        if not num_classes:
            problems.append(
                f"it is class-conditional ({loaded.num_classes} classes): pass "
                "--class-conditional with a dataset of the same classes"
            )
        elif not loaded.num_classes:
            problems.append(
                "it is unconditional and --class-conditional asks for class embeddings it "
                "does not have: drop --class-conditional"
            )
        else:
            problems.append(f"it knows {loaded.num_classes} classes and the data has {num_classes}")
    if problems:
        raise InputError(f"{spec} cannot start this run:\n  " + "\n  ".join(problems), "init_from")


def run_codec(run: Run) -> LatentCodec | None:
    """--vae's autoencoder for this run (None without --vae), and the run's latents.

    Before any work: the VAE is resolved (a folder, or a hub id through the cache and offline
    rules of --init-from), checked (an AutoencoderKL with safetensors weights, its channels
    and downsampling against the data, the network's preset against the latent grid) and
    compared with a resumed checkpoint's. Then the data is encoded once per node, shared by
    its processes (or read from the latent cache), and the latent scale is the VAE config's, a
    resumed run's, or measured on the latents when the config has none (never over per-channel
    latents_mean/latents_std, which the config's scale follows). DreamBooth's class images
    (`run.prior`) are encoded too, into their own cache, and scaled alike.
    """
    cfg = run.cfg
    saved = None if run.checkpoint is None else run.checkpoint.state.get("latent")
    if cfg.vae is None:
        problems = codec_changes(saved, None)
        if problems:
            raise InputError(
                f"{run.checkpoint.path} cannot be resumed without it: {problems[0]}; pass "
                "--vae with that autoencoder, or --resume none / another --output-dir to start "
                "over",
                "vae",
            )
        return None
    source = main_process_first(
        run.accelerator,
        lambda: resolve_model_source(cfg.vae, "vae", VAE_HUB_FILES, what=VAE_SOURCES),
        InputError(f"{cfg.vae} could not be found (the main process says why)", "vae"),
    )
    precision = cfg.mixed_precision or run.accelerator.mixed_precision
    try:
        # A local folder is recorded by its absolute path, so that the run's checkpoints sample
        # from any directory; a hub id as it is.
        recorded = str(source.resolve()) if Path(cfg.vae).expanduser().exists() else cfg.vae
        codec = load_codec(source, recorded, DTYPES.get(precision or "no", torch.float32))
    except InputError as err:
        raise InputError(str(err), "vae") from None
    problems = check_against(codec, cfg.channels, cfg.resolution)
    if problems:
        raise InputError(f"{cfg.vae} does not fit the data:\n  " + "\n  ".join(problems), "vae")
    latent_channels, latent_size = codec.latent_shape(cfg.resolution)
    if cfg.init_from is None:
        try:
            check_preset(cfg.backbone, cfg.preset, latent_size)
        except InputError as err:
            raise InputError(
                f"the network denoises the VAE's {latent_size}x{latent_size} latent grid "
                f"(--resolution {cfg.resolution} / {codec.downsampling}), and for --preset "
                f"{cfg.preset} it {err.args[0]}: choose a larger --resolution or a preset "
                "with fewer downsamplings (a DiT: a patch size dividing the grid)",
                "vae",
            ) from None
    if run.checkpoint is not None:
        problems = codec_changes(saved, codec)
        if problems:
            raise InputError(
                f"{run.checkpoint.path} cannot be resumed with this --vae: {problems[0]}; pass "
                "the --vae it was trained with, or --resume none / another --output-dir",
                "vae",
            )
    if codec.per_channel and cfg.latent_scale == "measure" and saved is None:
        raise InputError(
            f"{cfg.vae}'s config normalizes each latent channel (latents_mean, latents_std), "
            "which a scale measured on the raw latents would undo: pass --latent-scale config",
            "latent_scale",
        )
    codec.to(run.accelerator.device)
    # The node's processes share the encoding, each decoding its own chunks of a streamed
    # dataset with its workers: the node's cores split among them.
    workers = (
        default_num_workers(local_world_size()) if cfg.num_workers is None else cfg.num_workers
    )
    latents = load_latents(run.data, codec, cfg.random_flip, run.accelerator, num_workers=workers)
    measured = measured_scale(latents.variance)
    if saved is not None:  # a resumed run keeps the map it was trained with
        codec.set_scale(saved["scaling_factor"])
        codec.set_channel_statistics(saved.get("latents_mean"), saved.get("latents_std"))
    elif codec.per_channel:
        codec.set_scale(codec.scaling_factor or 1.0)  # the statistics make them unit already
    elif cfg.latent_scale == "measure" or codec.scaling_factor is None:
        reason = "--latent-scale measure" if codec.scaling_factor else "its config has none"
        codec.set_scale(measured)
        logger.info(
            "latents: scale measured on the data (%s): %.5g (recorded in the export's "
            "vae/config.json and task.json)",
            reason,
            measured,
        )
    else:
        codec.set_scale(codec.scaling_factor)
        spread = codec.scaling_factor / measured  # the standard deviation of scaled latents
        if not 0.5 <= spread <= 2:
            logger.warning(
                "latents: %s's scaling_factor %.5g leaves the latents with standard deviation "
                "%.3g, far from 1 (a default of another VAE?); --latent-scale measure would "
                "use %.5g",
                cfg.vae,
                codec.scaling_factor,
                spread,
                measured,
            )
    latents.shift, latents.scale = codec.affine(run.accelerator.device)
    run.latents = latents
    if run.prior is not None:  # DreamBooth's class images: encoded alike, under the same map
        prior = load_latents(
            run.prior, codec, cfg.random_flip, run.accelerator, num_workers=workers
        )
        prior.shift, prior.scale = latents.shift, latents.scale
        run.prior_latents = prior
    logger.info(
        "latents: %d x %dx%d per image (VAE %s, downsampling %d, scale %.5g)",
        latent_channels, latent_size, latent_size, cfg.vae, codec.downsampling,
        codec.scaling_factor,
    )  # fmt: skip
    return codec


def run_text(run: Run, prompts: Sequence[str] | None = None) -> AnyTextEncoder | None:
    """--text-encoder's encoder for this run (None without it), the run's text cache and its
    grids' prompts.

    Before any work: the encoder is loaded (a folder, a hub id through the cache and offline
    rules of --vae, or a built-in name; frozen, in eval mode, in the run's precision), its
    width checked against the network's preset and compared with a resumed checkpoint's
    (its fingerprint: weights, tokenizer, length). Then every distinct caption and the empty
    prompt are encoded once per node on the device, shared by its processes (or read from the
    text cache: `run.text`), the grids' `prompts` (default: a few captions of the data) are
    encoded (`run.validation_prompts`), and the encoder leaves the device: training reads the
    cache. The encoder is returned on the CPU."""
    cfg = run.cfg
    saved = None if run.checkpoint is None else run.checkpoint.state.get("text_encoder")
    if cfg.text_encoder is None:
        if run.checkpoint is not None:  # one trained on captions needs its encoder
            check_resumed_text_encoder(saved, None, str(run.checkpoint.path))
        return None
    captions = run.data.captions
    assert captions is not None, "start_run(with_captions=True) reads the captions"
    precision = cfg.mixed_precision or run.accelerator.mixed_precision
    dtype = DTYPES.get(precision or "no", torch.float32)
    encoder = main_process_first(
        run.accelerator,
        lambda: load_text_encoder(cfg.text_encoder, cfg.text_encoder_max_length, dtype),
        InputError(f"{cfg.text_encoder} could not be loaded (the main process says why)",
                   "text_encoder"),
    )  # fmt: skip
    if Path(cfg.text_encoder).expanduser().exists():  # by its absolute path, as --vae
        encoder.source = str(Path(cfg.text_encoder).expanduser().resolve())
    if cfg.init_from is None:
        check_text_width(cfg.backbone, cfg.preset, encoder.width)
    if run.checkpoint is not None:
        check_resumed_text_encoder(saved, encoder, str(run.checkpoint.path))
    encoder.to(run.accelerator.device)
    run.text = load_text_embeddings(captions, encoder, run.accelerator)
    texts = list(prompts or default_validation_prompts(captions, cfg.num_sample_images))
    run.validation_prompts = encode_prompts(encoder, texts)
    encoder.to("cpu")  # training reads the cache
    return encoder


def initial_network(run: Run, kind: Kind, codec: LatentCodec | None = None) -> nn.Module:
    """A new network of --preset, or --init-from's trained one (checked against the data; the
    kind takes what it needs from its scheduler config, e.g. the noise schedule for the flags
    not given). A run that has checkpoints resumes: the network and schedule are then the
    checkpoint's and --init-from is not read. With a `codec`, the network denoises its
    latents: channels and size are the latent grid's."""
    cfg = run.cfg
    channels, resolution = cfg.channels, cfg.resolution
    if codec is not None:
        channels, resolution = codec.latent_shape(cfg.resolution)
    text_width = None if run.text is None else int(run.text.hidden.shape[-1])
    if cfg.init_from is None:
        return build_backbone(cfg.backbone, cfg.preset, resolution, channels,
                              run.data.num_classes, text_width)  # fmt: skip
    source, adapter = None, cfg.adapter()
    if cfg.pipeline is not None:  # its VAE and text encoder are read again on resume: it is here
        source = init_source(run)
        run.base = BasePipeline.read(source, cfg.init_from)
    if run.checkpoint is not None:
        state = run.checkpoint.state
        kind.take_from_model(cfg, state.get("scheduler_config") or {}, str(run.checkpoint.path))
        if adapter is None:  # a full fine-tune: the checkpoint holds the whole network
            logger.info(
                "resuming %s: --init-from %s is not read", run.checkpoint.path, cfg.init_from
            )
            cls = network_class(state.get("model_class", "UNet2DModel"))
            return prepare_loaded(cls.from_config(state["model_config"]))
        check_resumed_base(state.get("base"), run.base, str(run.checkpoint.path))
    source = source or init_source(run)
    try:
        loaded = load_for_sampling(source, "ema")
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"{cfg.init_from} cannot be loaded: {err}", "init_from") from err
    changed = codec_changes(None if loaded.codec is None else loaded.codec.facts(), codec)
    if changed:
        raise InputError(
            f"{cfg.init_from} cannot start this run: {changed[0]}; "
            "give --vae the autoencoder it was trained with (its export's vae/ folder)",
            "init_from",
        )
    check_init_model(
        loaded,
        cfg.init_from,
        objective=cfg.objective,
        resolution=cfg.resolution,  # a latent model's loaded sizes are its images'
        channels=cfg.channels,
        num_classes=run.data.num_classes,
        text_width=text_width,
    )
    backbone = backbone_of(loaded.model).name
    if cfg.backbone not in (None, backbone):
        raise InputError(
            f"{cfg.init_from} is a {backbone} network: drop --backbone {cfg.backbone}", "backbone"
        )
    if run.checkpoint is None:
        kind.take_from_model(cfg, loaded.scheduler_config or {}, cfg.init_from)
    logger.info("starting from the weights of %s (%s)", cfg.init_from, source)
    # The same network as a fresh one would be (no loading metadata in its config), so the
    # checkpoints of this run describe it as resume rebuilds it.
    config = {k: v for k, v in loaded.model.config.items() if not k.startswith("_")}
    model = prepare_loaded(type(loaded.model).from_config(config))
    model.load_state_dict(loaded.model.state_dict())
    if adapter is not None:  # the base frozen, the adapter's A drawn from the run's seed
        try:
            add_lora(model, adapter, derive_seed("lora", cfg.seed))
        except ValueError as err:
            raise InputError(str(err), "lora_target_modules") from None
        run.adapter = adapter
        logger.info("training a %s; the base stays frozen", adapter.describe())
    return model


def check_resumed_base(saved: dict | None, base: BasePipeline, checkpoint: str) -> None:
    """A LoRA checkpoint goes on only on the base it was trained on (its denoiser's weights)."""
    if saved is not None and saved["fingerprint"] != base.fingerprint:
        raise InputError(
            f"{checkpoint} holds an adapter trained on {saved['source']} (its {base.family.denoiser}"
            f" weights' fingerprint {saved['fingerprint'][:12]}...), and {base.source} holds "
            f"other weights ({base.fingerprint[:12]}...): give --init-from the pipeline it was "
            "trained on, or --resume none / another --output-dir to start over",
            "init_from",
        )


def init_source(run: Run) -> Path:
    """--init-from's folder (a hub id fetched by the main process first: a text-to-image
    pipeline's components only)."""
    cfg = run.cfg
    family = FAMILIES_BY_NAME.get(cfg.pipeline)
    patterns = None if family is None else family.hub_files()
    return main_process_first(
        run.accelerator,
        lambda: resolve_model_source(cfg.init_from, "init_from", patterns),
        InputError(f"{cfg.init_from} could not be found (the main process says why)", "init_from"),
    )


def resolve_kind_options(run: Run, kind: Kind, codec: LatentCodec | None) -> None:
    """The kind's options still unset once the data and the model are known (EDM's sigma_data,
    say): what a resumed checkpoint was trained with, else what follows from the data's
    standard deviation, PIXEL_DATA_STD for pixels in [-1, 1], for latents the scaled latents'
    (measured on the data; 1 when the scale is measured too)."""
    cfg = run.cfg
    data_std = PIXEL_DATA_STD
    if codec is not None:
        if codec.per_channel:  # the statistics make each channel unit, then the scale applies
            data_std = codec.scaling_factor
        else:
            data_std = codec.scaling_factor * math.sqrt(run.latents.variance)
    shape = (cfg.channels, cfg.resolution, cfg.resolution)
    if codec is not None:
        channels, size = codec.latent_shape(cfg.resolution)
        shape = (channels, size, size)
    state = None if run.checkpoint is None else run.checkpoint.state
    kind.resolve(cfg, state, data_std, shape)
