"""The command line as a newcomer meets it: `--help` of every script, diffusers' flag names,
typos, and `--dry-run` refusing what a real run would refuse."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ddp_utils.config import build_parser, parse_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "train_basic": "BasicConfig",
    "train_ddpm": "DDPMConfig",
    "train_autoencoder": "AutoencoderConfig",
    "sample": "SampleConfig",
    "evaluate": "EvalConfig",
}


def render_help(script: str, flag: str, capsys) -> str:
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main([flag])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_of_every_script_renders(script, flag, capsys):
    text = render_help(script, flag, capsys)
    assert text.startswith("usage: ")
    assert "--dry-run" in text and "--config CONFIG" in text
    module = importlib.import_module(script)
    first_line = module.__doc__.strip().splitlines()[0]
    assert first_line in text  # the description is there
    # Every example line of the description is a line of the help, as written.
    examples = [line for line in module.__doc__.splitlines() if line.startswith("    ")]
    assert examples
    lines = text.splitlines()
    for line in examples:
        assert line.rstrip() in lines, line


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_option_says_its_default_once(script):
    module = importlib.import_module(script)
    parser = build_parser(getattr(module, SCRIPTS[script]), module.__doc__)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.help or action.help == "==SUPPRESS==":
            continue
        text = formatter._expand_help(action)
        assert len(re.findall("default", text, re.IGNORECASE)) <= 1, (action.dest, text)
    if script == "train_ddpm":  # the help whose `%` crashed --help
        assert "99.6% of the time" in " ".join(parser.format_help().split())


def test_a_help_with_a_percent_sign_renders(capsys):
    from dataclasses import dataclass

    from ddp_utils.config import option

    @dataclass
    class Config:
        share: float = option(0.5, "share of the images (50% by default)")

    with pytest.raises(SystemExit):
        parse_config(Config, ["--help"], description="100% of the docs")
    assert "(50% by default)" in capsys.readouterr().out


# diffusers' example flags (train_unconditional.py, train_text_to_image.py): each one and the
# toolkit's value it must give. `{dir}` is an existing folder, `{preset}` a UNet config file.
DIFFUSERS_ALIASES = [
    (["--dataset_name", "mnist"], "dataset", "mnist"),
    (["--train_data_dir", "{dir}"], "dataset", "{dir}"),
    (["--dataset_config_name", "plain_text"], "dataset_config", "plain_text"),
    (["--max_train_samples", "100"], "max_images", 100),
    (["--train_batch_size", "32"], "batch_size", 32),
    (["--max_train_steps", "10"], "max_steps", 10),
    (["--checkpointing_steps", "7"], "checkpoint_every", 7),
    (["--resume_from_checkpoint", "{dir}"], "resume", "{dir}"),
    (["--dataloader_num_workers", "2"], "num_workers", 2),
    (["--adam_weight_decay", "0.01"], "weight_decay", 0.01),
    (["--logger", "tensorboard"], "report_to", "tensorboard"),
    (["--tracker_project_name", "proj"], "wandb_project", "proj"),
    (["--eval_batch_size", "16"], "num_sample_images", 16),
    (["--ddpm_num_steps", "500"], "num_train_timesteps", 500),
    (["--ddpm_beta_schedule", "linear"], "beta_schedule", "linear"),
    (["--snr_gamma", "5"], "min_snr_gamma", 5.0),
    (["--lr_scheduler", "constant_with_warmup"], "lr_schedule", "constant"),
    (["--lr_scheduler=cosine"], "lr_schedule", "cosine"),
    (
        ["--pretrained_model_name_or_path", "google/ddpm-cifar10-32"],
        "init_from",
        "google/ddpm-cifar10-32",
    ),
    (["--model_config_name_or_path", "{preset}"], "preset", "{preset}"),
    (["--ddpm_num_inference_steps", "25"], "sample_steps", 25),
    (["--local_rank", "0"], "max_steps", 4000),  # ignored: the launcher's environment says it
    (["--local_rank=1"], "max_steps", 4000),
    # Already this toolkit's flags with `_` for `-`:
    (["--output_dir", "{dir}"], "output_dir", "{dir}"),
    (["--resolution", "32"], "resolution", 32),
    (["--center_crop"], "center_crop", True),
    (["--random_flip"], "random_flip", True),
    (["--gradient_accumulation_steps", "2"], "gradient_accumulation_steps", 2),
    (["--learning_rate", "1e-4"], "learning_rate", 1e-4),
    (["--lr_warmup_steps", "500"], "lr_warmup_steps", 500),
    (["--use_ema"], "use_ema", True),
    (["--ema_max_decay", "0.999"], "ema_max_decay", 0.999),
    (["--mixed_precision", "bf16"], "mixed_precision", "bf16"),
    (["--prediction_type", "epsilon"], "prediction_type", "epsilon"),
    (["--checkpoints_total_limit", "2"], "checkpoints_total_limit", 2),
    (["--caption_column", "text", "--text_encoder", "tiny-clip"], "caption_column", "text"),
    (
        ["--validation_prompts", "a seven", "the number 7, by hand", "--text_encoder", "tiny-clip"],
        "validation_prompts",
        ["a seven", "the number 7, by hand"],
    ),  # fmt: skip
    (["--seed", "3"], "seed", 3),
    (["--gradient_checkpointing"], "gradient_checkpointing", True),
    (["--max_grad_norm", "0.5"], "max_grad_norm", 0.5),
    (["--report_to", "none"], "report_to", "none"),
    (["--image_column", "img"], "image_column", "img"),
]


@pytest.mark.parametrize(("argv", "field", "expected"), DIFFUSERS_ALIASES)
def test_diffusers_example_flags_set_the_toolkits_field(argv, field, expected, tmp_path):
    import train_ddpm
    from tests.tiny_runs import tiny_preset

    subs = {"{dir}": str(tmp_path), "{preset}": str(tiny_preset(tmp_path))}
    Image.new("L", (8, 8)).save(tmp_path / "image.png")  # {dir} as a --dataset: a folder of images

    def fill(text):
        return subs.get(text, text) if isinstance(text, str) else text

    argv = [fill(a) for a in argv]
    cfg = parse_config(train_ddpm.DDPMConfig, argv)
    assert getattr(cfg, field) == fill(expected)


def refused_diffusers_flags() -> list[str]:
    from ddp_utils.train_config import DIFFUSERS_FLAGS

    return [name for name, f in DIFFUSERS_FLAGS.items() if f.field is None and not f.ignored]


# Every flag of diffusers' examples/unconditional_image_generation/train_unconditional.py and
# examples/text_to_image/train_text_to_image.py (huggingface/diffusers at 58eb52c, 2026-08).
DIFFUSERS_EXAMPLE_FLAGS = """
dataset_name dataset_config_name model_config_name_or_path train_data_dir output_dir
overwrite_output_dir cache_dir resolution center_crop random_flip train_batch_size
eval_batch_size dataloader_num_workers num_epochs save_images_epochs save_model_epochs
gradient_accumulation_steps learning_rate lr_scheduler lr_warmup_steps adam_beta1 adam_beta2
adam_weight_decay adam_epsilon use_ema ema_inv_gamma ema_power ema_max_decay push_to_hub
hub_token hub_model_id hub_private_repo logger logging_dir local_rank mixed_precision
prediction_type ddpm_num_steps ddpm_num_inference_steps ddpm_beta_schedule checkpointing_steps
checkpoints_total_limit resume_from_checkpoint enable_xformers_memory_efficient_attention
preserve_input_precision input_perturbation pretrained_model_name_or_path revision variant
image_column caption_column max_train_samples validation_prompts seed num_train_epochs
max_train_steps gradient_checkpointing scale_lr snr_gamma dream_training
dream_detail_preservation use_8bit_adam allow_tf32 offload_ema foreach_ema non_ema_revision
max_grad_norm report_to noise_offset validation_epochs tracker_project_name
image_interpolation_mode
""".split()
HUB_FLAGS = {"--push_to_hub", "--hub_model_id", "--hub_private_repo"}  # the hub upload's


def test_every_diffusers_example_flag_is_an_alias_or_refused():
    import train_ddpm
    from ddp_utils.train_config import DIFFUSERS_FLAGS

    parser = build_parser(train_ddpm.DDPMConfig)
    tested = {argv[0].partition("=")[0] for argv, _, _ in DIFFUSERS_ALIASES}
    for name in DIFFUSERS_EXAMPLE_FLAGS:
        flag = "--" + name
        if flag in HUB_FLAGS:
            continue
        assert flag in tested or flag in refused_diffusers_flags(), flag
        hyphenated = "--" + name.replace("_", "-")
        assert flag in DIFFUSERS_FLAGS or hyphenated in parser._option_string_actions, flag
    assert set(DIFFUSERS_FLAGS) <= {f"--{n}" for n in DIFFUSERS_EXAMPLE_FLAGS}


def parse_exit(config_class, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(config_class, argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("flag", refused_diffusers_flags())
def test_refused_diffusers_flags_exit_2_and_say_what_to_use(flag, capsys):
    import train_ddpm
    from ddp_utils.train_config import DIFFUSERS_FLAGS

    err = parse_exit(train_ddpm.DDPMConfig, [flag, "3"], capsys)
    assert f"{flag} (a flag of diffusers' training examples) is not supported" in err
    assert DIFFUSERS_FLAGS[flag].note in err


def test_epochs_name_the_steps_flag(capsys):
    import train_ddpm

    err = parse_exit(train_ddpm.DDPMConfig, ["--num_epochs", "10"], capsys)
    assert "counts optimizer steps, not epochs: use --max-steps" in err


def test_a_diffusers_flag_the_script_lacks_names_the_toolkits_flag(capsys):
    from train_basic import BasicConfig

    err = parse_exit(BasicConfig, ["--pretrained_model_name_or_path", "google/x"], capsys)
    assert "--pretrained_model_name_or_path is --init-from in this toolkit" in err


def test_a_scheduler_without_an_equivalent_is_refused(capsys):
    from train_basic import BasicConfig

    err = parse_exit(BasicConfig, ["--lr_scheduler", "polynomial"], capsys)
    assert "--lr_scheduler polynomial has no equivalent here: --lr-schedule takes" in err


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["--push_to_hub"], "push_to_hub", True),
        (["--push_to_hub", "--hub_model_id", "me/model"], "hub_model_id", "me/model"),
        (["--push_to_hub", "--hub_private_repo"], "hub_private", True),
    ],
)
def test_hub_flags_are_the_hub_upload_flags(argv, field, value):
    import train_ddpm

    cfg = parse_config(train_ddpm.DDPMConfig, argv)
    assert getattr(cfg, field) == value


def test_a_note_says_how_a_translated_flag_differs(capsys):
    from train_basic import BasicConfig

    cfg = parse_config(BasicConfig, ["--lr_scheduler", "constant", "--local_rank=0"])
    assert cfg.lr_schedule == "constant"
    err = capsys.readouterr().err
    assert "note: --lr_scheduler is --lr-schedule here: after --lr-warmup-steps" in err
    assert "note: --local_rank is ignored" in err


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["--max-step", "5"], "--max-step (did you mean --max-steps?)"),
        (["--max_step", "5"], "--max_step (did you mean --max-steps?)"),
        (["--learning-rat=0.1"], "--learning-rat=0.1 (did you mean --learning-rate?)"),
        (["--learning", "0.1"], "unrecognized arguments: --learning"),  # no prefix matching
    ],
)
def test_typos_and_abbreviations_are_refused_with_the_closest_flag(argv, suggestion, capsys):
    from train_basic import BasicConfig

    err = parse_exit(BasicConfig, argv, capsys)
    assert suggestion in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--preset", "huge"], "--preset: 'huge' is neither a preset nor a JSON file"),
        (
            ["--preset", "unet-18.5m", "--resolution", "12"],
            "--resolution: must be a positive multiple of 8",
        ),
        (["--dataset", "./no/such/folder"], "--dataset: no such folder ./no/such/folder"),
        (["--log-model", "--report-to", "tensorboard"], "--log-model uploads the exports to wandb"),
        (["--output-dir", str(ROOT / "README.md")], "README.md is a file, not a folder"),
    ],
)
def test_dry_run_refuses_what_a_run_refuses(argv, expected, capsys):
    import train_ddpm

    with pytest.raises(SystemExit) as exit_info:
        train_ddpm.main([*argv, "--dry-run"])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def console_scripts() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return pyproject["project"]["scripts"]


def test_console_scripts_are_the_five_scripts_with_their_exit_codes(monkeypatch, capsys):
    scripts = console_scripts()
    assert set(scripts) == {
        "ddp-train-basic",
        "ddp-train-ddpm",
        "ddp-train-autoencoder",
        "ddp-sample",
        "ddp-evaluate",
    }
    for command, target in scripts.items():
        module_name, _, function = target.partition(":")
        entry = getattr(importlib.import_module(module_name), function)
        monkeypatch.setattr(sys, "argv", [command, "--help"])
        with pytest.raises(SystemExit) as exit_info:
            entry()
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: {command} ")
    monkeypatch.setattr(sys, "argv", ["ddp-train-ddpm", "--batch-size", "0"])
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module("train_ddpm").cli()
    assert exit_info.value.code == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err


def test_the_python_api_trains_a_run_validated_like_the_cli(tmp_path):
    from tests.tiny_runs import NUM_IMAGES, RESOLUTION, fresh_accelerate_state, tiny_preset
    from train_ddpm import DDPMConfig, train

    with pytest.raises(ValueError, match="--preset: 'huge' is neither a preset nor a JSON"):
        DDPMConfig(preset="huge")
    with pytest.raises(ValueError, match="--report-to must be one of"):
        DDPMConfig(report_to="tensorbord")
    fresh_accelerate_state()
    cfg = DDPMConfig(
        output_dir=str(tmp_path / "run"),
        preset=str(tiny_preset(tmp_path)),
        resolution=RESOLUTION,
        max_images=NUM_IMAGES,
        max_steps=2,
        batch_size=8,
        sample_every=0,
        sample_steps=2,
        num_sample_images=4,
        report_to="none",
    )
    run = train(cfg)
    assert run.output_dir == tmp_path / "run"
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()


def test_only_the_toolkits_input_errors_exit_2_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """A user's bad input is one line and exit 2; a ValueError of the toolkit's own code is a
    bug, so it is not dressed up as a typo in a flag: it propagates (traceback, exit 1)."""
    from ddp_utils.cli import cli_main
    from ddp_utils.errors import CheckpointError, InputError

    monkeypatch.delenv("DDP_DIFFUSION_DEBUG", raising=False)
    for error, line in (
        (InputError("must be >= 1, got 0", "batch_size"), "error: --batch-size: must be >= 1, got 0"),
        (CheckpointError("runs/x/checkpoint-3/state.json is damaged"),
         "error: runs/x/checkpoint-3/state.json is damaged"),
    ):  # fmt: skip

        def refused(error: Exception = error) -> None:
            raise error

        with pytest.raises(SystemExit) as exit_info:
            cli_main(refused)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == line + "\n"
    for bug in (ValueError("chunk size must be >= 1, got 0"), FileNotFoundError("cache.npz")):

        def broken(bug: Exception = bug) -> None:
            raise bug

        with pytest.raises(type(bug)):
            cli_main(broken)
    # As a script's process: a traceback and exit 1.
    done = subprocess.run(
        [sys.executable, "-c", "from ddp_utils.cli import cli_main; cli_main(lambda: int('x'))"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "DDP_DIFFUSION_DEBUG"},
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "invalid literal for int()" in done.stderr
