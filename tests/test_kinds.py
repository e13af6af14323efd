"""Kinds describe themselves: the registry is the only place outside a kind's package that names
it, the scripts' flags come from the registry, and what a kind declares is consistent.

A new formulation is its package `diffusion/kinds/<name>/` and its name in the registry's
import line (diffusion/kinds/__init__.py); `test_no_module_outside_a_kinds_package_names_it`
fails when code elsewhere switches on a kind's name.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest

import sample
import train_ddpm
from diffusion.drawing import SampleConfig
from diffusion.kinds import KINDS, kinds_trained_by
from diffusion.kinds.registry import all_knobs, all_samplers, choose_sampler
from diffusion.networks import BACKBONES

REPO = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {".venv", "tests", "bench", ".git", "runs", "build"}
# Where a kind's name may appear as a string, besides its own package and the registry.
ALLOWED = {
    # The basic model's own script; "basic" also names its network (BasicUNet), a backbone.
    "basic": {"train_basic.py", "diffusion/networks/__init__.py", "diffusion/networks/basic.py"},
}


def python_files() -> list[Path]:
    return [p for p in REPO.rglob("*.py") if not SKIPPED_DIRS & set(p.relative_to(REPO).parts)]


def names_in(path: Path, names: set[str]) -> list[tuple[str, int]]:
    """(kind name, line) of every string literal equal to a kind's name, and every import of a
    kind's package, in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and node.value in names:
            found.append((node.value, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[:2] == ["diffusion", "kinds"] and len(parts) > 2 and parts[2] in names:
                found.append((parts[2], node.lineno))
            if node.module == "diffusion.kinds":
                found += [(a.name, node.lineno) for a in node.names if a.name in names]
    return found


def test_no_module_outside_a_kinds_package_names_it() -> None:
    names = set(KINDS)
    registry = {"diffusion/kinds/registry.py", "diffusion/kinds/__init__.py"}
    offences = []
    for path in python_files():
        rel = str(path.relative_to(REPO))
        for name, line in names_in(path, names):
            own = rel.startswith(f"diffusion/kinds/{name}/")
            if not own and rel not in registry and rel not in ALLOWED.get(name, set()):
                offences.append(f"{rel}:{line} names the kind {name!r}")
    assert not offences, "\n".join(offences)


def test_the_check_finds_a_kind_named_outside_its_package(tmp_path: Path) -> None:
    """The check above can fail: a comparison with a kind's name and an import of its package
    are both found."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from diffusion.kinds.edm import EDM\ndef f(cfg):\n    return cfg.objective == 'edm'\n"
    )
    assert names_in(bad, set(KINDS)) == [("edm", 1), ("edm", 3)]


def test_the_scripts_flags_come_from_the_registry() -> None:
    trained = [kind.name for kind in kinds_trained_by("train_ddpm.py")]
    assert list(typing.get_args(train_ddpm.Objective)) == trained
    assert set(typing.get_args(train_ddpm.SamplerName)) == set(all_samplers())
    scheduler = typing.get_type_hints(SampleConfig)["scheduler"]  # SamplerName | None
    literal = next(a for a in typing.get_args(scheduler) if a is not type(None))
    assert set(typing.get_args(literal)) == set(all_samplers())
    assert sample.SampleConfig is SampleConfig
    fields = {f.name for f in dataclasses.fields(train_ddpm.DDPMConfig)}
    for kind in kinds_trained_by("train_ddpm.py"):
        assert {f.name for f in dataclasses.fields(kind.options)} <= fields, kind.name
    for knob in all_knobs():
        assert f"sample_{knob}" in fields
        assert knob in {f.name for f in dataclasses.fields(SampleConfig)}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_each_kind_declares_a_consistent_description(name: str) -> None:
    kind = KINDS[name]
    assert kind.name == name and kind.summary and kind.trained_by in (
        "train_ddpm.py", "train_basic.py",
    )  # fmt: skip
    if kind.samplers:
        assert kind.default_sampler in kind.samplers
        for sampler_name, sampler in kind.samplers.items():
            assert sampler.name == sampler_name and sampler.default_steps >= 1
            choice = choose_sampler(kind, sampler_name, None, {}, source="test")
            assert choice.steps == sampler.default_steps
            assert set(choice.knobs) <= {knob.name for knob in sampler.knobs}
    if kind.options is not None:
        for field in dataclasses.fields(kind.options):
            assert field.metadata["section"], (name, field.name)
            assert field.metadata["help"], (name, field.name)


def test_every_backbone_has_a_unique_class_and_a_known_component() -> None:
    classes = [b.network_class for b in BACKBONES.values()]
    assert len(set(classes)) == len(classes)
    assert {b.component for b in BACKBONES.values()} <= {"unet", "transformer"}
    for backbone in BACKBONES.values():
        if backbone.default_preset is not None:
            assert backbone.default_preset in backbone.presets
            assert backbone.build is not None and backbone.check_preset is not None
