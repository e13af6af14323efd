"""DreamBooth (Ruiz et al. 2022) as a recipe on a pipeline's fine-tune (full or LoRA): the
subject's images all captioned by one instance prompt ("a photo of sks dog"), and optionally
prior preservation: images of the subject's class drawn once by the base pipeline itself
(`diffusion.class_images`), trained on beside them so that the fine-tune keeps what the base
knew of the class.

With prior preservation every micro-batch holds as many class examples as instance examples
(`ddp_utils.data.batches.Batch.prior`, drawn from their own generator) and the loss is, as in
diffusers' train_dreambooth.py, the instance examples' mean plus `--prior-loss-weight` times
the class examples' mean (`prior_preservation_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ddp_utils.config import option, require

SECTION = "DreamBooth (--init-from a text-to-image pipeline)"
DEFAULT_NUM_CLASS_IMAGES = 100  # diffusers' train_dreambooth.py's
DEFAULT_PRIOR_LOSS_WEIGHT = 1.0  # diffusers' train_dreambooth.py's


@dataclass
class DreamBoothOptions:
    """DreamBooth's section of the training config."""

    instance_prompt: str | None = option(
        None,
        "caption every image of --dataset with this prompt (DreamBooth's instance prompt, "
        "e.g. 'a photo of sks dog': a rare token for the subject, and its class); the data's "
        "own captions, if any, are not read",
        section=SECTION,
    )
    class_prompt: str | None = option(
        None,
        "prior preservation: the base pipeline draws --num-class-images images of this prompt "
        "once, before training (e.g. 'a photo of a dog'; stored in the run directory's "
        "class_images/, reused on resume), and every batch trains on as many of them as on "
        "the data's images",
        section=SECTION,
    )
    num_class_images: int | None = option(
        None,
        f"with --class-prompt: how many class images the base draws (default: "
        f"{DEFAULT_NUM_CLASS_IMAGES})",
        section=SECTION,
    )
    prior_loss_weight: float | None = option(
        None,
        "with --class-prompt: the loss is the instance images' plus this times the class "
        f"images' (default: {DEFAULT_PRIOR_LOSS_WEIGHT:g})",
        section=SECTION,
    )

    def check_dreambooth_options(self, pipeline: str | None) -> None:
        """Refuse what cannot work (named with its fix); fill the class defaults."""
        require(
            self.instance_prompt is None or self.instance_prompt.strip() != "",
            "--instance-prompt is blank: give the prompt every image is captioned with",
        )
        require(
            self.instance_prompt is None or pipeline is not None,
            "--instance-prompt captions --dataset's images to fine-tune a text-to-image "
            "pipeline: give --init-from a pipeline folder or hub id",
        )
        require(
            self.instance_prompt is None or getattr(self, "caption_column", None) is None,
            "--instance-prompt and --caption-column both give the captions: keep "
            "--instance-prompt (every image gets it) or --caption-column (the data's own)",
        )
        if self.class_prompt is None:
            for name in ("num_class_images", "prior_loss_weight"):
                require(
                    getattr(self, name) is None,
                    f"--{name.replace('_', '-')} applies to prior preservation: add "
                    "--class-prompt (the prompt the base draws the class images of), or drop it",
                )
            return
        require(
            self.class_prompt.strip() != "",
            "--class-prompt is blank: give the prompt of the subject's class",
        )
        require(
            pipeline is not None,
            "--class-prompt has the base pipeline draw class images: give --init-from a "
            "pipeline folder or hub id",
        )
        if self.num_class_images is None:
            self.num_class_images = DEFAULT_NUM_CLASS_IMAGES
        if self.prior_loss_weight is None:
            self.prior_loss_weight = DEFAULT_PRIOR_LOSS_WEIGHT
        require(
            self.num_class_images >= 1,
            f"--num-class-images must be >= 1, got {self.num_class_images}",
        )
        require(
            self.prior_loss_weight >= 0,
            f"--prior-loss-weight must be >= 0, got {self.prior_loss_weight}",
        )


def prior_preservation_weights(
    num_instance: int, num_class: int, prior_loss_weight: float, device: torch.device
) -> torch.Tensor:
    """Per-sample weights w of a batch of `num_instance` instance examples, then `num_class`
    class examples, such that mean(w * loss) = mean(instance losses) + prior_loss_weight *
    mean(class losses): diffusers' train_dreambooth.py's loss."""
    total = num_instance + num_class
    return torch.cat([
        torch.full((num_instance,), total / num_instance, device=device),
        torch.full((num_class,), prior_loss_weight * total / num_class, device=device),
    ])  # fmt: skip


def dreambooth_facts(cfg: Any) -> dict[str, Any]:
    """What task.json records of the recipe ({}: not a DreamBooth run)."""
    facts = {"instance_prompt": getattr(cfg, "instance_prompt", None),
             "class_prompt": getattr(cfg, "class_prompt", None)}  # fmt: skip
    if facts["class_prompt"] is not None:
        facts.update(num_class_images=cfg.num_class_images,
                     prior_loss_weight=cfg.prior_loss_weight)  # fmt: skip
    return {k: v for k, v in facts.items() if v is not None}


def dreambooth_fact(cfg: Any) -> str:
    """What the model card says of the recipe ("": not a DreamBooth run)."""
    facts, parts = dreambooth_facts(cfg), []
    if "instance_prompt" in facts:
        parts.append(f"every training image captioned {facts['instance_prompt']!r}")
    if "class_prompt" in facts:
        parts.append(
            f"prior preservation: {facts['num_class_images']} images of "
            f"{facts['class_prompt']!r} drawn by the base, weight {facts['prior_loss_weight']:g}"
        )
    return "; ".join(parts)
