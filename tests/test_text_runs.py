"""Text-to-image runs as a user meets them: `train_ddpm.py --text-encoder` with the backbones
that attend to text (text-unet: UNet2DConditionModel; pixart: PixArtTransformer2DModel), every
kind, in pixels and on latents; grids of the validation prompts, captioned by them in wandb
and TensorBoard; the CLIP score beside FID (--clip-model, a tiny random CLIPModel); a resume
that continues bit for bit; two processes; `sample.py --prompt` drawing the training grid's
images (and `--clip-model` scoring them); exports that diffusers runs with prompts (its own
StableDiffusionPipeline and PixArtAlphaPipeline for the runs of their parts, the export's own
pipeline for the others) drawing sample.py's images.

One tiny run (a DDPM text-unet on the 8x8 captioned digits, tiny-clip, evaluated and tracked
at its last step) is trained once and shared; the other runs are as small as the code paths
allow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    PixArtAlphaPipeline,
    StableDiffusionPipeline,
)
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from transformers import T5Config, T5EncoderModel

import sample
import train_ddpm
from ddp_utils.config import parse_config
from ddp_utils.data import load_image_data
from ddp_utils.data.text_cache import load_text_embeddings
from ddp_utils.errors import InputError
from ddp_utils.tracking import read_metrics
from diffusion.conditioning.text import TextCondition, encode_prompts
from diffusion.drawing import SampleConfig, choose_condition
from diffusion.loading import load_for_sampling
from diffusion.networks import build_backbone, count_parameters, predict
from diffusion.networks.text_unet import SD15_PARAMETERS
from diffusion.sampling import sample_seed
from diffusion.text_encoders import TINY_CLIP, load_text_encoder
from evaluation.clip_score import clip_score, load_clip_scorer
from tests.test_clip_score import save_tiny_clip_model
from tests.test_latent import make_vae
from tests.test_resume import assert_a_kill_continues_bit_for_bit
from tests.test_text import save_joint
from tests.test_train_basic import wandb_history
from tests.tiny_runs import fresh_accelerate_state, launch_two_processes

PROMPTS = ["a handwritten seven", "the number 2, written by hand"]


def text_args(out: Path | None, *extra: str) -> list[str]:
    """A 4-step DDPM text-unet run on 8x8 captioned digits: 1 process x accumulation 2 x 4;
    grids of the two prompts, guided at every step."""
    return [
        "--dataset", "digits-captioned", "--text-encoder", TINY_CLIP, "--resolution", "8",
        "--max-images", "32", "--max-steps", "4", "--batch-size", "4",
        "--gradient-accumulation-steps", "2", "--lr-warmup-steps", "1", "--log-every", "1",
        "--checkpoint-every", "2", "--sample-every", "4", "--num-sample-images", "6",
        "--sample-steps", "3", "--sample-guidance-scale", "2", "--sample-guidance-interval",
        "all", "--validation-prompts", *PROMPTS, "--ema-max-decay", "0.9", "--report-to", "none",
        *([] if out is None else ["--output-dir", str(out)]), *extra,
    ]  # fmt: skip


def eval_args(clip_model: Path) -> list[str]:
    """FID (against 4 training images: the Inception features cost) and the CLIP score at the
    last step, of the 6 grid samples (2 chunks of 4)."""
    return ["--eval-every", "4", "--eval-num-samples", "6", "--eval-num-reference", "4",
            "--clip-model", str(clip_model)]  # fmt: skip


def train(args: list[str]) -> None:
    """In-process on one thread (module fixtures run before conftest's one-thread fixture)."""
    fresh_accelerate_state()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_ddpm.train(parse_config(train_ddpm.DDPMConfig, args))
    finally:
        torch.set_num_threads(previous)


def sample_py(model: Path, out: Path, *flags: str) -> tuple[np.ndarray, np.ndarray | None]:
    fresh_accelerate_state()
    sample.sample(parse_config(SampleConfig, [str(model), f"--output-dir={out}", *flags]))
    with np.load(out / "samples.npz") as npz:
        return npz["arr_0"], npz["labels"] if "labels" in npz.files else None


def seeded(indices) -> list[torch.Generator]:
    """sample.py's generators of samples `indices` (seed 0)."""
    return [torch.Generator().manual_seed(sample_seed(0, k)) for k in indices]


def levels(images: np.ndarray) -> np.ndarray:
    """A pipeline's "np" images (floats in [0, 1]) as sample.py's 0..255 levels."""
    return np.round(images * 255).astype(np.int64)


def shipped_pipeline(folder: Path) -> DiffusionPipeline:
    """The export's own pipeline.py, as diffusers runs it; a DDPM one steps with DDIM, the
    kind's default sampler in sample.py."""
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True,
                                             use_safetensors=True)  # fmt: skip
    if isinstance(pipe.scheduler, DDPMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> Path:
    return save_tiny_clip_model(tmp_path_factory.mktemp("clip") / "clip-model")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, clip_model) -> Path:
    """The shared run, evaluated (FID, CLIP score) and tracked by wandb (offline, its files in
    the run's wandb/) and TensorBoard."""
    out = tmp_path_factory.mktemp("text") / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_DIR", str(out.parent))
        train(text_args(out, *eval_args(clip_model), "--report-to", "all"))
    return out


# --------------------------------------------------------------------------- backbones


def test_the_cross_attention_backbones_take_the_encoders_width_and_sd15_is_sd15() -> None:
    # Stable Diffusion 1.5's UNet, built from its layout on the meta device: its published size.
    with torch.device("meta"):
        sd15 = build_backbone("text-unet", "sd15", 64, 4, text_width=768)
    assert count_parameters(sd15) == SD15_PARAMETERS == 859_520_964
    with pytest.raises(InputError, match="--preset sd15 attends to 768-wide text embeddings "
                                         r"\(cross_attention_dim\) and this encoder's are "
                                         "1024-wide"):  # fmt: skip
        build_backbone("text-unet", "sd15", 64, 4, text_width=1024)
    # The tiny presets take the encoder's width, and answer the condition as a denoiser.
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    for backbone, preset in (("text-unet", "digits-text"), ("pixart", "pixart-digits")):
        torch.manual_seed(0)
        net = build_backbone(backbone, preset, 16, 1, text_width=24)
        hidden = torch.randn(2, 5, 24)
        out = predict(net, x, t, {"encoder_hidden_states": hidden})
        assert out.shape == x.shape
        other = predict(net, x, t, {"encoder_hidden_states": hidden.flip(0)})
        assert not torch.allclose(out, other), backbone  # the text matters
    # PixArt: the caption projection maps the encoder's width to the transformer's.
    assert net.config.caption_channels == 24 and net.config.cross_attention_dim == 96


def test_text_flags_are_refused_where_they_cannot_work(tmp_path, capsys) -> None:
    for argv, message in (
        (["--text-encoder", TINY_CLIP, "--backbone", "unet"],
         "--text-encoder needs a backbone that attends to text: --backbone text-unet or pixart"),
        (["--backbone", "pixart"], "--backbone pixart is conditioned on text: add --text-encoder"),
        (["--text-encoder", TINY_CLIP, "--class-conditional"],
         "--text-encoder and --class-conditional"),
        (["--text-encoder", TINY_CLIP, "--validation-prompts", "a", "--validation-prompts-file",
          str(tmp_path)], "--validation-prompts and --validation-prompts-file"),
        (["--validation-prompts", "a"], "--validation-prompts applies to text-to-image runs"),
        (["--text-encoder", TINY_CLIP, "--validation-prompts-file", str(tmp_path / "none")],
         "--validation-prompts-file: cannot read"),
        (["--text-encoder", TINY_CLIP, "--label-dropout", "0.2"],
         "--label-dropout applies to --class-conditional runs only"),
        (["--text-encoder", TINY_CLIP, "--validation-prompts", "a", "b", "c",
          "--num-sample-images", "2"], "3 validation prompts and --num-sample-images 2"),
        (["--clip-model", "clip"], "--clip-model applies to text-to-image runs only"),
        (["--text-encoder", TINY_CLIP, "--clip-model", "clip"],
         "--clip-model scores the samples of each evaluation: give --eval-every N"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as stopped:
            train_ddpm.main([*argv, "--dry-run"])
        assert stopped.value.code == 2
        assert message in capsys.readouterr().err, argv
    # Guidance applies to text runs as to class-conditional ones.
    cfg = parse_config(train_ddpm.DDPMConfig, ["--text-encoder", TINY_CLIP,
                                               "--sample-guidance-scale", "3"])  # fmt: skip
    assert cfg.guidance().scale == 3 and cfg.backbone == "text-unet"
    # ... at every step by default, as diffusers' text pipelines; classes in EDM2's interval.
    assert cfg.guidance().interval is None and cfg.sample_guidance_interval == "all"
    classes = parse_config(train_ddpm.DDPMConfig, ["--class-conditional"])
    assert classes.guidance().interval == (0.28, 5.42)
    # An unconditional run's config file written before holds that interval: still read.
    plain = parse_config(train_ddpm.DDPMConfig, ["--sample-guidance-interval", "0.28,5.42"])
    assert plain.guidance().scale == 1.0 and plain.guidance().interval is None
    (tmp_path / "prompts.txt").write_text("a handwritten seven\n\nthe digit two\n")
    cfg = parse_config(train_ddpm.DDPMConfig, ["--text-encoder", TINY_CLIP,
                                               "--validation-prompts-file",
                                               str(tmp_path / "prompts.txt")])  # fmt: skip
    assert cfg.validation_prompt_texts() == ["a handwritten seven", "the digit two"]


# --------------------------------------------------------------------------- a text run


def test_a_text_run_records_its_encoder_and_grids_one_prompt_per_row(text_run: Path) -> None:
    encoder = load_text_encoder(TINY_CLIP)
    checkpoint = json.loads((text_run / "checkpoints" / "checkpoint-4" / "state.json").read_text())
    task = json.loads((text_run / "pipeline" / "task.json").read_text())
    for info in (checkpoint, task):
        assert info["text_encoder"] == encoder.facts()  # source and fingerprint
        assert info["prompts"] == PROMPTS and info["backbone"] == "text-unet"
        assert info["guidance_scale"] == 2.0 and info["guidance_interval"] is None
    assert checkpoint["model_class"] == "UNet2DConditionModel"
    assert "ema.safetensors" in {
        p.name for p in (text_run / "checkpoints" / "checkpoint-4").iterdir()
    }
    # The export's card calls it what it is, lists the grid's prompts (its rows, top to
    # bottom) and says how to sample it: its own pipeline, given prompts.
    card = ModelCard.load(text_run / "pipeline" / "README.md")
    text = card.content
    assert card.data.pipeline_tag == "text-to-image"
    assert "# text-to-image DDPM on digits-captioned" in text and "- text-to-image" in text
    assert "class" not in text.replace("classifier-free", "")
    assert '| validation prompts | "a handwritten seven"; "the number 2, written by hand" |' in text
    assert ('one row per validation prompt, top to bottom: 1. "a handwritten seven", 2. "the '
            'number 2, written by hand"') in text  # fmt: skip
    assert "![samples](samples.png)" in text and (text_run / "pipeline" / "samples.png").is_file()
    assert "trust_remote_code=True" in text
    assert f"images = pipeline(prompt={PROMPTS!r}, guidance_scale=2).images" in text
    # 6 samples, 2 prompts: 2 rows of 3 images of 8 pixels and 2 of padding, upscaled.
    with Image.open(text_run / "samples" / "samples-0000004.png") as grid:
        width, height = grid.size
    assert width / height == pytest.approx((3 * 10 + 2) / (2 * 10 + 2))


def test_the_grids_are_captioned_by_their_prompts_in_wandb_and_tensorboard(text_run) -> None:
    """wandb's image carries the rows' prompts as its caption; TensorBoard (whose images take
    no caption) a text beside it at the same step; both read back from their own files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    rows, _ = wandb_history(text_run.parent)
    (grid,) = [row for row in rows if "samples/_type" in row]  # wandb's keys, flattened
    assert grid["_step"] == 4 and grid["samples/_type"] == "image-file"
    assert grid["samples/caption"] == (
        "row 1: a handwritten seven | row 2: the number 2, written by hand"
    )
    (events_dir,) = (text_run / "tensorboard").iterdir()
    events = EventAccumulator(str(events_dir), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    (picture,) = events.Images("samples")
    with Image.open(text_run / "samples" / "samples-0000004.png") as png:
        assert (picture.step, picture.width, picture.height) == (4, *png.size)
    (text,) = events.Tensors("samples/rows/text_summary")  # torch's add_text adds the suffix
    assert text.step == 4
    assert make_ndarray(text.tensor_proto).item().decode() == (
        "1. a handwritten seven\n2. the number 2, written by hand"
    )


def test_the_clip_score_of_the_evaluations_samples_is_logged_beside_fid(
    text_run, clip_model, tmp_path
) -> None:
    """At --eval-every: the CLIP score of the evaluation's samples (the grid's 6, the two
    validation prompts in turn) in metrics.jsonl, wandb (summarised by its maximum), best/'s
    fid.json and the model card; sample.py --clip-model scores the same images alike, and
    their score by hand is the number."""
    evaluated = [row for row in read_metrics(text_run / "metrics.jsonl") if "fid" in row]
    assert [row["step"] for row in evaluated] == [4]
    score = evaluated[0]["clip_score"]
    assert 0 <= score <= 100
    best = json.loads((text_run / "best" / "fid.json").read_text())
    assert best["clip_score"] == score and best["step"] == 4
    card = (text_run / "pipeline" / "README.md").read_text()
    assert f"| CLIP score | {score:.2f} (FID's samples against their prompts, by " in card
    rows, _ = wandb_history(text_run.parent)
    assert [row["clip_score"] for row in rows if "clip_score" in row] == [pytest.approx(score)]
    # The evaluation's samples are the grid's: sample.py draws them from the export, and scores
    # them in the evaluation's chunks (its --batch-size: the run's 4).
    images, labels = sample_py(text_run, tmp_path / "scored", "--num-samples=6",
                               "--scheduler=ddim", "--num-steps=3", "--batch-size=4",
                               "--clip-model", str(clip_model))  # fmt: skip
    written = json.loads((tmp_path / "scored" / "clip_score.json").read_text())
    assert written["clip_score"] == score and written["prompts"] == PROMPTS
    # By hand: each image against its prompt (its label), in the evaluation's two chunks.
    scorer = load_clip_scorer(str(clip_model))
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    by_hand = torch.cat([scorer.scores(nchw[chunk], [PROMPTS[k] for k in labels[chunk]])
                         for chunk in (slice(0, 4), slice(4, 6))])  # fmt: skip
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert score == float(by_hand.double().mean())
    # Scored whole (one chunk), the same within float rounding.
    whole = clip_score(nchw, lambda items: [PROMPTS[k % 2] for k in items], scorer, None, 64)
    assert whole == pytest.approx(score, rel=1e-5)


def test_sample_py_draws_the_training_grid_for_the_same_prompts_and_seed(text_run, tmp_path):
    """The prompts encoded by the run's recorded encoder, the export's guidance: sample.py's
    grid is the training grid, pixel for pixel, from the export and from the checkpoint."""
    with Image.open(text_run / "samples" / "samples-0000004.png") as grid:
        expected = np.asarray(grid)
    flags = ["--num-samples=6", "--scheduler=ddim", "--num-steps=3", "--prompt", *PROMPTS]
    for model in (text_run, text_run / "checkpoints" / "checkpoint-4"):
        images, labels = sample_py(model, tmp_path / model.name, *flags)
        with Image.open(tmp_path / model.name / "grid.png") as grid:
            assert np.array_equal(np.asarray(grid), expected), model
        assert labels.tolist() == [0, 1, 0, 1, 0, 1]
    # Below the images' rounding too: sample.py's conditions are the training grid's, bit for
    # bit (the prompts rounded as the cache stores captions, "no condition" the cache's).
    loaded = load_for_sampling(text_run)
    drawn, _ = choose_condition(SampleConfig(model_path=str(text_run), prompt=PROMPTS), loaded)
    data = load_image_data("digits-captioned", 8, 1, max_images=32, with_captions=True)
    encoder = load_text_encoder(TINY_CLIP)
    embeddings = load_text_embeddings(data.captions, encoder)
    grids = TextCondition(embeddings, data.captions, 0.1, "cpu", encode_prompts(encoder, PROMPTS))
    for ours, theirs in ((drawn.for_samples(range(6), "cpu"), grids.for_samples(range(6), "cpu")),
                         (drawn.null(6, "cpu"), grids.null(6, "cpu"))):  # fmt: skip
        assert ours.keys() == theirs.keys() == {"encoder_hidden_states"}
        assert torch.equal(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])
    info = json.loads((tmp_path / "checkpoint-4" / "sample_info.json").read_text())
    assert info["prompts"] == PROMPTS and info["negative_prompt"] == ""
    # Without --prompt: the training grids' prompts. A negative prompt and the guidance scale
    # change the guided images, not the first prompt's at w = 1.
    default, _ = sample_py(text_run, tmp_path / "default", *flags[:3])
    assert np.array_equal(default, images)
    negative, _ = sample_py(text_run, tmp_path / "neg", *flags, "--negative-prompt",
                            "a handwritten one")  # fmt: skip
    assert not np.array_equal(negative, images)
    plain, _ = sample_py(text_run, tmp_path / "w1", *flags, "--guidance-scale=1")
    plain_negative, _ = sample_py(text_run, tmp_path / "w1n", *flags, "--guidance-scale=1",
                                  "--negative-prompt", "a handwritten one")  # fmt: skip
    assert np.array_equal(plain, plain_negative) and not np.array_equal(plain, images)


def test_sample_py_refuses_what_a_model_does_not_take(text_run) -> None:
    text = SimpleNamespace(text_encoder=load_text_encoder(TINY_CLIP).facts(), source=text_run,
                           prompts=None, guidance_scale=2.0, text_encoder_folder=None)  # fmt: skip
    flags = SampleConfig(model_path=str(text_run), class_labels="3")
    with pytest.raises(InputError, match="is a text-to-image model: it takes prompts"):
        choose_condition(flags, text)
    with pytest.raises(InputError, match="is a text-to-image model: give --prompt"):
        choose_condition(SampleConfig(model_path=str(text_run)), text)
    classes = SimpleNamespace(text_encoder=None, source=text_run, num_classes=0)
    with pytest.raises(InputError, match="is not a text-to-image model: it takes no prompts"):
        choose_condition(SampleConfig(model_path=str(text_run), prompt=["a seven"]), classes)
    with pytest.raises(InputError, match="is not a text-to-image model: --clip-model scores "
                                         "images against their prompts"):  # fmt: skip
        choose_condition(SampleConfig(model_path=str(text_run), clip_model="clip"), classes)
    moved = SimpleNamespace(**{**vars(text), "text_encoder": {
        **text.text_encoder, "fingerprint": "0" * 32}})  # fmt: skip
    with pytest.raises(InputError, match="the text encoder changed since training"):
        choose_condition(SampleConfig(model_path=str(text_run), prompt=["a seven"]), moved)
    # An encoder folder that moved: --text-encoder says where it is now (the same weights).
    gone = SimpleNamespace(**{**vars(text), "text_encoder": {
        **text.text_encoder, "source": str(text_run / "gone")}})  # fmt: skip
    with pytest.raises(InputError, match="cannot be loaded now: .* give sample.py --text-encoder"):
        choose_condition(SampleConfig(model_path=str(text_run), prompt=["a seven"]), gone)
    flags = SampleConfig(model_path=str(text_run), prompt=["a seven"], text_encoder=TINY_CLIP)
    condition, guidance = choose_condition(flags, gone)
    assert condition.prompts.texts == ("a seven",) and guidance == 2.0
    # A run in bf16 encoded in bf16: sample.py loads the encoder so again.
    bf16 = load_text_encoder(TINY_CLIP, dtype=torch.bfloat16)
    assert bf16.facts()["dtype"] == "bfloat16" and bf16.fingerprint != text.text_encoder[
        "fingerprint"]  # fmt: skip
    half = SimpleNamespace(**{**vars(text), "text_encoder": bf16.facts()})
    condition, _ = choose_condition(SampleConfig(model_path=str(text_run), prompt=["a seven"]),
                                    half)  # fmt: skip
    assert torch.equal(condition.prompts.hidden, encode_prompts(bf16, ["a seven"]).hidden)


def test_the_export_takes_prompts_and_draws_sample_pys_images(text_run, tmp_path) -> None:
    """A pixel model has no stock text pipeline: its export's own pipeline carries the text
    encoder and tokenizer and takes prompts as diffusers' text pipelines do (`prompt`,
    `negative_prompt`, `num_images_per_prompt`, the saved guidance by default). For sample.py's
    prompts and seeds its images are sample.py's: the prompts encoded and rounded as the
    captions were."""
    pipeline = text_run / "pipeline"
    index = json.loads((pipeline / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "GuidedDDPMPipeline"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"][0] == "transformers"
    pipe = shipped_pipeline(pipeline)
    assert pipe.config.max_sequence_length == 16 and pipe.config.prompt_embeds_dtype == "float16"
    assert pipe.config.guidance_scale == 2.0 and not pipe.config.prompt_attention_mask
    flags = ["--num-samples=4", "--scheduler=ddim", "--num-steps=3", "--prompt", *PROMPTS]
    ours, _ = sample_py(pipeline, tmp_path / "ours", *flags)
    theirs = pipe(prompt=PROMPTS * 2, num_inference_steps=3, eta=1.0, generator=seeded(range(4)),
                  output_type="np").images  # fmt: skip
    assert np.abs(levels(theirs) - ours).max() <= 1  # the same images, up to rounding
    # Two images per prompt, prompt by prompt: sample.py's samples 0, 2 (the first prompt's),
    # then 1, 3.
    pairs = pipe(prompt=PROMPTS, num_images_per_prompt=2, num_inference_steps=3, eta=1.0,
                 generator=seeded([0, 2, 1, 3]), output_type="np").images  # fmt: skip
    assert np.abs(levels(pairs) - ours[[0, 2, 1, 3]]).max() <= 1
    # A negative prompt in place of the empty one, as sample.py's.
    negative, _ = sample_py(pipeline, tmp_path / "neg", *flags, "--negative-prompt",
                            "a handwritten one")  # fmt: skip
    steered = pipe(prompt=PROMPTS * 2, negative_prompt="a handwritten one", num_inference_steps=3,
                   eta=1.0, generator=seeded(range(4)), output_type="np").images  # fmt: skip
    assert np.abs(levels(steered) - negative).max() <= 1
    assert np.abs(levels(steered) - ours).max() > 1  # the negative prompt matters
    with pytest.raises(ValueError, match="text-to-image model: give prompt="):
        pipe(class_labels=[3], num_inference_steps=1)
    # Below the images' rounding: the pipeline's conditions are sample.py's bit for bit (the
    # prompts rounded to float16 as the cache stores captions; the empty prompt's).
    drawn, _ = choose_condition(SampleConfig(model_path=str(pipeline), prompt=PROMPTS),
                                load_for_sampling(pipeline))  # fmt: skip
    for theirs, ours in ((pipe.encode_prompt(PROMPTS), drawn.for_samples(range(2), "cpu")),
                         (pipe.encode_prompt([""]), drawn.null(1, "cpu"))):  # fmt: skip
        assert theirs.keys() == ours.keys() == {"encoder_hidden_states"}
        assert torch.equal(theirs["encoder_hidden_states"], ours["encoder_hidden_states"])


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {**load_file(checkpoint / "model.safetensors"), **{
        f"ema.{k}": v for k, v in load_file(checkpoint / "ema.safetensors").items()}}  # fmt: skip


def test_a_resumed_text_run_ends_bit_identical_and_needs_its_encoder(text_run, tmp_path):
    out = tmp_path / "resumed"
    train(text_args(out, "--max-steps", "2", "--sample-every", "0"))
    train(text_args(out, "--sample-every", "0"))  # the same command, longer: resumes
    first = weights(text_run / "checkpoints" / "checkpoint-4")
    second = weights(out / "checkpoints" / "checkpoint-4")
    assert sorted(first) == sorted(second)
    assert all(torch.equal(value, second[key]) for key, value in first.items())
    # Without its encoder, a resume is refused before anything is written.
    args = text_args(out, "--max-steps", "6")
    for flag, num in (("--text-encoder", 1), ("--validation-prompts", 2),
                      ("--sample-guidance-scale", 1), ("--sample-guidance-interval", 1)):  # fmt: skip
        at = args.index(flag)
        del args[at : at + 1 + num]
    with pytest.raises(InputError, match="cannot be resumed without --text-encoder"):
        train(args)


# --------------------------------------------------------------------------- every kind


def save_tiny_t5(folder: Path) -> Path:
    """A T5 encoder of width 16 with tiny-clip's tokenizer (whose mask the network is given)."""
    tokenizer = load_text_encoder(TINY_CLIP).tokenizer
    torch.manual_seed(0)
    config = T5Config(vocab_size=tokenizer.vocab_size, d_model=16, d_kv=4, d_ff=32,
                      num_layers=1, num_heads=2, decoder_start_token_id=0)  # fmt: skip
    T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("objective", "backbone", "latent", "encoder"),
    [("edm", "pixart", True, None), ("flow", "text-unet", True, "sdxl"),
     ("flow", "pixart", False, None), ("ddpm", "pixart", False, "t5")],
)  # fmt: skip
def test_every_kind_trains_on_text_with_each_backbone(
    objective, backbone, latent, encoder, tmp_path
):
    """With the DDPM text-unet in pixels (`text_run`): every kind, both backbones, pixels and
    latents (a tiny VAE: 16x16 digits -> 4x4x4 latents), with EMA, a T5 encoder whose mask
    goes with its embeddings, and SDXL's two CLIPs read together; sample.py draws them, and so
    does the export's own pipeline given the prompt (none of these is a stock text pipeline's
    model; SDXL's pair is not shipped: that export takes no prompts)."""
    out = tmp_path / "run"
    extra = ["--objective", objective, "--backbone", backbone, "--max-steps", "2",
             "--checkpoint-every", "2", "--sample-every", "2", "--sample-steps", "2"]  # fmt: skip
    if latent:
        extra += ["--vae", str(make_vae(tmp_path / "vae")), "--resolution", "16"]
    if encoder == "t5":
        extra += ["--text-encoder", str(save_tiny_t5(tmp_path / "t5")),
                  "--text-encoder-max-length", "12"]  # fmt: skip
    elif encoder == "sdxl":
        extra += ["--text-encoder", str(save_joint(tmp_path / "sdxl", ("clip", "clip")))]
    train([*text_args(out), *extra])
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "state.json").read_text())
    assert state["task"] == objective and state["backbone"] == backbone
    assert ("latent" in state) == latent
    assert state["text_encoder"]["class"] == {
        None: "CLIPTextModel", "t5": "T5EncoderModel",
        "sdxl": "CLIPTextModel+CLIPTextModelWithProjection"}[encoder]  # fmt: skip
    width = "caption_channels" if backbone == "pixart" else "cross_attention_dim"
    assert state["model_config"][width] == {None: 32, "t5": 16, "sdxl": 16 + 24}[encoder]
    assert (out / "checkpoints" / "checkpoint-2" / "ema.safetensors").is_file()
    images, labels = sample_py(out, tmp_path / "samples", "--num-samples=2", "--num-steps=2",
                               "--prompt", "a handwritten seven")  # fmt: skip
    size = 16 if latent else 8
    assert images.shape == (2, size, size, 1) and labels.tolist() == [0, 0]
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    name = {"ddpm": "GuidedDDPMPipeline", "edm": "EDMPipeline", "flow": "FlowPipeline"}[objective]
    assert index["_class_name"] == ["pipeline", name]
    if encoder == "sdxl":  # several encoders: sample.py samples it, the export ships none
        assert index.get("text_encoder", [None])[0] is None
        return
    call = {"eta": 1.0} if objective == "ddpm" else {}  # sample.py's DDIM; Heun; Euler
    theirs = shipped_pipeline(out / "pipeline")(
        prompt="a handwritten seven", num_images_per_prompt=2, num_inference_steps=2,
        generator=seeded(range(2)), output_type="np", **call,
    ).images  # fmt: skip
    assert np.abs(levels(theirs) - images).max() <= 1
    if encoder == "t5":  # the training grid drew the prompts with their mask, as sample.py does
        with Image.open(out / "samples" / "samples-0000002.png") as grid:
            expected = np.asarray(grid)
        sample_py(out, tmp_path / "grid", "--num-samples=6", "--scheduler=ddim",
                  "--num-steps=2", "--prompt", *PROMPTS)  # fmt: skip
        with Image.open(tmp_path / "grid" / "grid.png") as grid:
            assert np.array_equal(np.asarray(grid), expected)


# --------------------------------------------------------------------------- stock pipelines


def latent_text_args(out: Path, tmp_path: Path, *extra: str) -> list[str]:
    """A 2-step DDPM text run on the latents of a tiny VAE (16x16 digits -> 4x4x4), guided
    at its default interval, grids of 6 images (DDIM, 3 steps, eta 1)."""
    args = text_args(out, "--vae", str(make_vae(tmp_path / "vae")), "--resolution", "16",
                     "--max-steps", "2", "--checkpoint-every", "2", "--sample-every", "2",
                     *extra)  # fmt: skip
    at = args.index("--sample-guidance-interval")
    return args[:at] + args[at + 2 :]


@pytest.mark.parametrize(
    ("backbone", "t5", "pipeline_class"),
    [("text-unet", False, StableDiffusionPipeline), ("pixart", True, PixArtAlphaPipeline)],
)
def test_a_latent_ddpm_run_of_a_stock_pipelines_parts_exports_as_that_pipeline(
    backbone, t5, pipeline_class, tmp_path
) -> None:
    """DDPM on an AutoencoderKL's latents with Stable Diffusion's parts (a UNet attending to
    CLIP's padded sequence) or PixArt-alpha's (its transformer attending to T5's, with the
    mask): the export is diffusers' own StableDiffusionPipeline or PixArtAlphaPipeline folder,
    loaded with nothing of ours, and draws sample.py's images for the same prompts and seeds
    up to the float16 rounding of the prompts' embeddings that training and sample.py apply
    (one level of 255, on a few pixels; the CLIP mask or the steps' offset alone moved them by
    up to 24 and 9 levels). sample.py draws the training grid from it; its card says how."""
    extra = ["--backbone", backbone]
    if t5:
        extra += ["--text-encoder", str(save_tiny_t5(tmp_path / "t5")),
                  "--text-encoder-max-length", "12"]  # fmt: skip
    out = tmp_path / "run"
    train(latent_text_args(out, tmp_path, *extra))
    pipeline = out / "pipeline"
    task = json.loads((pipeline / "task.json").read_text())
    assert task["guidance_interval"] is None  # a text run guides every step, as theirs do
    assert json.loads((pipeline / "model_index.json").read_text())["_class_name"] == (
        pipeline_class.__name__
    )
    pipe = pipeline_class.from_pretrained(pipeline, use_safetensors=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)  # the grids' sampler
    if pipeline_class is StableDiffusionPipeline:
        assert pipe.safety_checker is None and not pipe.config.requires_safety_checker
        assert pipe.tokenizer.model_max_length == 16
        assert not pipe.text_encoder.config.use_attention_mask
        assert pipe.scheduler.config.steps_offset == 1 == task["scheduler_config"]["steps_offset"]
    flags = ["--num-samples=6", "--scheduler=ddim", "--num-steps=3", "--prompt", *PROMPTS]
    ours, _ = sample_py(pipeline, tmp_path / "ours", *flags)
    with (
        Image.open(tmp_path / "ours" / "grid.png") as grid,
        Image.open(out / "samples" / "samples-0000002.png") as training_grid,
    ):
        assert np.array_equal(np.asarray(grid), np.asarray(training_grid))
    call = {"max_sequence_length": 12, "use_resolution_binning": False,
            "clean_caption": False} if t5 else {}  # fmt: skip
    theirs = pipe(PROMPTS * 3, guidance_scale=2.0, num_inference_steps=3, eta=1.0,
                  generator=seeded(range(6)), output_type="np", **call).images  # fmt: skip
    difference = np.abs(levels(theirs) - ours)
    assert difference.max() <= 1 and difference.mean() < 0.01, (difference.max(), difference.mean())
    card = (pipeline / "README.md").read_text()
    name = pipeline_class.__name__
    assert f"from diffusers import {name}" in card and "trust_remote_code" not in card
    assert f"images = pipeline({PROMPTS!r}, guidance_scale=2, num_inference_steps=3, eta=1" in card
    if t5:  # the export holds its encoder: sample.py needs no other copy of it
        shutil.rmtree(tmp_path / "t5")
        again, _ = sample_py(pipeline, tmp_path / "again", *flags)
        assert np.array_equal(again, ours)
        with pytest.raises(InputError, match="give sample.py --text-encoder"):
            sample_py(out / "checkpoints" / "checkpoint-2", tmp_path / "ckpt", *flags)


def test_a_run_of_stable_diffusions_parts_guided_in_an_interval_ships_its_own_pipeline(tmp_path):
    """Stable Diffusion's pipeline guides every step: a run that guides only in an interval
    exports its own pipeline, which applies it and draws sample.py's images; it samples with
    Stable Diffusion's steps' offset all the same (its parts decide that, not a flag that may
    change on resume)."""
    out = tmp_path / "run"
    train(latent_text_args(out, tmp_path, "--sample-guidance-interval", "0.28,5.42"))
    pipeline = out / "pipeline"
    index = json.loads((pipeline / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "GuidedDDPMPipeline"]
    pipe = shipped_pipeline(pipeline)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.config.guidance_interval == [0.28, 5.42]
    ours, _ = sample_py(pipeline, tmp_path / "ours", "--num-samples=2", "--scheduler=ddim",
                        "--num-steps=3", "--prompt", PROMPTS[0])  # fmt: skip
    theirs = pipe(prompt=PROMPTS[0], num_images_per_prompt=2, num_inference_steps=3, eta=1.0,
                  generator=seeded(range(2)), output_type="np").images  # fmt: skip
    assert np.abs(levels(theirs) - ours).max() <= 1
    assert "trust_remote_code=True" in (pipeline / "README.md").read_text()


# --------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_a_killed_text_run_continues_bit_for_bit(text_run, tmp_path) -> None:
    """SIGKILL mid-run (after checkpoint-2, mid accumulation), then the same command: its
    checkpoint-4 is the uninterrupted run's (`text_run`), byte for byte."""
    args = text_args(tmp_path / "run", "--sample-every", "0")
    assert_a_kill_continues_bit_for_bit(text_run, args, tmp_path)


@pytest.mark.slow
def test_two_processes_train_on_text_as_one_does(text_run, clip_model, tmp_path) -> None:
    """Global batch 8 either way (1 process x accumulation 2 x 4, or 2 processes x 4): the
    same text encoder, learning rates and grids' prompts; the grid two processes draw is the
    one one process draws, and so is the CLIP score the two processes' evaluation gives
    (chunk 0 scored on one process, chunk 1 on the other)."""
    args = text_args(tmp_path / "two", *eval_args(clip_model))
    args[args.index("--gradient-accumulation-steps") + 1] = "1"
    log = launch_two_processes(["train_ddpm.py", *args], tmp_path)
    assert "per device 4 x 2 processes x 1 accumulation = global 8" in log
    two = json.loads((tmp_path / "two" / "checkpoints" / "checkpoint-4" / "state.json").read_text())
    one = json.loads((text_run / "checkpoints" / "checkpoint-4" / "state.json").read_text())
    assert two["num_processes"] == 2 and two["text_encoder"] == one["text_encoder"]
    lrs = {}
    for name, folder in (("one", text_run), ("two", tmp_path / "two")):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        lrs[name] = [r["lr"] for r in rows if "lr" in r]
    assert len(lrs["one"]) == 4 and lrs["one"] == lrs["two"]
    assert two["prompts"] == one["prompts"] == PROMPTS
    # The same micro-batches, captions, noise and timesteps (keyed by the micro-batch's place
    # in the stream, not by rank): the one process's weights, up to the order of the sums.
    for name in ("model", "ema"):
        ones = load_file(text_run / "checkpoints" / "checkpoint-4" / f"{name}.safetensors")
        twos = load_file(tmp_path / "two" / "checkpoints" / "checkpoint-4" / f"{name}.safetensors")
        assert ones.keys() == twos.keys()
        gap = max((ones[k] - twos[k]).abs().max().item() for k in ones)
        assert gap < 1e-5, (name, gap)  # 0 here: gloo's sum of two is the accumulated one
    # Its grid, drawn by the two processes (each sampling its share of the prompts' seeds),
    # is what one process draws from its export.
    with Image.open(tmp_path / "two" / "samples" / "samples-0000004.png") as grid:
        expected = np.asarray(grid)
    sample_py(tmp_path / "two", tmp_path / "one", "--num-samples=6", "--scheduler=ddim",
              "--num-steps=3", "--prompt", *PROMPTS, "--batch-size=4", "--clip-model",
              str(clip_model))  # fmt: skip
    with Image.open(tmp_path / "one" / "grid.png") as grid:
        assert np.array_equal(np.asarray(grid), expected)
    (evaluated,) = [row for row in read_metrics(tmp_path / "two" / "metrics.jsonl") if "fid" in row]
    one = json.loads((tmp_path / "one" / "clip_score.json").read_text())
    assert evaluated["clip_score"] == one["clip_score"]
