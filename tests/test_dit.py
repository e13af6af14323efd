"""The DiT backbone: sizes as in the paper, its init, label handling the toolkit relies on
(no hidden label dropout, a "no class" row), export and loading back, and the stock pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from diffusion.networks import count_parameters
from diffusion.networks.dit import (
    DIT_PRESETS,
    PAPER_PARAMETERS,
    build_dit,
    check_dit_preset,
    null_class,
    num_classes,
    paper_parameter_count,
    prepare_dit,
)

# The paper's code logs `DiT Parameters: N` (its train.py), counting its frozen sin-cos position
# table too. XL/2 675,129,632 and S/2 32,963,360: as logged by runs of the official train.py
# that ports of it publish (XL/2 also quoted for SiT-XL/2, the same network). B/2 and L/2:
# counted from the official models.py definition (no published log found). All four round to
# Table 4's figures.
OFFICIAL_CODE_PARAMETERS = {
    "dit-s-2": 32_963_360,
    "dit-b-2": 130_512_416,
    "dit-l-2": 458_102_816,
    "dit-xl-2": 675_129_632,
}
# diffusers' own counts at the paper's setting (one embedder per block), pinned.
DIFFUSERS_PARAMETERS = {
    "dit-s-2": 39_805_088,
    "dit-b-2": 147_439_904,
    "dit-l-2": 511_609_888,
    "dit-xl-2": 749_826_464,
}


def digits_dit(classes: int = 10) -> DiTTransformer2DModel:
    """dit-digits with every weight nudged off the adaLN-Zero init, so labels and timesteps
    change the output (a fresh DiT outputs 0 whatever it is fed)."""
    torch.manual_seed(0)
    model = build_dit("dit-digits", resolution=16, channels=1, num_classes=classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def batch(size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(size, 1, 16, 16, generator=generator)
    t = torch.rand(size, generator=generator) * 999  # float timesteps, one per image
    labels = torch.randint(0, 10, (size,), generator=generator)
    return x, t, labels


def test_fresh_dit_outputs_exactly_zero() -> None:
    torch.manual_seed(0)
    model = build_dit("dit-digits", resolution=16, channels=1, num_classes=10)
    x, t, labels = batch()
    assert torch.equal(model(x, t, labels).sample, torch.zeros_like(x))
    # adaLN-Zero: the modulation is zero, the rest is not.
    assert not model.transformer_blocks[0].norm1.linear.weight.any()
    assert model.transformer_blocks[0].attn1.to_q.weight.any()


def test_forward_returns_images_shaped_like_the_input() -> None:
    model = digits_dit()
    x, t, labels = batch(3)
    assert model(x, t, labels).sample.shape == (3, 1, 16, 16)
    # The timestep must be a 1-D tensor; a 0-d one trips diffusers' assert (the toolkit's
    # adapter expands it to (B,)), and labels are required even for an unconditional DiT.
    with pytest.raises(AssertionError, match="1d"):
        model(x, torch.tensor(500.0), labels)
    with pytest.raises((AttributeError, TypeError)):
        model(x, t, None)


def test_train_mode_forward_is_deterministic_whatever_the_global_seed() -> None:
    model = digits_dit().train()
    x, t, labels = batch(16)
    torch.manual_seed(1)
    first = model(x, t, labels).sample
    torch.manual_seed(2)
    assert torch.equal(model(x, t, labels).sample, first)
    # Without prepare_dit, diffusers drops labels by itself from the global RNG.
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.1
    torch.manual_seed(2)
    assert not torch.equal(model(x, t, labels).sample, first)


def test_the_no_class_row_learns_from_null_labels() -> None:
    model = digits_dit().train()
    x, t, _ = batch()
    null = torch.full((len(x),), null_class(model))
    model(x, t, null).sample.square().mean().backward()
    for block in model.transformer_blocks:
        grad = block.norm1.emb.class_embedder.embedding_table.weight.grad
        assert grad[null_class(model)].abs().sum() > 0
        assert not grad[: null_class(model)].any()


def test_class_helpers_and_an_unconditional_dit() -> None:
    model = prepare_dit(prepare_dit(digits_dit()))  # idempotent
    assert (num_classes(model), null_class(model)) == (10, 10)
    for block in model.transformer_blocks:
        labels = block.norm1.emb.class_embedder
        assert (labels.dropout_prob, labels.embedding_table.num_embeddings) == (0.0, 11)
    unconditional = digits_dit(classes=0)
    assert (num_classes(unconditional), null_class(unconditional)) == (1, 1)
    x, t, _ = batch(2)
    assert unconditional(x, t, torch.zeros(2, dtype=torch.long)).sample.shape == x.shape


def test_export_loads_back_with_identical_outputs(tmp_path: Path) -> None:
    model = digits_dit().train()
    model.save_pretrained(tmp_path / "dit")
    assert (tmp_path / "dit" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path / "dit")
    # Loading brings diffusers' label dropout back: prepare_dit again, then train mode matches.
    assert loaded.transformer_blocks[0].norm1.emb.class_embedder.dropout_prob == 0.1
    loaded = prepare_dit(loaded).train()
    x, t, labels = batch()
    assert torch.equal(loaded(x, t, labels).sample, model(x, t, labels).sample)


def test_dit_digits_size() -> None:
    with torch.device("meta"):
        model = build_dit("dit-digits", resolution=16, channels=1, num_classes=10)
    assert count_parameters(model) == 828_964


@pytest.mark.parametrize("preset", list(PAPER_PARAMETERS))
def test_parameter_counts_match_the_paper(preset: str) -> None:
    # The paper's setting: 256x256 images as 32x32x4 latents, 1000 classes, learned sigma.
    with torch.device("meta"):  # no memory, no init cost
        model = build_dit(preset, resolution=32, channels=4, num_classes=1000, out_channels=8)
    assert count_parameters(model) == DIFFUSERS_PARAMETERS[preset]
    paper = paper_parameter_count(model)
    assert abs(paper - PAPER_PARAMETERS[preset]) <= 0.005 * PAPER_PARAMETERS[preset]
    num_patches = (32 // 2) ** 2
    assert paper + num_patches * model.inner_dim == OFFICIAL_CODE_PARAMETERS[preset]


def write_preset(config: dict, path: Path) -> Path:
    path.write_text(json.dumps(config))
    return path


def test_paper_count_is_the_count_with_one_shared_embedder(tmp_path: Path) -> None:
    three_blocks = write_preset({**DIT_PRESETS["dit-digits"], "num_layers": 3}, tmp_path / "d.json")
    model = build_dit(str(three_blocks), resolution=8, channels=4, num_classes=7)
    expected = paper_parameter_count(model)
    for block in model.transformer_blocks[1:]:  # share block 0's embedder, as the paper does
        block.norm1.emb = model.transformer_blocks[0].norm1.emb
    assert count_parameters(model) == expected


def architecture(config) -> dict:
    """Config entries that define the network (diffusers' "_" bookkeeping left out)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_exported_config_is_a_preset_and_the_data_sets_the_size(tmp_path: Path) -> None:
    with torch.device("meta"):
        exported = build_dit("dit-digits", resolution=32, channels=3, num_classes=5)
        path = write_preset(dict(exported.config), tmp_path / "config.json")
        model = build_dit(str(path), resolution=16, channels=1, num_classes=10)
        reference = build_dit("dit-digits", resolution=16, channels=1, num_classes=10)
    assert architecture(model.config) == architecture(reference.config)


def test_bad_presets_and_resolutions_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--preset: must be one of dit-digits, dit-s-2"):
        check_dit_preset("dit-s/2", 32)
    path = write_preset({**DIT_PRESETS["dit-digits"], "num_layer": 3}, tmp_path / "dit.json")
    with pytest.raises(ValueError, match="--preset: .*num_layer"):
        check_dit_preset(str(path), 16)
    with pytest.raises(ValueError, match="--resolution: must be a positive multiple of the patch"):
        check_dit_preset("dit-digits", 15)
    assert check_dit_preset("dit-digits", None) == DIT_PRESETS["dit-digits"]


def test_a_latent_class_conditional_export_runs_in_dit_pipeline(tmp_path: Path) -> None:
    torch.manual_seed(0)
    # 1000 classes: DiTPipeline's guidance feeds the "no class" label 1000.
    dit = build_dit("dit-digits", resolution=8, channels=4, num_classes=1000, out_channels=8)
    vae = AutoencoderKL(
        block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8
    )
    DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler()).save_pretrained(tmp_path)
    pipe = DiTPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([3, 999], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 3)
