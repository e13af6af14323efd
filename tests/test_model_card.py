"""Every export carries a model card (README.md + samples.png) the hub reads as one."""

from __future__ import annotations

import json

import numpy as np
from huggingface_hub import ModelCard
from PIL import Image

from tests.tiny_runs import (
    GLOBAL_BATCH,
    MAX_STEPS,
    RESOLUTION,
    trained_basic,
    trained_ddpm,
    trained_edm,
)


def read_card(folder) -> ModelCard:
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers"
    return card


def test_a_ddpm_export_card_says_what_how_long_and_how_to_load(tmp_path_factory):
    run = trained_ddpm(tmp_path_factory)
    card = read_card(run / "pipeline")
    assert "ddpm" in card.data.tags
    assert card.data.pipeline_tag == "unconditional-image-generation"
    text = card.text
    assert f"| optimizer steps | {MAX_STEPS} |" in text
    assert f"| global batch | {GLOBAL_BATCH} (1 process(es) x 4 x 2 accumulation) |" in text
    assert (
        "| precision | fp32 |" in text
        and "predict the velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 at one of 1000"
        in text
    )
    assert 'DDPMPipeline.from_pretrained("path/to/this/folder"' in text
    assert "FID" not in text and card.data.eval_results is None  # none was measured
    # The grid of the last logged samples, upscaled to a viewable size without smoothing.
    grid = np.asarray(Image.open(run / "pipeline" / "samples.png"))
    assert max(grid.shape[:2]) >= 512
    assert (grid[:, 1:] == grid[:, :-1]).mean() > 0.75  # pixels repeated, not interpolated


def test_an_edm_card_reports_the_fid_measured_in_training(tmp_path_factory):
    run = trained_edm(tmp_path_factory)
    best = json.loads((run / "best" / "fid.json").read_text())
    for folder in (run / "pipeline", run / "best"):
        card = read_card(folder)
        (result,) = card.data.eval_results
        assert result.metric_type == "fid" and result.metric_value == round(best["fid"], 4)
        assert f"{best['fid']:.2f} at step {best['step']}" in card.text
        assert "trust_remote_code=True" in card.text and "edm" in card.data.tags
        assert (folder / "samples.png").is_file()


def test_a_basic_export_card_names_its_sampler(tmp_path_factory):
    card = read_card(trained_basic(tmp_path_factory) / "model")
    assert f"{RESOLUTION}x{RESOLUTION} image blended with uniform noise" in card.text
    assert "sample.py <folder> --num-steps N" in card.text
