r"""Images from any model this toolkit trains: an export, a checkpoint, or a run directory.

    # the basic model (train_basic.py): its stepping sampler
    python sample.py runs/basic/model --num-samples 64 --num-steps 40 --output-dir out/basic
    # DDPM (train_ddpm.py): DDPM-1000, DDIM-50, DPM-Solver, UniPC, Karras samplers; EMA or raw
    python sample.py runs/ddpm/pipeline --scheduler ddim --num-inference-steps 50 \
        --num-samples 1000 --output-dir out/ddim50
    # EDM (train_ddpm.py --objective edm): Heun over 18 noise levels (35 network evaluations)
    python sample.py runs/edm/pipeline --scheduler edm-heun --num-steps 18 --output-dir out/edm
    # any number of processes: the work is split, and a seed gives the same images
    accelerate launch --config_file accelerate_configs/1node_8gpu_bf16.yaml sample.py \
        runs/ddpm/pipeline --num-samples 10000 --batch-size 250 --output-dir out/ddim50
    # ... and score them: FID/KID against the training data, printed and in fid.json
    python sample.py runs/ddpm/pipeline --num-samples 1000 --fid --dataset digits
    # a text-to-image model: prompts (one row of grid.png each), guided away from a negative one
    python sample.py runs/text --prompt "a handwritten seven" "the digit two" \
        --negative-prompt "a handwritten one" --guidance-scale 3
    # ... and how well the images match their prompts: the CLIP score (clip_score.json)
    python sample.py runs/text --num-samples 400 --clip-model openai/clip-vit-large-patch14

Writes `<output-dir>/samples.npz` (uint8 (N, H, W, C) as `arr_0`, the format evaluation tools
read) and `<output-dir>/grid.png`; `--save-images` adds one PNG per sample and
`--save-progression` a strip of the denoising trajectory, `--fid --dataset D` FID/KID against
dataset D in `fid.json` (sharded like the sampling), `--clip-model` a text model's CLIP score
against its prompts in `clip_score.json`. Sample k always comes from the
seed (`--seed`, k), so the images do not depend on the batch size or number of processes.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the libraries below load (~10 s): exit 130 quietly
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))


import numpy as np

from ddp_utils.cli import cli_main, setup_logging
from ddp_utils.config import parse_config
from ddp_utils.distributed import (
    all_finite,
    local_chunks,
    main_process_first,
    map_sharded,
    new_accelerator,
    raise_together,
)
from ddp_utils.errors import CheckpointError, InputError, NonFiniteError, OutputError
from ddp_utils.files import write_json
from ddp_utils.sample_output import check_finite_samples, check_output, write_outputs
from diffusion.drawing import (
    SampleConfig,
    choose_condition,
    count_calls,
    describe_source,
    guidance_interval,
    make_chunk_fn,
    sampler_choice,
    warn_if_resized,
)
from diffusion.kinds.registry import all_knobs
from diffusion.loading import load_for_sampling
from diffusion.sources import resolve_model_source
from evaluation import load_fid_inception
from evaluation.clip_score import load_clip_scorer
from evaluation.during_sampling import clip_metrics, fid_metrics, fid_reference


def sample(cfg: SampleConfig) -> np.ndarray:
    accelerator = new_accelerator()
    setup_logging(accelerator.is_main_process)
    # Every check before any sampling, and nothing written until the samples are.
    extractor = None
    if cfg.fid:
        try:
            extractor = load_fid_inception(accelerator.device)
        except ImportError as err:
            raise InputError(str(err), "fid") from None
    out = check_output(accelerator, cfg)
    # A hub id is downloaded once (by the main process), then read from the cache by the others.
    source = main_process_first(
        accelerator,
        lambda: resolve_model_source(cfg.model_path, None),
        InputError(f"{cfg.model_path} could not be found (the main process says why)"),
    )
    try:
        loaded = load_for_sampling(source, cfg.weights, cfg.vae)
    except (InputError, CheckpointError):
        raise
    except (FileNotFoundError, ValueError) as err:  # what loading refuses is MODEL_PATH's fault
        raise InputError(str(err)) from err
    if not all_finite(loaded.model.parameters()):
        raise NonFiniteError(
            f"the weights in {loaded.source} hold non-finite values (NaN/inf): that model "
            "diverged; sample an earlier checkpoint"
        )
    choice = sampler_choice(cfg, loaded)
    # Sample k's class or prompt (a text model's prompts encoded once, its encoder let go).
    # A hub id's encoder is downloaded once (by the main process), then read from the cache.
    condition, guidance = main_process_first(
        accelerator,
        lambda: choose_condition(cfg, loaded, accelerator.device),
        InputError("the prompts could not be encoded (the main process says why)", "prompt"),
    )
    clip = None  # --clip-model: a text model's samples against their prompts
    if cfg.clip_model is not None:
        clip = main_process_first(
            accelerator,
            lambda: load_clip_scorer(cfg.clip_model, accelerator.device),
            InputError(f"{cfg.clip_model} could not be loaded (the main process says why)",
                       "clip_model"),
        )  # fmt: skip
    if accelerator.is_main_process:
        describe_source(cfg, loaded)
        if cfg.fid:
            warn_if_resized(cfg, loaded)
    reference = None if extractor is None else fid_reference(cfg, loaded, extractor, accelerator)
    loaded.model.to(accelerator.device).eval()
    chunk, progression, nonfinite = make_chunk_fn(
        cfg, loaded, accelerator.device, choice, condition, guidance
    )
    calls = count_calls(loaded.model)
    images = map_sharded(accelerator, cfg.num_samples, cfg.batch_size, chunk, "sampling").numpy()
    check_finite_samples(accelerator, nonfinite, cfg.num_samples)
    labels = None if condition is None else condition.labels(range(cfg.num_samples)).numpy()
    world, rank = accelerator.num_processes, accelerator.process_index
    num_local = sum(map(len, local_chunks(cfg.num_samples, cfg.batch_size, world, rank)))
    error = None
    if accelerator.is_main_process:
        info = {
            "task": loaded.task,
            "source": str(loaded.source),
            "scheduler": choice.name,
            "num_steps": choice.steps,
            # Network evaluations per image (a guided step runs two, batched).
            "num_evaluations": calls[0] // max(1, num_local),
            # Every knob of any sampler: the chosen sampler's values, None for the others.
            **{name: choice.knobs.get(name) for name in all_knobs()},
            "class_names": loaded.class_names,
            # A text model's: its prompts (samples.npz's labels index them), the negative one.
            **({} if loaded.text_encoder is None else condition.task_info()),
            "guidance_scale": guidance if condition is not None else None,
            "guidance_interval": guidance_interval(cfg, loaded) if condition is not None else None,
            "num_processes": accelerator.num_processes,
        }
        try:
            write_outputs(cfg, out, images, labels, progression, loaded, info)
        except OSError as err:  # disk full: one message and exit 74, as training's
            error = OutputError(
                f"could not write the samples into {out}: {err.strerror or err}. Free some "
                "space or choose another --output-dir, then run the command again"
            )
    raise_together(accelerator, error, OutputError("the main process could not write"))
    if extractor is not None and reference is not None:
        metrics = fid_metrics(cfg, loaded, images, labels, extractor, reference, accelerator)
        if accelerator.is_main_process:
            write_json(out / "fid.json", metrics)
            print(
                f"FID {metrics['fid']:.4f} | KID {metrics['kid_mean']:.6f} "
                f"± {metrics['kid_std']:.6f} | {metrics['num_samples']} samples vs "
                f"{metrics['num_reference']} images of {metrics['reference']} -> "
                f"{out / 'fid.json'}"
            )
    if clip is not None:
        metrics = clip_metrics(cfg, images, condition, clip, accelerator)
        if accelerator.is_main_process:
            write_json(out / "clip_score.json", metrics)
            print(
                f"CLIP score {metrics['clip_score']:.4f} | {metrics['num_samples']} samples, "
                f"{len(metrics['prompts'])} prompt(s), {cfg.clip_model} -> "
                f"{out / 'clip_score.json'}"
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return images


def main(argv: list[str] | None = None) -> None:
    sample(parse_config(SampleConfig, argv, description=__doc__))


def cli() -> None:
    """The console script (pyproject's [project.scripts]): main() with the exit codes."""
    cli_main(main)


if __name__ == "__main__":
    cli()
