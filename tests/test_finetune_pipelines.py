"""Fine-tuning the text-to-image pipelines people have (`train_ddpm.py --init-from` a Stable
Diffusion pipeline): the run takes the pipeline's denoiser, VAE, text encoder, tokenizer and
noise schedule; its export is the stock pipeline with the trained UNet, which diffusers loads
and which draws sample.py's images.

The base is a tiny StableDiffusionPipeline built from configs (no download): a 2-level
UNet2DConditionModel on 4x4x4 latents, a 2-level AutoencoderKL of 3-channel 8x8 images,
tiny-clip's text model and tokenizer, Stable Diffusion's PNDMScheduler config. One fine-tune
of it is trained once and shared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from huggingface_hub import constants
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train_ddpm
from ddp_utils.checkpoint import read_checkpoint, shard_metadata, whole_tensors
from ddp_utils.config import parse_config
from ddp_utils.errors import InputError
from diffusion.adapters import ADAPTER_FILE
from diffusion.conditioning.text import encode_prompts
from diffusion.kinds.registry import kind_named
from diffusion.pipelines import FAMILIES_BY_NAME
from diffusion.sampling import make_sample_generators
from diffusion.text_encoders import load_text_encoder, tiny_clip
from tests.test_init_from import as_hub_cache
from tests.test_resume import assert_a_kill_continues_bit_for_bit
from tests.test_text_runs import sample_py, train
from tests.tiny_runs import launch_two_processes

PROMPTS = ["a handwritten seven", "the number 2, written by hand"]
WEIGHTS = "diffusion_pytorch_model.safetensors"
# Stable Diffusion 1.x's scheduler config, as its repositories ship it.
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False}  # fmt: skip


def tiny_sd(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder of tiny random parts, as save_pretrained writes it."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
        attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=8,
    )  # fmt: skip
    text_encoder, tokenizer = tiny_clip()
    scheduler = PNDMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def sd_args(base: Path, out: Path | None, *extra: str) -> list[str]:
    """A 4-step fine-tune on 8x8 captioned digits in RGB: 1 process x accumulation 2 x 4;
    grids of the two prompts at w = 2 on every step."""
    return [
        "--dataset", "digits-captioned", "--init-from", str(base), "--channels", "3",
        "--resolution", "8", "--max-images", "32", "--max-steps", "4", "--batch-size", "4",
        "--gradient-accumulation-steps", "2", "--lr-warmup-steps", "1", "--log-every", "1",
        "--checkpoint-every", "2", "--sample-every", "4", "--num-sample-images", "4",
        "--sample-steps", "3", "--sample-scheduler", "ddim", "--sample-eta", "0",
        "--sample-guidance-scale", "2", "--sample-guidance-interval", "all",
        "--validation-prompts", *PROMPTS, "--ema-max-decay", "0.9", "--report-to", "none",
        *([] if out is None else ["--output-dir", str(out)]), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_sd(tmp_path_factory.mktemp("sd") / "base")


@pytest.fixture(scope="module")
def full_run(base: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sd-full") / "run"
    train(sd_args(base, out))
    return out


# --------------------------------------------------------------------------- full fine-tune


def test_a_stable_diffusion_pipeline_fine_tunes_with_its_own_parts(base, full_run) -> None:
    """The run's VAE, text encoder and schedule are the pipeline's; its export is the pipeline
    with the trained UNet, which StableDiffusionPipeline loads."""
    config = (full_run / "config.yaml").read_text()
    for line in (f"text_encoder: {base}", f"vae: {base}", "beta_schedule: scaled_linear",
                 "beta_start: 0.00085", "beta_end: 0.012", "prediction_type: epsilon"):  # fmt: skip
        assert line in config, line
    task = json.loads((full_run / "pipeline" / "task.json").read_text())
    assert task["base"]["pipeline"] == "StableDiffusionPipeline"
    assert task["base"]["source"] == str(base) and task["backbone"] == "text-unet"
    assert task["text_encoder"]["source"] == str(base) and task["latent"]["vae"] == str(base)
    assert task["latent"]["scaling_factor"] == 0.18215  # the pipeline's VAE config's
    pipeline = StableDiffusionPipeline.from_pretrained(full_run / "pipeline", use_safetensors=True)
    assert isinstance(pipeline.scheduler, PNDMScheduler)
    assert pipeline.scheduler.config.steps_offset == 1  # the base's sampler, its schedule
    assert pipeline.scheduler.config.beta_schedule == "scaled_linear"
    trained, start = (
        load_file(folder / "unet" / WEIGHTS) for folder in (full_run / "pipeline", base)
    )
    assert trained.keys() == start.keys()
    assert not all(torch.equal(trained[k], start[k]) for k in start)  # the UNet trained
    for part in ("text_encoder/model.safetensors", f"vae/{WEIGHTS}"):  # the base's, as they were
        assert (full_run / "pipeline" / part).read_bytes() == (base / part).read_bytes()
    card = (full_run / "pipeline" / "README.md").read_text()
    assert "StableDiffusionPipeline.from_pretrained" in card and "a handwritten seven" in card


def test_sample_py_and_the_stock_pipeline_draw_the_training_grid(full_run, tmp_path) -> None:
    """sample.py on the export draws the training grid, pixel for pixel; diffusers' own
    StableDiffusionPipeline on the same export, sampler, prompts and initial noise draws the
    same images (within rounding: it batches and decodes otherwise)."""
    with Image.open(full_run / "samples" / "samples-0000004.png") as grid:
        expected = np.asarray(grid)
    flags = ["--num-samples=4", "--scheduler=ddim", "--num-steps=3", "--eta=0", "--prompt",
             *PROMPTS]  # fmt: skip
    images, labels = sample_py(full_run / "pipeline", tmp_path / "ours", *flags)
    with Image.open(tmp_path / "ours" / "grid.png") as grid:
        assert np.array_equal(np.asarray(grid), expected)
    assert labels.tolist() == [0, 1, 0, 1]
    pipeline = StableDiffusionPipeline.from_pretrained(full_run / "pipeline", use_safetensors=True)
    theirs = stock_images(pipeline, full_run / "pipeline")
    assert np.abs(theirs - images.astype(np.int16)).max() <= 1


def test_the_pipelines_schedule_and_prediction_type_are_taken() -> None:
    """Stable Diffusion 2.x's 768-v pipelines predict v over the same betas: the fine-tune
    trains v-prediction on scaled_linear 0.00085..0.012; what cannot be rebuilt is refused."""
    cfg = parse_config(train_ddpm.DDPMConfig, ["--init-from", "someone/sd2-v"])
    ddpm = kind_named(cfg.objective, "test")
    ddpm.take_from_model(cfg, {**SD_SCHEDULER, "prediction_type": "v_prediction"}, "sd2")
    scheduler = ddpm.train_scheduler(cfg)
    assert scheduler.config.prediction_type == "v_prediction"
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2  # scaled_linear
    assert torch.allclose(scheduler.betas, expected)
    for problem, message in (({"trained_betas": [0.1] * 1000}, "explicit list of betas"),
                             ({"rescale_betas_zero_snr": True}, "zero terminal SNR"),
                             ({"beta_schedule": "sigmoid"}, "its beta_schedule is 'sigmoid'")):  # fmt: skip
        cfg = parse_config(train_ddpm.DDPMConfig, ["--init-from", "someone/sd2-v"])
        with pytest.raises(InputError, match=message):
            ddpm.take_from_model(cfg, {**SD_SCHEDULER, **problem}, "sd2")


def test_a_hub_id_in_the_cache_names_the_pipeline_offline(base, tmp_path, monkeypatch) -> None:
    """--init-from a hub id: read from the hub cache offline (what a download left), its VAE and
    text encoder the same repository's; only the pipeline's parts are asked of the hub."""
    as_hub_cache(base, tmp_path / "hub", "someone/tiny-sd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = parse_config(train_ddpm.DDPMConfig, ["--init-from", "someone/tiny-sd"])
    assert cfg.pipeline == "stable-diffusion"
    assert cfg.vae == cfg.text_encoder == "someone/tiny-sd"
    assert load_text_encoder("someone/tiny-sd").facts()["class"] == "CLIPTextModel"
    patterns = FAMILIES_BY_NAME[cfg.pipeline].hub_files()
    assert "unet/diffusion_pytorch_model.safetensors" in patterns
    assert not any("safety_checker" in p or p.endswith((".bin", "*")) for p in patterns)


def test_other_families_and_parts_are_refused_naming_what_works(base, tmp_path, capsys):
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}))  # fmt: skip
    other = tmp_path / "vae"
    other.mkdir()
    for argv, message in (
        ([f"--init-from={sdxl}"], f"{sdxl} is a StableDiffusionXLPipeline (Stable Diffusion XL); "
         "--init-from fine-tunes the text-to-image pipelines Stable Diffusion 1.x/2.x "
         "(StableDiffusionPipeline)"),
        ([f"--init-from={base}", f"--vae={other}"], "a Stable Diffusion 1.x/2.x pipeline brings "
         "its own vae; drop --vae"),
        ([f"--init-from={base}", "--text-encoder=tiny-clip"], "brings its own text encoder; drop "
         "--text-encoder"),
        ([f"--init-from={base}", "--preset=digits-text"], "--preset and --init-from both"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as stopped:
            train_ddpm.main([*argv, "--dry-run"])
        assert stopped.value.code == 2
        assert message in capsys.readouterr().err, argv
    # What only the data or the pipeline's parts can tell: refused before anything is written.
    common = ["--dataset", "digits-captioned", "--init-from", str(base), "--resolution", "8",
              "--max-images", "8", "--report-to", "none", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    for extra, message in ((["--channels", "3", "--objective", "flow"], "pass --objective ddpm"),
                           (["--channels", "1"], "pass --channels 3")):  # fmt: skip
        with pytest.raises(InputError, match=message):
            train([*common, *extra])
        assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- LoRA

LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--export-fused",
        "--learning-rate", "1e-2"]  # fmt: skip
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def lora_run(base: Path, tmp_path_factory) -> Path:
    """A rank-4 LoRA (alpha 8: scale 2) with dropout, fused export too."""
    out = tmp_path_factory.mktemp("sd-lora") / "run"
    train(sd_args(base, out, *LORA))
    return out


def safetensors_metadata(path: Path) -> dict:
    header = path.read_bytes()
    size = int.from_bytes(header[:8], "little")
    return json.loads(header[8 : 8 + size])["__metadata__"]


def test_a_lora_run_trains_and_keeps_the_adapter_alone(base, lora_run, full_run) -> None:
    """Checkpoints hold the adapter, its EMA and its optimizer state (no base weight); the
    export is the adapter in diffusers' LoRA format; the base stayed bit for bit: the fused
    UNet is the base file's weights, plus (alpha / r) B A in the adapted layers only."""
    checkpoint = lora_run / "checkpoints" / "checkpoint-4"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["adapter"] == {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": list(TARGETS)}
    assert state["base"]["source"] == str(base) and state["model_class"] == "UNet2DConditionModel"
    model, ema = (
        load_file(checkpoint / "model.safetensors"),
        load_file(checkpoint / "ema.safetensors"),
    )
    assert model.keys() == ema.keys() and all(".lora_" in k for k in model)
    # A and B of 4 projections in 8 attention layers (self and cross, in 4 transformer blocks).
    assert len(model) == 2 * 4 * 8
    optimizer = load_file(checkpoint / "optimizer.safetensors")  # Adam's moments, per parameter
    assert len({key.split(".")[0] for key in optimizer}) == len(model)
    full = full_run / "checkpoints" / "checkpoint-4" / "model.safetensors"
    assert (checkpoint / "model.safetensors").stat().st_size * 20 < full.stat().st_size
    adapter_file = lora_run / "pipeline" / "pytorch_lora_weights.safetensors"
    adapter = load_file(adapter_file)
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in adapter)  # fmt: skip
    assert len(adapter) == len(model)
    config = json.loads(safetensors_metadata(adapter_file)["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 8
    # Dropout is training's; load_lora_weights would apply it (its new layers train mode).
    assert config["unet.lora_dropout"] == 0
    assert sorted(config["unet.target_modules"]) == sorted(TARGETS)
    start = load_file(base / "unet" / WEIGHTS)
    merged = load_file(lora_run / "pipeline" / "fused" / "unet" / WEIGHTS)
    assert merged.keys() == start.keys()
    num_adapted = 0
    for key, weight in start.items():
        down = adapter.get(f"unet.{key.removesuffix('.weight')}.lora_A.weight")
        if down is None:
            assert torch.equal(merged[key], weight), key
            continue
        up = adapter[f"unet.{key.removesuffix('.weight')}.lora_B.weight"]
        assert up.abs().max() > 0  # B left zero: it trained
        torch.testing.assert_close(merged[key], weight + 2 * up @ down, rtol=0, atol=1e-6)
        num_adapted += 1
    assert num_adapted == 32
    task = json.loads((lora_run / "pipeline" / "task.json").read_text())
    assert task["adapter"] == state["adapter"] and task["base"] == state["base"]
    card = (lora_run / "pipeline" / "README.md").read_text()
    assert f'StableDiffusionPipeline.from_pretrained("{base}"' in card
    assert 'pipeline.load_lora_weights("path/to/this/folder")' in card
    assert "LoRA of rank 4, alpha 8, dropout 0.1 on to_q, to_k, to_v, to_out.0" in card


def stock_images(pipeline: StableDiffusionPipeline, encoder_folder: Path) -> np.ndarray:
    """The stock pipeline's images of the grids' prompts, seeds and DDIM-3 (eta 0, w = 2),
    given the prompts as the run encoded them."""
    # The base's schedule and its steps_offset (1, which StableDiffusionPipeline imposes): the
    # run samples with them.
    schedule = {k: v for k, v in pipeline.scheduler.config.items()
                if k.startswith("beta") or k == "steps_offset"}  # fmt: skip
    pipeline.scheduler = DDIMScheduler.from_config(
        {**schedule, "prediction_type": "epsilon"}, clip_sample=False
    )
    encoder = load_text_encoder(str(encoder_folder))
    prompts = encode_prompts(encoder, [PROMPTS[k % 2] for k in range(4)] + [""])
    noise = torch.cat([torch.randn((1, 4, 4, 4), generator=g)
                       for g in make_sample_generators(0, range(4))])  # fmt: skip
    images = pipeline(
        prompt_embeds=prompts.hidden[:4], negative_prompt_embeds=prompts.hidden[4:].expand(4, -1, -1),
        latents=noise, num_inference_steps=3, guidance_scale=2.0, eta=0.0, output_type="np",
    ).images  # fmt: skip
    return np.round(images * 255).astype(np.int16)


def test_the_adapter_reloads_onto_the_base_and_draws_the_training_grid(base, lora_run, tmp_path):
    """sample.py on the LoRA export and on its checkpoint draws the training grid, pixel for
    pixel; diffusers' StableDiffusionPipeline with load_lora_weights draws the same images;
    the fused pipeline draws them within rounding."""
    with Image.open(lora_run / "samples" / "samples-0000004.png") as grid:
        expected = np.asarray(grid)
    flags = ["--num-samples=4", "--scheduler=ddim", "--num-steps=3", "--eta=0",
             "--guidance-scale=2", "--prompt", *PROMPTS]  # fmt: skip
    drawn = {}
    for name, model in (("export", lora_run / "pipeline"), ("run", lora_run),
                        ("checkpoint", lora_run / "checkpoints" / "checkpoint-4"),
                        ("fused", lora_run / "pipeline" / "fused"), ("base", base)):  # fmt: skip
        drawn[name], _ = sample_py(model, tmp_path / name, *flags)
        if name in ("export", "run", "checkpoint"):
            with Image.open(tmp_path / name / "grid.png") as grid:
                assert np.array_equal(np.asarray(grid), expected), name
    assert np.abs(drawn["fused"].astype(np.int16) - drawn["export"]).max() <= 1
    assert np.abs(drawn["base"].astype(np.int16) - drawn["export"]).max() > 5  # the adapter matters
    pipeline = StableDiffusionPipeline.from_pretrained(base, use_safetensors=True)
    pipeline.load_lora_weights(lora_run / "pipeline")
    assert np.abs(stock_images(pipeline, base) - drawn["export"]).max() <= 1
    fused = StableDiffusionPipeline.from_pretrained(lora_run / "pipeline" / "fused",
                                                    use_safetensors=True)  # fmt: skip
    assert np.abs(stock_images(fused, base) - drawn["export"]).max() <= 1


def test_a_resumed_lora_run_ends_bit_identical_on_its_base_only(base, lora_run, tmp_path):
    out = tmp_path / "resumed"
    train(sd_args(base, out, *LORA, "--max-steps", "2", "--sample-every", "0"))
    train(sd_args(base, out, *LORA, "--sample-every", "0"))  # the same command: resumes
    for name in ("model", "ema", "optimizer"):
        first = load_file(lora_run / "checkpoints" / "checkpoint-4" / f"{name}.safetensors")
        second = load_file(out / "checkpoints" / "checkpoint-4" / f"{name}.safetensors")
        assert first.keys() == second.keys()
        assert all(torch.equal(v, second[k]) for k, v in first.items()), name
    # The exported adapter: the same tensors and metadata (safetensors writes the metadata's
    # keys in no fixed order, so the bytes may differ).
    adapter = "pipeline/pytorch_lora_weights.safetensors"
    with safe_open(out / adapter, "pt") as mine, safe_open(lora_run / adapter, "pt") as theirs:
        assert mine.metadata() == theirs.metadata()
    ours, reference = load_file(out / adapter), load_file(lora_run / adapter)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in ours.items())
    # The adapter goes on only on the base it was trained on.
    moved = tmp_path / "other-base"
    tiny_sd(moved)
    weights = load_file(moved / "unet" / WEIGHTS)
    save_file({k: v + 1e-3 for k, v in weights.items()}, moved / "unet" / WEIGHTS)
    with pytest.raises(InputError, match="holds an adapter trained on .* holds other weights"):
        train(sd_args(moved, out, *LORA, "--max-steps", "6", "--sample-every", "0"))


def test_gradient_checkpointing_trains_the_same_adapter(base, lora_run, tmp_path, capsys):
    """--gradient-checkpointing with an adapter (diffusers' checkpointing inside the UNet's
    blocks, the frozen base's activations recomputed in the backward; the dropout masks
    replayed): after 2 steps, the adapter and its EMA are the run's without it, bit for bit."""
    out = tmp_path / "run"
    train(sd_args(base, out, *LORA, "--gradient-checkpointing", "--max-steps", "2",
                  "--sample-every", "0"))  # fmt: skip
    log = capsys.readouterr().out
    assert "gradient checkpointing: UNet2DConditionModel's blocks recompute" in log
    for name in ("model", "ema", "optimizer"):
        ours = load_file(out / "checkpoints" / "checkpoint-2" / f"{name}.safetensors")
        theirs = load_file(lora_run / "checkpoints" / "checkpoint-2" / f"{name}.safetensors")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_lora_flags_are_refused_where_they_cannot_work(base, tmp_path, capsys) -> None:
    for argv, message in (
        (["--lora-alpha", "8"], "--lora-alpha applies to LoRA fine-tunes only: add --lora-rank"),
        (["--export-fused"], "--export-fused applies to LoRA fine-tunes only"),
        (["--lora-rank", "4"], "--lora-rank adapts a text-to-image pipeline's denoiser: give "
         "--init-from"),
        (["--lora-rank", "0", f"--init-from={base}"], "--lora-rank must be >= 1, got 0"),
        (["--lora-rank", "4", "--lora-dropout", "1", f"--init-from={base}"],
         "--lora-dropout must be in [0, 1), got 1.0"),
        ([f"--init-from={base}", "--latent-scale", "measure"], "--latent-scale measure and "
         "--init-from a pipeline"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as stopped:
            train_ddpm.main([*argv, "--dry-run"])
        assert stopped.value.code == 2
        assert message in capsys.readouterr().err, argv
    args = sd_args(base, tmp_path / "run", "--lora-rank", "4", "--lora-target-modules", "to_qq")
    with pytest.raises(InputError, match="--lora-target-modules: to_qq: .*to_q to_k to_v"):
        train(args)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_a_killed_lora_run_continues_bit_for_bit(base, lora_run, tmp_path) -> None:
    """SIGKILL mid-run (after checkpoint-2, mid accumulation), then the same command: its
    checkpoint-4 (adapter, EMA, optimizer) is the uninterrupted run's, byte for byte."""
    args = sd_args(base, tmp_path / "run", *LORA, "--sample-every", "0")
    assert_a_kill_continues_bit_for_bit(lora_run, args, tmp_path)


@pytest.mark.slow
def test_two_processes_train_one_adapter(base, lora_run, tmp_path) -> None:
    """Global batch 8 either way (1 process x accumulation 2 x 4, or 2 processes x 4): DDP
    over the adapter alone (the base frozen) trains the one process's adapter, with its
    learning rate at every step, in an adapter-only checkpoint; every rank holds the same
    adapter: the grid the two draw together is what one process draws from their export."""
    args = sd_args(base, tmp_path / "two", *LORA)
    args[args.index("--gradient-accumulation-steps") + 1] = "1"
    log = launch_two_processes(["train_ddpm.py", *args], tmp_path)
    assert "per device 4 x 2 processes x 1 accumulation = global 8" in log
    assert "5,504 of them trained" in log
    lrs = {}
    for name, folder in (("one", lora_run), ("two", tmp_path / "two")):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        lrs[name] = [r["lr"] for r in rows if "lr" in r]
    assert len(lrs["one"]) == 4 and lrs["one"] == lrs["two"]
    # The same micro-batches, noise and dropout masks (keyed by the micro-batch's place in the
    # stream, not by rank): the one process's adapter and its EMA, up to the sums' order.
    for name in ("model", "ema"):
        ones = load_file(lora_run / "checkpoints" / "checkpoint-4" / f"{name}.safetensors")
        twos = load_file(tmp_path / "two" / "checkpoints" / "checkpoint-4" / f"{name}.safetensors")
        assert ones.keys() == twos.keys() and all("lora" in k for k in ones)
        gap = max((ones[k] - twos[k]).abs().max().item() for k in ones)
        assert gap < 1e-5, (name, gap)
    with Image.open(tmp_path / "two" / "samples" / "samples-0000004.png") as grid:
        expected = np.asarray(grid)
    sample_py(tmp_path / "two" / "pipeline", tmp_path / "one", "--num-samples=4",
              "--scheduler=ddim", "--num-steps=3", "--eta=0", "--prompt", *PROMPTS)  # fmt: skip
    with Image.open(tmp_path / "one" / "grid.png") as grid:
        assert np.array_equal(np.asarray(grid), expected)


@pytest.mark.slow
def test_an_adapter_trains_sharded_as_it_trains_under_ddp(base, lora_run, tmp_path) -> None:
    """--sharding fsdp with a LoRA: the frozen base and the adapter sharded by block over 2
    processes; the checkpoint's shards hold the adapter, its EMA and its optimizer state only;
    the adapter and EMA are the one process's within float tolerance, and so is the export's
    adapter (gathered whole); one process resumes the 2-process shards onto its own base."""
    args = sd_args(base, tmp_path / "sharded", *LORA, "--sharding", "fsdp")
    args[args.index("--gradient-accumulation-steps") + 1] = "1"
    log = launch_two_processes(["train_ddpm.py", *args], tmp_path)
    assert "sharded over 2 processes" in log and "5,504 of them trained" in log
    checkpoint = tmp_path / "sharded" / "checkpoints" / "checkpoint-4"
    names = shard_metadata(checkpoint)
    assert names and all("lora" in name for name in names), sorted(names)[:5]
    assert {name.split(".")[0] for name in names} == {"model", "ema", "optimizer"}
    whole = whole_tensors(read_checkpoint(checkpoint))
    for name in ("model", "ema"):
        ones = load_file(lora_run / "checkpoints" / "checkpoint-4" / f"{name}.safetensors")
        assert ones.keys() == whole[name].keys()
        gap = max((ones[k] - whole[name][k]).abs().max().item() for k in ones)
        assert gap < 1e-5, (name, gap)
    exported = load_file(tmp_path / "sharded" / "pipeline" / ADAPTER_FILE)
    ones = load_file(lora_run / "pipeline" / ADAPTER_FILE)
    assert exported.keys() == ones.keys()
    assert max((ones[k] - exported[k]).abs().max().item() for k in ones) < 1e-5
    # The 2-process shards resume on one process (its base read from --init-from again), the
    # global batch kept by accumulating 2.
    args[args.index("--max-steps") + 1] = "5"
    args[args.index("--gradient-accumulation-steps") + 1] = "2"
    train(args)
    assert (tmp_path / "sharded" / "checkpoints" / "checkpoint-5").is_dir()
