"""Webdataset-style tar shards and their index.

A dataset folder holds `shard-000000.tar`, `shard-000001.tar`, ... and `index.json`. Each clip is
a group of consecutive tar members sharing a key: `KEY.webm` (VP9) or `KEY.mp4` (H.264),
`KEY.flac` (16 kHz mono) and `KEY.json` (labels, duration, source, optional split/fold). Python's
tarfile and DALI's webdataset reader both read it.

Shards are written under a temporary name and renamed when complete, so a shard file that
exists is whole: tools that write shards resume by keeping the ones already there whose
sidecar (`shard-NNNNNN.meta.json`) says they hold the same items written the same way
(fastmavil.data.writer).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..files import write_atomically

INDEX = "index.json"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def split_key(name: str) -> tuple[str, str]:
    """`dir/clip.flac` -> (`dir/clip`, `flac`): as in webdataset and DALI, the extension starts
    at the first dot of the file name, so keys hold no dots."""
    folder, slash, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return folder + slash + stem, ext


class ShardWriter:
    """Writes one shard: `add(key, {"flac": bytes, "webm": bytes, "json": dict})`, then `close()`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.GNU_FORMAT)
        self.clips = 0

    def add(self, key: str, members: dict[str, bytes | dict]) -> None:
        if "." in Path(key).name:
            raise ValueError(f"clip key {key!r} must not contain a dot (it separates the extension)")
        for ext in sorted(members):
            data = members[ext]
            if isinstance(data, dict):
                data = json.dumps(data, sort_keys=True).encode()
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # reproducible bytes
            self.tar.addfile(info, io.BytesIO(data))
        self.clips += 1

    def close(self) -> None:
        self.tar.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.abort() if exc_type else self.close()


@dataclass
class Clip:
    """One clip read from a shard: member extension -> raw bytes."""
    shard: str
    key: str
    members: dict[str, bytes] = field(default_factory=dict)

    @property
    def display_key(self) -> str:
        """The key printable everywhere (names that are not UTF-8 carry surrogate escapes)."""
        return self.key.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def read_shard(path: str | Path, only: tuple[str, ...] | None = None) -> Iterator[Clip]:
    """Yields the clips of a shard in order; members of one key must be consecutive.

    A damaged member header is passed over to the next header that reads (ignore_zeros: without
    it tarfile takes a bad header for the archive's end, silently dropping the rest). A shard
    truncated mid-member yields the clips before the damage, then raises tarfile.ReadError; one
    truncated in a header ends early without an error, which only a count against the index
    shows (ShardDataset does that). `only` reads just the members of those extensions (the
    others are passed over unread).
    """
    path = Path(path)
    clip = None
    with tarfile.open(path, "r:", errors="surrogateescape", ignore_zeros=True) as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = split_key(info.name)
            if clip is not None and key != clip.key:
                yield clip
                clip = None
            if clip is None:
                clip = Clip(path.name, key)
            if only is None or ext in only:
                clip.members[ext] = tar.extractfile(info).read()
    if clip is not None:
        yield clip


def clip_json(clip: Clip) -> dict | None:
    """A clip's json as a dict, or None where it is missing or does not read."""
    try:
        meta = json.loads(clip.members["json"])
    except (KeyError, ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def shard_metas(path: str | Path) -> Iterator[dict | None]:
    """Each clip's json (clip_json) in the shard's order, reading only the json members; ends
    quietly where the shard is damaged (the loader reports that when it reads the shard)."""
    try:
        for clip in read_shard(path, only=("json",)):
            yield clip_json(clip)
    except (tarfile.TarError, OSError, EOFError):
        return


def write_index(folder: str | Path, shards: list[dict], labels: list[str], **extra) -> dict:
    """Writes `index.json`: clip count, label names, shards [{name, clips, bytes}], and extras."""
    folder = Path(folder)
    index = {"clips": sum(s["clips"] for s in shards), "labels": labels,
             "shards": sorted(shards, key=lambda s: s["name"]), **extra}
    write_atomically(folder / INDEX, json.dumps(index, indent=2))
    return index


def read_index(folder: str | Path) -> dict:
    path = Path(folder) / INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no dataset index; write shards with fastmavil-prep "
                                "or fastmavil-synth") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    for key in ("clips", "labels", "shards"):
        if key not in index:
            raise ValueError(f"{path}: missing key {key!r}")
    return index


def shard_paths(source: str | Path) -> list[Path]:
    """The shards of a dataset: a folder with index.json, a folder of shards, or one .tar file."""
    source = Path(source)
    if source.is_file():
        return [source]
    if (source / INDEX).exists():
        return [source / s["name"] for s in read_index(source)["shards"]]
    paths = sorted(source.glob("shard-*.tar"))
    if not paths:
        raise FileNotFoundError(f"{source}: no shards (shard-*.tar) and no {INDEX}")
    return paths


def shard_clips(source: str | Path) -> dict[Path, int]:
    """Clips per shard: from the dataset's index, else by scanning the shards' tar headers as
    read_shard reads them (past a damaged header, grouping consecutive members by key), so
    that the plan counts what the loader reads."""
    source = Path(source)
    if source.is_dir() and (source / INDEX).exists():
        shards = read_index(source)["shards"]
        if all("clips" in s for s in shards):
            return {source / s["name"]: int(s["clips"]) for s in shards}
    counts = {}
    for path in shard_paths(source):
        try:
            # a file whose first header does not read is no tar (read_shard would skip it all)
            tarfile.open(path, "r:").close()
            counts[path] = sum(1 for _ in read_shard(path, only=()))
        except tarfile.TarError as err:  # named: a dataset folder holds many shards
            raise tarfile.TarError(f"{path.name}: {err}") from err
    return counts


def count_clips(source: str | Path) -> int:
    """Clips in a dataset: from its index, else by scanning the shards' tar headers."""
    source = Path(source)
    if source.is_dir() and (source / INDEX).exists():
        return int(read_index(source)["clips"])
    return sum(shard_clips(source).values())
