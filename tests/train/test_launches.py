"""The record of each start of a run (fastmavil/train/launches.py)."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastmavil.train import launches

ROOT = Path(__file__).resolve().parents[2]


def test_versions_name_every_package_a_number_depends_on():
    found = launches.versions()
    assert found["torch"] == torch.__version__ and found["fastmavil"]
    assert {"python", "cuda", "cudnn", "triton", "flash-attn", "av", "numpy"} <= set(found)
    assert any(name.startswith("nvidia-dali") for name in found)  # a build's version, or null
    assert found["flash-attn"] is None or isinstance(found["flash-attn"], str)


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs git and a git checkout of fastmavil")
def test_the_git_commit_is_the_checkouts_and_a_change_is_seen(tmp_path):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert launches.git_commit()["commit"] == head
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "pkg" / "a.py").write_text("1\n")
    subprocess.run([*git, "add", "pkg/a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    (repo / "new.txt").write_text("untracked files do not count\n")
    assert launches.git_commit(repo / "pkg")["changed"] is False
    (repo / "pkg" / "a.py").write_text("2\n")
    assert launches.git_commit(repo / "pkg")["changed"] is True
    assert launches.git_commit(tmp_path) is None  # not a checkout
    # installed inside another repository (a venv in it): not fastmavil's checkout
    (repo / "venv" / "site-packages" / "pkg").mkdir(parents=True)
    assert launches.git_commit(repo / "venv" / "site-packages" / "pkg") is None


def test_a_start_that_cannot_be_recorded_warns_and_goes_on(tmp_path, caplog):
    missing = tmp_path / "gone"
    record = launches.record_launch(missing, torch.device("cpu"), 1, 0)
    assert record["step"] == 0 and "could not record this start" in caplog.text
