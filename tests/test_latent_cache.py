"""The latent cache as the node's processes build it together: each encodes its chunks, the
cache is the bytes one process writes (variance included), an interrupted build continues
where it stopped (on any number of processes) and one that does not fit is started over.

Processes are threads with the two attributes `load_latents` reads of an accelerator, and
once a real second process (no launcher: LOCAL_WORLD_SIZE is all it needs); 32 digits in
chunks of 8 rows make 4 chunks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ddp_utils.data import ImageData, LatentData, latent_cache, load_image_data, load_latents
from ddp_utils.errors import InputError
from diffusion.codecs import LatentCodec, load_codec
from tests.test_latent import RESOLUTION, make_vae

REPO = Path(__file__).resolve().parents[1]
ENCODE_ROWS = 8
NUM_CHUNKS = 4  # of the 32 digits


class Interrupted(Exception):
    """A process killed in the middle of the build."""


class CountingEncoder:
    """The codec, counting its calls: one image first (the latent shape), then each chunk and
    its mirror image. Raises Interrupted at call `stop_at`."""

    def __init__(self, codec: LatentCodec, stop_at: int | None = None) -> None:
        self.codec, self.fingerprint, self.stop_at = codec, codec.fingerprint, stop_at
        self.calls = 0

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if self.calls == self.stop_at:
            raise Interrupted
        return self.codec.encode(images)


def calls_for(num_chunks: int) -> int:
    return 1 + 2 * num_chunks


@pytest.fixture(scope="module")
def codec(tmp_path_factory) -> LatentCodec:
    return load_codec(make_vae(tmp_path_factory.mktemp("vae") / "vae"))


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch) -> None:
    monkeypatch.setattr(latent_cache, "ENCODE_ROWS", ENCODE_ROWS)
    monkeypatch.setattr(latent_cache, "DECODE_ROWS", 4)
    monkeypatch.setattr(latent_cache, "WAIT_SECONDS", 0.02)


def digits(folder: Path) -> ImageData:
    return load_image_data("digits", RESOLUTION, 1, max_images=32, cache_dir=folder)


def on_processes(
    monkeypatch, num: int, work: Callable[[SimpleNamespace], Any], exported: bool = True
) -> list[Any]:
    """`work(accelerator)` on `num` threads as the node's processes (local ranks 0..num-1,
    LOCAL_WORLD_SIZE=num unless not `exported`); what each returned or raised."""
    if exported:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(num))
    else:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    results: list[Any] = [None] * num

    def run(rank: int) -> None:
        node = SimpleNamespace(local_process_index=rank, is_local_main_process=rank == 0)
        try:
            results[rank] = work(node)
        except Exception as err:  # noqa: BLE001 - handed to the test to check
            results[rank] = err

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(num)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive(), "a process is still waiting"
    return results


def cache_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def assert_same_cache(ours: Path, theirs: Path) -> None:
    """The same files, byte for byte: the arrays and the manifest (the variance's bits)."""
    assert ours != theirs
    mine, others = cache_files(ours), cache_files(theirs)
    assert list(mine) == ["flipped_mean.npy", "flipped_std.npy", "manifest.json", "mean.npy",
                          "std.npy"]  # fmt: skip
    assert list(mine) == list(others)
    for name in mine:
        assert mine[name] == others[name], name


def partial_of(cache_dir: Path) -> Path:
    (partial,) = cache_dir.glob("latents-*.partial")
    return partial


def recorded(cache_dir: Path) -> list[str]:
    return sorted(path.stem for path in (partial_of(cache_dir) / "chunks").glob("*.json"))


def test_two_processes_share_the_encoding_and_write_the_one_process_cache(
    codec, tmp_path, monkeypatch
) -> None:
    data = digits(tmp_path)
    one = load_latents(data, codec, True, cache_dir=tmp_path / "one")
    encoders = [CountingEncoder(codec), CountingEncoder(codec)]

    def build(node: SimpleNamespace) -> LatentData:
        encoder = encoders[node.local_process_index]
        return load_latents(data, encoder, True, node, cache_dir=tmp_path / "two")

    ours = on_processes(monkeypatch, 2, build)
    assert [encoder.calls for encoder in encoders] == [calls_for(2), calls_for(2)]
    assert ours[0].folder == ours[1].folder and ours[0].variance == one.variance
    assert_same_cache(ours[0].folder, one.folder)
    assert not list((tmp_path / "two").glob("*.partial"))  # the build folder was published


def test_without_local_world_size_the_local_main_process_encodes_alone(
    codec, tmp_path, monkeypatch
) -> None:
    """A launcher that does not export LOCAL_WORLD_SIZE: the other process only waits."""
    data = digits(tmp_path)
    encoders = [CountingEncoder(codec), CountingEncoder(codec)]

    def build(node: SimpleNamespace) -> LatentData:
        encoder = encoders[node.local_process_index]
        return load_latents(data, encoder, True, node, cache_dir=tmp_path)

    ours = on_processes(monkeypatch, 2, build, exported=False)
    assert [encoder.calls for encoder in encoders] == [calls_for(NUM_CHUNKS), 1]
    assert np.array_equal(ours[0].mean, ours[1].mean)


def test_a_second_job_building_the_same_cache_waits_for_the_first(codec, tmp_path) -> None:
    """Two one-process jobs on the node, the same cache: one encodes it, the other waits for
    the lock (it neither shares nor removes the first's build folder) and maps the cache."""
    data = digits(tmp_path)
    encoders = [CountingEncoder(codec), CountingEncoder(codec)]
    results: list[Any] = [None, None]

    def job(k: int) -> None:
        results[k] = load_latents(data, encoders[k], True, cache_dir=tmp_path)

    threads = [threading.Thread(target=job, args=(k,), daemon=True) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive()
    assert sorted(encoder.calls for encoder in encoders) == [1, calls_for(NUM_CHUNKS)]
    assert results[0].folder == results[1].folder
    assert np.array_equal(results[0].mean, results[1].mean)


PROCESS = """
import json, sys
from pathlib import Path
from types import SimpleNamespace
import torch
from ddp_utils.data import latent_cache, load_image_data, load_latents
from diffusion.codecs import load_codec
torch.set_num_threads(1)
rank, vae, cache = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
latent_cache.ENCODE_ROWS, latent_cache.WAIT_SECONDS = 8, 0.05
codec = load_codec(vae)
encode, calls = codec.encode, []
codec.encode = lambda images: calls.append(len(images)) or encode(images)
data = load_image_data("digits", 16, 1, max_images=32, cache_dir=cache)
node = SimpleNamespace(local_process_index=rank, is_local_main_process=rank == 0)
latents = load_latents(data, codec, True, node, cache_dir=cache)
print(json.dumps({"calls": calls, "folder": str(latents.folder)}))
"""


def test_a_real_second_process_shares_the_build(codec, tmp_path, monkeypatch) -> None:
    """This process is local process 0 and a Python subprocess local process 1 (no launcher,
    no collective): each encodes two chunks, and both map the one-process cache."""
    data = digits(tmp_path)
    one = load_latents(data, codec, True, cache_dir=tmp_path / "one")
    cache = tmp_path / "two"
    digits(cache)  # the decoded digits, for the other process to read
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    other = subprocess.Popen(
        [sys.executable, "-c", PROCESS, "1", str(codec.folder), str(cache)], cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        encoder = CountingEncoder(codec)
        node = SimpleNamespace(local_process_index=0, is_local_main_process=True)
        ours = load_latents(data, encoder, True, node, cache_dir=cache)
        out, err = other.communicate(timeout=240)
    finally:
        other.kill()
    assert other.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    # The latent shape, then two chunks of 8 and their mirror images: chunks 1 and 3.
    assert report["calls"] == [1, 8, 8, 8, 8] and encoder.calls == calls_for(2)
    assert report["folder"] == str(ours.folder)
    assert_same_cache(ours.folder, one.folder)


def test_an_interrupted_build_continues_without_encoding_its_chunks_again(
    codec, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="ddp_diffusion")
    data = digits(tmp_path)
    whole = load_latents(data, codec, True, cache_dir=tmp_path / "whole")
    cache = tmp_path / "cache"
    with pytest.raises(Interrupted):  # in the third chunk
        load_latents(data, CountingEncoder(codec, stop_at=calls_for(2) + 1), True,
                     cache_dir=cache)  # fmt: skip
    assert recorded(cache) == ["000000", "000001"]
    assert not list(cache.glob("latents-*/manifest.json"))  # nothing published
    again = CountingEncoder(codec)
    resumed = load_latents(data, again, True, cache_dir=cache)
    assert again.calls == calls_for(2)  # the two chunks left
    assert "continuing the interrupted encoding" in caplog.text and "(2 of 4" in caplog.text
    assert_same_cache(resumed.folder, whole.folder)
    assert not list(cache.glob("*.partial"))


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_an_interrupted_build_continues_on_another_number_of_processes(
    codec, tmp_path, monkeypatch, before: int, after: int
) -> None:
    """Progress is kept per chunk, not per process: 2 processes stopped in their second chunk
    (chunks 0 and 1 done) continued by 1, and 1 stopped in its second (chunk 0 done) by 2."""
    data = digits(tmp_path)
    whole = load_latents(data, codec, True, cache_dir=tmp_path / "whole")
    cache = tmp_path / "cache"

    def build(encoders: list[CountingEncoder]) -> Callable[[SimpleNamespace], Any]:
        def work(node: SimpleNamespace) -> Any:
            encoder = encoders[node.local_process_index]
            return load_latents(data, encoder, True, node, cache_dir=cache)

        return work

    stopped = [CountingEncoder(codec, stop_at=calls_for(1) + 1) for _ in range(before)]
    results = on_processes(monkeypatch, before, build(stopped))
    assert all(isinstance(result, Interrupted) for result in results)
    done = {2: ["000000", "000001"], 1: ["000000"]}[before]
    assert recorded(cache) == done
    encoders = [CountingEncoder(codec) for _ in range(after)]
    results = on_processes(monkeypatch, after, build(encoders))
    # Each process encodes its chunks (k % after) not yet recorded, and no other.
    left = [k for k in range(NUM_CHUNKS) if f"{k:06d}" not in done]
    expected = [calls_for(len([k for k in left if k % after == r])) for r in range(after)]
    assert [encoder.calls for encoder in encoders] == expected
    assert_same_cache(results[0].folder, whole.folder)


def test_the_rows_an_interrupted_build_wrote_count_as_space_already_taken(
    codec, tmp_path, monkeypatch
) -> None:
    """The disk check before any work: a build that filled the disk to the last chunk it
    recorded continues on what is left; a new one is refused."""
    data = digits(tmp_path)
    with pytest.raises(Interrupted):  # three chunks written
        load_latents(data, CountingEncoder(codec, stop_at=calls_for(3) + 1), True,
                     cache_dir=tmp_path / "cache")  # fmt: skip
    written = latent_cache.bytes_on_disk(partial_of(tmp_path / "cache"))  # whole disk blocks
    needed = 4 * 32 * 4 * 4 * 4 * 2  # four float16 arrays
    assert written > 0
    monkeypatch.setattr(latent_cache, "disk_free", lambda folder: needed - written)
    with pytest.raises(InputError, match="the latent cache needs"):
        load_latents(data, codec, True, cache_dir=tmp_path / "new")
    load_latents(data, codec, True, cache_dir=tmp_path / "cache")


def test_a_build_folder_that_does_not_fit_is_started_over(
    codec, tmp_path, monkeypatch, caplog
) -> None:
    """Another chunk size, a damaged array, a folder without its layout marker: each warned
    about and encoded again from the start, into the cache an uninterrupted build writes."""
    data = digits(tmp_path)
    whole = load_latents(data, codec, True, cache_dir=tmp_path / "whole")
    cache = tmp_path / "cache"

    def interrupt() -> Path:
        with pytest.raises(Interrupted):  # one chunk recorded
            load_latents(data, CountingEncoder(codec, stop_at=calls_for(1) + 1), True,
                         cache_dir=cache)  # fmt: skip
        return partial_of(cache)

    def other_chunk_size(partial: Path) -> None:
        layout = json.loads((partial / "layout.json").read_text())
        (partial / "layout.json").write_text(json.dumps({**layout, "encode_rows": 16}))

    def truncated_array(partial: Path) -> None:
        (partial / "std.npy").write_bytes((partial / "std.npy").read_bytes()[:300])

    def no_layout(partial: Path) -> None:
        (partial / "layout.json").unlink()

    damages = {"encode_rows": other_chunk_size, "std.npy": truncated_array,
               "no layout marker": no_layout}  # fmt: skip
    for problem, damage in damages.items():
        damage(interrupt())
        caplog.clear()
        again = CountingEncoder(codec)
        rebuilt = load_latents(data, again, True, cache_dir=cache)
        assert "cannot be continued" in caplog.text and "starting it over" in caplog.text
        assert problem in caplog.text
        assert again.calls == calls_for(NUM_CHUNKS)  # all of it
        assert_same_cache(rebuilt.folder, whole.folder)
        for path in rebuilt.folder.iterdir():  # the next round damages a new build
            path.unlink()
        rebuilt.folder.rmdir()


def write_images(folder: Path) -> None:
    """12 files, 2 unreadable: source rows 3 (chunk 0) and 7 (chunk 1)."""
    for c in range(2):
        (folder / f"c{c}").mkdir(parents=True)
        for k in range(5):
            rng = np.random.default_rng(10 * c + k)  # texture: latents that differ per image
            pixels = rng.integers(0, 60, (12, 12)) + 150 * c  # class 1 is the bright one
            Image.fromarray(pixels.astype(np.uint8), "L").save(folder / f"c{c}" / f"{k}.png")
    (folder / "c0" / "2a.png").write_bytes(b"not a png")
    (folder / "c1" / "0a.png").write_bytes(b"not a png either")


def test_a_streamed_dataset_sharded_over_two_processes_gives_the_one_process_cache(
    codec, tmp_path, monkeypatch
) -> None:
    """Each process decodes only its own chunks, each with an unreadable file: the skipped
    rows are named as one process names them, the kept rows compacted in order, every label
    on its latent's row."""
    monkeypatch.setattr(latent_cache, "ENCODE_ROWS", 4)  # 3 chunks: process 0 has 0 and 2
    monkeypatch.setattr(latent_cache, "DECODE_ROWS", 2)
    write_images(tmp_path / "images")

    def load(mode: str) -> ImageData:
        return load_image_data(str(tmp_path / "images"), RESOLUTION, 1, data_loading=mode,
                               with_labels=True, cache_dir=tmp_path / mode)  # fmt: skip

    streamed, memory = load("stream"), load("memory")
    one = load_latents(streamed, codec, True, cache_dir=tmp_path / "one", num_workers=2)
    two = on_processes(monkeypatch, 2, lambda node: load_latents(
        streamed, codec, True, node, cache_dir=tmp_path / "two"))  # fmt: skip
    assert_same_cache(two[0].folder, one.folder)
    manifest = json.loads((two[0].folder / "manifest.json").read_text())
    assert manifest["skipped_rows"] == [3, 7] and manifest["shape"][0] == 10
    assert "2a.png" in manifest["skipped"][0] and "0a.png" in manifest["skipped"][1]
    for ours in two:
        assert torch.equal(ours.labels, memory.labels)
    in_memory = load_latents(memory, codec, True, cache_dir=tmp_path / "memory")
    assert np.array_equal(two[1].mean, in_memory.mean)


def test_a_finish_interrupted_while_compacting_continues_without_encoding(
    codec, tmp_path, monkeypatch
) -> None:
    """Rows skipped: the arrays are cut to the kept rows one at a time (each removed from the
    build folder once its copy is in place, so the disk holds one array twice at most). A
    process killed in the second copy leaves the first; the next run copies the rest."""
    monkeypatch.setattr(latent_cache, "ENCODE_ROWS", 4)
    monkeypatch.setattr(latent_cache, "DECODE_ROWS", 2)
    write_images(tmp_path / "images")
    streamed = load_image_data(str(tmp_path / "images"), RESOLUTION, 1, data_loading="stream",
                               with_labels=True, cache_dir=tmp_path / "data")  # fmt: skip
    whole = load_latents(streamed, codec, True, cache_dir=tmp_path / "whole")
    copy_rows, copies = latent_cache.copy_rows, []

    def killed_in_the_second(*args: Any) -> None:
        copies.append(args)
        if len(copies) == 2:
            raise Interrupted
        copy_rows(*args)

    monkeypatch.setattr(latent_cache, "copy_rows", killed_in_the_second)
    cache = tmp_path / "cache"
    with pytest.raises(Interrupted):
        load_latents(streamed, codec, True, cache_dir=cache)
    partial = partial_of(cache)
    assert [p.name for p in (partial / "compacted").iterdir()] == ["mean.npy"]  # the first
    assert not (partial / "mean.npy").exists()
    monkeypatch.setattr(latent_cache, "copy_rows", copy_rows)
    again = CountingEncoder(codec)
    resumed = load_latents(streamed, again, True, cache_dir=cache)
    assert again.calls == 1  # the latent shape only: every chunk was recorded
    assert_same_cache(resumed.folder, whole.folder)
    assert not list(cache.glob("*.partial"))
    assert torch.equal(resumed.labels, whole.labels)
