"""--sharding fsdp on two CPU processes over gloo (docs/sharding.md): a sharded run trains as
DDP does, its checkpoints hold one shard per process, a kill mid-save resumes bit for bit, a
checkpoint moves between 1 and 2 processes, and its export equals DDP's.

The runs are shared by one module fixture. A one-process sharded run of 3 steps (in this
process) of a class-conditional flow DiT writes checkpoint-3, from which every DiT run below
goes on: on two processes the
sharded reference, the same command killed while checkpoint-6 is half written (then rerun), and
the DDP run of the same command, each to step 8 with a NaN batch on rank 1 in step 5 (skipped);
on four processes HSDP and DDP, one step each. Beside them, a 2-step text-to-image run on
latents (PixArt with EDM, in bf16 with gradient checkpointing and CPU offload) and the basic
model. (DDPM with a cross-attention UNet shards under LoRA: tests/test_finetune_pipelines.py.)
The launches overlap, so that both cores stay busy while one of them waits.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_ddpm
from ddp_utils.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    list_checkpoints,
    read_checkpoint,
    read_shards,
    whole_tensors,
)
from ddp_utils.distributed import check_shard_groups
from ddp_utils.errors import InputError
from ddp_utils.sharding import check_launch
from ddp_utils.train_config import TrainConfig
from diffusion.loading import load_for_sampling
from diffusion.text_encoders import TINY_CLIP
from tests.faulty_runs import Launch, Result
from tests.test_latent import make_vae
from tests.tiny_runs import fresh_accelerate_state, read_jsonl

MAX_STEPS = 8
TINY_DIT = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2}
NAN_IN_STEP_5 = "nan@4:1"  # micro-step 4 (0-based) on rank 1
TOLERANCE = 1e-5  # reduce-scatter and all-reduce may add in different orders


# Text to image on latents: PixArt's transformer (its blocks one unit each), EDM, bf16 compute
# on fp32 weights, diffusers' gradient checkpointing inside the blocks, the shards offloaded to
# CPU memory, the tiny CLIP encoder (loaded whole on every process), a tiny VAE (16x16 ->
# 4x4x4). (A UNet with cross-attention shards under LoRA: tests/test_finetune_pipelines.py.)
TEXT_ARGS = [
    "--sharding", "fsdp", "--dataset", "digits-captioned", "--text-encoder", TINY_CLIP,
    "--backbone", "pixart", "--objective", "edm", "--resolution", "16", "--max-images", "32",
    "--max-steps", "2", "--batch-size", "4", "--mixed-precision", "bf16", "--fsdp-cpu-offload",
    "--gradient-checkpointing", "--checkpoint-every", "2", "--log-every", "1",
    "--sample-every", "2", "--num-sample-images", "2", "--sample-steps", "2",
    "--validation-prompts", "a handwritten seven", "--report-to", "none",
]  # fmt: skip


BASIC_ARGS = [
    "--resolution", "8", "--max-images", "64", "--batch-size", "8", "--max-steps", "4",
    "--checkpoint-every", "4", "--log-every", "1", "--sample-every", "4",
    "--num-sample-images", "8", "--sample-steps", "2", "--report-to", "none",
]  # fmt: skip


def args(out: Path, preset: Path, *extra: str) -> list[str]:
    return [
        "--backbone", "dit", "--preset", str(preset), "--class-conditional", "--objective", "flow",
        "--resolution", "8", "--max-images", "32", "--max-steps", str(MAX_STEPS),
        "--batch-size", "4", "--lr-warmup-steps", "2", "--lr-schedule", "cosine",
        "--checkpoint-every", "2", "--checkpoints-total-limit", "none", "--log-every", "1",
        "--sample-every", "0", "--num-sample-images", "4", "--sample-steps", "2",
        "--ema-max-decay", "0.9", "--report-to", "none", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def finish(launch: Launch) -> Result:
    result = launch.wait()
    assert result.returncode == 0, result.output[-3000:]
    return result


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preset") / "tiny_dit.json"
    path.write_text(json.dumps(TINY_DIT))
    return path


def train(argv: list[str]) -> None:
    """In-process, on one thread (module fixtures are set up before conftest's one-thread one)."""
    fresh_accelerate_state()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_ddpm.main(argv)
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, preset: Path) -> dict:
    tmp = tmp_path_factory.mktemp("sharding")
    one, ref, out, ddp = tmp / "one", tmp / "reference", tmp / "interrupted", tmp / "ddp"
    sharded = ["--sharding", "fsdp"]
    vae = make_vae(tmp / "vae")
    text = Launch(tmp, "train_ddpm.py",
                  [*TEXT_ARGS, "--vae", str(vae), "--output-dir", str(tmp / "text")], 2)  # fmt: skip
    # Meanwhile, one process: 3 steps; every 2-process run below goes on from its checkpoint.
    train(args(one, preset, *sharded, "--max-steps", "3"))
    start = one / "checkpoints" / "checkpoint-3"
    for run in (ref, out):  # resumed in place: a run's own checkpoint
        shutil.copytree(start, run / "checkpoints" / start.name)
    reference = Launch(tmp, "train_ddpm.py", args(ref, preset, *sharded), 2, NAN_IN_STEP_5)
    killing = Launch(tmp, "train_ddpm.py", args(out, preset, *sharded), 2,
                     f"kill-in-save@6,{NAN_IN_STEP_5}")  # fmt: skip
    # Without --sharding, a new run from it (a sharded run's own checkpoint resumes sharded).
    ddp_run = Launch(tmp, "train_ddpm.py", args(ddp, preset, "--resume", str(start)), 2,
                     NAN_IN_STEP_5)  # fmt: skip
    killed = killing.wait()
    left_behind = sorted(p.name for p in (out / "checkpoints").iterdir())
    latest = find_resume_checkpoint(out / "checkpoints", "latest")
    rerun = Launch(tmp, "train_ddpm.py", args(out, preset, *sharded), 2, NAN_IN_STEP_5)
    text_result, reference_result, ddp_result = finish(text), finish(reference), finish(ddp_run)
    # The basic kind (the corruption denoiser, its conv levels one unit each), beside HSDP.
    basic = Launch(tmp, "train_basic.py", [*sharded, *BASIC_ARGS, "--output-dir",
                                           str(tmp / "basic")], 2)  # fmt: skip
    # Four processes: HSDP (2 copies x 2 shards) and DDP, both going on from the one-process
    # sharded checkpoint-3 as new runs (a DDP run reads a sharded checkpoint whole).
    new_run = ["--resume", str(start), "--batch-size", "2", "--max-steps", "4"]
    hsdp = Launch(tmp, "train_ddpm.py", args(tmp / "hsdp", preset, *new_run, "--sharding",
                                             "hsdp", "--hsdp-shard-size", "2"), 4)  # fmt: skip
    ddp4 = Launch(tmp, "train_ddpm.py", args(tmp / "ddp4", preset, *new_run), 4)
    return {
        "one": one,
        "reference": ref,
        "reference_result": reference_result,
        "interrupted": out,
        "ddp": ddp,
        "ddp_result": ddp_result,
        "killed": killed,
        "left_behind": left_behind,
        "latest_after_kill": None if latest is None else latest.step,
        "rerun": finish(rerun),
        "hsdp": tmp / "hsdp",
        "hsdp_result": finish(hsdp),
        "ddp4": tmp / "ddp4",
        "ddp4_result": finish(ddp4),
        "text": tmp / "text",
        "text_result": text_result,
        "basic": tmp / "basic",
        "basic_result": finish(basic),
    }


def checkpoint_tensors(run: Path, step: int = MAX_STEPS) -> dict[str, dict[str, torch.Tensor]]:
    return whole_tensors(read_checkpoint(run / "checkpoints" / f"checkpoint-{step}"))


def export_tensors(run: Path) -> dict[str, torch.Tensor]:
    pipeline = run / "pipeline"
    return {
        f"{f.parent.name}/{k}": v
        for f in sorted(pipeline.rglob("*.safetensors"))
        for k, v in load_file(f).items()
    }


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tolerance: float):
    assert sorted(a) == sorted(b)
    worst = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a}
    assert all(torch.isfinite(a[k]).all() for k in a)
    assert max(worst.values()) <= tolerance, sorted(worst.items(), key=lambda kv: -kv[1])[:4]


@pytest.mark.slow
def test_a_sharded_run_trains_as_the_ddp_run_does_and_skips_the_nan_step_alike(runs) -> None:
    """Same losses and weights (raw, EMA, optimizer moments) after 8 steps within float
    tolerance; the NaN batch one rank saw was skipped by every shard (else NaN, or half the
    rows a step apart)."""
    losses = {}
    for name in ("reference", "ddp"):
        rows = read_jsonl(runs[name] / "metrics.jsonl")
        losses[name] = [r["loss"] for r in rows if "loss" in r]
        assert rows[-1]["nonfinite_steps"] == 1 and rows[-1]["step"] == MAX_STEPS
    assert len(losses["ddp"]) == MAX_STEPS - 3 - 1  # from checkpoint-3; the skipped step logs none
    assert losses["reference"] == pytest.approx(losses["ddp"], rel=TOLERANCE, abs=TOLERANCE)
    sharded, ddp = checkpoint_tensors(runs["reference"]), checkpoint_tensors(runs["ddp"])
    assert_close(sharded["model"], ddp["model"], TOLERANCE)
    assert_close(sharded["ema"], ddp["ema"], TOLERANCE)
    # DDP's optimizer tensors are keyed by parameter number, the sharded ones by name.
    folder = runs["reference"] / "checkpoints" / f"checkpoint-{MAX_STEPS}"
    names = json.loads((folder / "state.json").read_text())["optimizer"]["param_groups"][0]
    names = names["params"]  # in parameter order
    moments = {f"{names[int(i)]}.{key}": v for k, v in ddp["optimizer"].items()
               for i, key in [k.split(".", 1)]}  # fmt: skip
    assert_close(sharded["optimizer"], moments, TOLERANCE)
    assert "update skipped" in runs["rerun"].output or "update skipped" in runs["killed"].output
    assert "update skipped" in runs["ddp_result"].output


@pytest.mark.slow
def test_the_sharded_export_equals_the_ddp_export(runs) -> None:
    assert_close(export_tensors(runs["reference"]), export_tensors(runs["ddp"]), TOLERANCE)
    index = json.loads((runs["reference"] / "pipeline" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"]


@pytest.mark.slow
def test_each_process_writes_its_own_shard_of_weights_ema_and_optimizer(runs) -> None:
    folder = runs["reference"] / "checkpoints" / f"checkpoint-{MAX_STEPS}"
    state = json.loads((folder / "state.json").read_text())
    assert state["format"] == "sharded" and state["num_processes"] == 2
    assert state["model_class"] == "DiTTransformer2DModel"
    shards = sorted(folder.glob("*.safetensors"))
    assert [p.name for p in shards] == sorted(state["files"]) and len(shards) == 2
    assert sorted(p.name for p in folder.iterdir()) == [*sorted(state["files"]), "state.json"]
    name = "transformer_blocks.0.attn1.to_q.weight"  # 16 x 16: 8 rows in each shard
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for part in ("model.", "ema.", "optimizer."):
                key = part + name + (".exp_avg" if part == "optimizer." else "")
                assert tuple(f.get_slice(key).get_shape()) == (8, 16), (shard.name, key)
    assert "(2 shards)" in runs["rerun"].output  # it resumed from its own checkpoint-4


@pytest.mark.slow
def test_a_sharded_run_killed_mid_save_reruns_to_bit_identical_weights(runs) -> None:
    # The kill left a temporary folder, never a checkpoint-6; the rerun removed it, resumed
    # from the checkpoint-4 two processes wrote and ended where the uninterrupted run did, bit
    # for bit.
    assert runs["killed"].returncode != 0
    assert "checkpoint-4" in runs["left_behind"] and "checkpoint-6" not in runs["left_behind"]
    assert any(name.startswith(".checkpoint-6.") for name in runs["left_behind"])
    assert runs["latest_after_kill"] == 4
    out = runs["interrupted"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [
        "checkpoint-3", "checkpoint-4", "checkpoint-6", f"checkpoint-{MAX_STEPS}"]  # fmt: skip
    assert "resumed from" in runs["rerun"].output
    for step in (6, MAX_STEPS):
        a, b = checkpoint_tensors(runs["reference"], step), checkpoint_tensors(out, step)
        for part in ("model", "ema", "optimizer"):
            assert sorted(a[part]) == sorted(b[part])
            differ = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
            assert not differ, (step, part, differ[:4])
    states = [json.loads((run / "checkpoints" / f"checkpoint-{MAX_STEPS}" / "state.json")
                         .read_text()) for run in (runs["reference"], out)]  # fmt: skip
    assert states[0]["optimizer"] == states[1]["optimizer"]


@pytest.mark.slow
def test_a_two_process_sharded_checkpoint_resumes_on_one_process(runs, preset, tmp_path):
    """One process reads both shards into the whole network: the same weights (its export of
    the checkpoint equals the two-process run's), and it trains on from there."""
    out = tmp_path / "one"
    checkpoint = runs["reference"] / "checkpoints" / f"checkpoint-{MAX_STEPS}"
    shutil.copytree(checkpoint, out / "checkpoints" / checkpoint.name)
    train(args(out, preset, "--sharding", "fsdp", "--batch-size", "8"))
    for name, tensor in export_tensors(out).items():
        assert torch.equal(tensor, export_tensors(runs["reference"])[name]), name
    train(args(out, preset, "--sharding", "fsdp", "--batch-size", "8", "--max-steps", "9"))
    state = json.loads((out / "checkpoints" / "checkpoint-9" / "state.json").read_text())
    assert state["num_processes"] == 1 and state["format"] == "sharded"
    assert len(state["files"]) == 1
    # Accelerate's plugin writes ACCELERATE_USE_FSDP into the environment: the next run of
    # this process (and what it launches) must not find it there.
    assert "ACCELERATE_USE_FSDP" not in os.environ


@pytest.mark.slow
def test_a_one_process_sharded_checkpoint_resumes_on_two_processes(runs) -> None:
    """Each of two processes reads its half of every tensor from the one-process checkpoint-3
    (the DDP run reads it whole): a step on, the two agree, and differ from where they
    started (five steps on, they agree in full: above)."""
    log = runs["reference_result"].output
    assert "DistributedType.FSDP" in log and "resumed from" in log
    assert "was made by 1 process(es)" in log
    start = checkpoint_tensors(runs["one"], 3)["model"]
    sharded, ddp = checkpoint_tensors(runs["reference"], 4), checkpoint_tensors(runs["ddp"], 4)
    assert_close(sharded["model"], ddp["model"], TOLERANCE)
    assert any(not torch.equal(sharded["model"][k], start[k]) for k in start)


@pytest.mark.slow
def test_a_text_transformer_shards_by_block_in_bf16_with_checkpointing_and_offload(runs):
    """Each process holds half of every weight (fp32 masters) in CPU memory; bf16 was the
    compute dtype; the transformer blocks are units; the frozen text encoder and VAE stay whole
    on every process (Accelerate's FSDP flag is out of the environment before transformers
    loads the encoder); the validation prompt's grid is drawn; sample.py reads the sharded
    checkpoint whole, and the export is a text-to-image pipeline whose transformer weights are
    the checkpoint's EMA."""
    log = runs["text_result"].output
    assert "mixed precision bf16" in log and "DistributedType.FSDP" in log
    assert "FSDP2 units: BasicTransformerBlock" in log and "offloaded to CPU memory" in log
    folder = runs["text"] / "checkpoints" / "checkpoint-2"
    state = json.loads((folder / "state.json").read_text())
    assert state["format"] == "sharded" and state["task"] == "edm" and "latent" in state
    assert state["model_class"] == "PixArtTransformer2DModel"
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) == 2
    tensors = whole_tensors(read_checkpoint(folder))
    with safe_open(shards[0], framework="pt") as f:
        key = "model.transformer_blocks.0.attn1.to_q.weight"
        assert f.get_slice(key).get_dtype() == "F32"
        whole = tensors["model"]["transformer_blocks.0.attn1.to_q.weight"]
        assert f.get_slice(key).get_shape()[0] * 2 == whole.shape[0]
    loaded = load_for_sampling(folder)
    state_dict = loaded.model.state_dict()
    assert all(torch.equal(state_dict[k], tensors["ema"][k]) for k in state_dict)
    exported = export_tensors(runs["text"])
    assert all(torch.equal(exported[f"transformer/{k}"], tensors["ema"][k]) for k in state_dict)
    loaded = load_for_sampling(runs["text"] / "pipeline")
    assert type(loaded.model).__name__ == "PixArtTransformer2DModel"
    assert list((runs["text"] / "samples").glob("*.png"))


@pytest.mark.slow
def test_the_basic_kind_shards_its_conv_levels(runs) -> None:
    """The corruption denoiser's six conv levels are units: each process writes half the rows
    of each; the exported model is the checkpoint's weights, whole."""
    assert "FSDP2 units: Conv2d (7 units with the root)" in runs["basic_result"].output
    folder = runs["basic"] / "checkpoints" / "checkpoint-4"
    state = json.loads((folder / "state.json").read_text())
    assert state["format"] == "sharded" and state["model_class"] == "BasicUNet"
    tensors = whole_tensors(read_checkpoint(folder))
    with safe_open(sorted(folder.glob("*.safetensors"))[0], framework="pt") as f:
        rows = f.get_slice("model.down_layers.1.weight").get_shape()[0]
    assert rows * 2 == tensors["model"]["down_layers.1.weight"].shape[0]
    loaded = load_for_sampling(runs["basic"] / "model")
    state_dict = loaded.model.state_dict()
    assert all(torch.equal(state_dict[k], tensors["model"][k]) for k in state_dict)
    rows = read_jsonl(runs["basic"] / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)


@pytest.mark.slow
def test_hsdp_shards_within_groups_and_trains_as_ddp_does(runs) -> None:
    """Four processes as two copies of two shards each (HSDP's 2-D mesh), started from the
    one-process sharded checkpoint like a DDP run of four: the same weights after a step; each
    weight written once, in halves (the copies hold the same)."""
    log = runs["hsdp_result"].output
    assert "sharded over 2 processes, 2 copies" in log and "a new run from" in log
    folder = runs["hsdp"] / "checkpoints" / "checkpoint-4"
    state = json.loads((folder / "state.json").read_text())
    assert state["format"] == "sharded" and state["num_processes"] == 4
    key = "model.transformer_blocks.0.attn1.to_q.weight"
    rows = []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            if key in f.keys():  # noqa: SIM118 - safe_open has no __contains__
                rows.append(f.get_slice(key).get_shape()[0])
    assert rows == [8, 8]
    hsdp, ddp = checkpoint_tensors(runs["hsdp"], 4), checkpoint_tensors(runs["ddp4"], 4)
    assert_close(hsdp["model"], ddp["model"], TOLERANCE)
    assert_close(hsdp["ema"], ddp["ema"], TOLERANCE)
    assert_close(export_tensors(runs["hsdp"]), export_tensors(runs["ddp4"]), TOLERANCE)
    start = checkpoint_tensors(runs["one"], 3)["model"]
    assert any(not torch.equal(hsdp["model"][k], start[k]) for k in start)


@pytest.mark.slow
def test_a_damaged_shard_falls_back_to_the_older_checkpoint(runs, tmp_path, caplog) -> None:
    checkpoints = tmp_path / "checkpoints"
    for step in (6, MAX_STEPS):
        name = f"checkpoint-{step}"
        shutil.copytree(runs["reference"] / "checkpoints" / name, checkpoints / name)
    shard = sorted((checkpoints / f"checkpoint-{MAX_STEPS}").glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the tensors: the size stays, the checksum does not
    shard.write_bytes(bytes(data))
    assert find_resume_checkpoint(checkpoints, "latest").step == 6
    assert str(shard) in caplog.text and "checksum" in caplog.text
    with pytest.raises(CheckpointError, match="checksum"):
        read_checkpoint(shard.parent)


@pytest.mark.slow
def test_dcp_metadata_pickles_and_unlisted_files_in_a_sharded_checkpoint_never_load(
    runs, tmp_path
) -> None:
    folder = tmp_path / f"checkpoint-{MAX_STEPS}"
    shutil.copytree(runs["reference"] / "checkpoints" / folder.name, folder)
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    # DCP's default reader unpickles `.metadata`; the safetensors reader never opens it.
    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    checkpoint = read_checkpoint(folder)
    tensors = whole_tensors(checkpoint)
    assert tensors["model"] and tensors["ema"] and tensors["optimizer"]
    one = {"model.pos_embed.proj.bias": torch.zeros(16)}
    read_shards(folder, one, distributed=False)
    assert torch.equal(one["model.pos_embed.proj.bias"], tensors["model"]["pos_embed.proj.bias"])
    assert not marker.exists()
    # Another safetensors file would be read as part of the checkpoint: refused.
    shutil.copy(next(folder.glob("shard-*.safetensors")), folder / "extra.safetensors")
    with pytest.raises(CheckpointError, match="extra.safetensors is not one of the files"):
        read_checkpoint(folder)


def test_sharding_flags_are_checked_before_anything_runs() -> None:
    with pytest.raises(InputError, match="--fsdp-cpu-offload applies with --sharding fsdp or"):
        TrainConfig(fsdp_cpu_offload=True)
    with pytest.raises(InputError, match="--save-on-each-node does not work with --sharding"):
        TrainConfig(sharding="fsdp", save_on_each_node=True)
    with pytest.raises(InputError, match="--compile does not work with --sharding"):
        TrainConfig(sharding="fsdp", compile=True)
    TrainConfig(sharding="fsdp", fsdp_cpu_offload=True)
    with pytest.raises(InputError, match="--hsdp-shard-size applies with --sharding hsdp"):
        TrainConfig(sharding="fsdp", hsdp_shard_size=2)
    with pytest.raises(InputError, match="--hsdp-shard-size must be >= 2"):
        TrainConfig(sharding="hsdp", hsdp_shard_size=1)
    # One process per node cannot shard; the processes must make whole groups.
    with pytest.raises(InputError, match="--sharding: .* 1 here: nothing to shard"):
        check_shard_groups(num_processes=16, shard_size=1, per_node=True)
    with pytest.raises(InputError, match="--hsdp-shard-size: 6 processes do not split into"):
        check_shard_groups(num_processes=6, shard_size=4, per_node=False)
    check_shard_groups(num_processes=16, shard_size=8, per_node=True)


def test_an_fsdp_accelerate_config_must_agree_with_the_flags(monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `distributed_type: FSDP` exports
    with pytest.raises(InputError, match="--sharding: .* add --sharding fsdp"):
        check_launch("none", cpu_offload=False)
    check_launch("fsdp", cpu_offload=False)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(InputError, match="set fsdp_version: 2"):
        check_launch("fsdp", cpu_offload=False)
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(InputError, match="--fsdp-cpu-offload: .* give --fsdp-cpu-offload"):
        check_launch("fsdp", cpu_offload=False)
    check_launch("fsdp", cpu_offload=True)
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    with pytest.raises(InputError, match="use --gradient-checkpointing"):
        check_launch("fsdp", cpu_offload=True)
