"""What a hostile (or unlucky) user gives the scripts, refused where it enters with a message
naming the input and the fix: non-finite numbers, damaged checkpoints and caches, full or
read-only disks, folders without images, bad preset files, flags that would do nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import evaluate
import train_autoencoder
import train_basic
import train_ddpm
from ddp_utils import hub, loop
from ddp_utils.checkpoint import (
    find_resume_checkpoint,
    list_checkpoints,
    prune,
    read_checkpoint,
    write_checkpoint,
)
from ddp_utils.cli import cli_main
from ddp_utils.config import _unwrap_optional, parse_config
from ddp_utils.data import latent_cache, load_image_data, load_latents
from ddp_utils.data.batches import LatentBatches
from ddp_utils.errors import InputError
from ddp_utils.export import write_checksums
from ddp_utils.lock import RunLock
from diffusion.drawing import SampleConfig
from evaluation.image_sets import EvalConfig, load_image_set
from tests.test_latent import TINY_DIT, latent_args, make_vae
from tests.tiny_runs import (
    GLOBAL_BATCH,
    REPO,
    TINY_UNET,
    ddpm_args,
    fresh_accelerate_state,
    trained_ddpm,
)

CONFIGS = {
    "train_ddpm.py": train_ddpm.DDPMConfig,
    "train_basic.py": train_basic.BasicConfig,
    "train_autoencoder.py": train_autoencoder.AutoencoderConfig,
    "sample.py": SampleConfig,
    "evaluate.py": EvalConfig,
}
REQUIRED = {"sample.py": ["."], "evaluate.py": ["--samples", "s.npz", "--dataset", "digits"]}


def float_fields(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if _unwrap_optional(hints[f.name])[0] is float]


def parse_error(cls: type, argv: list[str], capsys) -> str:
    """Parse `argv`, which must be refused with exit 2; what was printed on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        parse_config(cls, argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------------------- 1. finite numbers


def test_every_float_field_of_every_script_is_found() -> None:
    """The check is by type: these are among the fields it covers (not a list kept by hand)."""
    fields = {script: float_fields(cls) for script, cls in CONFIGS.items()}
    for name in ("p_mean", "weight_decay", "sigma_data", "p_std", "rho", "min_snr_gamma",
                 "sigma_max", "sample_guidance_scale", "sample_eta", "max_grad_norm"):  # fmt: skip
        assert name in fields["train_ddpm.py"], name
    assert "kl_weight" in fields["train_autoencoder.py"]
    assert {"guidance_scale", "eta", "churn"} <= set(fields["sample.py"])


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
@pytest.mark.parametrize("script", list(CONFIGS))
def test_non_finite_numbers_are_refused_from_flags_and_config_files(
    script: str, value: str, tmp_path: Path, capsys
) -> None:
    cls = CONFIGS[script]
    for name in float_fields(cls):
        flag = "--" + name.replace("_", "-")
        expected = f"{flag} must be a finite number, got {float(value)}"
        assert expected in parse_error(cls, [*REQUIRED.get(script, []), flag, value], capsys)
        config = tmp_path / "config.yaml"
        config.write_text(f"{name}: {value}\n")  # YAML reads the word as a string
        argv = [*REQUIRED.get(script, []), "--config", str(config)]
        assert expected in parse_error(cls, argv, capsys)
        config = tmp_path / "config.json"
        config.write_text(
            "{" + f'"{name}": {"NaN" if value == "nan" else value.replace("inf", "Infinity")}' + "}"
        )
        argv = [*REQUIRED.get(script, []), "--config", str(config)]
        assert expected in parse_error(cls, argv, capsys)


def test_a_config_built_in_code_is_checked_too() -> None:
    with pytest.raises(ValueError, match="--sigma-max must be a finite number, got inf"):
        train_ddpm.DDPMConfig(objective="edm", sigma_max=float("inf"))


# ----------------------------------------------------------------------------- 11. the CLI layer


@pytest.mark.parametrize(
    ("cls", "argv", "expected"),
    [
        (
            train_ddpm.DDPMConfig,
            ["--class-conditional", "--sample-guidance-interval", "-1,2"],
            "needs 0 <= LOW < HIGH",
        ),
        (SampleConfig, [".", "--guidance-interval", "-1,2"], "needs 0 <= LOW < HIGH"),
        (train_basic.BasicConfig, ["--weight-decay", "-0.5"], "--weight-decay must be >= 0"),
        (train_basic.BasicConfig, ["--max-grad-norm", "-inf"], "must be a finite number"),
    ],
)
def test_a_value_starting_with_a_dash_is_taken_as_the_value(cls, argv, expected, capsys) -> None:
    err = parse_error(cls, argv, capsys)
    assert expected in err and "expected one argument" not in err


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("c.yaml", "max_steps: 10\nbatch_size: 4\nmax_steps: 20\n"),
        ("c.yaml", "max_steps: 10\nmax-steps: 20\n"),
        ("c.json", '{"max_steps": 10, "max_steps": 20}'),
    ],
)
def test_a_key_given_twice_in_a_config_file_is_refused(name, text, tmp_path, capsys) -> None:
    (tmp_path / name).write_text(text)
    err = parse_error(train_basic.BasicConfig, ["--config", str(tmp_path / name)], capsys)
    assert "'max_steps' is given twice" in err or "'max-steps'" in err


def test_a_config_file_takes_none_as_the_flag_does(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("max_grad_norm: none\ncheckpoints_total_limit: None\n")
    cfg = parse_config(train_basic.BasicConfig, ["--config", str(tmp_path / "c.yaml")])
    assert cfg.max_grad_norm is None and cfg.checkpoints_total_limit is None
    assert cfg == parse_config(
        train_basic.BasicConfig, ["--max-grad-norm", "none", "--checkpoints-total-limit", "none"]
    )


# ----------------------------------------------------------------------------- 2. damaged checkpoints


def _checkpoint(folder: Path, step: int, total_limit: int | None = None) -> Path:
    tensors = {"model": {"w": torch.full((4, 4), float(step))}, "optimizer": {}}
    return write_checkpoint(folder, step, tensors, {"config": {}}, total_limit)


def _names(folder: Path) -> list[str]:
    return [p.name for p in list_checkpoints(folder)]


def test_a_damaged_checkpoint_does_not_count_toward_the_limit(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "checkpoints"
    _checkpoint(folder, 5)
    _checkpoint(folder, 10)
    damaged = _checkpoint(folder, 1000, total_limit=5)  # below the limit: all are kept
    assert _names(folder) == ["checkpoint-5", "checkpoint-10", "checkpoint-1000"]
    model = damaged / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-40])  # truncated
    (folder / "checkpoint-5" / "state.json").unlink()  # an old one, damaged too
    # A run starting here (--checkpoints-total-limit 1) resumes checkpoint-10: it stays.
    assert find_resume_checkpoint(folder, "latest").step == 10
    with caplog.at_level(logging.WARNING, logger="ddp_utils.checkpoint"):
        prune(folder, total_limit=1)
    assert _names(folder) == ["checkpoint-10", "checkpoint-1000"]
    assert "removing damaged checkpoint-5" in caplog.text
    # Its next save is kept in its place; the damaged newer one is left until passed.
    _checkpoint(folder, 20, total_limit=1)
    assert _names(folder) == ["checkpoint-20", "checkpoint-1000"]
    _checkpoint(folder, 1000, total_limit=1)  # the save of its step replaces it
    assert _names(folder) == ["checkpoint-1000"]
    assert read_checkpoint(folder / "checkpoint-1000").step == 1000


# ----------------------------------------------------------------------------- 3. latent cache


class HalvingEncoder:
    """A stand-in VAE: 2x2 average pooling; `nan_from` poisons the encodings of that image on."""

    fingerprint = "halving-encoder-v1"

    def __init__(self, nan_from: int | None = None) -> None:
        self.nan_from, self.calls = nan_from, 0

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        mean = torch.nn.functional.avg_pool2d(images.float(), 2)
        if self.nan_from is not None and len(mean) > 1:
            mean[self.nan_from :] = float("nan")
        return mean, torch.full_like(mean, 0.1)


def _digits(cache: Path):
    return load_image_data("digits", 8, 1, max_images=16, cache_dir=cache)


def test_a_latent_cache_holding_nan_is_found_when_read_and_encoded_anew(
    tmp_path: Path, caplog
) -> None:
    data = _digits(tmp_path)
    first = load_latents(data, HalvingEncoder(), False, cache_dir=tmp_path)
    assert np.isfinite(first.mean).all()
    mean_file = first.folder / "mean.npy"
    damaged = np.load(mean_file, mmap_mode="r+")
    damaged[3, 0, 0, 0] = np.nan  # the file keeps its size: only its values say it
    damaged.flush()
    del damaged, first
    encoder = HalvingEncoder()
    with caplog.at_level(logging.WARNING, logger="ddp_diffusion"):
        again = load_latents(data, encoder, False, cache_dir=tmp_path)
    assert "mean.npy holds non-finite values (NaN/inf) in row 3" in caplog.text
    assert "rebuilding it" in caplog.text and encoder.calls > 1  # encoded anew
    assert np.isfinite(again.mean).all()


def test_an_encoder_giving_nan_is_refused_and_nothing_is_cached(tmp_path: Path) -> None:
    data = _digits(tmp_path)
    with pytest.raises(
        InputError, match=r"gave non-finite latents \(NaN/inf\) in mean for image 5"
    ):
        load_latents(data, HalvingEncoder(nan_from=5), False, cache_dir=tmp_path)
    assert not list(tmp_path.glob("latents-*/manifest.json"))


def test_a_large_cache_damaged_on_disk_is_named_by_the_batch_that_reads_it(
    tmp_path: Path, monkeypatch
) -> None:
    data = _digits(tmp_path)
    latents = load_latents(data, HalvingEncoder(), False, cache_dir=tmp_path)
    damaged = np.load(latents.folder / "std.npy", mmap_mode="r+")
    damaged[:] = np.inf
    damaged.flush()
    monkeypatch.setattr(latent_cache, "SCAN_BYTES", 0)  # as a cache too large to scan
    latents = load_latents(data, HalvingEncoder(), False, cache_dir=tmp_path)
    accelerator = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
    batches = LatentBatches(latents, 4, accelerator, 0, (-1.0, 1.0), False)
    with pytest.raises(
        InputError, match=rf"latent cache {latents.folder} holds non-finite .* std\.npy"
    ):
        batches.get(0, torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- 4, 5. full disks

TINY_BASIC = ["--resolution", "8", "--max-images", "32", "--max-steps", "2", "--batch-size", "8",
              "--sample-every", "0", "--num-sample-images", "4", "--sample-steps", "2",
              "--report-to", "none"]  # fmt: skip


@contextlib.contextmanager
def tmpfs(folder: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A small filesystem of its own at `folder` (root only: FIELD_NOTES), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    options = f"{'ro,' if read_only else ''}size={size}"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]).returncode:
        pytest.skip("could not mount a tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path, leave: int) -> None:
    """Take all but `leave` bytes of the filesystem holding `folder`."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(0, free - leave))


def run_script(main: Callable[[], None], capsys) -> tuple[int, str, str]:
    """`main` as the console script runs it (cli_main: known endings -> exit codes): its exit
    code, its stderr and its log (stdout)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(main)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err, captured.out


def test_a_disk_that_fills_during_the_export_exits_74_with_a_message(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    with tmpfs(tmp_path / "disk", "30m") as disk:
        out = disk / "run"
        real_card = loop.model_card

        def fill_then_card(*args, **kwargs):  # the last thing before the export
            fill(disk, leave=64 * 1024)
            return real_card(*args, **kwargs)

        monkeypatch.setattr(loop, "model_card", fill_then_card)
        fresh_accelerate_state()
        argv = [*TINY_BASIC, "--output-dir", str(out)]
        code, err, _ = run_script(lambda: train_basic.main(argv), capsys)
        assert code == 74, err
        assert f"could not write the export model/ in {out}: No space left on device" in err
        assert "The earlier checkpoints are intact (newest: checkpoint-2)" in err
        assert "Traceback" not in err and "SafetensorError" not in err
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".model")) == []


def test_a_pixel_run_with_a_read_only_cache_folder_trains_without_it_and_says_so(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    with tmpfs(tmp_path / "cache", "1m", read_only=True) as cache:
        monkeypatch.setenv("DDP_DIFFUSION_CACHE", str(cache))
        fresh_accelerate_state()
        train_basic.main([*TINY_BASIC, "--output-dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / "model" / "checksums.json").is_file()
    log = capsys.readouterr().out  # the run's log (setup_logging: stdout)
    assert "could not write the decoded-image cache" in log and "Read-only file system" in log
    assert f"set DDP_DIFFUSION_CACHE (now {cache}) to a writable folder" in log


def test_a_full_cache_folder_is_no_error_for_the_decoded_images(tmp_path: Path, caplog) -> None:
    with tmpfs(tmp_path / "cache", "64k") as cache:
        fill(cache, leave=0)
        with caplog.at_level(logging.WARNING, logger="ddp_diffusion"):
            data = load_image_data("digits", 8, 1, max_images=16, cache_dir=cache)
    assert data.num_images == 16 and "No space left on device" in caplog.text


@pytest.mark.parametrize("problem", ["read-only", "full"])
def test_a_latent_run_with_an_unwritable_cache_folder_says_which_and_how(
    problem: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    (tmp_path / "tiny_dit.json").write_text(json.dumps(TINY_DIT))
    vae = make_vae(tmp_path / "vae")
    argv = latent_args(tmp_path / "run", tmp_path / "tiny_dit.json", vae)
    with tmpfs(tmp_path / "cache", "64k", read_only=problem == "read-only") as cache:
        if problem == "full":
            fill(cache, leave=0)
        monkeypatch.setenv("DDP_DIFFUSION_CACHE", str(cache))
        fresh_accelerate_state()
        code, err, _ = run_script(lambda: train_ddpm.main(argv), capsys)
    assert "Traceback" not in err and err.count("error:") == 1, err
    if problem == "read-only":
        assert code == 74
        assert f"could not write the latent cache {cache}/latents-" in err
        assert "Read-only file system. A latent run reads its batches from it" in err
        assert f"set DDP_DIFFUSION_CACHE (now {cache}) to a writable folder" in err
    else:
        assert code == 2
        assert f"the latent cache needs 16.4 kB in {cache} and only 0 bytes are free" in err
        assert "set DDP_DIFFUSION_CACHE to a folder on a larger disk" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 6. no images


def test_a_dataset_folder_without_images_is_refused_naming_it(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.txt", "b.txt", "sub/c.txt"):
        (folder / name).write_text("not an image")
    expected = f"--dataset: the folder {folder} holds no image files"
    err = parse_error(train_basic.BasicConfig, ["--dataset", str(folder), "--dry-run"], capsys)
    assert expected in err and "it holds 3 .txt file(s)" in err
    with pytest.raises(InputError) as refused:  # sample.py --fid, evaluate.py: the same loader
        load_image_data(str(folder), 8, 1, cache_dir=tmp_path)
    assert expected in str(refused.value) and "corresponds to no data" not in str(refused.value)


# ----------------------------------------------------------------------------- 7. preset files


@pytest.mark.parametrize(
    ("backbone", "edit", "expected"),
    [
        ("dit", {"num_layers": "abc"}, "'num_layers' must be a whole number, got 'abc'"),
        ("dit", {"num_layers": -1}, "'num_layers' must be a whole number, each >= 1, got -1"),
        ("dit", {"num_attention_heads": 0}, "'num_attention_heads' must be a whole number, each"),
        ("dit", {"dropout": 1.5}, "'dropout' must be a number in [0, 1), got 1.5"),
        ("dit", {"activation_fn": "nope"}, "DiTTransformer2DModel cannot be built"),
        (
            "unet",
            {"block_out_channels": [0]},
            "'block_out_channels' must be a non-empty list of whole numbers, each >= 1, got [0]",
        ),  # fmt: skip
        ("unet", {"block_out_channels": []}, "'block_out_channels' must be a non-empty list"),
        ("unet", {"layers_per_block": "2"}, "'layers_per_block' must be a whole number, got '2'"),
        ("unet", {"norm_eps": 0}, "'norm_eps' must be a number > 0, got 0"),
        ("unet", {"block_out_channels": [16, 32, 64]}, "need one entry per level each, got 3"),
        ("unet", {"down_block_types": ["Nope", "AttnDownBlock2D"]}, "UNet2DModel cannot be built"),
        ("unet", {"norm_num_groups": 5}, "must be divisible by num_groups (5)"),
    ],
)
def test_a_bad_preset_file_is_refused_at_the_dry_run_naming_the_field(
    backbone: str, edit: dict, expected: str, tmp_path: Path, capsys
) -> None:
    preset = tmp_path / "preset.json"
    base = TINY_DIT if backbone == "dit" else TINY_UNET
    preset.write_text(json.dumps({**base, **edit}))
    out = tmp_path / "run"
    argv = ["--backbone", backbone, "--preset", str(preset), "--output-dir", str(out), "--dry-run"]
    err = parse_error(train_ddpm.DDPMConfig, argv, capsys)
    assert f"--preset: {preset}" in err and expected in err, err
    assert not out.exists()


def test_a_good_preset_file_passes_and_builds(tmp_path: Path) -> None:
    for backbone, base in (("dit", TINY_DIT), ("unet", TINY_UNET)):
        preset = tmp_path / f"{backbone}.json"
        preset.write_text(json.dumps(base))
        cfg = parse_config(train_ddpm.DDPMConfig, ["--backbone", backbone, "--preset", str(preset)])
        assert cfg.preset == str(preset)


# ----------------------------------------------------------------------------- 8. evaluate.py


def test_evaluate_refuses_one_image(tmp_path: Path, capsys) -> None:
    np.savez(tmp_path / "one.npz", np.zeros((1, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "two.npz", np.zeros((2, 8, 8, 3), dtype=np.uint8))
    for samples, reference in (("one", "two"), ("two", "one")):
        argv = ["--samples", str(tmp_path / f"{samples}.npz"), "--reference",
                str(tmp_path / f"{reference}.npz")]  # fmt: skip
        code, err, _ = run_script(lambda argv=argv: evaluate.main(argv), capsys)
        flag = "--samples" if samples == "one" else "--reference"
        assert code == 2 and "Traceback" not in err
        assert (
            f"{flag}: {tmp_path / 'one.npz'} holds 1 image(s): FID and KID need at least 2" in err
        )


def test_evaluate_says_an_autoencoder_export_has_no_samples(tmp_path: Path) -> None:
    run = tmp_path / "ae"  # what train_autoencoder.py leaves (the files evaluate.py looks at)
    (run / "checkpoints").mkdir(parents=True)
    (run / "model").mkdir()
    (run / "config.yaml").write_text("preset: ae-digits\n")
    (run / "model" / "task.json").write_text(json.dumps({"task": "autoencoder"}))
    for folder in (run / "model", run):
        with pytest.raises(InputError) as refused:
            load_image_set(str(folder), "--samples")
        message = str(refused.value)
        assert "of an autoencoder (train_autoencoder.py)" in message, message
        assert "no samples to score" in message and "grids" not in message


# ----------------------------------------------------------------------------- 9. --push-to-hub


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path: Path) -> None:
    """Not offline by its variables, a token set, and no hub to be reached (a closed port on
    this machine: refused at once, as on a machine without a network)."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_a_token_nobody_checked")
    fresh_accelerate_state()


def test_a_token_that_cannot_be_checked_refuses_the_push_before_training(
    unreachable_hub, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    with pytest.raises(InputError) as refused:
        train_basic.main([*TINY_BASIC, "--push-to-hub", "--output-dir", str(out)])
    message = str(refused.value)
    assert message.startswith("--push-to-hub: the Hugging Face token could not be checked")
    assert "ConnectError" in message and "upload the export later with `hf upload" in message
    assert not out.exists()


def test_a_token_the_hub_does_not_allow_to_push_is_refused(monkeypatch) -> None:
    identity: dict = {"name": "me", "orgs": [{"name": "lab"}]}
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(hub, "HfApi", lambda: SimpleNamespace(whoami=lambda token: identity))
    for repo in ("x", "me/x", "lab/x"):
        hub.check_can_push(repo)
    with pytest.raises(InputError, match=r"me's, who cannot create repositories in 'other'"):
        hub.check_can_push("other/x")
    identity["auth"] = {"accessToken": {"role": "read"}}
    with pytest.raises(InputError, match="the Hugging Face token can only read"):
        hub.check_can_push("x")


# ----------------------------------------------------------------------------- 10. flags doing nothing


@pytest.mark.parametrize(
    ("cls", "argv", "expected"),
    [
        (train_ddpm.DDPMConfig, ["--label-column", "label"],
         "--label-column: names the class labels of --class-conditional training: add"),
        (train_basic.BasicConfig, ["--label-column", "label"],
         "--label-column: names class labels, and this script trains on images alone"),
        (train_autoencoder.AutoencoderConfig, ["--label-column", "label"], "images alone"),
        (train_ddpm.DDPMConfig, ["--compile-mode", "max-autotune"],
         "--compile-mode applies with --compile only"),
        (train_basic.BasicConfig, ["--compile-backend", "aot_eager"],
         "--compile-backend applies with --compile only"),
    ],
)  # fmt: skip
def test_a_flag_that_would_do_nothing_is_refused(cls, argv, expected, capsys) -> None:
    assert expected in parse_error(cls, argv, capsys)


def test_the_same_flags_where_they_do_something_pass() -> None:
    cfg = parse_config(train_ddpm.DDPMConfig, ["--class-conditional", "--label-column", "label"])
    assert cfg.label_column == "label"
    cfg = parse_config(train_ddpm.DDPMConfig, ["--compile", "--compile-mode", "max-autotune"])
    assert cfg.compile_mode == "max-autotune"


# ----------------------------------------------------------------------------- 12. a busy directory


def test_a_run_into_a_busy_directory_is_refused_before_it_says_it_resumes(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    fresh_accelerate_state()
    train_basic.main([*TINY_BASIC, "--output-dir", str(out)])  # checkpoint-2 to resume from
    lock = RunLock.acquire(out)  # another run training there (flock: per open file)
    try:
        capsys.readouterr()
        fresh_accelerate_state()
        argv = [*TINY_BASIC, "--max-steps", "4", "--output-dir", str(out)]
        code, err, log = run_script(lambda: train_basic.main(argv), capsys)
    finally:
        lock.release()
    assert code == 2 and f"--output-dir: {out} is in use by another run (pid" in err
    assert "resumed" not in log + err and "checkpoint-2" not in log + err
    assert not (out / "checkpoints" / "checkpoint-4").exists()


# ----------------------------------------------------------------------------- 14. reproducible exports


def test_two_identical_runs_export_the_same_bytes(tmp_path_factory, tmp_path: Path) -> None:
    """The session's tiny DDPM run, and the same command in a process whose string hashing
    differs (set order: the scheduler config's `_use_default_values`)."""
    first = trained_ddpm(tmp_path_factory)
    preset = first.parent / "tiny_unet.json"  # the same preset path: the model card names it
    argv = [*ddpm_args(tmp_path / "run", preset, GLOBAL_BATCH // 2, 2), "--report-to=none"]
    seed = str(int(os.environ.get("PYTHONHASHSEED", "0") or 0) + 1)
    env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "train_ddpm.py", *argv], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    second = tmp_path / "run"
    files = sorted(p.relative_to(first / "pipeline") for p in (first / "pipeline").rglob("*"))
    assert files == sorted(
        p.relative_to(second / "pipeline") for p in (second / "pipeline").rglob("*")
    )
    differ = [f for f in files if (first / "pipeline" / f).is_file()
              and (first / "pipeline" / f).read_bytes() != (second / "pipeline" / f).read_bytes()]  # fmt: skip
    assert differ == []


# ----------------------------------------------------------------------------- 13. --dry-run


def dry_run(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_ddpm.main([*argv, "--dry-run"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_the_dry_run_prints_the_size_the_run_takes_from_the_data(tmp_path: Path, capsys) -> None:
    printed = dry_run([], capsys)  # the built-in digits: 8x8, trained at 16x16
    assert "resolution: 16  # what the run takes from the data; --resolution to choose" in printed
    assert "channels: 1  # what the run takes from the data; --channels to choose" in printed
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(5):
        Image.new("RGB", (24 if k else 40, 20)).save(folder / f"{k}.png")
    printed = yaml.safe_load(dry_run(["--dataset", str(folder), "--resolution", "16"], capsys))
    assert printed["resolution"] == 16 and printed["channels"] == 3
    printed = dry_run(["--dataset", "cifar10"], capsys)  # a hub dataset: the run reads it
    assert "resolution: null  # from the images, when the run loads them" in printed


def test_an_export_holding_infinity_is_made_again_by_a_rerun(
    tmp_path_factory, tmp_path: Path, capsys
) -> None:
    """A run given --sample-guidance-scale inf before flags were checked exported Infinity in
    task.json; the same command run again exports anew instead of keeping it as intact."""
    first = trained_ddpm(tmp_path_factory)
    run = tmp_path / "run"
    shutil.copytree(first, run)
    task_file = run / "pipeline" / "task.json"
    task = json.loads(task_file.read_text())
    task_file.write_text(json.dumps({**task, "guidance_scale": float("inf")}))
    write_checksums(run / "pipeline")  # as that run wrote it: its checksums match
    argv = [*ddpm_args(run, first.parent / "tiny_unet.json", GLOBAL_BATCH // 2, 2)]
    fresh_accelerate_state()
    train_ddpm.main([*argv, "--report-to=none"])
    assert "Infinity" not in task_file.read_text()
    assert "holds non-finite values (Infinity)" in capsys.readouterr().out
