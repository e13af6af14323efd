"""--push-to-hub without a network: what is uploaded (recorded by a stand-in for HfApi, the
one network seam), and the refusals at the start when nothing could be uploaded."""

from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub
import pytest

import train_basic
from ddp_utils import hub
from ddp_utils.config import parse_config
from tests.tiny_runs import fresh_accelerate_state

TINY = ["--resolution", "8", "--max-images", "32", "--max-steps", "2", "--batch-size", "8",
        "--sample-every", "0", "--num-sample-images", "4", "--sample-steps", "2",
        "--report-to", "none"]  # fmt: skip


class RecordingHfApi:
    """HfApi's create_repo/upload_folder, recording what they were given (and the files the
    uploaded folder held at that moment) instead of sending it."""

    calls: list[tuple] = []

    def whoami(self, token: str) -> dict:  # the start's check of the token
        return {
            "name": "me",
            "orgs": [{"name": "my-lab"}],
            "auth": {"accessToken": {"role": "write"}},
        }

    def create_repo(self, repo_id: str, *, private: bool, exist_ok: bool, repo_type: str):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        full_id = repo_id if "/" in repo_id else f"me/{repo_id}"  # the token's namespace
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{full_id}")

    def upload_folder(self, *, repo_id: str, folder_path: Path, path_in_repo: str | None, **_):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*"))
        self.calls.append(("upload_folder", repo_id, path_in_repo, Path(folder_path), files))


@pytest.fixture
def online(monkeypatch):
    """As on a machine with a network and a token: HfApi records instead of uploading."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    RecordingHfApi.calls = []
    monkeypatch.setattr(hub, "HfApi", RecordingHfApi)
    fresh_accelerate_state()


def test_the_export_and_best_are_uploaded_at_the_end(online, tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)  # what an evaluation of an earlier invocation kept
    (out / "best" / "fid.json").write_text('{"fid": 1.0}')
    flags = ["--push-to-hub", "--hub-model-id", "me/tiny-digits", "--hub-private"]
    train_basic.main([*TINY, *flags, "--output-dir", str(out)])
    create, export, best = RecordingHfApi.calls
    assert create == ("create_repo", "me/tiny-digits", True, True)
    assert export[:4] == ("upload_folder", "me/tiny-digits", None, out / "model")
    for name in ("README.md", "samples.png", "diffusion_pytorch_model.safetensors",
                 "config.json", "task.json"):  # fmt: skip
        assert name in export[4], export[4]
    assert best == ("upload_folder", "me/tiny-digits", "best", out / "best", ["fid.json"])


def test_the_repository_defaults_to_the_run_directory_name(online, tmp_path: Path) -> None:
    train_basic.main([*TINY, "--push-to-hub", "--output-dir", str(tmp_path / "digits-basic")])
    assert RecordingHfApi.calls[0] == ("create_repo", "digits-basic", False, True)
    uploads = [call[1:3] for call in RecordingHfApi.calls[1:]]
    assert uploads == [("me/digits-basic", None)]  # no best/: one upload


def test_an_upload_that_fails_keeps_the_export_and_says_how_to_retry(online, tmp_path, monkeypatch):
    def refuse(self, **_):
        raise ConnectionError("the network is down")

    monkeypatch.setattr(RecordingHfApi, "upload_folder", refuse)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"could not upload to the hub repository me/x \("
                       r"ConnectionError: the network is down\)\. The export is complete"):  # fmt: skip
        train_basic.main(
            [*TINY, "--push-to-hub", "--hub-model-id", "me/x", "--output-dir", str(out)]
        )
    assert (out / "model" / "README.md").is_file()


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (["--push-to-hub"], {"HF_HUB_OFFLINE": "1"},
         "--push-to-hub: offline mode is on (HF_HUB_OFFLINE=1), so nothing can be uploaded"),
        (["--push-to-hub"], {"HF_HUB_OFFLINE": "0"}, "--push-to-hub: no Hugging Face token"),
        (["--push-to-hub", "--hub-model-id", "a/b/c"], {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "x"},
         "--hub-model-id: 'a/b/c' is not a hub repository id"),
    ],
)  # fmt: skip
def test_a_push_that_cannot_happen_is_refused_before_anything(
    tmp_path: Path, monkeypatch, flags, env, message
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fresh_accelerate_state()
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape(message)):
        train_basic.main([*TINY, *flags, "--output-dir", str(out)])
    assert not out.exists()


def test_hub_flags_without_push_to_hub_are_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_config(train_basic.BasicConfig, ["--hub-private"])
    assert "--hub-private applies with --push-to-hub only" in capsys.readouterr().err
