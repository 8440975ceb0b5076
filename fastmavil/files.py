"""Files written whole or not at all: the run's records, the dataset's index and sidecars."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: str | Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file, synced to disk, then renamed over it:
    a crash or a kill mid-write leaves the previous file (or none), never a truncated one."""
    path = Path(path)
    partial = path.with_name(path.name + ".tmp")  # the whole name: a.toml and a.json differ
    partial.write_text(text, encoding="utf-8")
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)  # on disk before the rename: never an empty file after it
    finally:
        os.close(fd)
    os.replace(partial, path)
