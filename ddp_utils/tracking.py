"""Where numbers and pictures go: wandb (through Accelerate), `metrics.jsonl`, PNG files.

Every rank may call these methods; only the main process writes or talks to wandb. A wandb
problem (not logged in, no network, a broken install) falls back to offline mode, then to no
wandb at all, each time with a warning: tracking never stops training. The run directory
always gets `metrics.jsonl`, `loss.png` and the sample grids, for users without wandb.

On resume the same wandb run is continued (its id is kept in `<output-dir>/wandb_run_id`) and
`metrics.jsonl` is cut back to the resumed step, so no step appears twice.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from ddp_utils.files import write_text
from ddp_utils.images import upscale

logger = logging.getLogger(__name__)


def _wandb_has_credentials() -> bool:
    """An API key in the environment or in the netrc file `wandb login` writes to.

    Read directly: asking wandb (`wandb.api.api_key`) creates its settings singleton with the
    online mode baked in, after which even an offline `wandb.init` demands a key.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reset_wandb() -> None:
    try:
        import wandb

        wandb.teardown()
    except Exception as err:  # noqa: BLE001 - best effort before the offline retry
        logger.warning("wandb teardown failed: %s", err)


ReportTo = Literal["wandb", "tensorboard", "all", "none"]
MIN_PICTURE_SIDE = 512  # pictures are upscaled (nearest) until their longer side reaches this
SUMMARY_MIN = ("fid", "kid_mean")  # wandb summarises these by their best (lowest) value
SUMMARY_MAX = ("clip_score",)  # ... and these by their best (highest)


class Tracker:
    """metrics.jsonl, PNGs and loss.png always; wandb and/or TensorBoard through Accelerate's
    tracker classes (`accelerator.log` reaches every tracker started here)."""

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: Path,
        report_to: ReportTo,
        project: str,
        run_name: str | None,
        config: dict[str, Any],
        resume_step: int | None,
        is_writer: bool | None = None,
        log_model: bool = False,
    ) -> None:
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.is_main = accelerator.is_main_process  # talks to wandb and TensorBoard
        # Writes metrics.jsonl, samples/ and loss.png: the main process, or with a node-local
        # run directory (--save-on-each-node) the main process of every node.
        self.is_writer = self.is_main if is_writer is None else is_writer
        self.metrics_file = self.output_dir / "metrics.jsonl"
        self.images_dir = self.output_dir / "samples"
        self.use_wandb = report_to in ("wandb", "all")
        self.log_model = log_model
        self.tensorboard: TensorBoardTracker | None = None
        if self.is_writer:
            self.images_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_metrics(resume_step)
        if self.use_wandb:
            self.use_wandb = self._init_wandb(project, run_name, config, resume_step)
        if report_to in ("tensorboard", "all") and self.is_main:
            self.tensorboard = self._init_tensorboard(project, config, resume_step)

    def _init_tensorboard(
        self, project: str, config: dict[str, Any], resume_step: int | None
    ) -> TensorBoardTracker | None:
        """Event files in `<output-dir>/tensorboard/<project>/`; a resume purges the steps
        after the checkpoint, so no step appears twice."""
        kwargs = {} if resume_step is None else {"purge_step": resume_step + 1}
        try:
            tracker = TensorBoardTracker(project, self.output_dir / "tensorboard", **kwargs)
            tracker.start()
            # add_hparams takes bool/str/int/float only.
            tracker.store_init_configuration(
                {
                    k: v if isinstance(v, bool | str | int | float) else str(v)
                    for k, v in config.items()
                }
            )
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            logger.warning("TensorBoard could not start (%s: %s); continuing without it",
                           type(err).__name__, err)  # fmt: skip
            return None
        self.accelerator.trackers.append(tracker)
        return tracker

    # ------------------------------------------------------------------ setup

    def _truncate_metrics(self, resume_step: int | None) -> None:
        """Keep only lines up to the resumed step (all lines are dropped on a fresh start)."""
        if not self.metrics_file.exists():
            return
        kept = []
        if resume_step is not None:
            for line in self.metrics_file.read_text().splitlines():
                try:
                    if json.loads(line).get("step", math.inf) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
        write_text(self.metrics_file, "".join(line + "\n" for line in kept))

    def _run_id(self, resume_step: int | None) -> str:
        id_file = self.output_dir / "wandb_run_id"
        if resume_step is not None and id_file.exists():
            return id_file.read_text().strip()
        return self._new_run_id()

    def _new_run_id(self) -> str:
        run_id = uuid.uuid4().hex[:12]
        if self.is_main:
            write_text(self.output_dir / "wandb_run_id", run_id + "\n")
        return run_id

    def _init_wandb(
        self,
        project: str,
        run_name: str | None,
        config: dict[str, Any],
        resume_step: int | None,
    ) -> bool:
        """Start (or resume) the wandb run on the main process. Returns False if disabled."""
        ok = True
        if self.is_main:
            # wandb files go to $WANDB_DIR/wandb when the user set it, else <output-dir>/wandb.
            wandb_dir = os.environ.get("WANDB_DIR") or str(self.output_dir)
            # The mode goes to wandb.init explicitly: wandb reads WANDB_MODE only once.
            mode = os.environ.get("WANDB_MODE") or None  # the user's choice wins
            if mode is None and not _wandb_has_credentials():
                logger.warning(
                    "wandb: no API key found (run `wandb login`); logging offline to %s — "
                    "sync later with `wandb sync`",
                    Path(wandb_dir) / "wandb",
                )
                mode = "offline"
            wandb_kwargs = {
                "id": self._run_id(resume_step),
                "resume": "allow",
                "name": run_name,
                "dir": wandb_dir,
            }
            if mode is not None:
                wandb_kwargs["mode"] = mode
            ok = self._try_init(project, config, {"wandb": wandb_kwargs})
            if not ok and mode not in ("offline", "disabled"):
                logger.warning("wandb: online init failed; retrying offline")
                _reset_wandb()  # else the half-started online run keeps its id "in use"
                wandb_kwargs["mode"] = "offline"
                # Offline waits on no server, only on wandb-core starting (slow on a busy node).
                wandb_kwargs["settings"] = {"init_timeout": 300}
                ok = self._try_init(project, config, {"wandb": wandb_kwargs})
                if not ok:
                    # wandb-core may still hold the abandoned online run ("run ID is in
                    # use"): a new id, recorded so that a resume continues this one.
                    _reset_wandb()
                    wandb_kwargs["id"] = self._new_run_id()
                    ok = self._try_init(project, config, {"wandb": wandb_kwargs})
            if not ok:
                logger.warning(
                    "wandb: could not start even offline; continuing without wandb "
                    "(metrics.jsonl and PNGs are still written)"
                )
            else:
                run = self.accelerator.get_tracker("wandb", unwrap=True)
                for name in SUMMARY_MIN:  # the run's summary shows the best FID, not the last
                    run.define_metric(name, summary="min")
                for name in SUMMARY_MAX:
                    run.define_metric(name, summary="max")
        else:
            # Other ranks get Accelerate's no-op tracker stubs.
            self.accelerator.init_trackers(project, config=None)
        return ok

    def _try_init(
        self, project: str, config: dict[str, Any] | None, init_kwargs: dict[str, Any]
    ) -> bool:
        try:
            self.accelerator.init_trackers(project, config=config, init_kwargs=init_kwargs)
            return True
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            logger.warning("wandb init failed: %s: %s", type(err).__name__, err)
            self.accelerator.trackers = []
            return False

    # ------------------------------------------------------------------ logging

    def log(self, values: dict[str, float], step: int) -> None:
        """Log scalars (already averaged across ranks): metrics.jsonl, wandb, TensorBoard."""
        if not self.is_writer:
            return
        # Strict JSON: a non-finite value is written as null (bare NaN is not JSON).
        record = {"step": step, **{k: _finite_or_none(v) for k, v in values.items()}}
        try:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        except OSError as err:  # a full disk: the next checkpoint says so, and stops the run
            logger.warning("could not append to %s: %s", self.metrics_file, err)
        if self.is_main and (self.use_wandb or self.tensorboard is not None):
            self._safe_log(values, step)

    def log_image(
        self, name: str, image: np.ndarray, step: int, rows: Sequence[str] = ()
    ) -> Path | None:
        """Save an HWC uint8 picture as `samples/<name>-<step>.png`, upscaled (nearest) to a
        viewable size, and send it to wandb and TensorBoard. `rows`: what each row of the
        picture shows (a text model's prompts), its caption: wandb's image caption, and in
        TensorBoard (whose images take none) a text `<name>/rows` at the same step."""
        if not self.is_writer:
            return None
        image = upscale(image, MIN_PICTURE_SIDE)
        path = self.images_dir / f"{name}-{step:07d}.png"
        try:
            Image.fromarray(image).save(path)
        except OSError as err:
            logger.warning("could not write %s: %s", path, err)
        if self.use_wandb and self.is_main:
            import wandb

            caption = grid_caption(rows) if rows else None
            self._safe_log({name: wandb.Image(image, caption=caption)}, step, only="wandb")
        if self.tensorboard is not None:
            try:
                self.tensorboard.log_images({name: image[None]}, step, dataformats="NHWC")
            except Exception as err:  # noqa: BLE001 - tracking must never stop training
                logger.warning("TensorBoard image failed (%s)", err)
            if rows:
                self._safe_log({f"{name}/rows": rows_markdown(rows)}, step, only="tensorboard")
        return path

    def log_folder(self, folder: Path, alias: str) -> None:
        """With --log-model: upload an export to wandb as a model artifact (offline runs keep
        it for `wandb sync`). The same artifact name across versions, tagged by `alias`."""
        if not (self.log_model and self.use_wandb and self.is_main):
            return
        try:
            import wandb

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            artifact = wandb.Artifact(f"{run.id}-{folder.name}", type="model")
            artifact.add_dir(str(folder))
            run.log_artifact(artifact, aliases=[alias, "latest"])
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            logger.warning("wandb: could not log %s as an artifact (%s)", folder, err)

    def _safe_log(self, values: dict[str, Any], step: int, only: str | None = None) -> None:
        trackers = [t for t in self.accelerator.trackers if only is None or t.name == only]
        for tracker in trackers:
            try:
                tracker.log(values, step=step)
            except Exception as err:  # noqa: BLE001 - tracking must never stop training
                logger.warning("%s log failed (%s); disabling it for this run", tracker.name, err)
                self.accelerator.trackers.remove(tracker)
                self.use_wandb = self.use_wandb and tracker.name != "wandb"
                if tracker is self.tensorboard:
                    self.tensorboard = None

    def finish(self) -> None:
        """Draw the loss curve and close wandb (call on every rank)."""
        if self.is_writer:
            plot_loss_curve(self.metrics_file, self.output_dir / "loss.png")
        self.accelerator.end_training()


def grid_caption(rows: Sequence[str]) -> str:
    """A grid's caption, its rows top to bottom: "row 1: a handwritten seven | row 2: ..."."""
    return " | ".join(f"row {k}: {row}" for k, row in enumerate(rows, 1))


def rows_markdown(rows: Sequence[str]) -> str:
    """A grid's rows as a numbered Markdown list (TensorBoard renders its texts as Markdown)."""
    return "\n".join(f"{k}. {row}" for k, row in enumerate(rows, 1))


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def read_metrics(path: Path) -> list[dict[str, float]]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_file: Path, out: Path) -> None:
    """loss.png: the logged loss, linear and log scale."""
    rows = [r for r in read_metrics(metrics_file) if r.get("loss") is not None]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    # The object API with its own canvas: no pyplot state, no global backend change.
    fig = Figure(figsize=(10, 3.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    axes[0].plot(steps, losses)
    axes[0].set_title("loss")
    axes[1].plot(steps, losses)
    axes[1].set_yscale("log")
    axes[1].set_title("loss (log scale)")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
