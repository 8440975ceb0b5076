"""What the two training commands (fastmavil-train, fastmavil-finetune) share around their
loops: the command's body (logging, the process group, exit codes), the run folder and its
lock, the device and the fast path, the demo's data and the opening of a dataset, signals,
epochs whose data ends early, and the progress display."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tarfile
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..data.loader import LoaderSpec, ShardDataset
from ..schedule import EpochPlan
from .checkpoint import CheckpointError, RunLocked, run_lock
from .distributed import (SAME_ON_EVERY_RANK, OtherProcessFailed, World, init_world, launched,
                          launched_rank, leave_out_repeats, rank_seed, shutdown)
from .metrics import StepTimer

log = logging.getLogger("fastmavil.train")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stays non-finite); checkpoints are intact."""


class DataError(TrainingError):
    """An epoch's data gave no step: the steps trained so far are checkpointed first."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but CUDA is not available; use cpu or auto")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device = {name!r} but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def prepare_data(cfg: Config) -> Path:
    """The training shards; generates the synthetic demo dataset on first use."""
    d = cfg.data
    if not d.shards:
        raise ConfigError("data.shards is empty: pass --data.shards DIR (a dataset from "
                          "fastmavil-prep or fastmavil-synth), or --data.random_clips N to "
                          "time the model on random clips")
    source = Path(d.shards)
    if d.synth_clips:
        from ..data.synth import SynthSpec, synthesize, synthesized
        # first use, an interrupted one, or another data.synth_clips (not another data.seed,
        # which also seeds the loader: runs of other seeds share the demo's clips)
        if not synthesized(source.parent, d.synth_clips):
            log.info("generating %d synthetic clips under %s (data.synth_clips)", d.synth_clips,
                     source.parent)
            synthesize(source.parent, clips=d.synth_clips, spec=SynthSpec(seed=d.seed))
    if not source.exists():
        raise ConfigError(f"data.shards = {d.shards!r} does not exist")
    return source


def prepared_data(cfg: Config, world: World) -> Path:
    """prepare_data on rank 0 (which may generate the demo's clips) while the others wait."""
    error = None
    if world.main:
        try:
            source = prepare_data(cfg)
        except ConfigError as err:
            error = err
    if not world.all(error is None):
        raise error or ConfigError(f"rank 0 could not prepare data.shards = "
                                   f"'{cfg.data.shards}' (its error is in its log)")
    return source if world.main else Path(cfg.data.shards)


def fast_path(cfg: Config, device: torch.device) -> bool:
    """Triton kernels when requested (model.kernels, env FASTMAVIL_KERNELS) and runnable."""
    from kernels import kernels_enabled, triton_available
    if not kernels_enabled(cfg.model.kernels):
        return False
    if device.type != "cuda" or not triton_available():
        log.info("Triton kernels need a CUDA device and triton: using the PyTorch references")
        return False
    return True


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step, checkpoints and exits. A second
    SIGINT interrupts at once."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, sig, frame):
        if self.signal is not None and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(sig).name
        log.warning("%s received: stopping after this step", self.signal)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, world: World) -> bool:
        """Whether a signal asked any of `world`'s processes to stop (one host round trip), so
        that all stop after the same step; one stopped by another's signal says so."""
        stop = world.any(self.signal is not None)
        if stop and self.signal is None:
            self.signal = "a signal to another process"
        return stop


class NonFiniteStreak:
    """Non-finite steps in a row (a non-finite loss or gradient skips the update), counted on
    the device, so that a step needs no host sync: `update` after each step, `check` (one sync)
    when the loop logs or checkpoints, which stops the run at train.max_bad_steps in a row."""

    def __init__(self, device: torch.device):
        self.current = torch.zeros((), dtype=torch.long, device=device)
        self.longest = self.current.clone()  # since the last check: a streak can end between

    def update(self, finite: torch.Tensor) -> None:
        self.current = torch.where(finite, 0, self.current + 1)
        self.longest = torch.maximum(self.longest, self.current)

    def check(self, limit: int, step: int, last_checkpoint: Path | None) -> None:
        """Raises TrainingError after `limit` non-finite steps in a row; else counts the
        longest streak afresh."""
        in_a_row = int(self.longest)
        if in_a_row >= limit:  # skipped updates left the model as it was: the checkpoint is good
            kept = (f"the newest checkpoint, {last_checkpoint}, is intact" if last_checkpoint
                    else "no checkpoint was written yet")
            raise TrainingError(f"{in_a_row} non-finite steps in a row at step {step}; {kept}")
        self.longest = self.current.clone()


def accumulate_gradients(run_pass, batches, passes: int, timer: StepTimer):
    """One step's gradients over `passes` batches from `batches`, for both trainers.

    run_pass(batch, last) runs a forward and adds the gradient of its loss / passes to the
    parameters' .grad (eagerly, or replayed: fastmavil.cuda_graph.GraphedPasses), so the
    gradient is the mean over the step's samples as in one pass of them all (every pass holds
    as many); `last` is the step's last pass, where DistributedDataParallel all-reduces. It
    returns the pass's (loss, terms), detached. Returns the step's (loss, terms);
    StopIteration when the data ends mid-step."""
    loss_sum, terms_sum = 0.0, {}
    for index in range(passes):
        if index:
            timer.fetch_start()
        batch = next(batches)
        timer.data_ready()
        # read before the next pass: a replay overwrites them
        loss, terms = run_pass(batch, index == passes - 1)
        loss_sum = loss_sum + loss / passes
        for k, v in terms.items():
            terms_sum[k] = terms_sum.get(k, 0.0) + v / passes
    return loss_sum, terms_sum


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The gradients' total L2 norm (a tensor: no sync), having scaled them to at most
    `max_norm` when it is above 0. Without clipping only the norm is taken: clip_grad_norm_ with
    an infinite max_norm still multiplies every gradient by 1, a read and a write of all of them
    each step (~2 GB at paper size)."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                          if p.grad is not None])


def check_even_passes(plans: list[EpochPlan], processes: int, fixed_passes: bool = True
                      ) -> None:
    """Each process runs 1 / `processes` of every step's passes: a ConfigError naming the first
    epoch whose passes they cannot share evenly."""
    uneven = [p for p in plans if p.passes % processes]
    if uneven:
        p = uneven[0]
        raise ConfigError(f"epoch {p.epoch}'s steps take {p.passes} passes of {p.micro_batch} "
                          f"samples, which {processes} processes cannot share evenly: set "
                          "train.micro_batch_size so that train.batch_size / micro_batch_size "
                          f"is a multiple of {processes}"
                          + (" (with train.passes_per_step = 'fixed')" if fixed_passes else ""))


def steps_passed_over(advanced: int, trained: int) -> str:
    """For a summary: how many of the steps a run advanced were not trained, where an epoch's
    data ended before its plan and the schedule moved on to the next epoch ('' if none)."""
    if advanced == trained:
        return ""
    return f"{trained} trained, {advanced - trained} passed over where an epoch's data ended early"


def epoch_ended_early(plan: EpochPlan, done: int, missing: int, source: Path,
                       workers: int, processes: int = 1) -> None:
    """An epoch's data ended `missing` steps before its plan, after `done` steps (this run's
    and, resumed mid-epoch, the earlier ones): normal for a step or two (each loader worker
    drops its last partial batch); beyond that a warning, and an error when the epoch gave no
    step at all (unreadable shards, or worker shares each smaller than a batch: nothing would
    train). With several processes an epoch also ends when the smallest of their shares of
    the shards does."""
    if done == 0:
        split = (f", or data.num_workers = {workers} split the epoch into shares smaller than "
                 f"a micro-batch of {plan.micro_batch} (each worker drops its partial batch)"
                 if workers else "")
        raise DataError(f"epoch {plan.epoch} gave not even one step's {plan.batch_size} "
                        f"clips from {source}: its shards are unreadable (see any warnings "
                        f"above){split}")
    if processes > 1 and missing > max(1, workers) + 1:
        log.warning("epoch %d ended %d of its %d steps early: the smallest of the %d processes' "
                    "shares of the shards ended (or clips were skipped: see any warnings "
                    "above); shards in a multiple of processes x data.num_workers share evenly",
                    plan.epoch, missing, plan.steps, processes, extra=SAME_ON_EVERY_RANK)
    elif missing > max(1, workers) + 1:
        log.warning("epoch %d ended %d of its %d steps early: clips were skipped (see the "
                    "warnings above)", plan.epoch, missing, plan.steps)
    else:
        log.debug("epoch %d ended %d steps early", plan.epoch, missing)


def loader_workers(cfg: Config) -> int:
    """The DataLoader workers that share an epoch's clips: the DALI loader reads them in one
    process (its threads decode), the reference loader in data.num_workers."""
    return 0 if cfg.data.loader == "dali" else cfg.data.num_workers


def open_dataset(source: Path, spec: LoaderSpec, key: str = "data.shards", keep=None,
                 rank: int = 0, world_size: int = 1) -> tuple[ShardDataset, int]:
    """The shards at `source` (config key `key`) and their clip count (of the clips `keep`
    selects, if given; of every rank's share); a bad dataset is a ConfigError naming it."""
    try:
        dataset = ShardDataset(source, spec, rank, world_size, keep=keep)
        clips = dataset.num_clips()
    except tarfile.TarError as err:
        raise ConfigError(f"{key} = '{source}': not a readable tar file ({err})") from None
    except (OSError, ValueError) as err:
        inside = [d.name for d in sorted(source.glob("*/")) if (d / "index.json").is_file()]
        hint = f"; datasets inside it: {', '.join(inside)}" if inside else ""
        raise ConfigError(f"{key} = '{source}': {err}{hint}") from None
    missing = [path.name for path in dataset.shards if not path.is_file()]
    if missing:
        raise ConfigError(f"{key} = '{source}': {len(missing)} of the "
                          f"{len(dataset.shards)} shards its index lists are missing: "
                          + ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""))
    return dataset, clips


@contextlib.contextmanager
def run_folder(run_dir: Path, world: World):
    """A run's folder while it trains: made by rank 0, its only writer (the others wait until
    it exists), and locked by it against a second trainer. A run that fails before writing
    anything (a bad device, missing data) leaves no folder; removed while locked, so no other
    trainer has started in it."""
    new_dir = not run_dir.exists()
    with contextlib.ExitStack() as lock:
        error = None
        if world.main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                lock.enter_context(run_lock(run_dir))
            except RunLocked as err:
                error = TrainingError(str(err))
            except OSError as err:
                error = TrainingError(f"cannot make the run folder {run_dir}: {err}")
        try:
            world.agree(error, f"taking the run folder {run_dir}")
            yield
        except BaseException:
            with contextlib.suppress(OSError):
                if world.main and new_dir and {p.name for p in run_dir.iterdir()} <= {".lock"}:
                    shutil.rmtree(run_dir)
            raise


def setup_runtime(t, device_name: str | None = None, rank: int = 0) -> tuple[torch.device, bool]:
    """(device, bf16) for train config `t` (on `device_name` in place of train.device, if
    given: a torchrun process's own GPU), with the process set up for them: the current CUDA
    device, the seed (torch's own stream, which stochastic depth draws from: rank `rank`'s)
    and deterministic algorithms."""
    device = resolve_device(device_name or t.device)
    if device.index is not None:  # Triton kernels and CUDA graphs use the current device
        torch.cuda.set_device(device)
    if t.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"train.cuda_graphs = true needs a CUDA device; this run is on {device}")
    torch.manual_seed(rank_seed(t.seed, rank))
    if t.deterministic:
        # cuBLAS is deterministic only with a fixed workspace, set before its first matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    return device, t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")


def run_precision(t, bf16: bool, device: torch.device) -> str:
    """What the checkpoints record of a run's precision ("bf16" or "fp32", with ", bf16
    residual" where train.residual_precision keeps the residual stream so); a bf16 residual
    stream needs bf16 autocast."""
    if t.residual_precision == "bf16" and not bf16:
        raise ConfigError("train.residual_precision = 'bf16' needs bf16 autocast; this run "
                          f"trains in fp32 (train.precision = {t.precision!r} on {device})")
    return ("bf16" if bf16 else "fp32") + (", bf16 residual" if t.residual_precision == "bf16"
                                           else "")


def progress_bar(disable: bool = False):
    """The run's progress display (on stderr): epoch, steps, loss, samples/s, time left."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)
    return Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(),
                    MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                    TextColumn("{task.fields[rate]} samples/s"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=disable)


def run_command(prog: str, config_path: str, load, run) -> int:
    """A training command's body, for each process torchrun started (or the one): logging (rank
    0's messages, the others' own warnings), the config from load() (None: nothing to train), the
    process group, then run(cfg, world). A config error exits 2, a training or checkpoint error
    1, each printed as one line."""
    rank = launched_rank()
    said_by = f"{prog} [rank {rank}]" if rank else prog  # how a process's one-line errors begin
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=("%(levelname)s %(name)s: %(message)s" if not launched()
                else f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
    if rank:
        leave_out_repeats()
    world = World()
    try:
        cfg = load()
        if cfg is None:
            return 0
        if not cfg.run.name:
            cfg.run.name = Path(config_path).stem
        world = init_world(cfg.train.device)
        run(cfg, world)
    except ConfigError as err:  # the same on every rank: said once
        if rank == 0:
            print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except (TrainingError, CheckpointError, OtherProcessFailed) as err:
        print(f"{said_by}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the training loop (which stops at a step's end), or a
        # second Ctrl-C: what was saved stays (a checkpoint, the demo data's finished shards)
        print(f"{said_by}: interrupted; the same command goes on from what was saved",
              file=sys.stderr)
        return 130
    finally:
        shutdown(world)
    return 0
