"""The pieces the training loop is made of, each on its own: metric windows, cadence, atomic
publishing, sharded work, and the package boundaries the layout promises."""

from __future__ import annotations

import ast
import math
import stat
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ddp_utils import files
from ddp_utils.distributed import local_chunks, map_sharded
from ddp_utils.guard import StepGuard
from ddp_utils.loop import due
from ddp_utils.metrics import MetricWindow

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- metrics


def test_a_window_averages_committed_steps_and_drops_skipped_ones() -> None:
    window = MetricWindow(CPU)
    window.report("loss", torch.tensor([1.0, 3.0]))  # two micro-batches of one step
    window.commit(True)
    window.report("loss", torch.tensor([float("nan")]))  # a skipped step
    window.commit(False)
    window.report("loss", torch.tensor(5.0))
    window.commit(torch.tensor(True))
    window.report("loss", torch.tensor(float("inf")))
    window.commit(torch.tensor(False))  # a device-side verdict: where(), not a product
    accelerator = SimpleNamespace(num_processes=1)
    assert window.reduce(accelerator) == {"loss": 3.0}
    # A window in which every step was skipped logs no loss at all (never NaN).
    window.report("loss", torch.tensor(float("nan")))
    window.commit(False)
    assert window.reduce(accelerator) == {}


def test_binned_values_with_empty_bins_are_left_out() -> None:
    window = MetricWindow(CPU)
    window.add("loss_t_q0", torch.tensor(6.0), torch.tensor(3.0))
    window.add("loss_t_q1", torch.tensor(0.0), 0)
    window.commit()
    values = window.reduce(SimpleNamespace(num_processes=1))
    assert values == {"loss_t_q0": 2.0} and not any(map(math.isnan, values.values()))


def test_the_guard_counts_a_streak_alike_in_its_warning_and_its_error() -> None:
    """Non-finite losses from step 5 on, --max-nonfinite-steps 3, a boundary at step 10: the
    warning and the error name the same streak (steps 5..10, 6 in a row)."""
    accelerator = SimpleNamespace(device=CPU, num_processes=1)
    guard = StepGuard(accelerator, None, 3)  # type: ignore[arg-type]
    for step in range(10):  # 0-based optimizer steps: the 5th is index 4
        guard.step_ok(step, torch.tensor(float("nan") if step >= 4 else 1.0))
    guard.restore_signal_handlers()
    verdict = guard.check(10)
    assert verdict.skip_report == (
        "step 10: non-finite loss on 1 of 1 rank(s) and 5 earlier step(s) since the last "
        "report; update skipped (6 in a row, 6 in total)"
    )
    assert verdict.streak_too_long == (
        "steps 5..10: 6 optimizer steps in a row had a non-finite loss (--max-nonfinite-steps 3)"
    )


def test_due_every_n_steps_and_at_the_last_step() -> None:
    assert [s for s in range(1, 11) if due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if due(s, 0, 10)] == [10]  # 0: only at the end


# --------------------------------------------------------------------------- files


def test_atomic_file_replaces_only_on_success(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    files.write_text(path, "old\n")
    with pytest.raises(RuntimeError), files.atomic_file(path, "w") as f:
        f.write("half of a new file")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_dir_swaps_a_folder_in_whole(tmp_path: Path, monkeypatch, exchange: bool) -> None:
    """With renameat2 (Linux) the swap is one step; without, the old folder is renamed aside."""
    if not exchange:
        monkeypatch.setattr(files, "exchange", lambda a, b: False)
    folder = tmp_path / "pipeline"
    with files.atomic_dir(folder) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError), files.atomic_dir(folder) as tmp:
        (tmp / "weights").write_text("half of v2")
        raise RuntimeError("export failed")
    assert (folder / "weights").read_text() == "v1"
    with files.atomic_dir(folder) as tmp:
        (tmp / "weights").write_text("v2")
    assert (folder / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]


def test_published_files_are_readable_like_any_file_the_user_writes(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "export"
    with files.atomic_dir(folder) as tmp:
        save_file({"w": torch.zeros(2)}, tmp / "weights.safetensors")  # created 0600
        (tmp / "config.json").write_text("{}")
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == files.FILE_MODE, path.name
    assert files.FILE_MODE & stat.S_IRGRP  # group-readable under the usual umask 022


def test_exchange_really_swaps_on_this_machine(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    if not files.exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (b / "x").read_text() == "a" and not (a / "x").exists()


# --------------------------------------------------------------------------- sharded work


class ThreadWorld:
    """N ranks as threads of one process, with a real all-gather (what Accelerate's does)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world

    def accelerator(self, rank: int) -> SimpleNamespace:
        def gather(tensor: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = tensor
            self.barrier.wait()
            out = torch.cat(self.slots)  # type: ignore[arg-type]
            self.barrier.wait()  # everyone has read the slots before the next round
            return out

        return SimpleNamespace(
            num_processes=self.world, process_index=rank, device=CPU, gather=gather
        )

    def run(self, fn) -> list:
        results: list = [None] * self.world
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(self.accelerator(rank))
            except BaseException as err:  # noqa: BLE001 - re-raised below
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        if errors:
            raise errors[0]
        return results


def test_chunks_go_to_rank_k_mod_world() -> None:
    assert local_chunks(10, 3, 2, 1) == [range(3, 6), range(9, 10)]
    assert local_chunks(10, 3, 1, 0) == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    assert local_chunks(4, 8, 2, 1) == []  # one chunk only: rank 1 has nothing to do


@pytest.mark.parametrize("num_items", [4, 5, 11])
def test_sharded_work_is_gathered_in_item_order_and_idle_ranks_do_none(num_items: int) -> None:
    """Rank 1 has no chunk with 4 items (chunk 4): it learns the result's shape from rank 0."""
    made: dict[int, list[range]] = {0: [], 1: []}

    def work(accelerator) -> torch.Tensor:
        def make(items: range) -> torch.Tensor:
            made[accelerator.process_index].append(items)
            values = torch.arange(items.start, items.stop, dtype=torch.uint8)
            return values[:, None, None].expand(-1, 2, 3).clone()

        return map_sharded(accelerator, num_items, 4, make)

    outputs = ThreadWorld(2).run(work)
    expected = torch.arange(num_items, dtype=torch.uint8)[:, None, None].expand(-1, 2, 3)
    for out in outputs:
        assert out.dtype == torch.uint8 and torch.equal(out, expected)
    assert made[0] == local_chunks(num_items, 4, 2, 0)
    assert made[1] == local_chunks(num_items, 4, 2, 1)  # [] for 4 items: no work at all
    single = map_sharded(None, num_items, 4, lambda r: expected[r.start : r.stop])
    assert torch.equal(single, expected)


# --------------------------------------------------------------------------- boundaries


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(module, at top level?) for every import in a file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, id(node) in top))
    return found


def test_ddp_utils_holds_no_model_code_and_hides_no_import() -> None:
    problems = []
    for path in sorted((REPO / "ddp_utils").rglob("*.py")):
        for module, top_level in imports_of(path):
            if module.split(".")[0] == "diffusion":
                problems.append(f"{path.name} imports {module}")
            if not top_level and module.split(".")[0] in ("ddp_utils", "diffusion", "evaluation"):
                problems.append(f"{path.name} imports {module} inside a function")
    assert not problems, problems
