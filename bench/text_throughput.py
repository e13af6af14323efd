"""What the text path of a text-to-image run (train_ddpm.py --text-encoder) costs: encoding
captions, the text cache on disk, and training on the cached embeddings against encoding the
captions at every step.

    OMP_NUM_THREADS=1 python bench/text_throughput.py             # CPU, one thread: minutes
    python bench/text_throughput.py --quick                       # seconds: a smoke run
    python bench/text_throughput.py --device cuda --train-encoders tiny-clip,clip-l

The encoders, none downloaded: `tiny-clip` (the built-in one: CLIP's text model at width 32,
2 layers), `clip-l` (a CLIPTextModel of CLIP ViT-L/14's text tower, Stable Diffusion 1.x's
encoder: width 768, 12 layers, 77 tokens; random weights from its config) and `t5-base` (a
T5EncoderModel of T5-base's size: width 768, 12 layers, 120 tokens as PixArt-alpha's; random
weights). The big two take tiny-clip's word-level tokenizer: every caption is padded to the
encoder's length, so the tokenizer does not change the work.

(a) Encoding: captions per second through `TextEncoder.encode` (the cache's path), batches of
--encode-batch captions of the captioned digits, float32 (--num-encode of them, repeated until
2 s have passed). (b) The text cache: built by
`load_text_embeddings` (what train_ddpm.py calls) for the captioned digits' distinct captions
in a scratch folder; its bytes on disk per caption (the empty prompt's row counted as one).
(c) Training: the same DDPM step (epsilon MSE, AdamW) of the `digits-text` text-unet at 16x16
on the captioned digits, batch --batch-size, its captions drawn as the run draws them (one per
image, caption dropout 0.1): the condition read from the cache (`TextCondition`, what the
toolkit does) or the drawn captions encoded by the frozen encoder at every step (built here,
not a training flag). Warm-up steps, then rounds of steps alternating between the two, so a
shared machine slows both alike; the median round is reported.

Every rate is given twice: per second of wall time, and per second of this process's CPU time
(`time.process_time`). On a machine shared with other jobs the wall-time rates fall with the
share of a core the process gets; at one thread (OMP_NUM_THREADS=1) the CPU-time rates are
what one dedicated core would do, near enough (the caches are shared too), on a GPU they mean
nothing (use the wall-time ones).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import git_revision, machine, print_table, synchronize, tree_state  # noqa: E402
from ddp_utils.data import load_image_data, to_float  # noqa: E402
from ddp_utils.data.load import CAPTION_ROWS  # noqa: E402
from ddp_utils.data.text_cache import load_text_embeddings  # noqa: E402
from diffusion.conditioning.text import (  # noqa: E402
    EMBEDDING_DTYPE,
    TextCondition,
    takes_attention_mask,
    text_condition,
)
from diffusion.kinds.ddpm.formulation import make_train_scheduler  # noqa: E402
from diffusion.networks import build_backbone, count_parameters, predict  # noqa: E402
from diffusion.pipeline_code.core import VALUE_RANGE  # noqa: E402
from diffusion.text_encoders import (  # noqa: E402
    T5_MAX_LENGTH,
    TINY_CLIP,
    TextEncoder,
    fingerprint_of,
    frozen,
    load_text_encoder,
)

ENCODERS = ("tiny-clip", "clip-l", "t5-base")
CLIP_L_LENGTH = 77  # CLIP's positions


def random_encoder(name: str) -> TextEncoder:
    """`name`'s encoder: the built-in tiny-clip, or a random one of a published size."""
    if name == TINY_CLIP:
        return load_text_encoder(TINY_CLIP)
    tokenizer = load_text_encoder(TINY_CLIP).tokenizer
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    if name == "clip-l":  # openai/clip-vit-large-patch14's text_config
        config = CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=CLIP_L_LENGTH, projection_dim=768,
            hidden_act="quick_gelu", bos_token_id=vocab[tokenizer.bos_token],
            eos_token_id=vocab[tokenizer.eos_token], pad_token_id=vocab[tokenizer.pad_token],
        )  # fmt: skip
        model, length = CLIPTextModel(config), CLIP_L_LENGTH
    elif name == "t5-base":  # google-t5/t5-base's encoder
        config = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                          num_heads=12, decoder_start_token_id=0)  # fmt: skip
        model, length = T5EncoderModel(config), T5_MAX_LENGTH
    else:
        raise ValueError(f"unknown encoder {name}: one of {', '.join(ENCODERS)}")
    model = frozen(model, torch.float32)
    return TextEncoder(model, tokenizer, length, name, fingerprint_of(model, tokenizer, length))


class Clock:
    """Wall time and this process's CPU time since it was started."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        synchronize(device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rates(self, count: int) -> tuple[float, float]:
        """`count` per second of wall time, and per second of CPU time."""
        synchronize(self.device)
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return count / wall, count / cpu


def encodings_per_s(
    encoder: TextEncoder, texts: list[str], batch: int, min_seconds: float = 2.0
) -> tuple[float, float]:
    """Captions/s (wall, CPU) of `encoder.encode` over `texts` in batches of `batch`, after a
    warm-up on 8 of them; `texts` again until `min_seconds` of wall time have passed."""
    encoder.encode(texts[:8])
    clock, count = Clock(encoder.device), 0
    while count == 0 or time.perf_counter() - clock.wall < min_seconds:
        for i in range(0, len(texts), batch):
            encoder.encode(texts[i : i + batch])
        count += len(texts)
    return clock.rates(count)


class Trainer:
    """One DDPM step of the digits-text UNet; its condition from `condition(rows, generator)`,
    `rows` the batch's images' caption rows."""

    def __init__(
        self,
        images: torch.Tensor,
        width: int,
        condition: Callable[[torch.Tensor, torch.Tensor, torch.Generator], dict],
        batch_size: int,
        device: torch.device,
    ) -> None:
        torch.manual_seed(0)
        channels, resolution = images.shape[1], images.shape[2]
        self.model = build_backbone("text-unet", "digits-text", resolution, channels,
                                    text_width=width).to(device).train()  # fmt: skip
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.scheduler = make_train_scheduler("squaredcos_cap_v2", 1000, "epsilon")
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.images, self.condition, self.batch, self.device = images, condition, batch_size, device
        self.generator = torch.Generator(device).manual_seed(0)

    def steps(self, num_steps: int) -> tuple[float, float]:
        """Images/s (wall, CPU) over `num_steps` steps."""
        clock = Clock(self.device)
        for _ in range(num_steps):
            g = self.generator
            rows = torch.randint(len(self.images), (self.batch,), generator=g, device=self.device)
            x = to_float(self.images[rows], VALUE_RANGE, None)
            condition = self.condition(rows, g)
            noise = torch.randn(x.shape, generator=g, device=self.device)
            t = torch.randint(0, 1000, (len(x),), generator=g, device=self.device)
            pred = predict(self.model, self.scheduler.add_noise(x, noise, t), t, condition)
            F.mse_loss(pred.float(), noise).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return clock.rates(num_steps * self.batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoders", default=",".join(ENCODERS), help="encoders of (a), (b)")
    parser.add_argument("--train-encoders", default="tiny-clip,clip-l", help="encoders of (c)")
    parser.add_argument("--encode-batch", type=int, default=64)
    parser.add_argument("--num-encode", type=int, default=64, help="captions timed in (a)")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: tiny-clip only, 1 round of 1 step"
    )
    args = parser.parse_args()
    if args.quick:
        args.encoders = args.train_encoders = TINY_CLIP
        args.num_encode, args.warmup_steps, args.steps, args.rounds = 16, 1, 1, 1
    scratch = Path(tempfile.mkdtemp(prefix="bench-text-"))
    try:
        run(args, torch.device(args.device), scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, device: torch.device, scratch: Path) -> None:
    data = load_image_data("digits-captioned", args.resolution, 1, cache_dir=scratch,
                           with_captions=True)  # fmt: skip
    captions = data.captions
    assert captions is not None
    all_texts = [*captions.texts, ""]  # cache row i: caption i; the last: the empty prompt
    drawn = [all_texts[i] for i in captions.ids.tolist()]  # every image's captions, in order
    to_encode = (drawn * (args.num_encode // len(drawn) + 1))[: args.num_encode]
    print(
        f"machine: {machine()}; git {git_revision()} ({tree_state()}); "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; torch threads {torch.get_num_threads()}"
    )
    print(
        f"digits-captioned: {len(data.images):,} images at {args.resolution}x{args.resolution}, "
        f"{len(captions.texts)} distinct captions ({len(drawn):,} image-caption pairs); "
        f"device {device}\n"
    )
    encoders = {name: random_encoder(name) for name in args.encoders.split(",")}
    for name in args.train_encoders.split(","):
        encoders.setdefault(name, random_encoder(name))

    # (a) Encoding and (b) the cache on disk.
    rows, caches = [], {}
    for name in args.encoders.split(","):
        encoder = encoders[name]
        encoder.model.to(device)
        wall, cpu = encodings_per_s(encoder, to_encode, args.encode_batch)
        folder = scratch / f"cache-{name}"
        caches[name] = load_text_embeddings(captions, encoder, cache_dir=folder)
        files = [p for p in folder.rglob("*") if p.is_file()]
        num_bytes = sum(p.stat().st_size for p in files)
        per_caption = num_bytes / len(all_texts)
        hidden = caches[name].hidden
        rows.append([
            name, f"{count_parameters(encoder.model):,}", encoder.max_length, encoder.width,
            f"{wall:,.1f}", f"{cpu:,.1f}", f"{num_bytes:,}", f"{per_caption:,.0f}",
            f"{hidden.shape[1]}x{hidden.shape[2]} {hidden.dtype}",
        ])  # fmt: skip
    print(
        f"(a) encoding {args.num_encode} captions (again until 2 s passed) in batches of "
        f"{args.encode_batch} (float32), "
        f"(b) the text cache of the {len(captions.texts)} distinct captions and the empty prompt"
    )
    print_table(["encoder", "params", "tokens", "width", "captions/s (wall)",
                 "captions per CPU s", "cache bytes", "bytes per caption",
                 "hidden per caption"], rows)  # fmt: skip

    # (c) Training on the cache vs encoding at every step.
    images = data.images.to(device)
    rows = []
    for name in args.train_encoders.split(","):
        encoder = encoders[name]
        encoder.model.to(device)
        embeddings = caches.get(name) or load_text_embeddings(
            captions, encoder, cache_dir=scratch / f"cache-{name}"
        )
        source = TextCondition(embeddings, captions, 0.1, device)
        with_mask = takes_attention_mask(encoder.facts())

        def cached(image_rows, generator, source=source):
            return source.training({CAPTION_ROWS: image_rows}, generator)

        def encoded(image_rows, generator, source=source, encoder=encoder, with_mask=with_mask):
            """The same draw of captions, then the frozen encoder on them (as the cache did)."""
            texts = [all_texts[i] for i in source.draw_captions(image_rows, generator).tolist()]
            hidden, _, mask = encoder.encode(texts)
            return text_condition(hidden.to(EMBEDDING_DTYPE).to(device), mask.to(device),
                                  with_mask)  # fmt: skip

        sides = {
            "cache": Trainer(images, encoder.width, cached, args.batch_size, device),
            "encode": Trainer(images, encoder.width, encoded, args.batch_size, device),
        }
        rates: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
        for trainer in sides.values():
            trainer.steps(args.warmup_steps)
        for _ in range(args.rounds):
            for side, trainer in sides.items():
                rates[side].append(trainer.steps(args.steps))
        row = [name, f"{count_parameters(sides['cache'].model):,}"]
        for clock in (0, 1):  # wall, CPU
            on_cache = statistics.median(r[clock] for r in rates["cache"])
            encoding = statistics.median(r[clock] for r in rates["encode"])
            row += [f"{on_cache:,.1f}", f"{encoding:,.1f}", f"{on_cache / encoding:.1f}x"]
        row += [f"{[round(r[0], 1) for r in rates['cache']]}",
                f"{[round(r[0], 1) for r in rates['encode']]}"]  # fmt: skip
        rows.append(row)
        encoder.model.to("cpu")
    print(
        f"\n(c) training, text-unet digits-text at {args.resolution}x{args.resolution}, DDPM "
        f"epsilon MSE, AdamW, batch {args.batch_size}, caption dropout 0.1: "
        f"{args.warmup_steps} warm-up steps, then {args.rounds} rounds of {args.steps} steps"
    )
    print_table(["encoder", "UNet params", "cached img/s (wall)", "encoding img/s (wall)",
                 "ratio (wall)", "cached img per CPU s", "encoding img per CPU s",
                 "ratio (CPU)", "cached rounds (wall)", "encoding rounds (wall)"],
                rows)  # fmt: skip


if __name__ == "__main__":
    main()
