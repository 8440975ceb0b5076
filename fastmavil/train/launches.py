"""What each start of a run ran on, for reproducing it: one JSON line per start (a fresh run or a
resume) in the run folder's launches.jsonl, written by rank 0 before training.

A line holds the time, the step it started from, the command line (rank 0's: under torchrun a
worker's), the host, the processes and their device, and the versions of what computes:
fastmavil (with its git commit and whether the checkout had changes, when run from one),
Python, torch with its CUDA and cuDNN, Triton, NVIDIA DALI, flash-attn, PyAV and NumPy (null
where absent). A resume on another machine or stack adds a line, so the steps each setup
trained can be told apart.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch

import fastmavil

log = logging.getLogger("fastmavil.train")

# distributions whose version matters to the numbers; DALI's name carries its CUDA major
PACKAGES = ("triton", "flash-attn", "av", "numpy")
DALI_BUILDS = ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110")


def git_commit(package: Path = Path(fastmavil.__file__).resolve().parent) -> dict | None:
    """{"commit", "changed"} of the git checkout whose top folder holds `package` (tracked files
    changed or not), or None where the package is not run from its own checkout (installed into
    a venv inside another repository, say) or git is missing."""
    def git(*args: str) -> str:  # no optional locks: the user may be running git meanwhile
        return subprocess.run(["git", "--no-optional-locks", "-C", str(package), *args],
                              capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != package.parent.resolve():
            return None
        commit = git("rev-parse", "HEAD")
        changed = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "changed": changed}


def versions() -> dict:
    found = {"fastmavil": fastmavil.__version__, "python": platform.python_version(),
             "torch": torch.__version__, "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
             else None}
    found.update({name: _version(name) for name in PACKAGES})
    dali = {name: version for name in DALI_BUILDS if (version := _version(name))}
    found.update(dali or {"nvidia-dali": None})  # the build installed is named
    return found


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere what platform knows)."""
    model = platform.processor() or platform.machine() or "cpu"
    try:  # Linux names the model; platform gives only the architecture there
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    return model


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {os.cpu_count()} cores"


def record_launch(run_dir: Path, device: torch.device, processes: int, step: int) -> dict:
    """Appends this start's line to `run_dir`/launches.jsonl (a warning if it cannot: the run
    goes on, its checkpoints say whether the disk takes them); returns it."""
    record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "step": step, "command": sys.orig_argv, "host": socket.gethostname(),
              "processes": processes, "device": device_name(device),
              "versions": versions(), "git": git_commit()}
    try:
        with open(run_dir / "launches.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        log.warning("could not record this start in %s: %s", run_dir / "launches.jsonl", err)
    return record
