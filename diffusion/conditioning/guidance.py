"""Classifier-free guidance's settings (any condition source), and conditioning's section of
the training config.

The guidance itself (one batched forward of [condition, "no condition"], the projection of the
clean estimate) is in `diffusion/pipeline_code/core.py`, shipped with exports.
"""

from __future__ import annotations

from dataclasses import dataclass

from ddp_utils.config import option, require
from ddp_utils.errors import InputError

# Guidance (w > 1) only at noise levels sigma in (low, high]: EDM2's interval (Kynkaanniemi
# et al. 2024). On the digits at w = 4 it took the DiT's FID from 1.67x w = 1's to 1.40x.
DEFAULT_GUIDANCE_INTERVAL = "0.28,5.42"
# A text run's default: every step, as diffusers' text-to-image pipelines (Stable Diffusion's,
# PixArt's) guide, so that its export in one of them draws the run's grids.
TEXT_GUIDANCE_INTERVAL = "all"
SECTION = "Class-conditional generation, and guidance (classifier-free, Ho & Salimans 2022)"


@dataclass(frozen=True)
class Guidance:
    """The guidance scale w of a model's samples and the noise levels where w > 1 applies."""

    scale: float = 1.0
    interval: tuple[float, float] | None = None  # None: every step

    def describe(self) -> str:
        where = (
            "every step"
            if self.interval is None
            else f"noise levels sigma in ({self.interval[0]:g}, {self.interval[1]:g}]"
        )
        return f"default scale {self.scale} at {where}"


NO_GUIDANCE = Guidance()


@dataclass
class ConditioningOptions:
    """Conditioning's section of the training config."""

    class_conditional: bool = option(
        False,
        "train on the dataset's class labels (digits, MNIST, CIFAR-10, an image folder with one "
        "subfolder per class) and sample with classifier-free guidance",
        section=SECTION,
    )
    label_dropout: float = option(
        0.1, "share of labels replaced by 'no class' (what guidance needs)", section=SECTION
    )
    sample_guidance_scale: float = option(
        1.5,
        "guidance w of the grids and --eval-every, stored in the export, of a "
        "class-conditional or text run (0: unconditional, 1: conditional, > 1: more like the "
        "class or prompt; 1.5 measured best on class-conditional digits: FID as w = 1, the "
        "asked class 99.6% of the time)",
        section=SECTION,
    )
    sample_guidance_interval: str | None = option(
        None,
        "noise levels 'LOW,HIGH' (sigma in (LOW, HIGH]) where w > 1 applies, the conditional "
        "output elsewhere (Kynkaanniemi et al. 2024), stored in the export; 'all': every step; "
        f"default: {DEFAULT_GUIDANCE_INTERVAL} for --class-conditional, {TEXT_GUIDANCE_INTERVAL} "
        "for --text-encoder (as diffusers' text-to-image pipelines guide)",
        section=SECTION,
    )

    def is_conditional(self) -> bool:
        """Class labels, or text (--text-encoder, the text section's, when the config has it)."""
        return self.class_conditional or getattr(self, "text_encoder", None) is not None

    def check_conditioning_options(self) -> None:
        if self.sample_guidance_interval is not None:
            parse_guidance_interval(self.sample_guidance_interval, "sample_guidance_interval")
        require(
            0 <= self.label_dropout < 1,
            f"--label-dropout must be in [0, 1), got {self.label_dropout}",
        )
        require(
            self.sample_guidance_scale >= 0,
            f"--sample-guidance-scale must be >= 0, got {self.sample_guidance_scale}",
        )
        # Flags that would do nothing are refused.
        require(
            self.class_conditional or self.label_dropout == 0.1,
            "--label-dropout applies to --class-conditional runs only (a text run drops "
            "captions: --caption-dropout): add --class-conditional, or drop it",
        )
        if not self.is_conditional():
            for name, defaults in (
                ("sample_guidance_scale", (1.5,)),
                # the value older runs' config files hold
                ("sample_guidance_interval", (None, DEFAULT_GUIDANCE_INTERVAL)),
            ):  # fmt: skip
                require(
                    getattr(self, name) in defaults,
                    f"--{name.replace('_', '-')} applies to --class-conditional and "
                    "--text-encoder runs only: add one, or drop it",
                )
        elif self.sample_guidance_interval is None:  # the default, now the kind is known
            text = getattr(self, "text_encoder", None) is not None
            self.sample_guidance_interval = (
                TEXT_GUIDANCE_INTERVAL if text else DEFAULT_GUIDANCE_INTERVAL
            )

    def guidance(self) -> Guidance:
        """The guidance of the run's grids and export (none for an unconditional run)."""
        if not self.is_conditional():
            return NO_GUIDANCE
        assert self.sample_guidance_interval is not None, "check_conditioning_options sets it"
        interval = parse_guidance_interval(
            self.sample_guidance_interval, "sample_guidance_interval"
        )
        return Guidance(self.sample_guidance_scale, interval)


def parse_guidance_interval(text: str, flag: str) -> tuple[float, float] | None:
    """'LOW,HIGH' -> (low, high) with 0 <= low < high; 'all' -> None (every step)."""
    if text.strip().lower() == "all":
        return None
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise InputError(
            f"takes 'LOW,HIGH' (noise levels, e.g. 0.28,5.42) or 'all'; got {text!r}", flag
        ) from None
    if not 0 <= low < high:
        raise InputError(f"needs 0 <= LOW < HIGH; got {text!r}", flag)
    return low, high
