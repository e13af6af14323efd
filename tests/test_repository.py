"""The repository's own files: no merge left half done."""

from __future__ import annotations

import subprocess

from tests.conftest import ROOT

MARKERS = ("<<<<<<< ", ">>>>>>> ")


def test_no_file_holds_a_merge_conflict_marker() -> None:
    # Only files git tracks (a clean checkout's: CI's), read as text where they are text.
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    names = [n for n in listed.stdout.decode().split("\0") if n]
    assert "README.md" in names
    found = []
    for name in names:
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:  # images, weights
            continue
        found += [f"{name}:{k + 1}" for k, line in enumerate(lines) if line.startswith(MARKERS)]
    assert not found, f"merge conflict markers left in {found}"
