"""The pre-training loop: `fastmavil-train CONFIG [--section.key VALUE ...]`.

One epoch is one pass over the dataset at that epoch's (mask ratio, batch size) from the plan
(fastmavil.schedule); a step runs the epoch's passes (batch_size / micro_batch_size of them,
each a forward of the model, where masking, diffusion and losses live, and a backward adding
into the gradients), then takes an AdamW step with a per-step lr.
The run directory `<run.dir>/<run.name>/` holds the resolved config.toml, metrics.jsonl,
TensorBoard events (when installed) and checkpoints/; starting the same command again resumes
from the newest complete checkpoint. SIGINT/SIGTERM finish the current step, checkpoint, and
exit 0. Under torchrun several processes train one run, data-parallel (train/distributed.py).

No host sync per step (with optim.optimizer = 'adamw', the default): a non-finite step is
skipped on the device by the fused AdamW (found_inf, as under AMP's GradScaler); losses,
counters and timings are read at log intervals and checkpoints. apex's FusedAdam is told to
skip on the host, one sync per step.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import sys
import time
from pathlib import Path

import torch

from ..config import (OVERRIDE_SYNTAX, Config, ConfigError, load_config, split_overrides,
                      to_toml, unread_settings)
from ..cuda_graph import GraphedPasses
from ..data.dali_loader import DaliLoader, check_codec, dali_available, dali_device
from ..data.loader import ShardDataset, build_loader, loader_spec, to_device
from ..data.random_clips import RandomClips
from ..files import write_atomically
from ..flops import forward_flops_per_sample
from ..models import build_model, compile_blocks
from ..models.compile import MAX_AUTOTUNE_NEEDS_KERNELS
from ..schedule import EpochPlan, first_step, fits_passes, learning_rate, plan_epochs
from . import resume
from .checkpoint import (CheckpointClock, checkpoint_name, rng_state, save_run_checkpoint,
                         set_rng_state)
from .distributed import (SAME_ON_EVERY_RANK, World, agreed_batches, broadcast_parameters,
                          device_of, distributed_model, latest_checkpoint, launched_rank,
                          rank_seed, resume_command)
from .launches import record_launch
from .metrics import (GpuUtilization, MetricsWriter, NoMetrics, StepTimer, device_peak_flops,
                      device_sync, mfu, peak_memory_bytes, tflops)
from .plan_report import print_plan, work_per_step
from .runtime import (DataError, NonFiniteStreak, StopFlag, accumulate_gradients, clip_gradients,
                      check_even_passes, epoch_ended_early, fast_path, loader_workers,
                      open_dataset, prepared_data, progress_bar, run_command, run_folder,
                      run_precision, setup_runtime, steps_passed_over)

log = logging.getLogger("fastmavil.train")


def make_optimizer(cfg: Config, model: torch.nn.Module):
    o = cfg.optim
    # No weight decay on biases, norms, the mask token and the relative-position tables (MAE).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        decays = p.ndim >= 2 and "mask_token" not in name and "rel_pos" not in name
        (decay if decays else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if o.optimizer == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            raise ConfigError("optim.optimizer = 'apex' but apex is not importable; use 'adamw' "
                              "(PyTorch's fused AdamW)") from None
        return FusedAdam(groups, lr=o.lr, betas=o.betas, adam_w_mode=True)
    # fused on CUDA and CPU: one kernel per step, and it can skip a step on the device
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, fused=True)


def train(cfg: Config, argv: list[str], world: World | None = None) -> dict:
    """Runs (or resumes) the configured pre-training, as rank `world.rank` of `world.size`
    processes under torchrun; returns the final summary."""
    world = world or World()
    run_dir = Path(cfg.run.dir) / cfg.run.name
    with run_folder(run_dir, world):
        return _Run(cfg, run_dir, world).run(argv)


def _log_plan(plans: list[EpochPlan], steps: int, t) -> None:
    first, last = plans[0], plans[-1]
    fewest, most = min(p.passes for p in plans), max(p.passes for p in plans)
    passes = f"{fewest}" if fewest == most else f"{fewest} to {most}"
    log.info("plan: %d epochs, %d steps; mask ratio %.2f -> %.2f; batch %d -> %d (%s)%s",
             len(plans), steps, first.mask_ratio, last.mask_ratio,
             first.batch_size, last.batch_size,
             f"adaptive, {t.adaptive_batch_rule} rule" if t.adaptive_batch else "fixed",
             f" in {passes} passes of {first.micro_batch} -> {last.micro_batch}"
             if most > 1 else "")
    if t.passes_per_step == "fit" and not fits_passes(t):
        log.warning("train.passes_per_step = 'fit' changes nothing in this run: it fits the "
                    "passes of the adaptive batch's steps, and this run has %s",
                    "a fixed batch (train.adaptive_batch = false)" if not t.adaptive_batch
                    else "one pass per step (train.micro_batch_size)", extra=SAME_ON_EVERY_RANK)


def _warn_of_settings_without_effect(cfg: Config, plans: list[EpochPlan]) -> None:
    """Settings the model variant never reads, and passes of one clip, which give InfoNCE no
    negatives (a pass's clips are each other's): its terms are 0 there."""
    unread = unread_settings(cfg)
    if unread:
        log.warning("model.variant = %r never reads %s: they change nothing in this run",
                    cfg.model.variant, ", ".join(unread), extra=SAME_ON_EVERY_RANK)
    # passes follow the ratio's linear schedule: the epochs of one-clip passes are a run
    lone = [p.epoch for p in plans if p.micro_batch < 2]
    if lone and cfg.model.has_video and (cfg.loss.inter_weight or cfg.loss.intra_weight):
        epochs = f"epoch {lone[0]} passes" if len(lone) == 1 else \
            f"epochs {lone[0]}-{lone[-1]} pass"
        log.warning("%s one clip at a time: InfoNCE has no negatives there and its terms are "
                    "0", epochs, extra=SAME_ON_EVERY_RANK)


def _settings(cfg: Config, world: World) -> tuple[torch.device, bool, bool, str]:
    """(device, bf16, kernels_on, precision) of the run, its settings checked against each other and
    the machine before any data or model work (the process is set up for them: setup_runtime);
    precision is what the checkpoints record."""
    t = cfg.train
    if t.cuda_graphs and cfg.optim.optimizer != "adamw":
        raise ConfigError("train.cuda_graphs = true needs optim.optimizer = 'adamw': the fused "
                          "AdamW skips a non-finite step on the device, without clearing the "
                          "gradients the graphs add into")
    device, bf16 = setup_runtime(t, device_of(world, t.device), world.rank)
    kernels_on = fast_path(cfg, device)
    if t.compile and t.compile_mode == "max-autotune" and not kernels_on:
        raise ConfigError(MAX_AUTOTUNE_NEEDS_KERNELS)
    return device, bf16, kernels_on, run_precision(t, bf16, device)


def _training_data(cfg: Config, world: World) -> tuple[Path | None, ShardDataset | RandomClips,
                                                      int, list[EpochPlan]]:
    """(shards folder or None, dataset, clips per epoch, epoch plans)."""
    if cfg.data.random_clips:
        source, clips = None, cfg.data.random_clips
    else:
        source = prepared_data(cfg, world)
        dataset, clips = open_dataset(source, loader_spec(cfg, train=True), rank=world.rank,
                                      world_size=world.size)
        if cfg.data.loader == "dali":
            if not dali_available():
                raise ConfigError("data.loader = 'dali' needs NVIDIA DALI (Linux x86_64: pip "
                                  "install nvidia-dali-cuda120); or use data.loader = "
                                  "'reference'")
            try:
                device = dali_device(cfg.data.dali_device)
                check_codec(dataset, device)
            except ValueError as err:  # a device this machine lacks, a codec it cannot decode
                raise ConfigError(str(err)) from None
            log.info("data: DALI decodes on the %s", device)
    plans = plan_epochs(cfg, clips)
    check_even_passes(plans, world.size)
    if cfg.data.random_clips:  # drawn once, sized for the largest pass of the plan
        dataset = RandomClips(clips, loader_spec(cfg, train=True),
                              max(p.micro_batch for p in plans),
                              rank_seed(cfg.data.seed, world.rank))
        log.info("data: %d random clips per epoch held in memory (data.random_clips; "
                 "data.shards unused): the losses measure nothing", clips)
    return source, dataset, clips, plans


class _Run:
    """One run of the trainer: what it trains (data, plan, model, optimiser; a checkpoint's
    state when it resumes) and what it carries from step to step (the step count, the newest
    checkpoint, the steps since the last log line). run() adds the stop flag, metrics writer,
    utilisation sampler, progress display and step timer for the loop's duration."""

    def __init__(self, cfg: Config, run_dir: Path, world: World | None = None):
        self.cfg, self.run_dir, self.world = cfg, run_dir, world or World()
        t = cfg.train
        self.device, bf16, kernels_on, self.precision = _settings(cfg, self.world)
        resumed = latest_checkpoint(run_dir, self.world)
        if resumed:
            resume.check_format(*resumed)
            resume.check_config(resumed[0], resumed[1].get("config"), cfg)
        self.source, self.dataset, self.clips, self.plans = _training_data(cfg, self.world)
        if resumed:
            resume.check_run(resumed[0], resumed[1], self.clips, self.precision, self.plans)
        self.planned_steps = sum(p.steps for p in self.plans)
        _log_plan(self.plans, self.planned_steps, t)
        _warn_of_settings_without_effect(cfg, self.plans)
        self.total_steps = t.steps_to_run(self.planned_steps)
        if self.world.main:
            write_atomically(run_dir / "config.toml", to_toml(cfg))

        self.model = build_model(cfg).to(self.device)
        self.model.use_kernels(kernels_on)
        if cfg.model.attention == "triton" and not kernels_on:
            log.info("model.attention = 'triton' runs the Triton kernels, which are off here: "
                     "attention runs as under 'auto'")
        self.model.set_residual_dtype(torch.bfloat16 if t.residual_precision == "bf16" else None)
        self.optimizer = make_optimizer(cfg, self.model)
        # each rank masks and noises its own samples: its own stream (rank 0's is train.seed's)
        self.generator = torch.Generator(device=self.device).manual_seed(
            rank_seed(t.seed, self.world.rank))
        self.step, self.last_ckpt = 0, None
        if resumed:
            self.last_ckpt, state = resumed
            self.step = _restore(state, self.last_ckpt, self.model, self.optimizer,
                                 self.generator, t.seed, self.world)
            if self.step >= self.total_steps:
                more = (f"raise train.max_steps, up to the plan's {self.planned_steps}, to go "
                        "on; " if self.step < self.planned_steps else "")
                log.info("%s has trained %d steps, of %d to train: nothing to do (%sstart a "
                         "new run with --run.name to train another schedule: train.epochs "
                         "cannot change on a resume)", run_dir, self.step, self.total_steps,
                         more)
        if t.compile:
            log.info("compiled %d transformer blocks (mode %s)",
                     compile_blocks(self.model, t.compile_mode), t.compile_mode)
        # what runs each pass: the model, or under torchrun its DistributedDataParallel, which
        # averages the gradients over the ranks at each step's last pass; graphed passes run the
        # model itself, their gradients averaged after them (finish_step)
        self.forward_model = self.model
        if self.world.parallel and not t.cuda_graphs:
            self.forward_model = distributed_model(self.model, self.device)
        elif self.world.parallel:
            broadcast_parameters(self.model, self.world)
        # the batches' copies to the GPU overlap the previous pass (data.loader.to_device)
        self.copy_stream = (torch.cuda.Stream(self.device) if self.device.type == "cuda"
                            else None)
        self.graphed = None
        if t.cuda_graphs:
            self.graphed = GraphedPasses(self.model, self.generator,
                                         torch.bfloat16 if bf16 else None)
            log.info("forward + backward passes replayed as CUDA graphs, one per shape")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16
                         else contextlib.nullcontext())
        self.flops = forward_flops_per_sample(cfg, {p.mask_ratio for p in self.plans})
        self.peak, self.peak_source = device_peak_flops(
            self.device, torch.bfloat16 if bf16 else torch.float32)
        if self.world.parallel and self.peak:  # the work logged is every rank's
            self.peak *= self.world.size
            self.peak_source += f", x {self.world.size} processes"
        # torch's fused AdamW skips a non-finite step on the device; apex's is told on the host
        self.device_skip = cfg.optim.optimizer == "adamw"
        self.streak = NonFiniteStreak(self.device)  # read at log intervals and checkpoints
        self.interval = _Interval(self.step, self.device)  # the steps since the last log line
        self.summary = {"start_step": self.step, "samples": 0, "trained_steps": 0}
        self.lr, self.last_plan = None, None  # the latest finished step's

    def clear_grads(self) -> None:
        if self.graphed:  # the graphed passes add into fixed buffers: zeroed, never dropped
            self.graphed.zero_grads()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def checkpoint(self, at: int) -> Path:
        """Writes step `at`'s checkpoint (rank 0, with every rank's random streams; the others
        wait for it)."""
        self.last_ckpt = save_run_checkpoint(
            self.world, self.run_dir, at,
            {"generator": self.generator.get_state(), "rng": rng_state(self.device)},
            lambda: {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "step": at, "config": to_toml(self.cfg), "clips": self.clips,
                     "plan": resume.plan_record(self.plans), "precision": self.precision,
                     "format": resume.FORMAT},
            self.cfg.train.keep_checkpoints)
        self.checkpoint_clock.reset()
        return self.last_ckpt

    def saved(self, at: int) -> bool:
        """Whether the newest checkpoint is step `at`'s."""
        return self.last_ckpt is not None and self.last_ckpt.name == checkpoint_name(at)

    def keep_trained(self, cause: str, agreed: bool = False) -> None:
        """Before an error mid-step ends the run: logs and checkpoints the steps trained since
        the last checkpoint. Parameters and optimizer state are still the last finished step's (the
        error came before its update). Resumed, the failed step runs again on the same data with
        its masks (and dropout) drawn anew: from there the run differs from one that never
        failed. With several processes only an error every rank `agreed` on (the data's end)
        checkpoints: the others may be waiting in a collective."""
        if self.world.parallel and not agreed:
            log.warning("%s stopped step %d on rank %d; the newest checkpoint is %s", cause,
                        self.step + 1, self.world.rank, self.last_ckpt)
            return
        # at the step count, past the last step trained where an epoch's data ended early
        # since: the resumed run then goes on from there, as this one would have
        at = self.step
        if self.summary["trained_steps"] and not self.saved(at):
            try:  # the checkpoint closes the log interval, as a due one does
                if self.interval.ran:
                    self.log_interval()
            except Exception as err:
                log.error("could not log steps %d-%d (%s: %s)", self.interval.start + 1, at,
                          type(err).__name__, err)
            try:
                log.warning("%s stopped step %d: checkpointing step %d before stopping: %s",
                            cause, at + 1, at, self.checkpoint(at))
            except Exception as err:  # e.g. a broken CUDA context: the error that came first
                log.error("could not checkpoint step %d (%s: %s)", at, type(err).__name__, err)

    def run(self, argv: list[str]) -> dict:
        """Trains the plan's remaining steps (or until a signal); returns the run's summary,
        printed with `argv`, the command's arguments, to resume with."""
        main = self.world.main  # the other ranks train, and log only their warnings
        # no bar for a resume with nothing left to train (its log line says why)
        self.progress = progress_bar(disable=not main or self.step >= self.total_steps)
        self.timer, started = StepTimer(), time.perf_counter()
        t = self.cfg.train
        self.checkpoint_clock = CheckpointClock(t.ckpt_every, t.ckpt_minutes, self.world)
        if main:
            record_launch(self.run_dir, self.device, self.world.size, self.step)
        tensorboard = None if self.cfg.run.tensorboard else False  # None: when installed
        with (StopFlag() as self.stop,
              MetricsWriter(self.run_dir, tensorboard, self.step) if main else NoMetrics()
              as self.writer,
              GpuUtilization(self.device if main else torch.device("cpu")) as self.gpu_util,
              self.progress):
            self.task = self.progress.add_task("train", total=self.total_steps,
                                               completed=self.step, epoch="-", loss="-",
                                               rate="-")
            for plan in self.plans:
                self.run_epoch(plan)
                if self.stop.agreed(self.world) or self.step >= self.total_steps:
                    break
            if self.interval.ran:  # steps since the last log line: an epoch whose data ran
                # short jumped to the end, or a signal stopped the run between log lines
                self.check_bad_steps()
                self.log_interval()
            if not self.saved(self.step):
                self.checkpoint(self.step)
        self.summary.update(step=self.step, total_steps=self.total_steps,
                            planned_steps=self.planned_steps, checkpoint=str(self.last_ckpt),
                            seconds=time.perf_counter() - started, run_dir=str(self.run_dir),
                            interrupted=self.stop.signal, peak_source=self.peak_source,
                            processes=self.world.size)
        if main:
            _print_summary(self.progress.console, self.summary, argv)
        return self.summary

    def run_epoch(self, plan: EpochPlan) -> None:
        """The steps of `plan`'s epoch this run has left, up to a signal."""
        cfg = self.cfg
        start = first_step(plan.epoch, self.plans)
        end = min(start + plan.steps, self.total_steps)
        if self.step >= end:
            return
        # Resumed mid-epoch: the loader passes over this epoch's steps already done without
        # decoding them (an AudioSet-size epoch would take hours to decode), but for fewer
        # batches than it has workers, fetched and dropped here, and goes on with the data of
        # an uninterrupted run.
        workers = loader_workers(cfg)
        passes = plan.passes // self.world.size  # this rank's share of each step's passes
        drop = self.dataset.set_epoch(plan.epoch, (self.step - start) * passes,
                                      plan.micro_batch, workers)
        work = work_per_step(cfg, self.flops, plan.mask_ratio, plan.batch_size)
        run_pass = functools.partial(self.run_pass, plan)
        if isinstance(self.dataset, RandomClips):
            batches = self.dataset.batches(plan.micro_batch)
        elif cfg.data.loader == "dali":
            batches = iter(DaliLoader(self.dataset, plan.micro_batch, cfg.data.dali_device,
                                      threads=max(1, cfg.data.num_workers)))
        else:
            batches = iter(build_loader(self.dataset, plan.micro_batch, workers))
        for _ in range(drop):  # if the data ends here, the step loop finds it has
            next(batches, None)
        if self.world.parallel:  # an epoch ends on every rank when one has no batch left
            batches = agreed_batches(batches, self.world)
        self.progress.update(self.task, epoch=plan.epoch)
        while self.step < end and not self.stop.agreed(self.world):
            lr = learning_rate(cfg, self.step, self.plans)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            try:
                loss, terms = accumulate_gradients(run_pass, batches, passes, self.timer)
            except StopIteration:
                # Each DataLoader worker drops its own last partial batch, so an epoch can hold
                # a step or two fewer than the plan: move on to the next epoch. More missing
                # means clips were skipped (unreadable shards or clips, warned of).
                self.clear_grads()
                try:
                    epoch_ended_early(plan, self.step - start, end - self.step, self.source,
                                      workers, self.world.size)
                except DataError:
                    self.keep_trained("the data", agreed=True)
                    raise
                self.step = end
                self.progress.update(self.task, completed=self.step)
                return
            except Exception as err:  # a loader worker killed, out of memory, ...
                self.keep_trained(type(err).__name__)
                raise
            self.finish_step(plan, loss, terms, work, lr)

    def run_pass(self, plan: EpochPlan, batch, last: bool) -> tuple[torch.Tensor, dict]:
        """One forward + backward of `batch` at the epoch's shape, adding the gradient of
        loss / passes into .grad; returns (loss, terms), detached. `last`: the step's last pass."""
        audio, video = to_device(batch, self.device, self.dataset.spec, self.copy_stream)
        passes = plan.passes // self.world.size
        if self.graphed:
            return self.graphed(audio, video, plan.mask_ratio, passes)
        # under torchrun the gradients are averaged over the ranks once, at the step's last pass
        sync = last or not self.world.parallel
        with contextlib.nullcontext() if sync else self.forward_model.no_sync():
            with self.autocast:
                out = self.forward_model(audio, video, plan.mask_ratio, self.generator)
            (out.loss / passes).backward()
        return out.loss.detach(), {k: v.detach() for k, v in out.terms.items()}

    def finish_step(self, plan: EpochPlan, loss: torch.Tensor, terms: dict, work: dict,
                    lr: float) -> None:
        """After the step's passes: clips the gradients and updates the parameters, counts the
        step, then writes its log line and checkpoint when due. A non-finite loss or gradient
        skips the update; the step and its data still count, so the schedule and a resume stay
        aligned."""
        t = self.cfg.train
        if self.graphed and self.world.parallel:
            self.graphed.average_over(self.world)
        grad_norm = clip_gradients(self.model, t.grad_clip)
        self.step += 1
        self.summary["trained_steps"] += 1
        self.last_plan, self.lr = plan, lr
        self.progress.advance(self.task)
        # every rank's loss: the ranks must skip or apply a step together
        finite = torch.isfinite(self.world.mean(loss)) & torch.isfinite(grad_norm)
        if self.device_skip:
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
        elif bool(finite):  # not stepped at all: apex counts a step without gradients
            self.optimizer.step()
        self.clear_grads()
        self.streak.update(finite)
        self.interval.add(finite, work, {"loss": loss, **terms, "grad_norm": grad_norm})
        self.timer.step_done()  # the optimizer step's time is compute, not data wait
        due_checkpoint = self.checkpoint_clock.due(self.step)
        # a checkpoint closes the log interval: a resume from it loses no step's record
        if self.step % t.log_every == 0 or self.step == self.total_steps or due_checkpoint:
            self.check_bad_steps()
            self.log_interval()
        if due_checkpoint:
            with self.timer.left_out(device_sync(self.device)):
                self.checkpoint(self.step)

    def check_bad_steps(self) -> None:
        """Stops the run after train.max_bad_steps non-finite steps in a row (a sync)."""
        self.streak.check(self.cfg.train.max_bad_steps, self.step, self.last_ckpt)

    def log_interval(self) -> None:
        """The log line and metrics record of the interval's steps (their applied updates), a
        warning for any update skipped for a non-finite loss or gradient; starts the next
        interval."""
        interval, plan = self.interval, self.last_plan
        applied = int(interval.updates)  # a sync, once per interval
        main = self.world.main
        if applied < interval.ran and main:
            log.warning("steps %d-%d: %d non-finite loss or gradient, update skipped",
                        interval.start + 1, self.step, interval.ran - applied)
        if applied:
            keys = sorted(interval.sums)  # every rank's, in one all-reduce
            sums = dict(zip(keys, self.world.mean(torch.stack(
                [interval.sums[k].float() for k in keys])).unbind()))
            means = {k: float(v) / applied for k, v in sums.items()}  # over the applied updates
        # the interval's meters, read and started afresh for the next one
        timing = self.timer.summary(device_sync(self.device) if applied else None)
        gpu_util = self.gpu_util.mean()
        self.gpu_util.reset()
        if applied:
            record = {"step": self.step, "epoch": plan.epoch, "mask_ratio": plan.mask_ratio,
                      "batch_size": plan.batch_size, "lr": self.lr, **means,
                      **_speed(self.cfg, plan, timing, interval.work, self.peak),
                      "peak_memory_gb": _memory_held(self.device, self.graphed) / 2 ** 30,
                      "gpu_util": gpu_util}
            self.writer.write(record)
            self.summary["last"] = record
            if main:
                self.progress.update(self.task, loss=f"{record['loss']:.4f}",
                                     rate=f"{record['samples_per_s']:.1f}")
                self.progress.console.print(_line(record, self.total_steps), soft_wrap=True)
        self.summary["samples"] += interval.work["samples"]
        self.interval = _Interval(self.step, self.device)


@dataclasses.dataclass
class _Interval:
    """What the steps since the last log line did. The metric sums and the count of applied
    updates stay on the device (read once per interval); `work` (samples, training FLOPs,
    visible tokens) is summed per step, as an interval can span epochs of different shapes;
    `ran` counts the steps run, not those an epoch's data ran short of."""
    start: int  # the step the interval follows
    device: torch.device
    ran: int = 0
    sums: dict = dataclasses.field(default_factory=dict)
    work: dict = dataclasses.field(
        default_factory=lambda: dict.fromkeys(("samples", "flops", "tokens"), 0))
    updates: torch.Tensor = dataclasses.field(init=False)

    def __post_init__(self):
        self.updates = torch.zeros((), device=self.device)

    def add(self, finite: torch.Tensor, work: dict, metrics: dict) -> None:
        """One step run: its work, and its metrics where its update was applied (finite)."""
        self.ran += 1
        self.updates = self.updates + finite
        self.work = {k: v + work[k] for k, v in self.work.items()}
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + torch.where(finite, v.float(), 0.0)


def _restore(state: dict, path: Path, model, optimizer, generator: torch.Generator,
             seed: int, world: World) -> int:
    """Loads checkpoint `state` (read from `path`) into the run; returns its step."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    step = state["step"]
    ranks = state.get("ranks") or [state]  # every rank's streams (one, before 2026-11-28)
    streams = ranks[world.rank] if len(ranks) == world.size else None
    if streams is None:
        generator.manual_seed(rank_seed(seed + step, world.rank))
        torch.manual_seed(rank_seed(seed + step, world.rank))
        log.warning("%s was written by %d process(es), this run has %d: the random streams "
                    "are reseeded from train.seed and the step (the masks and the samples "
                    "from here on differ from an uninterrupted run's)", path, len(ranks),
                    world.size, extra=SAME_ON_EVERY_RANK)
        return step
    try:
        generator.set_state(streams["generator"])
    except RuntimeError:  # saved on another device type: CPU and CUDA states differ
        generator.manual_seed(rank_seed(seed + step, world.rank))
        log.warning("%s was written on another device type: its masking RNG state does not "
                    "load here, so it is reseeded from train.seed and the step (the masks "
                    "from here on differ from an uninterrupted run's)", path,
                    extra=SAME_ON_EVERY_RANK)
    set_rng_state(streams["rng"], generator.device)  # the training device
    log.info("resumed from %s (step %d)", path, step)
    return step


def _memory_held(device: torch.device, graphed: GraphedPasses | None) -> int:
    """Peak bytes on the device: the allocator's peak, and with CUDA graphs at least what is
    held now, the activations in the graphs' pool included (a replay allocates nothing, and
    each capture's peak counted its own shape's activations alone). With graphs it is an upper
    bound: the pool's free bytes include its fragmentation."""
    peak = peak_memory_bytes(device)
    idle = graphed.pool_idle_bytes() if graphed is not None else None
    return peak if idle is None else max(peak, torch.cuda.memory_allocated(device) + idle)


def _speed(cfg, plan: EpochPlan, timing: dict, work: dict, peak: float | None) -> dict:
    """A record's speed figures from StepTimer's `timing` of its steps and their `work`
    (samples, training FLOPs and visible tokens, summed per step); the visible tokens per step
    are the latest step's."""
    seconds = timing["step_ms"] * timing["steps"] / 1000.0
    visible = sum(cfg.model.visible_tokens(plan.mask_ratio))
    return {"visible_tokens": visible * plan.batch_size, "step_ms": timing["step_ms"],
            "samples_per_s": work["samples"] / seconds, "tokens_per_s": work["tokens"] / seconds,
            "tflops": tflops(work["flops"], seconds), "mfu": mfu(work["flops"], seconds, peak),
            "data_wait": timing["data_wait_share"]}


def _line(r: dict, total: int) -> str:
    terms = " ".join(f"{k} {r[k]:.4f}" for k in ("mse_audio", "mse_video", "inter", "intra")
                     if k in r)
    mfu_text = f" mfu {r['mfu'] * 100:.1f}%" if r["mfu"] is not None else ""
    return (f"step {r['step']}/{total} ep {r['epoch']} rho {r['mask_ratio']:.3f} "
            f"B {r['batch_size']} loss {r['loss']:.4f} ({terms}) gnorm {r['grad_norm']:.3f} "
            f"lr {r['lr']:.2e} {r['step_ms']:.0f} ms {r['samples_per_s']:.1f} samples/s "
            f"{r['tflops']:.3f} TFLOP/s{mfu_text} data {r['data_wait'] * 100:.0f}%")


def _print_summary(console, s: dict, argv: list[str]) -> None:
    from rich.table import Table
    table = Table(title="fastmavil-train summary", show_header=False)
    passed_over = steps_passed_over(s["step"] - s["start_step"], s["trained_steps"])
    table.add_row("steps", f"{s['step']} / {s['total_steps']} (this run from {s['start_step']}"
                  + (f"; {passed_over})" if passed_over else ")"))
    if s["planned_steps"] != s["total_steps"]:
        table.add_row("planned steps",
                      f"{s['planned_steps']} (train.max_steps ends the run at {s['total_steps']})")
    table.add_row("samples this run", str(s["samples"]))
    table.add_row("time", f"{s['seconds']:.1f} s")
    last = s.get("last")
    if last:
        table.add_row("final loss", f"{last['loss']:.4f}")
        for k in ("mse_audio", "mse_video", "inter", "intra"):
            if k in last:
                table.add_row(f"  {k}", f"{last[k]:.4f}")
    table.add_row("run directory", s["run_dir"])
    table.add_row("checkpoint", s["checkpoint"])
    table.add_row("MFU peak", s["peak_source"])
    console.print(table)
    if s["interrupted"]:
        # unwrapped and shell-quoted, so that it pastes as one command
        console.print(f"stopped by {s['interrupted']} at step {s['step']}; resume with: "
                      + resume_command("fastmavil-train", "fastmavil.train.pretrain", argv),
                      soft_wrap=True, markup=False, emoji=False, highlight=False)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    """(config and --plan, overrides): CONFIG and `--section.key VALUE` or `--section.key=VALUE`
    overrides, in any order."""
    sections = ", ".join(f.name for f in dataclasses.fields(Config))
    parser = argparse.ArgumentParser(
        prog="fastmavil-train", description="Pre-train MAViL / DiffMAViL / AudioMAE.",
        epilog=f"Override any config key: --train.max_steps 100 (default 0: every epoch) "
               f"--data.shards DIR (sections: {sections}; keys and defaults: "
               f"fastmavil/config.py). {OVERRIDE_SYNTAX} A run lives in <run.dir>/<run.name>/ "
               "(default runs/<config name>/); the same command resumes it from its newest "
               "checkpoint.")
    parser.add_argument("config", help="TOML config, e.g. configs/r4.toml")
    parser.add_argument("--plan", action="store_true",
                        help="print the run's schedule (per epoch: mask ratio, batch, passes, "
                             "steps, visible tokens and FLOPs per step) and exit; plans for "
                             "data.shards' clips or --data.random_clips N")
    try:
        rest, overrides = split_overrides(argv)
    except ConfigError as err:
        parser.error(str(err))
    return parser.parse_args(rest), overrides


def _planned_clips(cfg: Config) -> int:
    """--plan's clip count: data.random_clips, else the shards' (never generating the demo's:
    before its first run, the count it will generate)."""
    shards = cfg.data.shards
    if cfg.data.random_clips:
        return cfg.data.random_clips
    if shards and not Path(shards).exists() and cfg.data.synth_clips and \
            Path(shards).name == "train":
        from ..data.synth import split_items
        return len(split_items(cfg.data.synth_clips)["train"])
    if not shards or not Path(shards).exists():
        where = ("is empty" if not shards else
                 "does not exist (a demo config generates it on its first run)")
        raise ConfigError(f"data.shards = {shards!r} {where}: --plan counts its clips, or plans "
                          "for --data.random_clips N (AudioSet-2M: 1900000)")
    return open_dataset(Path(shards), loader_spec(cfg, train=True))[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)

    def load():
        cfg = load_config(args.config, overrides)
        if not args.plan:
            return cfg
        clips = _planned_clips(cfg)
        if launched_rank() == 0:
            print_plan(cfg, plan_epochs(cfg, clips), clips)
        return None
    return run_command("fastmavil-train", args.config, load,
                       lambda cfg, world: train(cfg, argv, world))


if __name__ == "__main__":
    sys.exit(main())
