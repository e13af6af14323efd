"""A training run around its loop: set up, resume, save, stop, finish.

`start_run` builds the Accelerator, finds the checkpoint to resume from (the same one on every
rank), opens the tracker and loads the data; `Run.save` and `Run.restore` move model, EMA and
optimizer state in and out of pickle-free checkpoints; `Run.check` is the agreement of all
ranks, at log and checkpoint boundaries, on what the device-side guard saw (skipped non-finite
steps) and on stopping (SIGTERM, SIGUSR1, SIGINT, `--max-train-time`), and `Run.stop` closes
the run and raises `TrainingStopped` (exit 75).
The loop itself is `ddp_utils.loop.train`.

Resume is exact (bit-identical weights, EMA and optimizer state after a kill at any point,
with 1 or N processes) without saving any sampler or RNG state: data order is a pure function
of (seed, micro-step, rank) (`ddp_utils.data.batches`), noise and timesteps come from a
generator seeded from the seed and the micro-batch's position in the stream (the global RNG,
which dropout draws from, is seeded from them too), and the LR from the step alone. The
position (`micro_batch_position`) does not depend on how the global batch is split into
processes and accumulation steps, so 1 process accumulating N micro-batches trains as N
processes do. Accelerate's
seedable sampler + `skip_first_batches` would also be exact, but replays the skipped batches
through the loader and needs `save_state`, whose custom objects are pickles.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.fsdp import FSDPModule

from ddp_utils.checkpoint import (
    FORMAT,
    PARTS,
    SHARDED,
    Checkpoint,
    config_differences,
    find_resume_checkpoint,
    list_checkpoints,
    load_trained_weights,
    optimizer_from_safetensors,
    optimizer_to_safetensors,
    prune,
    read_shards,
    shard_metadata,
    trained_weights,
    write_checkpoint,
    write_shards,
    write_state,
)
from ddp_utils.cli import setup_logging
from ddp_utils.compile import compile_network
from ddp_utils.config import save_config, to_dict
from ddp_utils.data import (
    BatchSource,
    ImageData,
    LatentBatches,
    LatentData,
    load_image_data,
    make_batches,
)
from ddp_utils.data.text_cache import TextEmbeddings
from ddp_utils.distributed import (
    all_finite,
    all_finite_everywhere,
    make_accelerator,
    raise_together,
)
from ddp_utils.ema import EMA
from ddp_utils.errors import (
    STOP_EXIT_CODE,
    CheckpointError,
    InputError,
    NonFiniteError,
    OutputError,
    TrainingStopped,
    flag_name,
)
from ddp_utils.files import publish_dir, temp_path
from ddp_utils.guard import StepGuard, Verdict, watch_launcher
from ddp_utils.hub import check_can_push, hub_repo_id
from ddp_utils.lock import RunLock, check_not_in_use
from ddp_utils.optim import make_optimizer
from ddp_utils.sharding import (
    check_launch,
    full_copy,
    load_training_state,
    network_class,
    set_units,
    training_state,
    weightless_copy,
)
from ddp_utils.tracking import Tracker
from ddp_utils.train_config import TrainConfig, parse_duration

logger = logging.getLogger("ddp_diffusion")


@dataclass
class Run:
    cfg: TrainConfig
    accelerator: Accelerator
    output_dir: Path
    data: ImageData
    checkpoint: Checkpoint | None  # the one resumed from, if any
    guard: StepGuard
    tracker: Tracker = field(init=False)  # opened by `begin`
    step: int = field(init=False, default=0)  # as of the last boundary
    lock: RunLock | None = field(init=False, default=None)  # the writer's, taken by `begin`
    # A latent model's data: the images encoded once (`ddp_utils.data.latent_cache`); batches then
    # carry latents, and `data` keeps the pixels (grids of real data, FID reference).
    latents: LatentData | None = field(init=False, default=None)
    # A text-conditional run's captions encoded once (`ddp_utils.data.text_cache`): batches
    # carry each image's caption row, the condition source reads the encodings from here.
    text: TextEmbeddings | None = field(init=False, default=None)
    # ... and its grids' prompts, encoded once at the start (the encoder does not stay loaded):
    # `diffusion.conditioning.text.EncodedPrompts`.
    validation_prompts: Any = field(init=False, default=None)
    # --sharding: the network before sharding, its parameters on the meta device; the whole
    # copies that sampling and the export use are made from it (`full_network`).
    template: torch.nn.Module | None = field(init=False, default=None)
    # A fine-tune of a text-to-image pipeline (--init-from): the pipeline it started from
    # (`diffusion.pipelines.BasePipeline`), which its export extends.
    base: Any = field(init=False, default=None)
    # ... trained with LoRA: the adapter's shape (`diffusion.adapters.LoraSpec`); the network's
    # trainable parameters are then the adapter's.
    adapter: Any = field(init=False, default=None)
    # DreamBooth's prior preservation (`diffusion.dreambooth`): the class images the base drew
    # (their condition: their rows among `data.captions`, which holds theirs after the data's),
    # and their latents; every batch then carries as many class examples as images.
    prior: ImageData | None = field(init=False, default=None)
    prior_latents: LatentData | None = field(init=False, default=None)

    def batches(self, start_micro_step: int, value_range: tuple[float, float]) -> BatchSource:
        """This rank's batches from `start_micro_step` on (in memory, streamed, or latents)."""
        cfg = self.cfg
        if self.latents is not None:
            common = (cfg.batch_size, self.accelerator, cfg.seed, value_range, cfg.random_flip)
            return LatentBatches(self.latents, *common, prior=self.prior_latents)
        assert self.prior is None, "class images come with a pipeline, which has a VAE"
        return make_batches(
            self.data,
            cfg.batch_size,
            self.accelerator,
            cfg.seed,
            value_range,
            cfg.random_flip,
            start_micro_step,
            cfg.num_workers,
        )

    @property
    def is_writer(self) -> bool:
        """Writes checkpoints, exports and files: the global main process, or each node's."""
        return is_writer(self.accelerator, self.cfg)

    @property
    def sharded(self) -> bool:
        """--sharding: checkpoints in shards, the network sharded on 2+ processes."""
        return self.cfg.sharding != "none"

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def global_batch_size(self) -> int:
        cfg = self.cfg
        return cfg.batch_size * self.accelerator.num_processes * cfg.gradient_accumulation_steps

    def begin(self, exports: tuple[str, ...] = ()) -> None:
        """Take the run directory and start writing: lock, config.yaml, tracker (collective).

        Called once everything that can refuse the run has passed. The lock comes first: a
        second run into the same directory stops here, having written nothing. `exports`: the
        names of the run's export folders, whose temporary folders a killed export left.
        """
        cfg, acc = self.cfg, self.accelerator
        error = None
        if self.is_writer:
            try:
                self.lock = RunLock.acquire(self.output_dir)
                # Temporary folders left now are from saves and exports that were killed
                # (`ddp_utils.files.temp_path` names): ours to remove.
                leftovers = [*self.checkpoints_dir.glob(".checkpoint-*")]
                for name in exports:
                    leftovers += self.output_dir.glob(f".{name}.tmp-*")
                    leftovers += self.output_dir.glob(f".{name}.old-*")
                for leftover in leftovers:
                    shutil.rmtree(leftover, ignore_errors=True)
                if cfg.checkpoints_total_limit is not None:  # a kill between save and prune
                    prune(self.checkpoints_dir, cfg.checkpoints_total_limit)
                save_config(cfg, self.output_dir / "config.yaml")
            except InputError as err:
                error = err
            except OSError as err:
                reason = err.strerror or str(err)
                error = InputError(f"cannot write into {self.output_dir}: {reason}", "output_dir")
        others = InputError("cannot be used (the main process says why)", "output_dir")
        raise_together(acc, error, others)
        if self.checkpoint is not None:
            logger.info("resumed from %s (step %d)", self.checkpoint.path, self.checkpoint.step)
        self.tracker = Tracker(
            acc,
            self.output_dir,
            cfg.report_to,
            cfg.wandb_project,
            cfg.run_name,
            to_dict(cfg),
            resume_step=None if self.checkpoint is None else self.checkpoint.step,
            is_writer=self.is_writer,
            log_model=cfg.log_model,
        )

    def prepare(
        self, model: torch.nn.Module, shard_units: tuple[str, ...] = ()
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Speed options, the optimizer, and Accelerate's wrapping (DDP or FSDP2, autocast) of
        both. `shard_units`: the classes of the network's blocks, one FSDP unit each under
        --sharding (none: the network cannot be sharded)."""
        cfg, acc = self.cfg, self.accelerator
        if cfg.gradient_checkpointing:
            if not getattr(model, "_supports_gradient_checkpointing", False):
                raise InputError(
                    f"{type(model).__name__} does not support it (diffusers' UNet2DModel "
                    "does: for the basic model, --model unet)",
                    "gradient_checkpointing",
                )
            model.enable_gradient_checkpointing()
            logger.info(
                "gradient checkpointing: %s's blocks recompute their activations in the backward",
                type(model).__name__,
            )
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg.compile:
            compile_network(model, cfg.compile_backend, cfg.compile_mode)
        if self.sharded:
            if not shard_units:
                raise InputError(
                    f"{type(model).__name__} has no blocks to shard; train it with --sharding none",
                    "sharding",
                )
            self.template = weightless_copy(model)
            if acc.is_fsdp2:
                set_units(acc, shard_units)
        trained = [p for p in model.parameters() if p.requires_grad]  # all, or an adapter's
        optimizer = make_optimizer(cfg.optimizer, trained, cfg.learning_rate, cfg.weight_decay)
        num_trained = sum(p.numel() for p in trained)
        model, optimizer = acc.prepare(model, optimizer)
        self.describe(sum(p.numel() for p in model.parameters()), num_trained)
        if acc.is_fsdp2:
            num_units = sum(isinstance(m, FSDPModule) for m in model.modules())
            mesh = getattr(acc, "torch_device_mesh", None)  # HSDP's 2-D mesh
            groups = (
                f"{acc.num_processes} processes"
                if mesh is None
                else f"{mesh['dp_shard'].size()} processes, {mesh['dp_replicate'].size()} copies"
            )
            logger.info(
                "sharded over %s, FSDP2 units: %s (%d units with the root)%s",
                groups,
                ", ".join(shard_units),
                num_units,
                ", the shards offloaded to CPU memory" if cfg.fsdp_cpu_offload else "",
            )
        return model, optimizer

    def full_network(
        self, net: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None
    ) -> torch.nn.Module:
        """A whole, unsharded copy of the sharded `net` on this process's device (collective),
        with `weights` (the EMA's) or its own: what sampling and the export use."""
        assert self.template is not None, "full_network is for --sharding runs"
        return full_copy(self.template, net, self.accelerator.device, weights)

    # ------------------------------------------------------------------ checkpoints

    def restore(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: EMA | None,
        task_info: dict[str, Any],
    ) -> int:
        """Load the resumed checkpoint into the (prepared) model/optimizer; return its step.

        Refuses a checkpoint of another model class, model config or task (`task_info["task"]`,
        as passed to `save`), then one trained with other flags (`check_resumed_flags`),
        listing every difference.
        """
        ckpt = self.checkpoint
        if ckpt is None:
            return 0
        unwrapped = self.accelerator.unwrap_model(model)
        saved = {
            "model class": ckpt.state.get("model_class"),
            "task": ckpt.state.get("task"),
            **ckpt.state.get("model_config", {}),
        }
        current = {
            "model class": network_class(unwrapped).__name__,
            "task": task_info.get("task"),
            **dict(unwrapped.config),
        }
        differences = config_differences(saved, current)
        # The noise schedule (prediction type, betas, T; EDM's constants): the keys both know.
        saved_schedule = ckpt.state.get("scheduler_config") or {}
        schedule = task_info.get("scheduler_config") or {}
        shared = set(saved_schedule) & set(schedule)
        differences += [
            f"noise schedule {line}"
            for line in config_differences(
                {k: saved_schedule[k] for k in shared}, {k: schedule[k] for k in shared}
            )
        ]
        if differences:
            raise CheckpointError(
                f"{ckpt.path} was made for a different model:\n  "
                + "\n  ".join(differences)
                + "\ngive the flags it was made with (its run's config.yaml), use another "
                "--output-dir, or --resume none to start over"
            )
        check_resumed_flags(self.cfg, ckpt, self.checkpoints_dir)
        self._warn_if_world_changed(ckpt)
        if ckpt.sharded:
            self._restore_shards(ckpt, unwrapped, optimizer, ema)
        elif self.sharded:
            raise CheckpointError(
                f"{ckpt.path} was written by a run without --sharding (whole tensors); a "
                "--sharding run resumes sharded checkpoints only: resume it with --sharding none"
            )
        else:
            load_trained_weights(unwrapped, ckpt.tensors["model"], ckpt.path)
            optimizer.load_state_dict(
                optimizer_from_safetensors(ckpt.tensors["optimizer"], ckpt.state["optimizer"])
            )
            if ema is not None:
                if "ema" not in ckpt.tensors:
                    raise CheckpointError(f"{ckpt.path} has no ema.safetensors but EMA is enabled")
                ema.load_state_dict(ckpt.tensors["ema"])
        scaler = self.accelerator.scaler
        if scaler is not None and ckpt.state.get("grad_scaler"):
            scaler.load_state_dict(ckpt.state["grad_scaler"])
        self.guard.num_nonfinite_steps = int(ckpt.state.get("num_nonfinite_steps", 0))
        return ckpt.step  # logged by `begin`, once the directory is this run's

    def _restore_shards(
        self,
        ckpt: Checkpoint,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: EMA | None,
    ) -> None:
        """Read a sharded checkpoint into this run's tensors, whatever the number of processes
        that wrote it: each process reads its shards (collective) or, unsharded, the whole."""
        if ema is not None and not any(k.startswith("ema.") for k in shard_metadata(ckpt.path)):
            raise CheckpointError(f"{ckpt.path} holds no EMA weights but EMA is enabled")
        tensors, _ = training_state(model, optimizer, None if ema is None else ema.state_dict())
        distributed = self.accelerator.is_fsdp2
        read_shards(ckpt.path, tensors, distributed)
        ema_state = load_training_state(model, optimizer, tensors, ckpt.state["optimizer"])
        if ema is not None:
            ema.load_state_dict(ema_state)

    def _warn_if_world_changed(self, ckpt: Checkpoint) -> None:
        """Another number of processes continues the run as it was (the micro-batches, their
        noise and dropout are keyed by their position in the stream: `micro_batch_position`)
        when the per-device and the global batch are the ones it was trained with; warn when
        either changed."""
        saved_cfg = ckpt.state.get("config", {})
        saved_processes = ckpt.state.get("num_processes", 1)
        saved_batch = saved_cfg.get("batch_size", 0)
        saved_global = (
            saved_batch * saved_processes * saved_cfg.get("gradient_accumulation_steps", 1)
        )
        if self.accelerator.is_main_process and (saved_batch, saved_global) != (
            self.cfg.batch_size,
            self.global_batch_size,
        ):
            logger.warning(
                "%s was made by %s process(es) with per-device batch %d and global batch %d; "
                "this run has %d with %d and %d: training continues, but not as the original "
                "run would have (keep both batches, changing --gradient-accumulation-steps with "
                "the number of processes, to continue it exactly)",
                ckpt.path.name,
                saved_processes,
                saved_batch,
                saved_global,
                self.accelerator.num_processes,
                self.cfg.batch_size,
                self.global_batch_size,
            )

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: EMA | None,
        task_info: dict[str, Any],
    ) -> Path | None:
        """Write checkpoint-<step> (collective: call on every rank; the writer writes).

        Nothing is written while non-finite steps are being skipped (all ranks agree on that),
        so the newest checkpoint is always one from before the trouble; weights or optimizer
        state that are not finite are never written (the run ends with `NonFiniteError`);
        a write that fails (disk full, read-only) ends it with `OutputError`, on every rank.
        """
        accelerator = self.accelerator
        if self.guard.num_skipped_in_a_row:
            if accelerator.is_main_process:
                logger.warning(
                    "not saving checkpoint-%d: the last %d step(s) had a non-finite loss",
                    step,
                    self.guard.num_skipped_in_a_row,
                )
            return None
        if self.sharded:
            return self._save_shards(step, model, optimizer, ema, task_info)
        unwrapped = accelerator.unwrap_model(model)
        opt_tensors, opt_meta = optimizer_to_safetensors(optimizer.state_dict())
        tensors = {"model": trained_weights(unwrapped), "optimizer": opt_tensors}
        if ema is not None:
            tensors["ema"] = ema.state_dict()
        not_finite = [name for name, named in tensors.items() if not all_finite(named.values())]
        if not_finite:  # every rank holds the same weights: every rank raises here
            self.fail_nonfinite(
                f"after step {step} the {' and '.join(not_finite)} tensors hold non-finite "
                "values (an update diverged although its loss was finite); "
                f"checkpoint-{step} was not written"
            )
        path, error = None, None
        if self.is_writer:
            state = self._checkpoint_state(unwrapped, opt_meta, task_info)
            try:
                path = write_checkpoint(
                    self.checkpoints_dir, step, tensors, state, self.cfg.checkpoints_total_limit
                )
                logger.info("saved %s", path)
            except (OSError, SafetensorError) as err:
                error = self.output_error(f"checkpoint-{step}", self.checkpoints_dir, err)
        raise_together(accelerator, error, OutputError("the main process could not save"))
        accelerator.wait_for_everyone()
        return path

    def _checkpoint_state(
        self, unwrapped: torch.nn.Module, opt_meta: dict[str, Any], task_info: dict[str, Any]
    ) -> dict[str, Any]:
        """What state.json says besides the files: config, model, optimizer hyper-parameters,
        grad scaler, processes, the task."""
        scaler = self.accelerator.scaler
        return {
            "config": to_dict(self.cfg),
            "model_class": network_class(unwrapped).__name__,
            "model_config": dict(unwrapped.config),
            "optimizer": opt_meta,
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "num_processes": self.accelerator.num_processes,
            "num_nonfinite_steps": self.guard.num_nonfinite_steps,
            **task_info,
        }

    def _save_shards(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: EMA | None,
        task_info: dict[str, Any],
    ) -> Path | None:
        """`save` of a sharded run (collective): every process writes its shard into one
        temporary folder (named by the main process), hashes it; the main process writes
        state.json with every file's record, renames the folder into place, prunes."""
        acc = self.accelerator
        tensors, opt_meta = training_state(
            model, optimizer, None if ema is None else ema.state_dict()
        )
        parts = {
            part: [v for k, v in tensors.items() if k.startswith(part + ".")] for part in PARTS
        }
        not_finite = [part for part, values in parts.items() if values and not
                      all_finite_everywhere(acc, values)]  # fmt: skip
        if not_finite:  # every rank knows: every rank raises here
            self.fail_nonfinite(
                f"after step {step} the {' and '.join(not_finite)} tensors hold non-finite "
                "values (an update diverged although its loss was finite); "
                f"checkpoint-{step} was not written"
            )
        final = self.checkpoints_dir / f"checkpoint-{step}"
        tmp, error = [temp_path(final)], None
        if acc.is_main_process:
            try:
                tmp[0].mkdir(parents=True)
            except OSError as err:
                error = self.output_error(f"checkpoint-{step}", self.checkpoints_dir, err)
        raise_together(acc, error, OutputError("the main process could not save"))
        if acc.num_processes > 1:
            broadcast_object_list(tmp)  # the main process's name, on every rank
        folder, records = tmp[0], {}
        try:
            records = write_shards(folder, tensors, distributed=acc.is_fsdp2)
        except (OSError, SafetensorError, CheckpointException) as err:
            error = self.output_error(f"checkpoint-{step}", self.checkpoints_dir, err)
        if error is not None and acc.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
        raise_together(acc, error, OutputError("another process could not save its shard"))
        files = records
        if acc.num_processes > 1:
            files = {k: v for part in gather_object([records]) for k, v in part.items()}
        path = None
        if acc.is_main_process:
            state = self._checkpoint_state(
                acc.unwrap_model(model), opt_meta, {FORMAT: SHARDED, **task_info}
            )
            try:
                write_state(folder, step, dict(sorted(files.items())), state)
                publish_dir(folder, final)
                path = final
                if self.cfg.checkpoints_total_limit is not None:
                    prune(self.checkpoints_dir, self.cfg.checkpoints_total_limit, keep=(final,))
                logger.info("saved %s (%d shards)", path, len(files))
            except OSError as err:
                error = self.output_error(f"checkpoint-{step}", self.checkpoints_dir, err)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        raise_together(acc, error, OutputError("the main process could not save"))
        acc.wait_for_everyone()
        return path

    def output_error(self, what: str, where: Path, err: BaseException) -> OutputError:
        """The message for a failed write: what, where, why, what is intact, what to do."""
        newest = list_checkpoints(self.checkpoints_dir)
        intact = (
            f"The earlier checkpoints are intact (newest: {newest[-1].name}); after fixing it, "
            "run the same command again: it resumes from there."
            if newest
            else "No checkpoint was written yet."
        )
        return OutputError(f"could not write {what} in {where}: {write_failure(err)}. {intact}")

    def fail_nonfinite(self, what: str) -> NoReturn:
        """End a diverged run: close it and raise `NonFiniteError` naming the last good
        checkpoint (collective: every rank must have come to the same conclusion)."""
        self.tracker.log({"nonfinite_steps": self.guard.num_nonfinite_steps}, self.step)
        self.finish()
        latest = list_checkpoints(self.checkpoints_dir)
        remedy = "lower --learning-rate, keep --max-grad-norm on, or prefer bf16 to fp16"
        if not latest:
            raise NonFiniteError(
                f"{what}. No checkpoint yet: {remedy[0].upper()}{remedy[1:]}, then run the "
                "command again (with no checkpoint it starts over)."
            )
        raise NonFiniteError(
            f"{what}. Last good checkpoint: {latest[-1].name}. Resumed with the same flags it "
            f"would repeat the same steps (resume is exact): {remedy}, and go on from it as a "
            f"new run (--resume {latest[-1]} --output-dir <a new folder>) or start over "
            "(--resume none)."
        )

    # ------------------------------------------------------------------ guarding the loop

    def check(self, step: int) -> Verdict:
        """At a boundary after `step` steps: what all ranks agree happened since the last one.

        Logs the skipped steps; ends the run (`NonFiniteError`, nothing saved) when a streak
        reached `--max-nonfinite-steps`. Collective: one all-reduce, one read.
        """
        self.step = step
        verdict = self.guard.check(step)
        if verdict.skip_report and self.accelerator.is_main_process:
            logger.warning("%s", verdict.skip_report)
        if verdict.streak_too_long:
            self.fail_nonfinite(f"{verdict.streak_too_long}; stopped without saving")
        return verdict

    def stop(self, step: int, reason: str) -> NoReturn:
        """End the run after a stop verdict: close tracker and signal handlers, then raise
        `TrainingStopped` (exit code 75). Save the checkpoint at `step` before calling this."""
        self.finish()
        saved = self.checkpoints_dir / f"checkpoint-{step}"
        raise TrainingStopped(
            f"stopped after step {step}/{self.cfg.max_steps}: {reason}. "
            + (f"Saved {saved}. " if saved.is_dir() else "No checkpoint at this step. ")
            + "Run the same command again to resume."
        )

    def finish(self) -> None:
        """Close the tracker (collective), put back the signal handlers, release the lock."""
        self.tracker.finish()
        self.guard.restore_signal_handlers()
        if self.lock is not None:
            self.lock.release()

    # ------------------------------------------------------------------ reporting

    def describe(self, num_parameters: int, num_trained: int) -> None:
        cfg, acc = self.cfg, self.accelerator
        logger.info(
            "data: %s, %d images at %dx%d, %d channel(s)%s",
            self.data.source,
            self.data.num_images,
            cfg.resolution,
            cfg.resolution,
            cfg.channels,
            f" ({self.data.num_skipped} unreadable skipped)" if self.data.num_skipped else "",
        )
        if self.data.class_names:
            names = self.data.class_names
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            logger.info("classes: %d (%s)", len(names), shown)
        logger.info(
            "batch: per device %d x %d processes x %d accumulation = global %d%s",
            cfg.batch_size,
            acc.num_processes,
            cfg.gradient_accumulation_steps,
            self.global_batch_size,
            ""
            if self.prior is None
            else f", each image beside a class image ({self.prior.source})",
        )
        logger.info(
            "model: %s parameters%s; device %s, mixed precision %s, %s",
            f"{num_parameters:,}",
            "" if num_trained == num_parameters else f", {num_trained:,} of them trained",
            acc.device,
            acc.mixed_precision,
            acc.distributed_type,
        )
        logger.info("run directory: %s", self.output_dir.resolve())
        logger.info(
            "on SIGTERM/SIGUSR1/Ctrl-C%s: save within --log-every steps, exit %d; rerun to resume",
            f" or when --max-train-time {cfg.max_train_time} is used up"
            if cfg.max_train_time
            else "",
            STOP_EXIT_CODE,
        )


def start_run(cfg: TrainConfig, with_labels: bool = False, with_captions: bool = False) -> Run:
    """The Accelerator, the data and the checkpoint to resume from; nothing is written yet.

    A run that is going to be refused (a dataset typo, a checkpoint of another model) must
    fail before it touches the run directory: `Run.begin` takes the directory and writes into
    it once the model is built and the checkpoint restored. `with_labels`: the data must
    carry class labels (class-conditional training); `with_captions`: captions (text, from
    the config's `caption_column`, else the one detected).
    """
    # An accelerate config that says FSDP must agree with --sharding (the flag decides how).
    check_launch(cfg.sharding, cfg.fsdp_cpu_offload)
    accelerator = make_accelerator(
        cfg.mixed_precision,
        cfg.gradient_accumulation_steps,
        cfg.report_to,
        cfg.output_dir,
        cfg.seed,
        sharding=cfg.sharding,
        fsdp_cpu_offload=cfg.fsdp_cpu_offload,
        hsdp_shard_size=cfg.hsdp_shard_size,
    )
    setup_logging(accelerator.is_main_process)
    watch_launcher()  # under torchrun: stop when the launcher dies (kill -9), not train on
    # The time budget counts from here; signal handlers come with the first step.
    guard = StepGuard(
        accelerator,
        parse_duration(cfg.max_train_time) if cfg.max_train_time else None,
        cfg.max_nonfinite_steps,
    )
    output_dir = Path(cfg.output_dir)  # not a file: TrainConfig checked it
    # A directory another run holds is refused at once: before the data loads, and before
    # its checkpoints are read (or one is named in the log as the one this run resumes from).
    error = None
    if is_writer(accelerator, cfg):
        try:
            check_not_in_use(output_dir)
        except InputError as err:
            error = err
    raise_together(accelerator, error, InputError("is in use by another run", "output_dir"))
    if cfg.push_to_hub:  # offline, no token, a token the hub refuses: now, not after training
        error = None
        if accelerator.is_main_process:  # one question to the hub, not one per process
            try:
                check_can_push(hub_repo_id(cfg.hub_model_id, cfg.output_dir))
            except InputError as err:
                error = err
        others = InputError("cannot be done (the main process says why)", "push_to_hub")
        raise_together(accelerator, error, others)
    data = load_image_data(
        cfg.dataset,
        cfg.resolution,
        cfg.channels,
        dataset_config=cfg.dataset_config,
        split=cfg.split,
        image_column=cfg.image_column,
        center_crop=cfg.center_crop,
        max_images=cfg.max_images,
        accelerator=accelerator,
        data_loading=cfg.data_loading,
        batch_size=cfg.batch_size,
        with_labels=with_labels,
        label_column=cfg.label_column,
        with_captions=with_captions,
        caption_column=getattr(cfg, "caption_column", None),
        instance_prompt=getattr(cfg, "instance_prompt", None),
    )
    # Not given: the images' own size and channels (logged by the loading).
    cfg.channels, cfg.resolution = data.images.shape[1], data.images.shape[-1]
    cfg.check_image_size()
    # Every rank reads the checkpoint itself (no broadcast of large tensors needed).
    checkpoint = _find_checkpoint_everywhere(accelerator, output_dir / "checkpoints", cfg.resume)
    if checkpoint is None and cfg.resume == "latest" and (output_dir / "checkpoints").exists():
        logger.info("no intact checkpoint in %s: starting from scratch", output_dir)
    if checkpoint is not None and checkpoint.step > cfg.max_steps:
        raise InputError(
            f"{checkpoint.path} is at step {checkpoint.step}, beyond --max-steps "
            f"{cfg.max_steps}: raise --max-steps to train on, or use --resume none or another "
            "--output-dir to start over",
            "max_steps",
        )
    return Run(cfg, accelerator, output_dir, data, checkpoint, guard)


def check_resumed_flags(cfg: TrainConfig, checkpoint: Checkpoint, checkpoints_dir: Path) -> None:
    """Refuse to resume this run's own checkpoint with training flags other than its saved
    config, but those of `cfg.may_change_on_resume`: config.yaml and the model card would
    describe values no step was trained with. Another run's checkpoint (`--resume PATH` into a
    new --output-dir) starts a new run from it: the differences are logged, not refused. Flags
    the checkpoint predates are not compared."""
    saved = checkpoint.state.get("config") or {}
    current = json.loads(json.dumps(to_dict(cfg)))  # as the checkpoint stored it
    differences = [
        f"{flag_name(name)}: {checkpoint.path.name} was trained with {saved[name]!r}, "
        f"this run gives {current[name]!r}"
        for name in current
        if name in saved and name not in cfg.may_change_on_resume and saved[name] != current[name]
    ]
    if not differences:
        return
    if checkpoint.path.parent.resolve() != checkpoints_dir.resolve():
        logger.warning(
            "a new run from %s, with other training flags:\n  %s",
            checkpoint.path,
            "\n  ".join(differences),
        )
        return
    raise InputError(
        f"this run would resume {checkpoint.path} with other training flags:\n  "
        + "\n  ".join(differences)
        + "\ngive the values it was trained with; or go on from it with these as a new run: "
        f"--resume {checkpoint.path} --output-dir <a new folder>; or start over: --resume none "
        "or another --output-dir. These may change on resume: "
        + ", ".join(flag_name(n) for n in sorted(cfg.may_change_on_resume))
    )


def write_failure(err: BaseException) -> str:
    """Why a write failed, in the system's words ("No space left on device"): an OSError's
    own, or the one safetensors' Rust code wraps in its SafetensorError's text."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    found = re.search(r"I/O error: (.+?) \(os error \d+\)", str(err))
    return found.group(1) if found else str(err)


def is_writer(accelerator: Accelerator, cfg: TrainConfig) -> bool:
    """The one process per shared run directory that writes into it."""
    if cfg.save_on_each_node:
        return accelerator.is_local_main_process
    return accelerator.is_main_process


def _find_checkpoint_everywhere(
    accelerator: Accelerator, checkpoints_dir: Path, resume: str
) -> Checkpoint | None:
    """`find_resume_checkpoint` on every rank, and an error on every rank (not a hang on the
    others) when one rank cannot read it or the ranks found different steps."""
    checkpoint, error = None, None
    try:
        checkpoint = find_resume_checkpoint(checkpoints_dir, resume)
    except CheckpointError as err:
        error = err
    if accelerator.num_processes == 1:
        if error is not None:
            raise error
        return checkpoint
    step = -2 if error is not None else -1 if checkpoint is None else checkpoint.step
    steps = accelerator.gather(torch.tensor([step], device=accelerator.device)).tolist()
    if error is not None:
        raise error
    if len(set(steps)) > 1:
        raise CheckpointError(
            f"the ranks found different checkpoints to resume from (steps by rank: {steps}; "
            "-1: none, -2: unreadable): the run directory must be one folder that every node "
            "sees, or with --save-on-each-node every node needs the same checkpoints"
        )
    return checkpoint
