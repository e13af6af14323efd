"""The model card (`README.md`) every export carries, ready for `huggingface_hub.upload_folder`.

Made with huggingface_hub's own card tools (`ModelCard`, `ModelCardData`): the YAML metadata
the hub reads (library, tags, datasets, FID as an eval result) and a page for people: what was
trained on what data for how long, the sampler to use, the FID if it was measured, a sample
grid, and the lines that load it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from PIL import Image

CARD_FILE = "README.md"
GRID_FILE = "samples.png"
GRID_CAPTION = "Samples from fixed seeds at the end of training."

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

| | |
|---|---|
{% for name, value in facts %}| {{ name }} | {{ value }} |
{% endfor %}
{% if grid %}![samples](samples.png)

{{ grid_caption }}
{% endif %}
## {% if generates %}Sampling{% else %}Use{% endif %}

{{ sampler }}

```python
{{ how_to_load }}
```

Made with ddp-diffusion (`{{ script }}`){% if generates %}; its `python sample.py <this folder>` samples it too{% endif %}.
"""


@dataclass
class CardFacts:
    """What a card says; the training loop and the method fill it in."""

    title: str
    summary: str  # one paragraph: what the model is
    script: str  # the training script that made it: train_ddpm.py, train_basic.py, ...
    sampler: str  # the sampler recommended for it, and why
    how_to_load: str  # Python lines that load and sample it
    facts: list[tuple[str, str]] = field(default_factory=list)  # training facts, a table
    dataset: str | None = None  # a hub id, for the metadata's `datasets`
    fid: float | None = None  # the best FID measured during training, if any
    fid_samples: int | None = None
    tags: list[str] = field(default_factory=list)
    class_conditional: bool = False  # the hub's task: class-conditional or unconditional
    text_to_image: bool = False  # ... or text-to-image
    generates: bool = True  # a generative model (sample.py samples it), not an autoencoder
    grid_caption: str = GRID_CAPTION  # what the grid shows (a text model's: its prompts)


def hub_task(card: CardFacts) -> str:
    """The task the card names. The hub's pipeline tags have unconditional image generation
    and text-to-image but no class-conditional one (class-conditional cards such as DiT's
    carry none)."""
    if card.class_conditional:
        return "class-conditional-image-generation"
    if card.text_to_image:
        return "text-to-image"
    return "unconditional-image-generation"


def write_model_card(folder: Path, card: CardFacts, grid: np.ndarray | None) -> None:
    """README.md (and samples.png when a grid is given) into an export folder."""
    eval_results = None
    if card.fid is not None:
        eval_results = [
            EvalResult(
                task_type=hub_task(card),
                dataset_type=card.dataset or "custom",
                dataset_name=card.dataset or "training data",
                metric_type="fid",
                metric_name=f"FID ({card.fid_samples} samples)",
                metric_value=round(card.fid, 4),
            )
        ]
    data = ModelCardData(
        library_name="diffusers",
        tags=["diffusion", "ddp-diffusion", *card.tags]
        + ([hub_task(card)] if card.class_conditional else []),
        datasets=[card.dataset] if card.dataset else None,
        eval_results=eval_results,
        model_name=card.title,
        pipeline_tag=None if card.class_conditional or not card.generates else hub_task(card),
    )
    if grid is not None:
        Image.fromarray(grid).save(folder / GRID_FILE)
    ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        title=card.title,
        summary=card.summary,
        facts=card.facts,
        grid=grid is not None,
        grid_caption=card.grid_caption,
        generates=card.generates,
        sampler=card.sampler,
        how_to_load=card.how_to_load,
        script=card.script,
    ).save(folder / CARD_FILE)
