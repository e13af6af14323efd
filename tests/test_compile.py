"""--compile with inductor, for real, on the CPU (a C++ compiler is all it needs): a compiled run
resumes bit-exactly, skips a non-finite step, keeps its compiled graphs in the toolkit's cache
folder, and sample.py's compiled network gives the eager network's images.

What a CPU cannot run: CUDA graphs (`--compile-mode reduce-overhead`/`max-autotune` capture
only CUDA tensors; on a CPU inductor compiles the same kernels without them) and Triton
kernels. bench/gpu_suite.sh runs those on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddp_utils.data import BatchSource
from tests.tiny_runs import fresh_accelerate_state, read_jsonl

NAN_AT = 2  # micro-step whose batch is NaN: step 3's update is skipped
# Smaller than the other tests' tiny UNet (no attention): inductor compiles it in about a minute.
SMALL_UNET = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
}


def train(root: Path, name: str, *extra: str) -> Path:
    """A compiled 4-step run, checkpoints at 2 and 4, the batch of micro-step NAN_AT NaN."""
    import train_ddpm

    preset = root / "small_unet.json"
    preset.write_text(json.dumps(SMALL_UNET))
    real_get = BatchSource.get

    def get(self, micro_step, generator):
        batch = real_get(self, micro_step, generator)
        if micro_step == NAN_AT:
            batch.images = batch.images * float("nan")
        return batch

    torch._dynamo.reset()  # each run compiles as a fresh process would (no stale guards)
    fresh_accelerate_state()
    out = root / name
    # One thread, also for the module fixture (set up before the per-test thread fixture):
    # inductor's CPU kernels are generated for the thread count, which orders their sums.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(BatchSource, "get", get)
            train_ddpm.main(
                [
                    f"--output-dir={out}",
                    f"--preset={preset}",
                    "--resolution=8",
                    "--max-images=32",
                    "--max-steps=4",
                    "--batch-size=8",
                    "--log-every=1",
                    "--checkpoint-every=2",
                    "--checkpoints-total-limit=none",
                    "--sample-every=0",
                    "--num-sample-images=2",
                    "--sample-steps=2",
                    "--report-to=none",
                    "--compile",
                    *extra,
                ]
            )
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("compiled"), "run")


def test_a_compiled_run_resumes_bit_exactly(compiled_run: Path, tmp_path: Path) -> None:
    resumed = train(
        tmp_path, "resumed", f"--resume={compiled_run / 'checkpoints' / 'checkpoint-2'}"
    )
    for name in ("model", "ema", "optimizer"):
        a = load_file(compiled_run / "checkpoints" / "checkpoint-4" / f"{name}.safetensors")
        b = load_file(resumed / "checkpoints" / "checkpoint-4" / f"{name}.safetensors")
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_compiled_run_skips_a_non_finite_step(compiled_run: Path) -> None:
    rows = [r for r in read_jsonl(compiled_run / "metrics.jsonl") if "nonfinite_steps" in r]
    assert [r["nonfinite_steps"] for r in rows] == [0, 0, 1, 1]  # step 3 skipped, then trained
    weights = load_file(compiled_run / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    # The skipped step changed nothing: Adam's step counts are one behind the step count.
    optimizer = load_file(compiled_run / "checkpoints" / "checkpoint-4" / "optimizer.safetensors")
    assert {float(v) for k, v in optimizer.items() if k.endswith(".step")} == {3.0}


def test_compiled_graphs_are_kept_in_the_toolkits_cache(compiled_run: Path) -> None:
    from ddp_utils.compile import inductor_cache_dir
    from ddp_utils.data.decode import default_cache_dir

    assert inductor_cache_dir() == default_cache_dir() / "inductor"
    assert any((inductor_cache_dir()).rglob("*.py")), "no compiled kernels were cached"


def test_sample_with_compile_gives_the_eager_images(compiled_run: Path, tmp_path: Path) -> None:
    import sample

    common = [str(compiled_run / "pipeline"), "--num-samples=2", "--batch-size=2"]
    torch._dynamo.reset()
    fresh_accelerate_state()
    sample.main([*common, f"--output-dir={tmp_path / 'eager'}"])
    fresh_accelerate_state()
    sample.main([*common, f"--output-dir={tmp_path / 'compiled'}", "--compile"])
    eager = np.load(tmp_path / "eager" / "samples.npz")["arr_0"].astype(int)
    compiled = np.load(tmp_path / "compiled" / "samples.npz")["arr_0"].astype(int)
    assert np.abs(eager - compiled).max() <= 1  # fused kernels round differently, slightly
    info = json.loads((tmp_path / "compiled" / "sample_info.json").read_text())
    assert info["num_evaluations"] == 50  # the forward hook still counts, compiled


def test_compile_modes_other_than_default_need_inductor(capsys) -> None:
    import train_ddpm

    with pytest.raises(SystemExit) as exit_info:
        train_ddpm.main(["--compile", "--compile-backend=aot_eager", "--compile-mode=max-autotune"])
    assert exit_info.value.code == 2
    assert "compile mode 'max-autotune' is inductor's" in capsys.readouterr().err


@pytest.mark.parametrize("objective", ["ddpm", "edm"])
def test_the_compiled_denoiser_traces_guidance_once_and_gives_the_eager_images(
    objective: str, tmp_path: Path
) -> None:
    """The sampler's denoiser (network, guidance's batched pair and their combination, EDM's
    preconditioning) compiles as one function: a second batch of other classes reuses the
    graphs (no recompile), and the images are the eager ones."""
    from diffusion.conditioning.classes import ClassLabels
    from diffusion.kinds import KINDS, SamplerChoice
    from diffusion.kinds.ddpm.formulation import make_train_scheduler
    from diffusion.kinds.edm.formulation import make_edm_scheduler
    from diffusion.networks.unet import build_ddpm_unet

    preset = tmp_path / "small_unet.json"
    preset.write_text(json.dumps(SMALL_UNET))
    torch.manual_seed(0)
    net = build_ddpm_unet(str(preset), 8, 1, num_classes=10).eval()
    kind = KINDS[objective]
    config = (make_edm_scheduler() if objective == "edm" else make_train_scheduler()).config
    choice = SamplerChoice("edm-heun" if objective == "edm" else "ddim", 3)
    classes = ClassLabels(tuple(map(str, range(10))))
    common = {"seed": 0, "shape": (1, 8, 8), "device": "cpu", "guidance_scale": 3.0,
              "null": classes.null}  # fmt: skip
    eager = kind.sampler(net, config, choice, **common)
    torch._dynamo.reset()
    compiled = kind.sampler(net, config, choice, **common, compile=("aot_eager", "default"))
    first = {"class_labels": torch.tensor([1, 2])}
    second = {"class_labels": torch.tensor([7, 9])}
    torch.testing.assert_close(compiled(range(2), first, None)[0], eager(range(2), first, None)[0])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch.testing.assert_close(compiled(range(2, 4), second, None)[0],
                               eager(range(2, 4), second, None)[0])  # fmt: skip
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs > 0
