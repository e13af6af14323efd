"""The command line as a newcomer meets it: `--help` of every script, diffusers' flag names,
typos, and `--dry-run` refusing what a real run would refuse."""

from __future__ import annotations

import importlib
import re

import pytest

from ddp_utils.config import build_parser, parse_config

SCRIPTS = {
    "train_basic": "BasicConfig",
    "train_ddpm": "DDPMConfig",
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
    assert "99.8%" in parser.format_help().replace("\n", " ").replace("  ", " ") or (
        script != "train_ddpm"
    )


def test_a_help_with_a_percent_sign_renders(capsys):
    from dataclasses import dataclass

    from ddp_utils.config import option

    @dataclass
    class Config:
        share: float = option(0.5, "share of the images (50% by default)")

    with pytest.raises(SystemExit):
        parse_config(Config, ["--help"], description="100% of the docs")
    assert "(50% by default)" in capsys.readouterr().out
