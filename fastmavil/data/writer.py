"""The shard-writing pipeline shared by fastmavil-prep and fastmavil-synth.

Items (input files, synthetic clip seeds) are cut into fixed groups of `clips_per_shard`, one
group per shard, so a rerun maps every item to the same shard. Worker processes turn items into
clip members; the main process writes them in order. A shard is finished when its tar exists
(it is renamed into place only when complete) next to its sidecar `shard-N.meta.json`
(clip count, bytes, failures, and a fingerprint of its items and the writing options);
finished shards are not redone, unless their fingerprint shows that the rerun would put other
items or options there (another clip count, split, source or spec). Items that fail are
recorded (source, reason) and reported in `failures.csv` instead of ending the run; so is an
item whose worker process dies (the OOM killer, a crash in a codec), after one retry alone.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..files import write_atomically
from .shards import ShardWriter, shard_name, write_index


class ClipFailure(Exception):
    """Raised by a clip maker for an input it cannot turn into a clip; the run goes on."""


def _meta_path(shard: Path) -> Path:
    return shard.with_name(shard.name.replace(".tar", ".meta.json"))


def _finished_meta(shard: Path) -> dict | None:
    """The sidecar of a shard an earlier run finished, or None: no shard, no sidecar, or one
    that does not read (said, and the shard is then written again)."""
    if not (shard.exists() and _meta_path(shard).exists()):
        return None
    try:
        meta = json.loads(_meta_path(shard).read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"a {type(meta).__name__}, not an object")
        return meta
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        print(f"{_meta_path(shard)}: does not read ({err}); writing its shard again",
              file=sys.stderr)
        return None


def _fingerprint(group: Sequence, options: dict) -> str:
    """What a shard is made of: its items and the options they are written with."""
    text = json.dumps({"items": [repr(item) for item in group], "options": options},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _run_one(args):
    make_clip, item = args
    try:
        key, members = make_clip(item)
        return key, members, None
    except ClipFailure as err:
        return None, None, str(err)
    except Exception as err:  # an unexpected error in one clip must not end the run
        return None, None, f"{type(err).__name__}: {err}"


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored by the worker processes started meanwhile (they inherit SIG_IGN, and
    Python keeps it), so that Ctrl-C, which the terminal sends to the whole process group, stops
    the parent alone, which then ends the workers (_Workers.close), instead of each worker
    printing its own KeyboardInterrupt traceback. The main thread only: signal handlers are
    set there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back; Python's instead
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


class _Workers:
    """_run_one over jobs in worker processes, results in order. multiprocessing.Pool waits
    forever for the result of a worker that died; here, when the pool breaks, the first job not
    yet read is retried alone in a fresh process and the rest go to a fresh pool, so a job that
    kills its process is met alone in the end and fails with the reason, and the run goes on."""

    def __init__(self, count: int):
        self.count, self.pool = count, None

    def _start(self, count: int) -> ProcessPoolExecutor:
        # spawn: workers start clean (no inherited threads from torch or PyAV in the parent)
        return ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"))

    def map(self, jobs: list) -> Iterator[tuple]:
        if self.count <= 1:
            yield from map(_run_one, jobs)
            return
        futures, i = self._submit(jobs), 0
        while i < len(jobs):
            try:
                yield futures[i].result()
                i += 1
                continue
            except BrokenProcessPool:
                pass
            self.close()
            yield self._alone(jobs[i])
            i += 1
            futures[i:] = self._submit(jobs[i:])

    def _submit(self, jobs: list) -> list:
        """Futures of `jobs` in the pool, started afresh where it is gone or broken (a worker
        can die idle, between two shards)."""
        for _ in range(2):
            self.pool = self.pool or self._start(self.count)
            try:
                with _sigint_ignored():  # the workers start on these submits
                    return [self.pool.submit(_run_one, job) for job in jobs]
            except BrokenProcessPool:
                self.close()
        raise BrokenProcessPool("a fresh pool of workers broke before any job")

    def _alone(self, job) -> tuple:
        pool = self._start(1)
        try:
            with _sigint_ignored():
                future = pool.submit(_run_one, job)
            return future.result()
        except BrokenProcessPool:
            return None, None, ("its worker process died (killed by the OS, out of memory, "
                                "or a crash in a decoder)")
        finally:  # done, or Ctrl-C: a worker that ignores it is ended here, not waited for
            _terminate(pool)

    def close(self) -> None:
        """Stops the pool, killing jobs still running (an error or Ctrl-C ended the run; at
        the end every job is done)."""
        if self.pool is not None:
            _terminate(self.pool)
            self.pool = None


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Shuts `pool` down without waiting, killing its jobs still running: shutdown alone
    would wait for them at exit (and its workers ignore Ctrl-C)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:  # no public way before Python 3.14's terminate_workers
        process.terminate()


def interrupted(prog: str) -> int:
    """What a shard-writing command says and exits with on Ctrl-C."""
    print(f"{prog}: interrupted; the same command goes on from the shards it finished",
          file=sys.stderr)
    return 130


def write_shards(out: str | Path, items: Sequence, make_clip: Callable, describe: Callable,
                 labels: list[str], clips_per_shard: int, workers: int = 0,
                 title: str = "writing shards", **index_extra) -> dict:
    """Writes the shards and index.json of `items`; returns the index.

    make_clip(item) -> (key, {ext: bytes | dict}) runs in worker processes (top-level function,
    picklable items); describe(item) names the item in the failures report.
    """
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if clips_per_shard < 1:
        raise ValueError(f"clips_per_shard = {clips_per_shard} must be >= 1")
    groups = [items[i:i + clips_per_shard] for i in range(0, len(items), clips_per_shard)]
    pool = _Workers(workers or os.cpu_count() or 1)
    shards, kept = [], 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task(title, total=len(items))
            for number, group in enumerate(groups):
                path = out / shard_name(number)
                fingerprint = _fingerprint(group, index_extra)
                meta = _finished_meta(path)
                if meta is not None:  # finished by an earlier run
                    # shards from before fingerprints carry none: taken as they are
                    if meta.get("fingerprint", fingerprint) == fingerprint:
                        shards.append(meta)
                        kept += 1
                        progress.advance(task, len(group))
                        continue
                    progress.console.print(f"{path}: written for other items or options; "
                                           "rewriting it")
                    path.unlink()  # gone first: a crash mid-rewrite leaves it unfinished
                jobs = [(make_clip, item) for item in group]
                results = pool.map(jobs)
                failures = []
                with ShardWriter(path) as writer:
                    for item, (key, members, error) in zip(group, results):
                        if error is None:
                            writer.add(key, members)
                        else:
                            failures.append([describe(item), error])
                        progress.advance(task)
                    meta = {"name": path.name, "clips": writer.clips, "failures": failures,
                            "fingerprint": fingerprint}
                    # sidecar first: the tar's rename on close is what marks the shard finished
                    write_atomically(_meta_path(path), json.dumps(meta))
                meta["bytes"] = path.stat().st_size
                write_atomically(_meta_path(path), json.dumps(meta))
                shards.append(meta)
            if kept:
                progress.console.print(f"{out}: kept {kept} of the {len(groups)} shards, which "
                                       "an earlier run had finished")
    finally:
        pool.close()
    failures = [f for s in shards for f in s["failures"]]
    with open(out / "failures.csv", "w", newline="", encoding="utf-8",
              errors="backslashreplace") as f:
        csv.writer(f).writerows([["source", "reason"], *failures])
    index = write_index(out, [{k: s[k] for k in ("name", "clips", "bytes") if k in s}
                              for s in shards], labels, failed=len(failures), **index_extra)
    return index
