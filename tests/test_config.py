"""The command line and config files, as a user meets them: errors, precedence, --dry-run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import train_basic
import train_ddpm
from ddp_utils.config import parse_config, save_config, to_dict
from diffusion.kinds.registry import kind_named
from train_basic import BasicConfig

REPO = Path(__file__).resolve().parents[1]


def parse(argv: list[str]) -> BasicConfig:
    return parse_config(BasicConfig, argv)


def parse_error(argv: list[str], capsys) -> str:
    """Parse `argv`, which must fail with exit code 2; return what was printed on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_cli_bad_value_exits_2_naming_the_flag():
    result = subprocess.run(
        [sys.executable, "train_basic.py", "--batch-size", "0", "--output-dir", "unused"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--batch-size must be >= 1, got 0" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (REPO / "unused").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--mixed-precision", "fp8"], ["--mixed-precision", "fp8", "'no', 'fp16', 'bf16'"]),
        (["--model", "big"], ["--model", "'basic', 'unet'"]),
        (["--max-steps", "ten"], ["--max-steps", "invalid int value: 'ten'"]),
        (["--max-steps", "0"], ["--max-steps must be >= 1, got 0"]),
        (["--channels", "2"], ["--channels must be 1 or 3, got 2"]),
        (["--learning-rate", "3"], ["--learning-rate must be in (0, 1), got 3.0"]),
        (["--resolution", "18"], ["--resolution must be divisible by 4", "got 18"]),
        (["--resume", "/no/such/checkpoint"], ["--resume must be latest, none or an existing"]),
        (["--checkpoints-total-limit", "0"], ["--checkpoints-total-limit must be >= 1 or none"]),
        (["--center-crop", "maybe"], ["unrecognized arguments: maybe"]),
    ],
)
def test_bad_values_name_the_flag_and_what_is_allowed(argv, expected, capsys):
    err = parse_error(argv, capsys)
    for text in expected:
        assert text in err


def test_yaml_and_json_config_files_set_fields_and_flags_win(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "# a comment\nbatch-size: 8\nlearning_rate: 0.01\nmodel: unet\nmax_grad_norm: null\n"
        "center_crop: false\nweight_decay: 1e-4\n"  # YAML reads 1e-4 as a string
    )
    cfg = parse(["--config", str(yaml_file)])
    assert (cfg.batch_size, cfg.learning_rate, cfg.model) == (8, 0.01, "unet")
    assert cfg.max_grad_norm is None and cfg.center_crop is False
    assert cfg.weight_decay == 1e-4
    assert cfg.max_steps == BasicConfig().max_steps  # untouched fields keep their defaults

    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"batch_size": 8, "max_steps": 7, "weight_decay": 1}))
    cfg = parse(["--config", str(json_file), "--batch-size", "3", "--no-center-crop"])
    assert cfg.batch_size == 3  # the flag overrides the file
    assert cfg.max_steps == 7 and cfg.center_crop is False
    assert cfg.weight_decay == 1.0 and isinstance(cfg.weight_decay, float)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("batch_sise: 8\n", ["run.yaml", "unknown field(s) batch_sise", "did you mean batch_size"]),
        ("model: big\n", ["--model must be one of basic, unet", "'big'"]),
        ("report_to: tensorboardx\n", ["--report-to must be one of wandb, tensorboard, all, none"]),
        ("batch_size: many\n", ["--batch-size: expected int, got 'many'"]),
        ("max_steps: yes\n", ["--max-steps: expected int, got True"]),
        ("center_crop: maybe\n", ["--center-crop: expected true or false"]),
        ("resolution: 18\n", ["--resolution must be divisible by 4"]),
        ("max_steps: 3.7\n", ["--max-steps: expected a whole number, got 3.7"]),
        ("- a list\n", ["must hold a mapping"]),
        ("batch_size: [1\n", ["does not parse"]),
    ],
)
def test_config_file_errors_name_the_field(tmp_path, capsys, text, expected):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(text)
    err = parse_error(["--config", str(config_file)], capsys)
    for part in expected:
        assert part in err


def test_whole_floats_in_a_config_file_are_ints(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("max_steps: 3.0\n")
    cfg = parse(["--config", str(config_file)])
    assert cfg.max_steps == 3 and isinstance(cfg.max_steps, int)


def test_underscore_flags_are_accepted_like_diffusers_examples():
    cfg = parse(["--batch_size", "5", "--max_grad_norm=none", "--no-center_crop"])
    assert (cfg.batch_size, cfg.max_grad_norm, cfg.center_crop) == (5, None, False)


@pytest.mark.parametrize(
    ("script", "argv", "expected"),
    [
        ("train_ddpm", ["--beta-schedule", "cosine"], "'squaredcos_cap_v2', 'linear', 'scaled"),
        ("train_ddpm", ["--prediction-type", "x0"], "'epsilon', 'v_prediction', 'sample'"),
        ("train_ddpm", ["--data-loading", "disk"], "'auto', 'memory', 'stream'"),
        ("sample", ["runs", "--scheduler", "euler-karras-x"], "'ddpm', 'ddim', 'dpm-solver'"),
    ],
)
def test_choices_of_every_script_are_checked_at_the_command_line(script, argv, expected, capsys):
    module = __import__(script)
    config_class = {"train_ddpm": "DDPMConfig", "sample": "SampleConfig"}[script]
    with pytest.raises(SystemExit) as exit_info:
        parse_config(getattr(module, config_class), argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[-2]}: invalid choice" in err and expected in err


def test_the_linear_schedules_take_their_end_points(capsys):
    """--beta-start and --beta-end set the linear schedules' betas (Stable Diffusion's
    scaled_linear 0.00085..0.012); the cosine schedule has none; a resolved config file,
    holding the defaults, parses again."""
    argv = ["--beta-schedule", "scaled_linear", "--beta-start", "0.00085", "--beta-end", "0.012"]
    cfg = parse_config(train_ddpm.DDPMConfig, argv)
    betas = kind_named(cfg.objective, "test").train_scheduler(cfg).betas
    assert torch.allclose(betas, torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    default = parse_config(train_ddpm.DDPMConfig, [])
    assert (default.beta_start, default.beta_end) == (0.0001, 0.02)
    assert parse_config(train_ddpm.DDPMConfig, ["--beta-start", "0.0001"]).beta_start == 0.0001
    for argv, message in (
        (["--beta-start", "0.001"], "--beta-start applies to the linear and scaled_linear "
         "schedules; the cosine one (squaredcos_cap_v2) has no end points"),
        (["--beta-schedule", "linear", "--beta-start", "0.1", "--beta-end", "0.01"],
         "--beta-start (0.1) must be below --beta-end (0.01)"),
        (["--beta-schedule", "linear", "--beta-end", "1.5"], "--beta-end must be in (0, 1)"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            parse_config(train_ddpm.DDPMConfig, argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_missing_config_file(tmp_path, capsys):
    err = parse_error(["--config", str(tmp_path / "nope.yaml")], capsys)
    assert "nope.yaml does not exist" in err


def test_dry_run_prints_resolved_yaml_and_creates_nothing(tmp_path, capsys):
    out_dir = tmp_path / "run"
    config_file = tmp_path / "c.json"
    config_file.write_text('{"max_steps": 11}')
    with pytest.raises(SystemExit) as exit_info:
        train_basic.main(
            ["--config", str(config_file), "--dry-run", "--output-dir", str(out_dir), "--seed", "5"]
        )
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = to_dict(BasicConfig(max_steps=11, output_dir=str(out_dir), seed=5))
    # Not given: what the run takes from the data (the built-in digits: 16x16, grayscale).
    assert printed == {**expected, "resolution": 16, "channels": 1}
    assert not out_dir.exists()


def test_saved_config_reproduces_the_run(tmp_path):
    cfg = parse(["--batch-size", "5", "--model", "unet", "--max-grad-norm", "none"])
    save_config(cfg, tmp_path / "config.yaml")
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left
    assert parse(["--config", str(tmp_path / "config.yaml")]) == cfg


@pytest.mark.parametrize(
    ("flag", "launcher", "expected"), [(None, "bf16", "bf16"), ("no", "bf16", "no")]
)
def test_mixed_precision_defers_to_the_launcher_unless_given(
    tmp_path, monkeypatch, flag, launcher, expected
) -> None:
    """No --mixed-precision: `accelerate launch --mixed_precision bf16` (or its config) wins."""
    from ddp_utils.distributed import make_accelerator
    from tests.tiny_runs import fresh_accelerate_state

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)  # what accelerate launch exports
    fresh_accelerate_state()
    try:
        accelerator = make_accelerator(flag, 1, "none", str(tmp_path), 0)
        assert accelerator.mixed_precision == expected
    finally:
        fresh_accelerate_state()


def test_each_kind_lists_its_options_in_its_own_help_section(capsys):
    import train_ddpm

    with pytest.raises(SystemExit):
        train_ddpm.main(["--help"])
    help_text = capsys.readouterr().out
    ddpm = help_text.index("DDPM objective (--objective ddpm")
    edm = help_text.index("EDM objective (--objective edm")
    classes = help_text.index("Class-conditional generation")
    assert help_text.index("--prediction-type", ddpm) < min(p for p in (edm, classes) if p > ddpm)
    assert help_text.index("--p-mean", edm) > edm
    assert "DDPM: " not in help_text and "EDM: " not in help_text  # no flat-namespace prefixes


def test_a_resolved_config_is_frozen():
    import train_ddpm

    cfg = parse_config(train_ddpm.DDPMConfig, ["--max-steps", "10"])
    cfg.max_steps = 20  # still being resolved
    cfg.freeze()
    with pytest.raises(AttributeError, match="frozen: max_steps cannot change"):
        cfg.max_steps = 30
    assert cfg.max_steps == 20
