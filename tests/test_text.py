"""Text conditioning: text encoders through transformers (tiny ones built from configs, nothing
downloaded), the text cache encoded once and keyed by the encoder, and the text condition
source (one caption drawn per step, caption dropout to the empty prompt, reproducibly)."""

from __future__ import annotations

import inspect
import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from accelerate import Accelerator
from diffusers import (
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from huggingface_hub import constants
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from ddp_utils.data import MemoryBatches, load_image_data
from ddp_utils.data import text_cache as text_cache_module
from ddp_utils.data.source import DIGIT_HELD_OUT_PHRASINGS, digit_captions
from ddp_utils.data.text_cache import load_text_embeddings
from ddp_utils.distributed import step_generator
from diffusion.conditioning import condition_source
from diffusion.conditioning import text as text_module
from diffusion.conditioning.text import TextCondition, TextOptions, encode_prompts
from diffusion.pipeline_code.core import guided_output, network_output
from diffusion.pretrained import run_text
from diffusion.text_encoders import (
    TINY_CLIP,
    check_resumed_text_encoder,
    fingerprint_of,
    load_text_encoder,
    text_encoder_changes,
    tiny_clip,
)


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder(TINY_CLIP)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    cache = tmp_path_factory.mktemp("images")
    return load_image_data("digits-captioned", 16, 1, cache_dir=cache, max_images=40,
                           with_captions=True)  # fmt: skip


class Counting:
    """An encoder counting the captions it encodes; raises at call `stop_at`."""

    def __init__(self, encoder, stop_at: int | None = None) -> None:
        self.encoder, self.fingerprint, self.stop_at = encoder, encoder.fingerprint, stop_at
        self.calls, self.encoded = 0, []

    def encode(self, texts):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        self.encoded += texts
        return self.encoder.encode(texts)

    def facts(self):
        return self.encoder.facts()


def save_tiny_clip(folder: Path, layout: str = "flat") -> Path:
    model, tokenizer = tiny_clip()
    model_folder = folder / "text_encoder" if layout == "pipeline" else folder
    model.save_pretrained(model_folder)
    tokenizer.save_pretrained(folder / "tokenizer" if layout == "pipeline" else folder)
    return folder


# --------------------------------------------------------------------------- encoders


def test_the_built_in_encoder_spells_each_word_as_one_token_and_is_reproducible(encoder):
    tokenizer = encoder.tokenizer
    for text in digit_captions(7) + digit_captions(7, DIGIT_HELD_OUT_PHRASINGS):
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
        words = text.replace(",", " , ").split()
        assert tokens[1:-1] == [f"{w}</w>" for w in words], tokens
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    # The same weights every time, and the run's global RNG is left as it was.
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    again = load_text_encoder(TINY_CLIP)
    assert torch.equal(torch.rand(3), expected)
    assert again.fingerprint == encoder.fingerprint
    # Distinct phrasings give distinct embeddings (random, frozen weights), the same text the
    # same one.
    texts = digit_captions(7) + digit_captions(3) + [digit_captions(7)[0]]
    hidden, pooled, mask = encoder.encode(texts)
    assert hidden.shape == (13, 16, 32) and pooled.shape == (13, 32) and mask.shape == (13, 16)
    flat = hidden.flatten(1)
    assert torch.equal(flat[0], flat[-1])
    assert torch.cdist(flat[:-1], flat[:-1]).add(torch.eye(12)).min() > 0.1


def test_a_folder_or_pipeline_folder_loads_the_same_encoder(encoder, tmp_path):
    texts = ["a handwritten seven", "the digit two"]
    expected = encoder.encode(texts)
    for layout in ("flat", "pipeline"):
        loaded = load_text_encoder(str(save_tiny_clip(tmp_path / layout, layout)))
        assert loaded.max_length == 16  # the model's positions
        assert loaded.fingerprint == encoder.fingerprint
        for a, b in zip(loaded.encode(texts), expected, strict=True):
            assert torch.equal(a, b)
    shorter = load_text_encoder(str(tmp_path / "flat"), max_length=8)
    assert shorter.encode(texts)[0].shape == (2, 8, 32)
    assert shorter.fingerprint != encoder.fingerprint  # the length changes the encoding


def test_a_t5_encoder_pools_the_mean_of_its_valid_tokens(encoder, tmp_path):
    folder = tmp_path / "t5"
    vocab_size = encoder.model.config.vocab_size
    config = T5Config(vocab_size=vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                      num_heads=2, decoder_start_token_id=0)  # fmt: skip
    T5EncoderModel(config).save_pretrained(folder)
    encoder.tokenizer.save_pretrained(folder)
    t5 = load_text_encoder(str(folder), max_length=12)
    hidden, pooled, mask = t5.encode(["the digit two", "a handwritten seven by hand"])
    assert hidden.shape == (2, 12, 16) and mask.sum(1).tolist() == [5, 7]
    for k in range(2):
        assert torch.allclose(pooled[k], hidden[k, mask[k].bool()].mean(0), atol=1e-6)


def test_bad_text_encoders_are_refused_naming_the_fix(tmp_path):
    folder = save_tiny_clip(tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ValueError, match="--text-encoder: .* holds no tokenizer"):
        load_text_encoder(str(folder))
    folder = save_tiny_clip(tmp_path / "pickle")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no safetensors weights .*pytorch_model.bin is a pickle"):
        load_text_encoder(str(folder))
    folder = save_tiny_clip(tmp_path / "other")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="holds a BertModel .* supported are CLIPTextModel"):
        load_text_encoder(str(folder))
    with pytest.raises(ValueError, match="--text-encoder-max-length: .* at most 16 tokens"):
        load_text_encoder(TINY_CLIP, max_length=77)
    with pytest.raises(ValueError, match=r"--text-encoder: .*offline.*hf download"):
        load_text_encoder("nobody/no-such-text-encoder")
    with pytest.raises(
        ValueError, match="--text-encoder: missing/folder/ does not exist: give a local"
    ):
        load_text_encoder("missing/folder/")


def test_a_resume_refuses_another_text_encoder_or_none(encoder, tmp_path):
    saved = encoder.facts()
    check_resumed_text_encoder(saved, load_text_encoder(TINY_CLIP), "ckpt")  # the same: fine
    folder = save_tiny_clip(tmp_path / "retrained")
    other = load_text_encoder(str(folder))
    with torch.no_grad():
        next(other.model.parameters()).add_(1e-3)  # one weight retrained
    other.fingerprint = fingerprint_of(other.model, other.tokenizer, other.max_length)
    with pytest.raises(ValueError, match="cannot be resumed with this --text-encoder: .*other "
                                         "weights.* pass the --text-encoder"):  # fmt: skip
        check_resumed_text_encoder(saved, other, "ckpt")
    with pytest.raises(ValueError, match="without --text-encoder: it was trained on captions "
                                         "encoded by tiny-clip"):  # fmt: skip
        check_resumed_text_encoder(saved, None, "ckpt")
    with pytest.raises(ValueError, match="it was trained without a text encoder"):
        check_resumed_text_encoder(None, encoder, "ckpt")


# --------------------------------------------------------------------------- the cache


def test_the_cache_is_encoded_once_reused_and_keyed_by_the_encoder(encoder, digits, tmp_path):
    captions = digits.captions
    first = Counting(encoder)
    cached = load_text_embeddings(captions, first, cache_dir=tmp_path)
    # Each distinct caption once (not once per image), then the empty prompt, last.
    assert first.encoded[1:] == [*captions.texts, ""]  # the first call: the shapes
    assert cached.hidden.shape == (len(captions.texts) + 1, 16, 32)
    assert isinstance(cached.hidden, np.memmap) and cached.hidden.dtype == np.float16
    hidden, pooled, mask = encoder.encode([captions.texts[3], ""])
    assert np.allclose(cached.hidden[3], hidden[0].numpy(), atol=2e-3)
    assert np.array_equal(cached.mask[cached.empty_row], mask[1].numpy())
    assert np.allclose(cached.pooled[cached.empty_row], pooled[1].numpy(), atol=2e-3)

    again = Counting(encoder)
    reused = load_text_embeddings(captions, again, cache_dir=tmp_path)
    assert again.calls == 0 and reused.folder == cached.folder

    other = load_text_encoder(TINY_CLIP, max_length=12)  # another encoding: another cache
    counted = Counting(other)
    theirs = load_text_embeddings(captions, counted, cache_dir=tmp_path)
    assert counted.calls > 0 and theirs.folder != cached.folder
    assert theirs.hidden.shape[1] == 12 and len(list(tmp_path.glob("text-*"))) == 4  # + locks
    # Another encoder's cache where this one's belongs is never read as this one's.
    shutil.rmtree(theirs.folder)
    shutil.copytree(cached.folder, theirs.folder)
    counted = Counting(other)
    assert load_text_embeddings(captions, counted, cache_dir=tmp_path).hidden.shape[1] == 12
    assert counted.calls > 0

    # A damaged cache is found and encoded anew.
    (cached.folder / "hidden.npy").write_bytes(b"broken")
    rebuilt = Counting(encoder)
    assert load_text_embeddings(captions, rebuilt, cache_dir=tmp_path).folder == cached.folder
    assert rebuilt.calls > 0


def test_an_interrupted_text_build_continues_without_encoding_its_chunks_again(
    encoder, digits, tmp_path, monkeypatch
):
    monkeypatch.setattr(text_cache_module, "TEXT_ROWS", 16)  # 61 rows: 4 chunks
    captions = digits.captions
    with pytest.raises(KeyboardInterrupt):
        load_text_embeddings(captions, Counting(encoder, stop_at=4), cache_dir=tmp_path)
    resumed = Counting(encoder)
    cached = load_text_embeddings(captions, resumed, cache_dir=tmp_path)
    assert resumed.encoded[1:] == [*captions.texts, ""][32:]  # chunks 0 and 1 were recorded
    whole = load_text_embeddings(captions, encoder, cache_dir=tmp_path / "whole")
    assert np.array_equal(cached.hidden, whole.hidden)


def test_two_processes_share_the_text_encoding_and_write_the_one_process_cache(
    encoder, digits, tmp_path, monkeypatch
):
    monkeypatch.setattr(text_cache_module, "TEXT_ROWS", 16)  # 61 rows: 4 chunks
    monkeypatch.setattr(text_cache_module, "WAIT_SECONDS", 0.02)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    counters = [Counting(encoder), Counting(encoder)]
    results: list = [None, None]

    def process(rank: int) -> None:  # a thread as the node's process `rank`
        node = SimpleNamespace(local_process_index=rank, is_local_main_process=rank == 0)
        try:
            results[rank] = load_text_embeddings(
                digits.captions, counters[rank], node, cache_dir=tmp_path / "two"
            )
        except Exception as err:  # noqa: BLE001 - handed to the test
            results[rank] = err

    threads = [threading.Thread(target=process, args=(r,), daemon=True) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    rows = [*digits.captions.texts, ""]
    # Chunks 0 and 2 by the main process, 1 and 3 by the other (after each one's shape call).
    assert counters[0].encoded[1:] == rows[0:16] + rows[32:48]
    assert counters[1].encoded[1:] == rows[16:32] + rows[48:]
    one = load_text_embeddings(digits.captions, encoder, cache_dir=tmp_path / "one")
    for result in results:
        for name in ("hidden", "pooled", "mask"):
            assert np.array_equal(getattr(result, name), getattr(one, name)), name
    manifests = [(r.folder / "manifest.json").read_text() for r in (results[0], one)]
    assert manifests[0] == manifests[1]


def test_a_hub_id_names_a_text_encoder_through_the_hub_cache(encoder, tmp_path, monkeypatch):
    """--text-encoder owner/name: the cached snapshot (offline), a pipeline repository with
    text_encoder/ and tokenizer/ as Stable Diffusion's."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = tmp_path / "hub" / "models--someone--tiny-sd"
    save_tiny_clip(storage / "snapshots" / commit, "pipeline")
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_text_encoder("someone/tiny-sd")
    assert loaded.fingerprint == encoder.fingerprint and loaded.source == "someone/tiny-sd"
    shutil.rmtree(tmp_path / "hub")
    with pytest.raises(ValueError, match="--text-encoder: someone/tiny-sd is a hub id, the hub "
                                         "is offline"):  # fmt: skip
        load_text_encoder("someone/tiny-sd")


# --------------------------------------------------------------------------- the condition


@pytest.fixture(scope="module")
def source(encoder, digits, tmp_path_factory):
    cache = tmp_path_factory.mktemp("text")
    embeddings = load_text_embeddings(digits.captions, encoder, cache_dir=cache)
    return TextCondition(embeddings, digits.captions, 0.25, "cpu")


def test_the_training_condition_is_what_a_cross_attention_network_takes(source, digits):
    accelerator = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
    batches = MemoryBatches(digits, 8, accelerator, 0, (-1.0, 1.0), False)
    batch = batches.get(3, step_generator(0, 3, torch.device("cpu")))
    condition = source.training(batch.condition, step_generator(0, 3, torch.device("cpu")))
    # A CLIP encoder's: the whole padded sequence and no mask, as Stable Diffusion trained.
    assert set(condition) == {"encoder_hidden_states"}
    hidden = condition["encoder_hidden_states"]
    assert hidden.shape == (8, 16, 32) and hidden.dtype == torch.float32
    null = source.null(8, "cpu")
    assert set(null) == {"encoder_hidden_states"}
    assert null["encoder_hidden_states"].shape == (8, 16, 32)
    samples = source.for_samples(range(5, 9), "cpu")
    assert samples["encoder_hidden_states"].shape == (4, 16, 32)
    assert torch.equal(samples["encoder_hidden_states"][0], source.for_samples([5], "cpu")[
        "encoder_hidden_states"][0])  # fmt: skip
    # A T5 encoder's carries its mask (PixArt's), the empty prompt's one token valid.
    t5 = TextCondition(replace(source.embeddings, encoder={"class": "T5EncoderModel"}),
                       digits.captions, 0.25, "cpu")  # fmt: skip
    condition = t5.training(batch.condition, step_generator(0, 3, torch.device("cpu")))
    assert set(condition) == {"encoder_hidden_states", "encoder_attention_mask"}
    assert condition["encoder_attention_mask"].shape == (8, 16)
    assert condition["encoder_attention_mask"].dtype == torch.int64
    assert torch.equal(t5.null(8, "cpu")["encoder_attention_mask"][0, :3], torch.tensor([1, 1, 0]))


def test_a_cross_attention_unet_trains_and_is_guided_on_the_condition_as_it_is(source, digits):
    """diffusers' UNet2DConditionModel takes the condition as the source gives it, through
    the shared network call and guidance (untouched); given no mask (CLIP's rule) it reads the
    padded tokens too, as Stable Diffusion's UNet does; given the mask, it ignores them."""
    torch.manual_seed(0)
    net = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )  # fmt: skip
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([10, 200, 500, 900])
    condition = source.training({"caption_rows": torch.arange(4)}, torch.Generator().manual_seed(1))
    network_output(net, x, t, condition).square().mean().backward()
    assert net.conv_in.weight.grad is not None
    with torch.no_grad():
        guided = guided_output(net, x, t, source.for_samples(range(4), "cpu"),
                               source.null(4, "cpu"), 2.0, 1.0, 1.0)  # fmt: skip
        assert guided.shape == x.shape and torch.isfinite(guided).all()
        rows = source.draw_captions(torch.arange(4), torch.Generator().manual_seed(1))
        padded = source.mask[rows] == 0
        assert padded.any()
        changed = {"encoder_hidden_states": torch.where(
            padded[..., None], 100.0, condition["encoder_hidden_states"])}  # fmt: skip
        assert not torch.allclose(network_output(net, x, t, condition),
                                  network_output(net, x, t, changed), atol=1e-3)  # fmt: skip
        mask = {"encoder_attention_mask": source.mask[rows].long()}
        assert torch.allclose(network_output(net, x, t, {**condition, **mask}),
                              network_output(net, x, t, {**changed, **mask}), atol=1e-5)  # fmt: skip


def test_samples_take_the_prompts_in_turn_and_grids_put_one_prompt_per_row(source, encoder, digits):
    prompts = [digit_captions(d)[0] for d in range(3)]
    encoded = encode_prompts(encoder, prompts)
    hidden = encoder.encode(prompts)[0]
    assert torch.equal(encoded.hidden, hidden.half().float())  # rounded as the cache stores
    prompted = TextCondition(source.embeddings, digits.captions, 0.1, "cpu", encoded)
    drawn = prompted.for_samples(range(2, 9), "cpu")
    for k in range(2, 9):
        assert torch.equal(drawn["encoder_hidden_states"][k - 2], encoded.hidden[k % 3])
    # "No condition" stays the cache's empty prompt.
    assert torch.equal(prompted.null(2, "cpu")["encoder_hidden_states"],
                       source.null(2, "cpu")["encoder_hidden_states"])  # fmt: skip
    assert prompted.task_info()["prompts"] == prompts
    images = np.arange(7, dtype=np.uint8)[:, None, None, None].repeat(2, axis=1)  # sample k: k
    grid, per_row = prompted.grid_layout(images)
    assert per_row == 3 and grid[:, 0, 0, 0].tolist() == [0, 3, 6, 1, 4, 0, 2, 5, 0]
    # The trackers' caption: each row's prompt, top to bottom (the prompts with a sample).
    assert prompted.grid_rows(7) == prompts and prompted.grid_rows(2) == prompts[:2]
    assert prompted.prompts_of(range(2, 6)) == [prompts[k % 3] for k in range(2, 6)]
    assert source.grid_rows(7) == []  # without prompts: 8 captions per row, no row's own text


def test_one_caption_per_image_and_dropout_drawn_from_the_steps_generator(source, digits):
    rows = torch.arange(40).repeat(50)  # every image 50 times
    draw = source.draw_captions
    first = draw(rows, step_generator(0, 7, torch.device("cpu")))
    assert torch.equal(first, draw(rows, step_generator(0, 7, torch.device("cpu"))))
    assert not torch.equal(first, draw(rows, step_generator(0, 8, torch.device("cpu"))))
    dropped = first == source.empty_row
    assert 0.2 < dropped.float().mean() < 0.3  # caption dropout 0.25
    # Every other draw is one of that image's captions, and each of its 6 is drawn.
    texts = digits.captions.texts
    for image in range(40):
        drawn = {texts[i] for i in first[(rows == image) & ~dropped].tolist()}
        assert drawn == set(digits.captions.of_row(image)), image
    # A dropped caption trains on the empty prompt's encoding.
    condition = source.encoded(first[:100])
    null = source.null(1, "cpu")["encoder_hidden_states"][0]
    for k in torch.nonzero(dropped[:100]).flatten().tolist():
        assert torch.equal(condition["encoder_hidden_states"][k], null)


def test_a_cache_too_large_for_the_device_is_read_from_the_host_alike(source, digits, monkeypatch):
    monkeypatch.setattr(text_module, "DEVICE_BYTES", 0)
    on_host = TextCondition(source.embeddings, digits.captions, 0.25, "cpu")
    assert on_host.hidden is None and source.hidden is not None
    condition = {"caption_rows": torch.arange(12)}
    a = source.training(condition, step_generator(1, 2, torch.device("cpu")))
    b = on_host.training(condition, step_generator(1, 2, torch.device("cpu")))
    for name in a:
        assert torch.equal(a[name], b[name])


# --------------------------------------------------------------------------- a run's text


def test_a_run_encodes_its_captions_once_and_a_resume_needs_the_same_encoder(
    encoder, digits, tmp_path, monkeypatch
):
    monkeypatch.setenv("DDP_DIFFUSION_CACHE", str(tmp_path / "cache"))
    cfg = SimpleNamespace(text_encoder=TINY_CLIP, text_encoder_max_length=None,
                          mixed_precision="no", caption_dropout=0.1, init_from=None,
                          backbone="text-unet", preset="digits-text",
                          num_sample_images=64)  # fmt: skip
    run = SimpleNamespace(cfg=cfg, accelerator=Accelerator(cpu=True), data=digits,
                          checkpoint=None, text=None, validation_prompts=None)  # fmt: skip
    returned = run_text(run)
    assert returned.fingerprint == encoder.fingerprint
    assert run.text.folder.parent == tmp_path / "cache" and run.text.empty_row == 60
    # The grids' prompts, encoded at once: by default the first distinct captions of the data.
    first = [digits.captions.of_row(r)[0] for r in range(digits.captions.num_rows)]
    assert list(run.validation_prompts.texts) == list(dict.fromkeys(first))[:4]
    assert returned.device == torch.device("cpu")  # training reads the cache
    # An encoder of another width than the preset's is refused before any encoding.
    cfg.preset = "sd15"
    with pytest.raises(ValueError, match="--text-encoder: --preset sd15 attends to 768-wide "
                                         "text embeddings .* this encoder's are 32-wide"):  # fmt: skip
        run_text(run)
    cfg.preset = "digits-text"
    # The condition source of the run: the captions' encodings, dropped with its rate.
    source = condition_source(cfg, None, run.text, digits.captions, "cpu")
    assert isinstance(source, TextCondition) and source.caption_dropout == 0.1
    assert source.task_info()["text_encoder"] == encoder.facts()
    shipped = "CLIPTextModel tiny-clip (frozen, 16 tokens per caption; in text_encoder/ and "
    assert ("text encoder", shipped + "tokenizer/)") in source.card_facts()

    saved = {**encoder.facts(), "fingerprint": "f" * 32}  # trained with other weights
    run.checkpoint = SimpleNamespace(path=tmp_path / "checkpoint-8",
                                     state={"text_encoder": saved})  # fmt: skip
    with pytest.raises(ValueError, match=r"--text-encoder: .*checkpoint-8 cannot be resumed "
                                         r"with this --text-encoder: .*other weights"):  # fmt: skip
        run_text(run)
    cfg.text_encoder = None
    with pytest.raises(ValueError, match="cannot be resumed without --text-encoder"):
        run_text(run)
    run.checkpoint.state = {}  # a class-conditional or unconditional run's: nothing to check
    assert run_text(run) is None


def test_the_text_flags_are_checked_and_refused_where_they_would_do_nothing():
    TextOptions(text_encoder=TINY_CLIP, caption_dropout=0.0).check_text_options()
    with pytest.raises(ValueError, match=r"--caption-dropout must be in \[0, 1\), got 1.0"):
        TextOptions(text_encoder=TINY_CLIP, caption_dropout=1.0).check_text_options()
    with pytest.raises(ValueError, match="--text-encoder-max-length must be >= 1"):
        TextOptions(text_encoder=TINY_CLIP, text_encoder_max_length=0).check_text_options()
    for flag, value in (("caption_column", "text"), ("caption_dropout", 0.2),
                        ("text_encoder_max_length", 8)):  # fmt: skip
        with pytest.raises(ValueError, match="applies to text-to-image runs only: add "
                                             "--text-encoder"):  # fmt: skip
            TextOptions(**{flag: value}).check_text_options()
    both = TextOptions(text_encoder=TINY_CLIP)
    both.class_conditional = True  # as a config holding both sections
    with pytest.raises(ValueError, match="--text-encoder and --class-conditional"):
        both.check_text_options()


# --------------------------------------------------------------------------- several encoders


def save_joint(folder: Path, families: tuple[str, ...]) -> Path:
    """A pipeline folder in SDXL's / SD3's / Flux's layout: text_encoder/, tokenizer/,
    text_encoder_2/, ... with tiny random CLIPs (the later ones with a projection, as SDXL's
    and SD3's second) and T5s, all on tiny-clip's tokenizer (16 positions)."""
    base, tokenizer = tiny_clip()
    tokenizer.model_max_length = 16  # what the pipelines pad CLIP to
    for n, name in enumerate(families):
        suffix = "" if n == 0 else f"_{n + 1}"
        torch.manual_seed(n)
        if name == "t5":
            config = T5Config(vocab_size=base.config.vocab_size, d_model=48, d_kv=4, d_ff=32,
                              num_layers=1, num_heads=2, decoder_start_token_id=0)  # fmt: skip
            model = T5EncoderModel(config)
        elif n == 0 and families != ("clip", "clip", "t5"):
            model = CLIPTextModel(replace_config(base.config, hidden_size=16 + 8 * n))
        else:
            config = replace_config(base.config, hidden_size=16 + 8 * n, projection_dim=12)
            model = CLIPTextModelWithProjection(config)
        model.save_pretrained(folder / f"text_encoder{suffix}")
        tokenizer.save_pretrained(folder / f"tokenizer{suffix}")
    return folder


def replace_config(config, **changes):
    return type(config)(**{**config.to_dict(), **changes})


def test_sdxl_sd3_and_flux_folders_encode_as_their_pipelines_do(tmp_path):
    """A folder with text_encoder_2/ (and _3) is read as its stock pipeline reads it:
    `encode` equals diffusers' own `encode_prompt` of StableDiffusionXLPipeline,
    StableDiffusion3Pipeline and FluxPipeline on the same tiny encoders, and the condition
    carries no mask (those pipelines give the network none)."""
    texts = ["a handwritten seven", "the digit two, written by hand"]
    layouts = {"sdxl": (StableDiffusionXLPipeline, ("clip", "clip")),
               "sd3": (StableDiffusion3Pipeline, ("clip", "clip", "t5")),
               "flux": (FluxPipeline, ("clip", "t5"))}  # fmt: skip
    for rule, (pipeline_class, families) in layouts.items():
        folder = save_joint(tmp_path / rule, families)
        joint = load_text_encoder(str(folder), max_length=10 if "t5" in families else None)
        assert joint.rule == rule
        parts = {}
        for n in range(len(families)):
            suffix = "" if n == 0 else f"_{n + 1}"
            model_folder = folder / f"text_encoder{suffix}"
            cls = json.loads((model_folder / "config.json").read_text())["architectures"][0]
            model = getattr(transformers, cls).from_pretrained(model_folder)
            tok = CLIPTokenizer.from_pretrained(folder / f"tokenizer{suffix}")
            parts[f"text_encoder{suffix}"], parts[f"tokenizer{suffix}"] = model, tok
        pipe = pipeline_class(**{name: None for name in pipeline_class._optional_components
                                 if name not in parts},
                              **{k: None for k in ("vae", "scheduler", "transformer", "unet")
                                 if k in inspect.signature(pipeline_class).parameters},
                              **parts)  # fmt: skip
        kwargs = {"prompt": texts, "device": "cpu", "num_images_per_prompt": 1}
        if rule == "sdxl":
            kwargs["do_classifier_free_guidance"] = False
        elif rule == "sd3":
            kwargs.update(prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
                          max_sequence_length=10)  # fmt: skip
        else:
            kwargs.update(prompt_2=None, max_sequence_length=10)
        expected = pipe.encode_prompt(**kwargs)
        hidden, pooled, mask = joint.encode(texts)
        want_hidden = expected[0]
        want_pooled = expected[2] if rule in ("sdxl", "sd3") else expected[1]
        assert hidden.shape == want_hidden.shape and hidden.shape[-1] == joint.width
        torch.testing.assert_close(hidden, want_hidden.float(), rtol=0, atol=1e-6)
        torch.testing.assert_close(pooled, want_pooled.float(), rtol=0, atol=1e-6)
        assert mask.shape == hidden.shape[:2]
        facts = joint.facts()
        assert facts["class"].count("+") == len(families) - 1
        assert not text_module.takes_attention_mask(facts)
        # Reloaded from its facts (as sample.py does): the same encoder; another rule or length
        # another fingerprint.
        again = load_text_encoder(facts["source"], facts["max_length"])
        assert again.fingerprint == joint.fingerprint
        assert not text_encoder_changes(facts, again)
    assert len({load_text_encoder(str(tmp_path / r)).fingerprint for r in layouts}) == 3
    # A combination no pipeline reads is refused, naming those that are.
    folder = save_joint(tmp_path / "t5-clip", ("t5", "clip"))
    with pytest.raises(ValueError, match=r"--text-encoder: .*t5 \+ clip.* read are clip \+ clip"):
        load_text_encoder(str(folder))


def test_clip_is_called_without_its_mask_and_t5_alone_with_it(encoder, tmp_path):
    """As StableDiffusionPipeline calls CLIP (no mask: the padding's states are what SD's UNet
    trained on) and PixArtAlphaPipeline calls T5 (with it)."""
    texts = ["a handwritten seven", "two"]
    ids = encoder.tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt")
    hidden, _, mask = encoder.encode(texts)
    torch.testing.assert_close(hidden, encoder.model(ids["input_ids"]).last_hidden_state,
                               rtol=0, atol=0)  # fmt: skip
    masked = encoder.model(ids["input_ids"], attention_mask=ids["attention_mask"])
    assert not torch.equal(hidden, masked.last_hidden_state)  # the padding's states differ
    assert torch.equal(mask, ids["attention_mask"])
    config = T5Config(vocab_size=encoder.model.config.vocab_size, d_model=16, d_kv=4, d_ff=32,
                      num_layers=1, num_heads=2, decoder_start_token_id=0)  # fmt: skip
    T5EncoderModel(config).save_pretrained(tmp_path / "t5")
    encoder.tokenizer.save_pretrained(tmp_path / "t5")
    t5 = load_text_encoder(str(tmp_path / "t5"), max_length=12)
    ids = t5.tokenizer(texts, padding="max_length", max_length=12, return_tensors="pt")
    expected = t5.model(ids["input_ids"], attention_mask=ids["attention_mask"])
    torch.testing.assert_close(t5.encode(texts)[0], expected.last_hidden_state, rtol=0, atol=0)
