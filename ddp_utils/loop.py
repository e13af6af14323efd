"""The one training loop every method shares.

A method (the basic model, DDPM, ...) supplies what is its own through the `Method`
protocol: its loss on a batch, how to sample images from fixed seeds, extra pictures, and its
export folder. An optional `Evaluator` (the script builds it: FID lives in `evaluation`, which
this package does not import) scores the samples. The loop owns everything else, in this order
per optimizer step:

    accumulate gradients -> clip -> all ranks agree (skip a non-finite step? stop?) -> update
    -> EMA -> log -> pictures -> evaluate -> checkpoint -> stop

and at the end the export. Every block that communicates runs on every rank; only file writes
are the writer's. Cadences are `--*-every N` steps, always also at the last step (`due`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from ddp_utils import hub
from ddp_utils.data import Batch, BatchSource
from ddp_utils.data.source import is_built_in
from ddp_utils.distributed import (
    all_finite_everywhere,
    derive_seed,
    map_sharded,
    micro_batch_position,
    raise_together,
    step_generator,
)
from ddp_utils.ema import EMA
from ddp_utils.errors import OutputError
from ddp_utils.export import (
    BEST_DIR,
    BEST_FILE,
    CHECKSUMS_FILE,
    check_task_finite,
    read_best_record,
    verify_checksums,
    write_checksums,
    write_task_file,
)
from ddp_utils.files import atomic_dir, write_json
from ddp_utils.guard import Verdict, guarded_step, unwrap_optimizer
from ddp_utils.images import make_grid, to_uint8, upscale
from ddp_utils.metrics import MetricWindow
from ddp_utils.model_card import CardFacts, write_model_card
from ddp_utils.optim import lr_at, set_lr
from ddp_utils.progress import Progress
from ddp_utils.run import Run
from ddp_utils.tracking import MIN_PICTURE_SIDE

logger = logging.getLogger("ddp_diffusion")

GRID_CHUNK = 64  # images per sampling chunk for the logged grids
NO_VERDICT = Verdict()  # between boundaries nothing is read, nothing decided on the host


class Method(Protocol):
    """What a training method plugs into the loop."""

    value_range: tuple[float, float]  # pixel range the network sees: (0, 1) or (-1, 1)
    export_name: str  # the export folder in the run directory: "model", "pipeline"

    def shard_units(self, net: nn.Module) -> tuple[str, ...]:
        """The classes of the network's blocks, one FSDP unit each under --sharding (empty:
        the network cannot be sharded)."""
        ...

    def task_info(self) -> dict[str, Any]:
        """JSON-able facts saved with checkpoints and exports (`task`, `value_range`, ...)."""
        ...

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, stats: MetricWindow
    ) -> torch.Tensor:
        """The scalar loss of one micro-batch (inside autocast); noise from `generator`.

        May `stats.report` per-sample values (same names on every rank, every step)."""
        ...

    def sample(self, net: nn.Module, indices: range) -> torch.Tensor:
        """Images `indices` of the run's fixed seeds, float NCHW on the CPU in `value_range`."""
        ...

    def pictures(self, net: nn.Module, step: int) -> dict[str, np.ndarray]:
        """Extra HWC uint8 pictures to log with each grid (writer only; no collectives)."""
        ...

    def data_pictures(self) -> dict[str, np.ndarray]:
        """Pictures of the data logged once at the start of a fresh run (writer only)."""
        ...

    def grid_layout(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """The sample grid's images (NHWC uint8, items 0..n-1) in order, and images per row."""
        ...

    def grid_rows(self, num_images: int) -> list[str]:
        """What each row of the grid of `num_images` shows, top to bottom (a text model's
        prompts, a class-conditional one's classes): the grid's caption in the trackers; []
        where rows show nothing in particular."""
        ...

    def export(self, folder: Path, net: nn.Module, raw: nn.Module) -> None:
        """Write the model folder: `net` holds the weights to ship (the EMA), `raw` the raw."""
        ...

    def card(self) -> CardFacts:
        """The export's model card: what the model is, its sampler, how to load it, and the
        method's own facts (the loop adds the run's: data, steps, batch, precision, FID)."""
        ...


class Evaluator(Protocol):
    """What scores the run's samples every `--eval-every` steps (`evaluation.during_training`)."""

    def evaluate(self, generate: Callable[[range], torch.Tensor]) -> dict[str, float]:
        """Metrics, at least `fid`, of the images `generate(items)` makes (uint8 NCHW) for the
        evaluation's items (collective: `generate` is called for this rank's share)."""
        ...

    def is_best(self, fid: float) -> bool:
        """Whether `fid` beats every evaluation so far, a resumed run's included (remembered)."""
        ...


def due(step: int, every: int, last_step: int) -> bool:
    """Is a `--*-every` cadence due after `step`? Every `every` steps (0: never) and at the end."""
    return (every > 0 and step % every == 0) or step == last_step


@contextlib.contextmanager
def sampling_weights(run: Run, net: nn.Module, ema: EMA | None) -> Iterator[nn.Module]:
    """The network in eval mode with the EMA weights (if any) for the duration of the block.
    Sharded: a whole copy of them on every process (collective), what sampling needs."""
    if run.sharded:
        yield run.full_network(net, None if ema is None else ema.state_dict())
        return
    net.eval()
    try:
        with ema.swapped_into(net) if ema is not None else contextlib.nullcontext():
            yield net
    finally:
        net.train()


def train(run: Run, method: Method, model: nn.Module, evaluator: Evaluator | None = None) -> Path:
    """Train `model` from the resume point (or scratch) to `--max-steps`; return the export.

    With an `evaluator` (prepared by the script before this call, so a missing FID network
    fails before any step), the samples are scored every `--eval-every` steps and the
    lowest-FID export is kept in `best/`."""
    cfg, acc = run.cfg, run.accelerator
    model, optimizer = run.prepare(model, method.shard_units(model))
    net = acc.unwrap_model(model)
    ema = EMA(net, cfg.ema_max_decay) if cfg.use_ema else None

    # Resume; then, with nothing left to refuse the run, take the run directory.
    step = first_step = run.restore(model, optimizer, ema, method.task_info())
    run.begin(exports=(method.export_name, BEST_DIR))
    if step == 0 and run.is_writer:
        for name, picture in method.data_pictures().items():
            run.tracker.log_image(name, picture, 0)
    batches = run.batches(step * cfg.gradient_accumulation_steps, method.value_range)
    progress = Progress(acc, start=step, total=cfg.max_steps)
    stats = MetricWindow(acc.device)
    window_start, window_first_step = time.perf_counter(), step
    last_grid = None  # the newest sample grid, for the export's model card

    params = [p for p in model.parameters() if p.requires_grad]  # clipped every step
    while step < cfg.max_steps:
        ok = optimizer_step(run, method, model, optimizer, params, batches, stats, step)
        step += 1
        if ema is not None:
            ema.update(net, step, keep=ok)  # a skipped step leaves the EMA as it was

        # Boundaries: all ranks agree on what the device saw and on stopping (one host read).
        verdict = NO_VERDICT
        if due(step, cfg.log_every, cfg.max_steps) or due(
            step, cfg.checkpoint_every, cfg.max_steps
        ):
            verdict = run.check(step)

        # Log: one all-reduce and one host read per window.
        if due(step, cfg.log_every, cfg.max_steps):
            elapsed = time.perf_counter() - window_start
            num_images = (step - window_first_step) * run.global_batch_size
            values = {
                **stats.reduce(acc),
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": num_images / elapsed,
                "nonfinite_steps": run.guard.num_nonfinite_steps,
            }
            run.tracker.log(values, step)
            progress.update(step, **{k: values[k] for k in ("loss", "images_per_s") if k in values})
            window_start, window_first_step = time.perf_counter(), step

        # Pictures, evaluation and checkpoints are not training: the window's images_per_s
        # leaves their time out (the window's start moves on by it). No device sync here:
        # checkpoint and log steps were synced by their boundary's read just above.
        pause_start = time.perf_counter()

        # Pictures: a grid from fixed seeds (sharded over all ranks) and the method's own.
        if due(step, cfg.sample_every, cfg.max_steps):
            with sampling_weights(run, net, ema) as sampled:
                last_grid = log_pictures(run, method, sampled, step)

        # Evaluate (not when stopping: the save comes first). Lowest FID -> best/.
        if evaluator is not None and due(step, cfg.eval_every, cfg.max_steps) and not verdict.stop:
            with sampling_weights(run, net, ema) as sampled:
                metrics = evaluator.evaluate(lambda items: sample_uint8(method, sampled, items))
            run.tracker.log(metrics, step)
            if evaluator.is_best(metrics["fid"]):
                record = {"step": step, **metrics, "num_samples": cfg.eval_num_samples}
                card = model_card(run, method, net, step, record)
                best = export(
                    run, method, net, ema, run.output_dir / BEST_DIR, card, last_grid,
                    {BEST_FILE: record},
                )  # fmt: skip
                run.tracker.log_folder(best, "best")

        # Checkpoint; after a stop verdict (SIGTERM, SIGUSR1, time budget) save here and exit.
        if due(step, cfg.checkpoint_every, cfg.max_steps) or verdict.stop:
            run.save(step, model, optimizer, ema, method.task_info())
        window_start += time.perf_counter() - pause_start
        if verdict.stop and step < cfg.max_steps:
            progress.close()
            run.stop(step, verdict.stop_reason)  # raises TrainingStopped: exit code 75

    # Export: a folder sample.py (and diffusers) load alone; never of a run that ended diverged.
    progress.close()
    if run.guard.num_skipped_in_a_row:
        run.fail_nonfinite(
            f"the run ended in {run.guard.num_skipped_in_a_row} step(s) in a row with a "
            f"non-finite loss; checkpoint-{step} and the export were not written"
        )
    folder = run.output_dir / method.export_name
    if step == first_step and export_intact(run, folder):  # a rerun of a finished run
        logger.info("%s is complete and intact (%s): left as it is", folder, CHECKSUMS_FILE)
    else:
        if last_grid is None:  # no step ran here: the grid of the checkpoint's weights
            with sampling_weights(run, net, ema) as sampled:
                last_grid = sample_grid(run, method, sampled)
        best_record = read_best_record(run.output_dir) if evaluator is not None else None
        card = model_card(run, method, net, step, best_record)
        export(run, method, net, ema, folder, card, last_grid)
        run.tracker.log_folder(folder, "final")
        logger.info("exported %s; pictures in %s", folder, run.tracker.images_dir)
    if cfg.push_to_hub:  # the export at the repository's root, the best one in best/
        best = run.output_dir / BEST_DIR
        folders = {"": folder, **({"best": best} if best.is_dir() else {})}
        repo_id = hub.hub_repo_id(cfg.hub_model_id, cfg.output_dir)
        hub.push_to_hub(acc, repo_id, cfg.hub_private, folders)
    run.finish()
    return folder


def optimizer_step(
    run: Run,
    method: Method,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    batches: BatchSource,
    stats: MetricWindow,
    step: int,
) -> torch.Tensor:
    """One optimizer step (`step` is 0-based): accumulate, clip, update unless non-finite.

    Returns whether the update happened, as a 0-dim bool on the device: nothing here reads a
    value on the host, so a GPU never waits for the CPU between log windows.
    """
    cfg, acc = run.cfg, run.accelerator
    # Accumulate gradients over micro-batches; noise is seeded from the micro-batch's position.
    losses = []
    for micro in range(cfg.gradient_accumulation_steps):
        micro_step = step * cfg.gradient_accumulation_steps + micro
        if cfg.compile:  # a new forward/backward: CUDA-graph outputs of the last one are free
            torch.compiler.cudagraph_mark_step_begin()
        position = micro_batch_position(micro_step, acc.num_processes, acc.process_index)
        generator = step_generator(cfg.seed, position, acc.device)
        # Dropout (a LoRA adapter's) draws from the global RNG: seeded per micro-batch too.
        torch.manual_seed(derive_seed("dropout", cfg.seed, position, 0))
        batch = batches.get(micro_step, generator)
        with acc.accumulate(model), acc.autocast():
            loss = method.loss(model, batch, generator, stats)
            acc.backward(loss)
        losses.append(loss.detach())
    assert acc.sync_gradients, "accumulation must end on a synchronising micro-step"

    # Update weights (LR from the optimizer step alone: the same for any number of processes),
    # unless a rank saw a non-finite loss: all ranks then skip on the device (ddp_utils.guard).
    lr = lr_at(step, cfg.learning_rate, cfg.lr_warmup_steps, cfg.max_steps, cfg.lr_schedule)
    set_lr(optimizer, lr)
    grad_norm = None
    if cfg.max_grad_norm is not None and acc.is_fsdp2:  # the norm of every process's shards
        grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
    elif cfg.max_grad_norm is not None:
        grad_norm = clip_gradients(optimizer, params, cfg.max_grad_norm, acc.scaler)
    step_losses = torch.stack(losses)
    ok = run.guard.step_ok(step, step_losses, grad_norm)
    guarded_step(optimizer, ok, acc.scaler)
    optimizer.zero_grad(set_to_none=True)
    stats.report("loss", step_losses)
    if grad_norm is not None:
        stats.report("grad_norm", grad_norm)
    stats.commit(keep=ok)
    return ok


def clip_gradients(
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    max_norm: float,
    scaler: torch.amp.GradScaler | None,
) -> torch.Tensor:
    """Scale the gradients to a total norm of at most `max_norm`; return the norm before.

    Under an fp16 GradScaler the gradients are unscaled first. `Accelerator.clip_grad_norm_`
    does the same, but first walks every prepared model's parameters to find which one they
    belong to, every step (with the cached list: ~1 ms less host time per step for the digits
    model on a CPU, bench/host_time.py).
    """
    if scaler is not None and scaler.is_enabled():
        scaler.unscale_(unwrap_optimizer(optimizer))
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def sample_uint8(method: Method, net: nn.Module, items: range) -> torch.Tensor:
    """The method's samples as uint8 NCHW, what FID features are computed from."""
    return torch.from_numpy(to_uint8(method.sample(net, items), method.value_range)).permute(
        0, 3, 1, 2
    )


def sample_grid(run: Run, method: Method, net: nn.Module) -> np.ndarray:
    """The grid of the run's fixed seeds (collective: every rank samples its chunks)."""
    images = map_sharded(
        run.accelerator,
        run.cfg.num_sample_images,
        GRID_CHUNK,
        lambda items: method.sample(net, items),
    )
    ordered, per_row = method.grid_layout(to_uint8(images, method.value_range))
    return make_grid(ordered, nrow=per_row)


def log_pictures(run: Run, method: Method, net: nn.Module, step: int) -> np.ndarray:
    """The sample grid and the method's pictures (collective); returns the grid."""
    grid = sample_grid(run, method, net)
    run.tracker.log_image("samples", grid, step, method.grid_rows(run.cfg.num_sample_images))
    if run.is_writer:
        for name, picture in method.pictures(net, step).items():
            run.tracker.log_image(name, picture, step)
    return grid


def export_intact(run: Run, folder: Path) -> bool:
    """Whether the export matches its checksums.json, on every rank (collective). One without
    checksums (older code), damaged, or with NaN/inf in its task.json is made again; a
    warning says why."""
    ok = False
    try:
        check_task_finite(folder)
        ok = verify_checksums(folder)
    except ValueError as err:
        if run.accelerator.is_main_process:
            logger.warning("exporting again: %s", err)
    flag = torch.tensor([0 if ok else 1], device=run.accelerator.device)
    if run.accelerator.num_processes > 1:
        flag = run.accelerator.reduce(flag, reduction="sum")
    return flag.item() == 0


def model_card(
    run: Run, method: Method, net: nn.Module, step: int, fid_record: dict[str, Any] | None
) -> CardFacts:
    """The method's card with the run's facts in front and the FID measured, if any."""
    cfg, data = run.cfg, run.data
    card = method.card()
    precision = cfg.mixed_precision or run.accelerator.mixed_precision
    run_facts = [
        ("data", f"{cfg.dataset} ({data.num_images:,} images, {cfg.resolution}x"
                 f"{cfg.resolution}, {cfg.channels} channel(s))"),
        ("parameters", f"{sum(p.numel() for p in net.parameters()):,}"),
        ("optimizer steps", f"{step:,}"),
        ("global batch", f"{run.global_batch_size} ({run.accelerator.num_processes} process(es)"
                         f" x {cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation)"),
        ("learning rate", f"{cfg.learning_rate:g} ({cfg.lr_schedule}, {cfg.lr_warmup_steps} "
                          "warmup steps)"),
        ("precision", "fp32" if precision in (None, "no") else precision),
        ("weights", f"EMA (max decay {cfg.ema_max_decay})" if cfg.use_ema else "raw"),
    ]  # fmt: skip
    card.facts = run_facts + card.facts
    if fid_record is not None:
        card.fid = float(fid_record["fid"])
        card.fid_samples = int(fid_record.get("num_samples", cfg.eval_num_samples))
        card.facts.append(
            ("FID", f"{card.fid:.2f} at step {fid_record.get('step', '?')} "
                    f"({card.fid_samples} samples vs the training data)")
        )  # fmt: skip
        if fid_record.get("clip_score") is not None:
            card.facts.append(
                ("CLIP score", f"{fid_record['clip_score']:.2f} (FID's samples against their "
                               f"prompts, by {getattr(cfg, 'clip_model', None) or 'CLIP'})")
            )  # fmt: skip
    if is_hub_dataset(cfg.dataset):
        card.dataset = cfg.dataset
    return card


def is_hub_dataset(name: str) -> bool:
    """A hub dataset id (cifar10, owner/name), not a local folder or the built-in digits."""
    return not is_built_in(name) and not Path(name).exists()


def export(
    run: Run,
    method: Method,
    net: nn.Module,
    ema: EMA | None,
    folder: Path,
    card: CardFacts,
    grid: np.ndarray | None,
    json_files: dict[str, dict] | None = None,
) -> Path:
    """Write the method's export into `folder`, atomically, with task.json, the model card
    (README.md, and the grid as samples.png) and checksums.json (collective). Weights that are
    not finite are never exported (every rank holds the same: every rank raises). Sharded:
    whole copies of the EMA and raw weights are gathered on every process first."""
    if run.sharded:
        raw = run.full_network(net)
        shipped = raw if ema is None else run.full_network(net, ema.state_dict())
        net = raw
    weights = [*net.parameters(), *(ema.state_dict().values() if ema is not None else ())]
    if not all_finite_everywhere(run.accelerator, weights):
        run.fail_nonfinite(
            f"the weights to export into {folder.name}/ hold non-finite values; nothing was "
            "exported"
        )
    error = None
    if run.is_writer:
        if not run.sharded:
            shipped = net
            if ema is not None:
                shipped = copy.deepcopy(net)
                ema.copy_to(shipped)
        try:
            with atomic_dir(folder) as tmp:
                method.export(tmp, shipped, net)
                write_task_file(tmp, run.cfg.resolution, method.task_info())
                picture = None if grid is None else upscale(grid, MIN_PICTURE_SIDE)
                write_model_card(tmp, card, picture)
                for name, content in (json_files or {}).items():
                    write_json(tmp / name, content)
                write_checksums(tmp)
        except (OSError, SafetensorError) as err:  # disk full, read-only: exit 74
            error = run.output_error(f"the export {folder.name}/", folder.parent, err)
    raise_together(run.accelerator, error, OutputError("the main process could not export"))
    run.accelerator.wait_for_everyone()
    return folder
