"""Checkpoints: atomic writes, the newest K kept, resume from the newest complete one.

A checkpoint is written to a temporary name, flushed to disk (fsync) and renamed into place, so a
crash mid-write leaves the previous checkpoints untouched and at worst a `.tmp` file, which is
ignored and cleaned up (a failed write, e.g. a full disk, removes it at once and raises
CheckpointError). Resuming takes the newest checkpoint that loads; a damaged one is reported and
renamed `*.bad`, so it never takes a slot of the newest K again; one that the disk cannot read (I/O
error, permissions), that needs other code (a module it pickled is missing) or that does not fit in
the memory free now stops the resume and stays in place. When checkpoints exist but none loads,
resuming stops with an error instead of starting again from step 0. A run directory holds a lock
while a trainer runs in it (run_lock).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("fastmavil.train")
NAME = re.compile(r"^step-(\d{8})\.pt$")
# OSErrors that say the file could not be read (disk, permissions, network filesystem), not
# that it is damaged.
UNREADABLE = {errno.EIO, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ESTALE, errno.ETIMEDOUT}
_REFUSED = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")


class CheckpointError(RuntimeError):
    """The run has checkpoints but none of them loads."""


class CheckpointClock:
    """When a step's checkpoint is due: every `every` steps, and at the first step that ends
    `minutes` (0: never) after the last one (`reset`), so a crash loses at most that long and a
    step, however long steps take. Under torchrun every process must ask at every step: they
    agree (`world.any`), each on its own clock."""

    def __init__(self, every: int, minutes: float, world):
        self.every, self.seconds, self.world = every, minutes * 60.0, world
        self.reset()

    def reset(self) -> None:
        self.last = self.now()

    def due(self, step: int) -> bool:
        if step % self.every == 0:
            return True
        return self.seconds > 0 and self.world.any(self.now() - self.last >= self.seconds)

    def now(self) -> float:
        return time.monotonic()


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Writes checkpoints/step-<8-digit step>.pt atomically and deletes all but the newest `keep`."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    # a crash's partial files: removed by the saver alone, which holds the run's lock (a
    # reader, fine-tuning from a run still training, would remove the one being written)
    for partial in folder.glob("*.tmp"):
        partial.unlink(missing_ok=True)
    path = folder / checkpoint_name(step)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as err:  # a full disk, or a stop mid-write: no partial file is left
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):  # torch's zip writer raises RuntimeError
            raise CheckpointError(f"{path} could not be written ({type(err).__name__}: {err}); "
                                  "the checkpoints before it are intact") from None
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def save_run_checkpoint(world, run_dir: Path, step: int, streams: dict, state, keep: int
                        ) -> Path:
    """Step `step`'s checkpoint of a run in `world`'s processes (fastmavil.train.distributed.
    World), for both trainers: each process's random `streams` are gathered, and rank 0 writes
    them with `state()` (the model, optimiser and run state; called there only) while the others
    wait. An error on rank 0 (a full disk) raises on every process. Returns the path."""
    gathered = world.gather(streams)
    path, error = checkpoint_dir(run_dir) / checkpoint_name(step), None
    if world.main:
        try:
            path = save_checkpoint(run_dir, step, {
                **state(), **gathered[0], **({"ranks": gathered} if world.parallel else {})},
                keep)
        except Exception as err:  # every process stops
            error = err
    world.agree(error, f"writing step {step}'s checkpoint")
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` is one being written, or a crash's)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if NAME.match(p.name))


def load_latest(run_dir: Path, owner: bool = True) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, or None when the run has none. The `owner`, the trainer
    holding the run's lock, sets a damaged one aside (renamed *.bad) before trying the one
    before; a reader (fine-tuning from the run, which may still be training) only passes over
    it, changing nothing."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=False)
        except OSError as err:
            if err.errno in UNREADABLE:  # the disk, not the file: a good checkpoint stays
                raise CheckpointError(f"{path} cannot be read ({err}); left as it is") from None
            damage = err  # e.g. EINVAL: the zip reader seeks past a truncated file's end
        except (ImportError, AttributeError) as err:  # written by other code, most likely
            raise CheckpointError(f"{path} does not load with this code ({type(err).__name__}: "
                                  f"{err}); left as it is (if it is damaged instead, move it "
                                  "aside to resume from the one before)") from None
        except Exception as err:  # damaged: truncated or corrupted (zip, pickle, tensor data)
            if _out_of_memory(err, path):  # this process, not the file: it stays
                raise CheckpointError(f"{path} does not fit in memory now ({err}); left as it "
                                      "is: resume where more memory is free") from None
            damage = err
        if not owner:
            log.warning("checkpoint %s does not load (%s: %s); trying an older one", path,
                        type(damage).__name__, damage)
            continue
        bad = path.with_name(path.name + ".bad")  # set aside, fall back to the one before
        path.rename(bad)
        log.warning("checkpoint %s does not load (%s: %s); moved to %s, trying an older one",
                    path, type(damage).__name__, damage, bad.name)
    if owner and any(checkpoint_dir(run_dir).glob("*.bad")):
        raise CheckpointError(f"{checkpoint_dir(run_dir)} holds checkpoints but none loads (see "
                              "the *.bad files); not restarting from step 0 over them")
    return None


def _out_of_memory(err: Exception, path: Path) -> bool:
    """Whether loading `path` failed for want of host memory rather than because it is damaged:
    the CPU allocator refused a request no larger than the file, whose tensors it holds
    uncompressed. A damaged file can ask for any size, and a bare MemoryError (a corrupted
    length in the pickle) counts as damage."""
    found = _REFUSED.search(str(err))
    return (isinstance(err, RuntimeError) and found is not None
            and int(found.group(1)) <= path.stat().st_size)


class RunLocked(RuntimeError):
    """Another process trains in this run directory."""


# The run locks this process holds, by file descriptor. A flock belongs to the open file, which
# a forked child (a DataLoader worker) shares: children close their copies at once, so that the
# lock goes with the trainer when it dies, not with workers that outlive it by seconds.
_LOCK_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _LOCK_FDS:  # closed, not unlocked: unlocking would release the parent's lock
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Holds an exclusive lock on run_dir/.lock while a trainer runs there: a second trainer in
    the same directory would delete the first one's checkpoint being written and rewrite its
    metrics file. The OS releases the lock when the process dies, so a crash leaves none."""
    path = Path(run_dir) / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            raise RunLocked(f"{run_dir} is in use by another trainer (pid {owner}); wait for it "
                            "or start a new run with --run.name") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        _LOCK_FDS.add(f.fileno())
        try:
            yield
        finally:
            _LOCK_FDS.discard(f.fileno())
            fcntl.flock(f, fcntl.LOCK_UN)


def rng_state(device: torch.device) -> dict:
    """Every RNG a step draws from: Python, NumPy, torch CPU and, training on CUDA, the
    training device's default generator (dropout draws from it). Only that device's: a run
    may resume with another number of GPUs visible."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # written before 2026-11-27: every visible device's
        index = device.index or 0
        cuda = cuda[index] if device.type == "cuda" and index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
