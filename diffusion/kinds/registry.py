"""What a model kind is to the rest of the toolkit, and the registry every script reads.

A kind is a training formulation with everything that depends on it, in one package
`diffusion/kinds/<name>/`: its math, its config section and validation, its fine-tune and
resume rules, its training method (loss, pictures, export, model card), its samplers with their
defaults and knobs, and its shipped pipeline. The network is a separate axis (any backbone of
`diffusion.networks` works with any kind that takes one), and so is the condition.

`task.json`, a checkpoint's state and an export's folder record the kind's name; the scripts
build `--objective`, the option sections, `--sample-scheduler`/`--scheduler` and the sampler
knobs' flags from here, and loading, `sample.py` and `--init-from` look the kind up here
instead of switching on its name. Nothing outside a kind's folder and this registry names a
kind (tests/test_kinds.py checks it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ddp_utils.config import option
from ddp_utils.errors import InputError
from diffusion.codecs import LatentCodec
from diffusion.pipeline_code.core import Condition
from diffusion.sampling import Draw

# (batch size, device) -> the "no condition" of a batch (a condition source's `null`).
NullCondition = Callable[[int, torch.device | str], Condition | None]


# The kind a new train_ddpm.py run trains when --objective is not given, and the kind a folder
# diffusers wrote (a DDPMPipeline or UNet2DModel folder, without task.json) is taken for.
DEFAULT_OBJECTIVE = "ddpm"
DIFFUSERS_FOLDER_KIND = "ddpm"


@dataclass(frozen=True)
class Knob:
    """A sampler's number a user may set: sample.py's `--<name>`, training's `--sample-<name>`."""

    name: str
    default: float | None  # None: the model's own value (its scheduler config's)
    help: str
    low: float = 0.0  # allowed: low <= value <= high
    high: float = math.inf

    def check(self, value: float, flag: str) -> None:
        """Refuse a value out of range (or not finite), naming the flag."""
        if not (math.isfinite(value) and self.low <= value <= self.high):
            bounds = f">= {self.low:g}" if self.high == math.inf else (
                f"in [{self.low:g}, {self.high:g}]")  # fmt: skip
            raise InputError(f"{flag} must be {bounds}, got {value}")


@dataclass(frozen=True)
class Sampler:
    """A sampler of a kind: its name, steps when none are given, and its knobs."""

    name: str
    default_steps: int
    knobs: tuple[Knob, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class SamplerChoice:
    """A sampler of a kind, its steps and its knobs' values (those it has, defaults filled)."""

    name: str | None
    steps: int
    knobs: Mapping[str, float] = field(default_factory=dict)

    def knob(self, name: str, default: float = 0.0) -> float:
        return float(self.knobs.get(name, default))


class Kind(Protocol):
    """What every kind declares (`diffusion/kinds/<name>/__init__.py` registers one)."""

    name: str  # what task.json records and --objective names
    summary: str  # one line: what the network learns (--objective's help)
    trained_by: str  # the script that trains it: "train_ddpm.py" or "train_basic.py"
    value_range: tuple[float, float]
    samplers: Mapping[str, Sampler]  # what --scheduler may name (empty: one unnamed sampler)
    default_sampler: str | None
    options: type | None  # its section of the training config (a dataclass of option fields)

    def sampler(
        self,
        net: nn.Module,
        scheduler_config: Mapping[str, Any] | None,
        choice: SamplerChoice,
        *,
        seed: int,
        shape: tuple[int, int, int],
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        null: NullCondition | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        compile: tuple[str, str] | None = None,
        codec: LatentCodec | None = None,
    ) -> Draw:
        """Draw samples of run `seed` from `net` (sample k depends only on (seed, k)), guided
        with scale w against the "no condition" of the draw's batch (`null`: the condition
        source's) at the noise levels in `guidance_interval` (None: every step). `compile`: (backend, mode) to torch.compile the denoiser with. `codec`: a
        latent model's; `shape` is then the latents' and the draw returns decoded images."""
        ...


class NetworkKind(Kind, Protocol):
    """A kind train_ddpm.py trains: a network of any backbone, exported as a pipeline."""

    def check_options(self, cfg: Any) -> None:
        """Validate this kind's section of a config that chose it (InputError naming flags)."""
        ...

    def leave_unused(self, cfg: Any) -> None:
        """A config that chose another kind: refuse this kind's options given, and fill the
        values its section records when unused (what configs have always recorded)."""
        ...

    def take_from_model(self, cfg: Any, scheduler_config: Mapping[str, Any], source: str) -> None:
        """Fine-tune and resume: fill the options not given from a trained model's scheduler
        config (--init-from's, or a resumed checkpoint's), refusing a contradiction."""
        ...

    def resolve(
        self,
        cfg: Any,
        checkpoint_state: Mapping[str, Any] | None,
        data_std: float,
        data_shape: tuple[int, int, int],
    ) -> None:
        """Fill the options still unset once the data is known (`data_std` and `data_shape`:
        the standard deviation and (C, H, W) of what the network denoises, pixels or scaled
        latents)."""
        ...

    def train_scheduler(self, cfg: Any) -> Any:
        """The export's scheduler, its config carrying what the sampler needs."""
        ...

    def method(self, run: Any, scheduler: Any, backbone: Any, codec: LatentCodec | None) -> Any:
        """The training method the loop runs (loss, pictures, export, card)."""
        ...


KINDS: dict[str, Kind] = {}

# Exports of this toolkit that hold no diffusion model, by the task their task.json records:
# what the folder is and what to do with it. Sampling and --init-from refuse them with this.
AUTOENCODER_TASK = "autoencoder"
NOT_DIFFUSION_MODELS: dict[str, str] = {
    AUTOENCODER_TASK: (
        "an autoencoder (a diffusers AutoencoderKL, from train_autoencoder.py), not a diffusion "
        "model: it encodes and decodes images but does not generate them. Give it to a latent "
        "diffusion run as --vae <folder>, or load it with AutoencoderKL.from_pretrained"
    ),
}


def register(kind: Kind) -> Kind:
    if kind.name in KINDS:
        raise ValueError(f"two kinds are named {kind.name!r}")
    KINDS[kind.name] = kind
    return kind


def kind_named(name: str | None, source: object) -> Kind:
    """The kind a model folder, checkpoint or task.json records; unknown names are refused, and
    so are the toolkit's exports that are not diffusion models (saying what to do instead)."""
    import diffusion.kinds  # noqa: F401  (registers every kind)

    if name in NOT_DIFFUSION_MODELS:
        raise InputError(f"{source} holds {NOT_DIFFUSION_MODELS[name]}")
    if name not in KINDS:
        raise InputError(
            f"{source} holds a model of unknown kind {name!r}; this toolkit knows "
            f"{', '.join(KINDS)} (a newer toolkit's export?)"
        )
    return KINDS[name]


def kinds_trained_by(script: str) -> list[Kind]:
    """The kinds a training script trains, in registration order."""
    import diffusion.kinds  # noqa: F401  (registers every kind)

    return [kind for kind in KINDS.values() if kind.trained_by == script]


def all_samplers() -> dict[str, Sampler]:
    """Every kind's samplers by name (a name two kinds share: the same sampler on each)."""
    import diffusion.kinds  # noqa: F401  (registers every kind)

    return {name: s for kind in KINDS.values() for name, s in kind.samplers.items()}


def all_knobs() -> dict[str, Knob]:
    """Every sampler knob by name (the first sampler's declaration names its help)."""
    knobs: dict[str, Knob] = {}
    for sampler in all_samplers().values():
        for knob in sampler.knobs:
            knobs.setdefault(knob.name, knob)
    return knobs


def choose_sampler(
    kind: Kind,
    name: str | None,
    steps: int | None,
    knobs: Mapping[str, float | None],
    *,
    source: object,
    flag: Callable[[str], str] = lambda name: f"--{name.replace('_', '-')}",
    scheduler_flag: str = "--scheduler",
    steps_flag: str = "--num-steps",
    scheduler_config: Mapping[str, Any] | None = None,
) -> SamplerChoice:
    """A kind's sampler, its steps and knobs from what a user gave (None: not given): the
    kind's default sampler, the sampler's default steps and knob values. A sampler of another
    kind, a knob the sampler does not have, a value out of its range, or more steps than the
    sampler can take with the model's `scheduler_config` (the kind's `step_limit`, e.g. a DDPM
    model's training timesteps) are refused, naming the flag."""
    given = {k: v for k, v in knobs.items() if v is not None}
    if steps is not None and steps < 1:
        raise InputError(f"{steps_flag} must be >= 1, got {steps}")
    if not kind.samplers:  # a kind with one sampler (the basic model)
        if name is not None or given:
            asked = [scheduler_flag] * (name is not None) + [flag(k) for k in given]
            raise InputError(
                f"{kind.name} models ({source}) have one sampler, without knobs: drop "
                f"{', '.join(asked)} (only the number of steps can be set)"
            )
        return SamplerChoice(None, steps or default_steps(kind, None))
    name = name or kind.default_sampler
    if name not in kind.samplers:
        raise InputError(
            f"{scheduler_flag} {name} does not sample {kind.name} models ({source}); use one of "
            f"{', '.join(kind.samplers)}"
        )
    sampler = kind.samplers[name]
    own = {knob.name: knob for knob in sampler.knobs}
    values = {}
    for knob_name, value in given.items():
        if knob_name not in own:
            takers = [
                s.name for s in kind.samplers.values() if knob_name in {k.name for k in s.knobs}
            ]
            where = f"{scheduler_flag} {', '.join(takers)}" if takers else "no sampler of this kind"
            raise InputError(f"{flag(knob_name)} applies to {where}; the sampler is {name}")
        own[knob_name].check(value, flag(knob_name))
        values[knob_name] = float(value)
    for knob in sampler.knobs:
        if knob.default is not None:
            values.setdefault(knob.name, knob.default)
    num_steps = steps or sampler.default_steps
    step_limit = getattr(kind, "step_limit", None)
    limit = None if step_limit is None else step_limit(name, scheduler_config or {})
    if limit is not None and num_steps > limit:
        raise InputError(
            f"{steps_flag} {num_steps} is more than {name} can take: the model was trained "
            f"with {limit} timesteps; give at most {limit}"
        )
    return SamplerChoice(name, num_steps, values)


def default_steps(kind: Kind, sampler: str | None) -> int:
    """Steps of a kind's sampler when none are given."""
    if not kind.samplers:
        return kind.default_steps  # type: ignore[attr-defined]
    return kind.samplers[sampler or kind.default_sampler].default_steps


def knob_options(prefix: str, what: str) -> type:
    """A config section of one optional float field per sampler knob of every kind (`prefix` +
    its name, e.g. sample.py's --eta, training's --sample-eta): a knob added to a sampler gets
    its flag in every script. None: the chosen sampler's default."""
    fields = []
    for knob in all_knobs().values():
        takers = []
        for kind in KINDS.values():
            names = [n for n, s in kind.samplers.items() if knob.name in {k.name for k in s.knobs}]
            takers += [f"{kind.name}'s {', '.join(names)}"] if names else []
        own = "the model's" if knob.default is None else f"{knob.default:g}"
        where = f" {what}" if what else ""
        help = f"{knob.help}{where}; samplers: {'; '.join(takers)}; none: {own}"
        fields.append((prefix + knob.name, float | None, option(None, help)))
    return dataclasses.make_dataclass("SamplerKnobs", fields)
