"""Data-parallel training over several processes (`torchrun --nproc_per_node N -m
fastmavil.train.pretrain ...`, or `fastmavil.train.finetune`).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; each process trains on its own device (CUDA:
LOCAL_RANK, NCCL; or the CPU, gloo) a 1 / N share of every step's passes, its gradients
averaged across the processes by DistributedDataParallel at each step's last pass (with the
passes replayed as CUDA graphs, which hold no all-reduce: by one all-reduce after them, of the
buffer every gradient is a view of). The shards are split by rank (data/loader.py), the plan
is the same on every rank (schedule.py), and the masks and noise of each rank come from its own
stream (rank_seed). The run folder and the data must be on a filesystem every process sees.

The ranks agree on the host, through a gloo group, on what can differ between them: whether
each still has data for the next pass (an epoch's shards split unevenly) and whether a signal
asked them to stop. Rank 0 writes the checkpoints (every rank's random states in them), the
metrics and the log.
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import itertools
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError
from .checkpoint import CheckpointError, load_latest


# extra= of a log record that every process gives alike (a resume's config changes, an epoch's
# agreed early end): the processes other than rank 0 leave it out (leave_out_repeats)
SAME_ON_EVERY_RANK = {"same_on_every_rank": True}


def leave_out_repeats() -> None:
    """For a process other than rank 0: its log handlers drop the records marked
    SAME_ON_EVERY_RANK, which rank 0 gives too; its own warnings still show."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: not getattr(record, "same_on_every_rank", False))


class OtherProcessFailed(RuntimeError):
    """Another process failed at a point all of them had to pass together; its own error is in
    its log."""


@dataclass
class World:
    """This process's place among the training processes; one process by default."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    control: object = None  # the gloo group the host-side agreements use

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (a host-side collective: no device sync)."""
        if not self.parallel:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, dist.ReduceOp.MIN, group=self.control)
        return bool(value)

    def any(self, flag: bool) -> bool:
        return not self.all(not flag)

    def agree(self, error: BaseException | None, what: str) -> None:
        """After a step some ranks may fail alone (rank 0's file work): raises on every rank if
        any failed, its own error where it has one, OtherProcessFailed naming `what` elsewhere;
        so no rank goes on to wait for the others in a collective."""
        if self.all(error is None):
            return
        if error is not None:
            raise error
        raise OtherProcessFailed(f"another process failed {what} (its error is in its log)")

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over the ranks (on its device, asynchronous to the host)."""
        return self.average_(tensor.clone()) if self.parallel else tensor

    def average_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` replaced, in place, by its mean over the ranks: each scaled by 1 / N, then
        summed, as DistributedDataParallel rounds its gradients."""
        if self.parallel:
            tensor.mul_(1.0 / self.size)
            dist.all_reduce(tensor)
        return tensor

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (a picklable object)."""
        if not self.parallel:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.control)
        return out


def rank_seed(seed: int, rank: int) -> int:
    """Rank `rank`'s seed of a stream seeded `seed`: the seed itself on rank 0 (a single
    process's), one drawn from (seed, rank) on the others, so that no rank's stream is another
    rank's under a nearby seed (seed + rank would be rank 0's at seed + 1)."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


def launched_rank() -> int:
    """This process's rank as torchrun numbered it (0 when it started alone)."""
    return int(os.environ["RANK"]) if launched() else 0


def launched() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resume_command(prog: str, module: str, argv: list[str]) -> str:
    """The command that resumes this run with its arguments `argv`: `prog ...` for one process,
    torchrun with the same process count under torchrun (a resume in another count reseeds)."""
    args = shlex.join(argv)
    if not launched():
        return f"{prog} {args}"
    size = int(os.environ["WORLD_SIZE"])
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    if per_node == size:
        return f"torchrun --standalone --nproc_per_node {size} -m {module} {args}"
    return (f"torchrun --nnodes {size // per_node} --nproc_per_node {per_node} -m {module} "
            f"{args}  # on every node, with the rendezvous flags this run was started with")


def init_world(device: str) -> World:
    """Joins the process group torchrun set up; `device` is train.device. One process: World()."""
    if not launched():
        return World()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {device!r} but CUDA is not available")
    if device.startswith("cuda:"):
        raise ConfigError(f"train.device = {device!r} names one GPU; with torchrun each process "
                          "takes the GPU of its LOCAL_RANK: use auto or cuda")
    if cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    control = dist.new_group(backend="gloo") if cuda else None  # gloo: host-side agreements
    return World(rank, size, local, control)


def device_of(world: World, device: str) -> str:
    """train.device for this process: each rank's own GPU under torchrun."""
    if world.parallel and device != "cpu" and torch.cuda.is_available():
        return f"cuda:{world.local_rank}"
    return device


def distributed_model(model: torch.nn.Module, device: torch.device):
    """`model` in DistributedDataParallel, which hands rank 0's parameters to the others as it
    wraps (fine-tuning loads the pre-trained encoder on rank 0 only). Its buffers (fixed
    positions, the diffusion schedule) are made the same on every rank, are not saved and
    never change: not synchronised at each forward."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    no_buffer_sync = ({"forward_sync_buffers": False}  # torch >= 2.13's name
                      if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               **no_buffer_sync)


def broadcast_parameters(model: torch.nn.Module, world: World) -> None:
    """Rank 0's parameters and buffers on every rank, as DistributedDataParallel hands them over
    when it wraps a model: for the passes replayed as CUDA graphs, which run the model itself."""
    if world.parallel:
        with torch.no_grad():
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                dist.broadcast(tensor, src=0)


def agreed_batches(batches, world: World):
    """`batches` until one rank has none left, on every rank at the same pass: a rank whose
    shards ran out earlier would otherwise leave the others waiting in the all-reduce."""
    for batch in itertools.chain(batches, [None]):
        if not world.all(batch is not None):
            return
        yield batch


def latest_checkpoint(run_dir: Path, world: World) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads: rank 0 finds it (setting damaged ones aside), the
    other ranks then read the same file."""
    found, error = None, None
    if world.main:
        try:
            found = load_latest(run_dir)
        except CheckpointError as err:
            error = err
    world.agree(error, "reading the newest checkpoint")
    path = world.gather(str(found[0]) if found else None)[0]
    if world.main or path is None:
        return found
    try:  # memory-mapped: a node's processes do not each hold a copy in RAM
        return Path(path), torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except OSError as err:
        raise CheckpointError(f"rank {world.rank} cannot read rank 0's checkpoint {path} ({err}): "
                              "run.dir must be on a filesystem every process shares") from None


def shutdown(world: World) -> None:
    """Leaves the process group together: a process that tore its connections down while
    another was still finishing (rank 0 printing the summary) aborted in gloo's threads at
    exit, 1 run in 4 on 2 CPU processes. The wait is bounded: after an error one process met
    alone, the others may never come (torchrun then stops them)."""
    if world.parallel and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.monitored_barrier(group=world.control, timeout=datetime.timedelta(seconds=30))
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
