"""DreamBooth on a Stable Diffusion fine-tune (`--instance-prompt`, `--class-prompt`): the
instance prompt is every image's caption; the class images are drawn once by the base pipeline
(as sample.py draws it), stored in the run directory and reused; every batch holds as many
class examples, and the loss is the instance loss plus W times the class loss.

The base is test_finetune_pipelines' tiny random StableDiffusionPipeline; the instance images
three 8x8 RGB pictures in a folder whose own captions the instance prompt replaces. Each run
is a 4-step LoRA fine-tune (test_finetune_pipelines' sd_args)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

import train_ddpm
from ddp_utils.errors import InputError
from diffusion.class_images import CLASS_IMAGES_DIR, RECORD_FILE, class_images_seed
from tests.test_finetune_pipelines import PROMPTS, sd_args, stock_images, tiny_sd
from tests.test_text_runs import sample_py, train

INSTANCE = "a photo of sks square"
CLASS = "a photo of a square"
NUM_CLASS = 4
LORA = ["--lora-rank", "4", "--learning-rate", "1e-2"]
PRIOR = ["--class-prompt", CLASS, "--num-class-images", str(NUM_CLASS)]


def image_folder(folder: Path, caption: str) -> Path:
    """Three random 8x8 RGB images, captioned `caption` by a metadata.jsonl."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for k in range(3):
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{k}.png")
        lines.append(json.dumps({"file_name": f"{k}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def dreambooth_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return sd_args(base, out, "--dataset", str(data), "--sample-every", "0", *LORA, *extra)


def adapter(run: Path, step: int = 4, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"checkpoint-{step}" / f"{name}.safetensors")


def class_pngs(run: Path) -> np.ndarray:
    folder = run / CLASS_IMAGES_DIR
    return np.stack([np.asarray(Image.open(folder / f"{k:06d}.png")) for k in range(NUM_CLASS)])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_sd(tmp_path_factory.mktemp("sd") / "base")


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    """The instance images, captioned otherwise: the instance prompt replaces their captions."""
    return image_folder(tmp_path_factory.mktemp("subject") / "images", "a red square")


@pytest.fixture(scope="module")
def prior_run(base, subject, tmp_path_factory) -> Path:
    """DreamBooth with prior preservation, W = 1 (the default)."""
    out = tmp_path_factory.mktemp("dreambooth") / "run"
    train(dreambooth_args(base, subject, out, "--instance-prompt", INSTANCE, *PRIOR))
    return out


@pytest.fixture(scope="module")
def plain_run(base, subject, tmp_path_factory) -> Path:
    """DreamBooth without prior preservation."""
    out = tmp_path_factory.mktemp("dreambooth-plain") / "run"
    train(dreambooth_args(base, subject, out, "--instance-prompt", INSTANCE))
    return out


def test_the_class_images_are_the_bases_drawn_once_for_the_run(base, prior_run, tmp_path):
    """The class images in the run directory are what sample.py draws from the base pipeline
    with the recorded prompt, seed, sampler and guidance (the run drew them in one batch of
    4, sample.py here in batches of 2: an image depends on its seed alone, which is what lets
    processes share the drawing)."""
    record = json.loads((prior_run / CLASS_IMAGES_DIR / RECORD_FILE).read_text())
    assert record["prompt"] == CLASS and record["num_images"] == NUM_CLASS
    assert record["seed"] == class_images_seed(0) != 0  # not the grids' seeds
    assert record["base"]["source"] == str(base) and "sample.py" in record["command"]
    drawn, _ = sample_py(
        base, tmp_path / "drawn", "--prompt", CLASS, f"--num-samples={NUM_CLASS}",
        f"--seed={record['seed']}", f"--scheduler={record['sampler']}",
        f"--num-steps={record['num_steps']}", f"--eta={record['eta']}",
        f"--guidance-scale={record['guidance_scale']}", "--batch-size=2",
    )  # fmt: skip
    assert np.array_equal(class_pngs(prior_run), drawn)
    assert drawn.std() > 0  # pictures, not a blank


def test_the_prior_term_is_in_the_loss(base, subject, prior_run, plain_run, tmp_path):
    """W = 0 trains the adapter that no prior preservation trains (the class examples' draws
    come from their own generator: the instance examples are drawn alike; the one forward pass
    over both sums otherwise, hence a tolerance); W = 1 another. The W = 0 run reuses the class
    images it finds in its run directory (its own drawing would be the same) instead of drawing
    them."""
    out = tmp_path / "w0"
    shutil.copytree(prior_run / CLASS_IMAGES_DIR, out / CLASS_IMAGES_DIR)
    stamps = [p.stat().st_mtime_ns for p in sorted((out / CLASS_IMAGES_DIR).iterdir())]
    train(dreambooth_args(base, subject, out, "--instance-prompt", INSTANCE, *PRIOR,
                          "--prior-loss-weight", "0"))  # fmt: skip
    assert stamps == [p.stat().st_mtime_ns for p in sorted((out / CLASS_IMAGES_DIR).iterdir())]
    zero, one, none = adapter(out), adapter(prior_run), adapter(plain_run)
    assert zero.keys() == one.keys() == none.keys()
    assert max((zero[k] - none[k]).abs().max().item() for k in zero) < 1e-4
    assert max((zero[k] - one[k]).abs().max().item() for k in zero) > 1e-2
    rows = [json.loads(line) for line in (prior_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert len(losses) == 4  # loss = instance loss + 1 * prior loss, each the mean of its half
    for r in losses:
        assert r["loss"] == pytest.approx(r["instance_loss"] + r["prior_loss"], rel=1e-5)


def test_the_instance_prompt_is_the_caption_trained_on(base, subject, plain_run, tmp_path):
    """--instance-prompt on images captioned otherwise trains what those images captioned by
    the instance prompt train, bit for bit."""
    recaptioned = image_folder(tmp_path / "images", INSTANCE)
    out = tmp_path / "run"
    train(dreambooth_args(base, recaptioned, out))
    for name in ("model", "ema", "optimizer"):
        ours, theirs = adapter(plain_run, name=name), adapter(out, name=name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(v, theirs[k]) for k, v in ours.items()), name


def test_a_resumed_run_reuses_its_class_images_and_ends_bit_identical(
    base, subject, prior_run, tmp_path
) -> None:
    """Stopped at step 2, then the same command: the class images are read back, not drawn
    again, and checkpoint-4 is the uninterrupted run's. A resume asking for other class images
    is refused, naming the flags and the fix. (The first part, without --validation-prompts,
    which may change on resume: its grids' rows are the instance and class prompts.)"""
    args = dreambooth_args(base, subject, tmp_path / "run", "--instance-prompt", INSTANCE, *PRIOR)
    prompts = args.index("--validation-prompts")
    train([*args[:prompts], *args[prompts + 1 + len(PROMPTS) :], "--max-steps", "2"])
    task = json.loads((tmp_path / "run" / "pipeline" / "task.json").read_text())
    assert task["prompts"] == [INSTANCE, CLASS]
    assert task["dreambooth"] == {"instance_prompt": INSTANCE, "class_prompt": CLASS,
                                  "num_class_images": NUM_CLASS, "prior_loss_weight": 1.0}  # fmt: skip
    card = (tmp_path / "run" / "pipeline" / "README.md").read_text()
    assert f"every training image captioned '{INSTANCE}'" in card
    assert f"prior preservation: {NUM_CLASS} images of '{CLASS}' drawn by the base" in card
    folder = tmp_path / "run" / CLASS_IMAGES_DIR
    stamps = [p.stat().st_mtime_ns for p in sorted(folder.iterdir())]
    train(args)
    assert stamps == [p.stat().st_mtime_ns for p in sorted(folder.iterdir())]
    for name in ("model", "ema", "optimizer"):
        ours, theirs = adapter(prior_run, name=name), adapter(tmp_path / "run", name=name)
        assert all(torch.equal(v, theirs[k]) for k, v in ours.items()), name
    for flags, named in ((["--class-prompt", "a photo of a circle"], "--class-prompt: "),
                         (["--num-class-images", "5"], "--num-class-images: 4 there, 5 now")):  # fmt: skip
        with pytest.raises(InputError, match="drawn otherwise than this run asks") as refused:
            train([*args, "--max-steps", "6", *flags])
        assert named in str(refused.value) and "--resume none" in str(refused.value)


def test_the_lora_export_loads_onto_the_base(base, prior_run, tmp_path) -> None:
    """diffusers' StableDiffusionPipeline with load_lora_weights draws what sample.py draws
    from the export (the training grid's prompts and seeds), and not what the base draws."""
    ours, _ = sample_py(prior_run / "pipeline", tmp_path / "ours", "--num-samples=4",
                        "--scheduler=ddim", "--num-steps=3", "--eta=0", "--guidance-scale=2",
                        "--prompt", *PROMPTS)  # fmt: skip
    pipeline = StableDiffusionPipeline.from_pretrained(base, use_safetensors=True)
    before = stock_images(pipeline, base)
    pipeline.load_lora_weights(prior_run / "pipeline")
    after = stock_images(pipeline, base)
    assert np.abs(after - ours).max() <= 1
    assert np.abs(after - before).max() > 5


def test_dreambooth_flags_are_refused_where_they_cannot_work(base, subject, tmp_path, capsys):
    for argv, message in (
        (["--instance-prompt", INSTANCE], "--instance-prompt captions --dataset's images to "
         "fine-tune a text-to-image pipeline: give --init-from"),
        ([f"--init-from={base}", "--instance-prompt", INSTANCE, "--caption-column", "text"],
         "--instance-prompt and --caption-column both give the captions"),
        (["--class-prompt", CLASS], "--class-prompt has the base pipeline draw class images: "
         "give --init-from"),
        ([f"--init-from={base}", "--num-class-images", "4"], "--num-class-images applies to "
         "prior preservation: add --class-prompt"),
        ([f"--init-from={base}", "--prior-loss-weight", "0.5"], "--prior-loss-weight applies "
         "to prior preservation: add --class-prompt"),
        ([f"--init-from={base}", *PRIOR[:2], "--num-class-images", "0"],
         "--num-class-images must be >= 1, got 0"),
        ([f"--init-from={base}", *PRIOR, "--prior-loss-weight", "-1"],
         "--prior-loss-weight must be >= 0, got -1.0"),
        ([f"--init-from={base}", *PRIOR, "--sharding", "fsdp"],
         "prior preservation (--class-prompt) under --sharding fsdp is not supported yet"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as stopped:
            train_ddpm.main([*argv, "--dry-run"])
        assert stopped.value.code == 2
        assert message in capsys.readouterr().err, argv
    # Data of another size than the base draws: refused before any class image is drawn.
    out = tmp_path / "run"
    with pytest.raises(InputError, match="draws 3-channel 8x8 images .* pass --resolution 8"):
        train(dreambooth_args(base, subject, out, *PRIOR, "--resolution", "16"))
    assert not (out / CLASS_IMAGES_DIR).exists()
