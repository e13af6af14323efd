"""--channels-last, --compile and --data-loading stream change speed, not what is learned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from tests.tiny_runs import fresh_accelerate_state, read_jsonl, tiny_preset

# fp32 on CPU: a different memory layout or a traced graph reorders float sums; 6 steps of
# the tiny UNet stay within this relative tolerance of the plain run (measured: < 1e-6).
RTOL = 1e-4


def run_ddpm(root: Path, name: str, *extra: str) -> list[float]:
    import train_ddpm

    fresh_accelerate_state()
    out = root / name
    train_ddpm.main(
        [
            f"--output-dir={out}",
            f"--preset={tiny_preset(root)}",
            "--resolution=8",
            "--max-images=32",
            "--max-steps=6",
            "--batch-size=8",
            "--log-every=1",
            "--sample-steps=2",
            "--num-sample-images=2",
            "--report-to=none",
            *extra,
        ]
    )
    return [row["loss"] for row in read_jsonl(out / "metrics.jsonl") if "loss" in row]


def test_channels_last_and_compile_follow_the_plain_loss_curve(tmp_path: Path) -> None:
    plain = run_ddpm(tmp_path, "plain")
    channels_last = run_ddpm(tmp_path, "channels_last", "--channels-last")
    # aot_eager traces forward and backward like inductor, without its C++ codegen (minutes
    # on this CPU); the graph capture is what could change the numbers.
    compiled = run_ddpm(tmp_path, "compiled", "--compile", "--compile-backend=aot_eager")
    checkpointed = run_ddpm(tmp_path, "checkpointed", "--gradient-checkpointing")
    assert len(plain) == 6
    np.testing.assert_allclose(channels_last, plain, rtol=RTOL)
    np.testing.assert_allclose(compiled, plain, rtol=RTOL)
    # Recomputing activations in the backward pass gives the same gradients.
    np.testing.assert_allclose(checkpointed, plain, rtol=RTOL)
    a = load_file(tmp_path / "plain" / "checkpoints" / "checkpoint-6" / "model.safetensors")
    b = load_file(tmp_path / "checkpointed" / "checkpoints" / "checkpoint-6" / "model.safetensors")
    assert all(np.allclose(a[k], b[k], rtol=RTOL, atol=1e-7) for k in a)
    # The compiled run's export is an ordinary diffusers folder (no _orig_mod. prefixes).
    keys = load_file(
        tmp_path / "compiled" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    )
    assert not any(k.startswith("_orig_mod") for k in keys)


def test_gradient_checkpointing_of_the_basic_unet_is_refused(tmp_path: Path) -> None:
    import train_basic
    from ddp_utils.errors import InputError

    fresh_accelerate_state()
    argv = ["--output-dir", str(tmp_path / "r"), "--gradient-checkpointing", "--report-to=none"]
    with pytest.raises(InputError, match="--gradient-checkpointing: BasicUNet does not support"):
        train_basic.main(argv)
    assert not (tmp_path / "r").exists()


def test_streamed_training_equals_in_memory_training(tmp_path: Path) -> None:
    import train_basic

    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    weights = {}
    for mode in ("memory", "stream"):
        fresh_accelerate_state()
        out = tmp_path / mode
        train_basic.main(
            [
                f"--dataset={folder}",
                f"--output-dir={out}",
                f"--data-loading={mode}",
                "--num-workers=1",
                "--resolution=8",
                "--max-steps=4",
                "--batch-size=6",  # 20 images: batches straddle epochs
                "--sample-steps=1",
                "--num-sample-images=2",
                "--report-to=none",
            ]
        )
        weights[mode] = load_file(out / "model" / "diffusion_pytorch_model.safetensors")
    assert weights["memory"].keys() == weights["stream"].keys()
    for key, value in weights["memory"].items():
        assert (value == weights["stream"][key]).all(), key


@pytest.mark.parametrize("flag", ["--num-workers=-1", "--compile-backend=tensorrt"])
def test_speed_flags_are_validated(flag: str, capsys) -> None:
    import train_ddpm

    with pytest.raises(SystemExit) as exit_info:
        train_ddpm.main([flag, "--dry-run"])
    assert exit_info.value.code == 2
    assert flag.split("=")[0] in capsys.readouterr().err
