"""The CLIP score (`evaluation.clip_score`, --clip-model) with a tiny random CLIPModel built from
its config (nothing downloaded): torchmetrics' definition, 100 * max(cos, 0), computed by hand
for known image/text pairs; the set's mean; what a folder must hold. Its use in a text run
(at --eval-every, 1 vs 2 processes) and in sample.py is in tests/test_text_runs.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from ddp_utils.errors import InputError
from diffusion.text_encoders import tiny_clip
from evaluation.clip_score import ChunkScores, clip_score, load_clip_scorer

CLIP_SIZE = 32  # the tiny model's input: 32x32 images in 8x8 patches


def save_tiny_clip_model(folder: Path) -> Path:
    """A CLIPModel of width 32 (2 layers each side, 16-d embeddings) with tiny-clip's word-level
    tokenizer and an image processor for 32x32 inputs, saved as a hub folder holds one."""
    _, tokenizer = tiny_clip()
    vocab = tokenizer.get_vocab()
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(**tower, vocab_size=len(vocab), max_position_embeddings=16,
                         bos_token_id=vocab[tokenizer.bos_token],
                         eos_token_id=vocab[tokenizer.eos_token],
                         pad_token_id=vocab[tokenizer.pad_token]),
        vision_config=dict(**tower, image_size=CLIP_SIZE, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    crop = {"height": CLIP_SIZE, "width": CLIP_SIZE}
    CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE}, crop_size=crop).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return save_tiny_clip_model(tmp_path_factory.mktemp("clip") / "tiny-clip-model")


TEXTS = ["a handwritten seven", "the digit two", "a small gray image of a 3", "seven",
         "the number 9, written by hand", "an image of the digit 0"]  # fmt: skip


def test_the_score_of_known_pairs_is_100_times_their_clamped_cosine(clip_folder) -> None:
    """By hand: the images normalised with CLIP's mean and std (they are at the model's input
    size: the processor's resize and crop leave them as they are), both towers through the
    model's forward, the cosine of its normalised embeddings; torchmetrics' 100 * max(cos, 0)."""
    scorer = load_clip_scorer(str(clip_folder))
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (len(TEXTS), 3, CLIP_SIZE, CLIP_SIZE), generator=generator,
                           dtype=torch.uint8)  # fmt: skip
    mean = torch.tensor(scorer.image_processor.image_mean)[:, None, None]
    std = torch.tensor(scorer.image_processor.image_std)[:, None, None]
    tokens = scorer.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(pixel_values=(images / 255.0 - mean) / std, **tokens)
    cosine = (out.image_embeds * out.text_embeds).sum(-1)
    assert (cosine < 0).any() and (cosine > 0).any()  # both sides of the clamp are exercised
    expected = 100 * cosine.clamp(min=0)
    scores = scorer.scores(images, TEXTS)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-4)
    assert (scores[cosine < 0] == 0).all()
    # The set's score is the mean of its pairs', in chunks or whole, on one process.
    score = clip_score(images, lambda items: TEXTS[items.start : items.stop], scorer, None, 4)
    assert score == pytest.approx(float(expected.double().mean()), rel=1e-5)
    # Images made on the fly and scored as they pass, chunk by chunk: the same number.
    chunks = ChunkScores(scorer, lambda items: TEXTS[items.start : items.stop])
    generate = chunks.wrap(lambda items: images[items.start : items.stop])
    for items in (range(0, 4), range(4, 6)):
        assert torch.equal(generate(items), images[items.start : items.stop])
    assert chunks.mean(None, len(TEXTS), 4) == score
    # A grayscale image is scored as the same gray in R, G and B; an 8x8 one is resized.
    gray = images[:2, :1]
    assert torch.equal(scorer.scores(gray, TEXTS[:2]), scorer.scores(gray.repeat(1, 3, 1, 1),
                                                                      TEXTS[:2]))  # fmt: skip
    small = scorer.scores(torch.from_numpy(np.full((2, 1, 8, 8), 200, np.uint8)), TEXTS[:2])
    assert small.shape == (2,) and torch.isfinite(small).all()
    with pytest.raises(ValueError, match="2 images and 3 texts"):
        scorer.scores(gray, TEXTS[:3])


def test_a_clip_model_folder_must_hold_a_clip_model_in_safetensors(clip_folder, tmp_path) -> None:
    encoder, tokenizer = tiny_clip()  # a text model alone: no image tower
    encoder.save_pretrained(tmp_path / "text")
    tokenizer.save_pretrained(tmp_path / "text")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for path in clip_folder.iterdir():
        if path.suffix != ".safetensors":
            (pickled / path.name).write_bytes(path.read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    no_processor = tmp_path / "no-processor"
    no_processor.mkdir()
    for path in clip_folder.iterdir():
        if path.name != "preprocessor_config.json":
            (no_processor / path.name).write_bytes(path.read_bytes())
    for spec, message in (
        (tmp_path / "text", "holds a CLIPTextModel .*the CLIP score needs a CLIPModel"),
        (pickled, r"has no safetensors weights \(pytorch_model.bin is a pickle"),
        (no_processor, "holds no preprocessor_config.json"),
        (tmp_path / "missing", "does not exist: give a local folder holding a transformers "
                               "CLIPModel"),
        ("openai/no-such-clip", "the hub is offline here"),
    ):  # fmt: skip
        with pytest.raises(InputError, match=message) as raised:
            load_clip_scorer(str(spec))
        assert raised.value.field == "clip_model"
