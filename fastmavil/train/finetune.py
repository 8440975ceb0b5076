"""The fine-tuning loop: `fastmavil-finetune CONFIG [--section.key VALUE ...]`.

The audio encoder of a fastmavil-train checkpoint (`finetune.checkpoint`) becomes a classifier
(models/classifier.py) trained on labelled clips with paper Table 4's fine-tuning recipe:
AdamW with layer-wise lr decay, warm-up then cosine, stochastic depth, SpecAugment, the noise
option, mixup and cutmix (fastmavil/augment.py), BCE or CE. After every `finetune.eval_every`
epochs and the last, the evaluation clips are scored: mAP or top-1 (fastmavil/evaluation.py).
`finetune.folds` runs a cross-validation, one run per fold (ESC-50: 5), and reports the mean.

A run lives in `<run.dir>/<run.name>/` as a pre-training run does (config.toml, metrics.jsonl
with the evaluations as records too, checkpoints/, and results.json with every evaluation);
the same command resumes it, mid-epoch included, and SIGINT/SIGTERM checkpoint and stop.
Under torchrun several processes share the clips and each step's passes, as in pre-training
(train/distributed.py), and the evaluation's scores are gathered from all of them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from ..augment import mix_batch, smooth_labels, spec_augment, spec_noise
from ..config import (OVERRIDE_SYNTAX, ConfigError, FinetuneConfig, load_config,
                      split_overrides, to_toml)
from ..data.loader import build_loader, loader_spec
from ..data.shards import shard_metas
from ..evaluation import mean_average_precision, top1_accuracy
from ..files import write_atomically
from ..models import compile_blocks
from ..models.classifier import AudioClassifier, load_pretrained_encoder, param_groups
from ..schedule import EpochPlan, first_step, learning_rate
from . import resume
from .checkpoint import (CheckpointClock, checkpoint_name, rng_state, save_run_checkpoint,
                         set_rng_state)
from .distributed import (SAME_ON_EVERY_RANK, World, agreed_batches, device_of,
                          distributed_model, latest_checkpoint, rank_seed, resume_command)
from .launches import record_launch
from .metrics import MetricsWriter, NoMetrics, StepTimer, device_sync
from .runtime import (NonFiniteStreak, StopFlag, accumulate_gradients, check_even_passes,
                      clip_gradients, epoch_ended_early, fast_path, open_dataset, prepared_data,
                      progress_bar, run_command, run_folder, run_precision, setup_runtime,
                      steps_passed_over)

log = logging.getLogger("fastmavil.finetune")


@dataclasses.dataclass(frozen=True)
class ClipFilter:
    """The clips a run reads, by their json: those of `split` (if not ""), not of `not_split`
    (if not ""), and with a fold, those in it (`in_fold`) or those not. A class, not a closure:
    loader workers started by spawn or forkserver receive it pickled."""
    split: str = ""
    not_split: str = ""
    fold: int | None = None
    in_fold: bool = True

    def __call__(self, meta: dict) -> bool:
        split = str(meta.get("split", ""))
        if (self.split and split != self.split) or (self.not_split and split == self.not_split):
            return False
        return self.fold is None or (str(meta.get("fold", "")) == str(self.fold)) == self.in_fold


def clip_filters(f, fold: int | None) -> tuple[ClipFilter | None, ClipFilter | None]:
    """(training, evaluation) filters of fine-tuning section `f` for `fold`. Evaluation clips
    drawn from the training folder by their split are kept out of training."""
    same_folder = not f.eval_shards
    train = ClipFilter(f.train_split, f.eval_split if same_folder and not f.train_split else "",
                       fold, in_fold=False)
    evaluate = ClipFilter(f.eval_split, "", fold, in_fold=True)
    return (train if train != ClipFilter(in_fold=False) else None,
            evaluate if evaluate != ClipFilter() else None)


def check_task(cfg: FinetuneConfig) -> None:
    """What a fine-tuning config must also hold; checked before any work."""
    f, d, t = cfg.finetune, cfg.data, cfg.train
    if not (f.eval_shards or f.eval_split or f.folds):
        raise ConfigError("finetune.eval_shards is empty: name the evaluation clips, a dataset "
                          "folder, or select them from data.shards with finetune.eval_split or "
                          "finetune.folds")
    if f.eval_shards and Path(f.eval_shards).resolve() == Path(d.shards).resolve() and not (
            f.folds or (f.eval_split and f.eval_split != f.train_split)):
        raise ConfigError(f"finetune.eval_shards = data.shards = '{d.shards}' with nothing to "
                          "tell the evaluation clips from the training clips: set "
                          "finetune.train_split and finetune.eval_split, or finetune.folds")
    if f.train_split and f.train_split == f.eval_split and not f.eval_shards:
        raise ConfigError(f"finetune.train_split = finetune.eval_split = {f.train_split!r}: the "
                          "evaluation clips would be trained on")
    micro = t.pass_size
    if (f.mixup or f.cutmix) and micro % 2:
        raise ConfigError(f"mixup and cutmix pair each clip with the pass's reverse: a pass of "
                          f"{micro} clips (train.micro_batch_size, or train.batch_size) must be "
                          "even, or the middle clip mixes with itself")
    if t.max_batch_size and micro > t.max_batch_size:
        raise ConfigError(f"a pass of {micro} clips exceeds train.max_batch_size = "
                          f"{t.max_batch_size}: set train.micro_batch_size")
    for key, default in (("passes_per_step", "fixed"), ("adaptive_batch_rule", "tokens")):
        if getattr(t, key) != default:
            raise ConfigError(f"train.{key} = {getattr(t, key)!r} is for pre-training's adaptive "
                              "batch; fine-tuning has a fixed batch")
    if d.loader != "reference":
        raise ConfigError(f"data.loader = {d.loader!r}: fine-tuning reads audio only, with the "
                          "reference loader (DALI's share, the video, is not read)")
    if cfg.optim.optimizer != "adamw":
        raise ConfigError(f"optim.optimizer = {cfg.optim.optimizer!r}: fine-tuning uses "
                          "PyTorch's fused AdamW ('adamw')")


def check_folds(dataset, folds: int) -> None:
    """Cross-validation needs every clip in one of the folds 1..folds (ESC-50's numbering)."""
    found = Counter("unreadable" if meta is None else str(meta.get("fold", "none"))
                    for shard in dataset.shards for meta in shard_metas(shard))
    expected = {str(k) for k in range(1, folds + 1)}
    if set(found) != expected:
        listed = ", ".join(f"{k}: {n} clips" for k, n in sorted(found.items()))
        raise ConfigError(f"finetune.folds = {folds} needs each clip's json \"fold\" to be one "
                          f"of 1..{folds}, each fold holding clips; {dataset.source} has {listed}")


class _Run:
    """One fine-tuning run (one fold of a cross-validation)."""

    def __init__(self, cfg: FinetuneConfig, run_dir: Path, fold: int | None, world: World):
        self.cfg, self.run_dir, self.fold, self.world = cfg, run_dir, fold, world
        f, t = cfg.finetune, cfg.train
        self.device, bf16 = setup_runtime(t, device_of(world, t.device), world.rank)
        self.precision = run_precision(t, bf16, self.device)
        kernels_on = fast_path(cfg, self.device)
        resumed = latest_checkpoint(run_dir, world)
        if resumed:
            resume.check_format(*resumed)
            resume.check_config(resumed[0], resumed[1].get("config"), cfg)

        source = prepared_data(cfg, world)
        spec = dataclasses.replace(loader_spec(cfg, train=True), audio_only=True)
        train_keep, eval_keep = clip_filters(f, fold)
        # each process trains on its share of the clips and scores its share of the evaluation
        ranks = dict(rank=world.rank, world_size=world.size)
        self.train_data, clips = open_dataset(source, spec, keep=train_keep, **ranks)
        eval_source = Path(f.eval_shards) if f.eval_shards else source
        eval_key = "finetune.eval_shards" if f.eval_shards else "data.shards"
        if not eval_source.exists():
            raise ConfigError(f"{eval_key} = '{eval_source}' does not exist")
        self.eval_data, eval_clips = open_dataset(
            eval_source, dataclasses.replace(spec, train=False), eval_key, keep=eval_keep,
            **ranks)
        if fold == 1:  # once per cross-validation
            check_folds(self.train_data, f.folds)
        self.labels = self.train_data.labels
        if self.eval_data.labels != self.labels:
            raise ConfigError(f"{eval_key} = '{eval_source}' names other labels than data.shards "
                              f"= '{source}' (their index.json files): both must list the same "
                              "classes in the same order")
        selected = "" if fold is None and not f.train_split else " selected"
        micro = t.pass_size
        steps = clips // t.batch_size
        if not steps or not eval_clips:
            raise ConfigError(f"{source}: {clips}{selected} training clips and {eval_clips} "
                              f"evaluation clips: fine-tuning needs at least train.batch_size = "
                              f"{t.batch_size} of the first and one of the second")
        self.plans = [EpochPlan(e, 0.0, t.batch_size, micro, steps) for e in range(t.epochs)]
        check_even_passes(self.plans[:1], world.size, fixed_passes=False)  # every epoch's
        self.passes = self.plans[0].passes // world.size  # this process's share of a step's
        planned = steps * t.epochs
        self.total_steps = t.steps_to_run(planned)
        log.info("%s: %d classes, %d training clips (%d steps an epoch), %d evaluation clips",
                 run_dir, len(self.labels), clips, steps, eval_clips)
        self.clips, self.source, self.workers = clips, source, cfg.data.num_workers
        if resumed:
            resume.check_run(resumed[0], resumed[1], clips, self.precision, self.plans)

        self.model = AudioClassifier(cfg.model, len(self.labels), f.drop_path)
        self.model.use_kernels(kernels_on)
        if t.residual_precision == "bf16":
            self.model.encoder.residual_dtype = torch.bfloat16
        self.pretrained, error = None, None
        if not resumed and world.main:  # DistributedDataParallel hands rank 0's weights on
            try:
                if f.checkpoint:
                    self.pretrained = str(load_pretrained_encoder(self.model, f.checkpoint))
                else:
                    log.warning("finetune.checkpoint is empty: the encoder starts from random "
                                "weights")
            except Exception as err:  # a bad file, a damaged run folder: every rank stops
                error = err
        world.agree(error, "loading finetune.checkpoint")
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.optim.weight_decay, f.layer_decay),
            lr=cfg.optim.lr, betas=cfg.optim.betas, fused=True)
        self.seed = t.seed + (fold or 0)
        seed = rank_seed(self.seed, world.rank)  # each process augments its own clips
        self.generator = torch.Generator(self.device).manual_seed(seed)  # SpecAugment, noise
        self.host_generator = torch.Generator().manual_seed(seed)  # mixup / cutmix, per batch
        self.step, self.evals, self.last_ckpt = 0, [], None
        if resumed:
            self.last_ckpt, state = resumed
            self._restore(state)
        if t.compile:
            compile_blocks(self.model, t.compile_mode)
        # under torchrun the gradients are averaged over the processes at each step's last pass
        self.forward_model = (distributed_model(self.model, self.device) if world.parallel
                              else self.model)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16
                         else contextlib.nullcontext())
        self.fill = -cfg.data.audio_mean / (2 * cfg.data.audio_std)  # a raw 0, normalised
        self.streak = NonFiniteStreak(self.device)
        if world.main:
            write_atomically(run_dir / "config.toml", to_toml(cfg))

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.evals = state["step"], state["evals"]
        self.pretrained = state.get("pretrained")
        ranks = state.get("ranks") or [state]  # every process's streams
        log.info("resumed from %s (step %d)", self.last_ckpt, self.step)
        if len(ranks) != self.world.size:
            reseed = rank_seed(self.seed + self.step, self.world.rank)
            for generator in (self.generator, self.host_generator):
                generator.manual_seed(reseed)
            torch.manual_seed(reseed)  # every device's default stream: stochastic depth's on CUDA
            log.warning("%s was written by %d process(es), this run has %d: the random streams "
                        "are reseeded (the samples and augmentations from here on differ from "
                        "an uninterrupted run's)", self.last_ckpt, len(ranks), self.world.size,
                        extra=SAME_ON_EVERY_RANK)
            return
        streams = ranks[self.world.rank]
        self.host_generator.set_state(streams["host_generator"])
        try:
            self.generator.set_state(streams["generator"])
        except RuntimeError:  # saved on another device type: CPU and CUDA states differ
            self.generator.manual_seed(rank_seed(self.seed + self.step, self.world.rank))
            log.warning("%s was written on another device type: its augmentation RNG state "
                        "does not load here, so it is reseeded from the seed and the step (the "
                        "augmentations from here on differ from an uninterrupted run's)",
                        self.last_ckpt, extra=SAME_ON_EVERY_RANK)
        set_rng_state(streams["rng"], self.device)

    def checkpoint(self) -> None:
        """Rank 0 writes the checkpoint, with every process's random streams."""
        self.last_ckpt = save_run_checkpoint(
            self.world, self.run_dir, self.step,
            {"generator": self.generator.get_state(),
             "host_generator": self.host_generator.get_state(), "rng": rng_state(self.device)},
            lambda: {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "step": self.step, "evals": self.evals, "config": to_toml(self.cfg),
                     "clips": self.clips, "plan": resume.plan_record(self.plans),
                     "precision": self.precision, "pretrained": self.pretrained,
                     "format": resume.FORMAT},
            self.cfg.train.keep_checkpoints)
        self.checkpoint_clock.reset()

    # --- one step -------------------------------------------------------------------------
    def augment(self, audio: torch.Tensor, targets: torch.Tensor):
        f = self.cfg.finetune
        if f.specaug_time or f.specaug_freq:
            audio = spec_augment(audio, f.specaug_time, f.specaug_freq, self.fill,
                                 self.generator)
        if f.noise:
            audio = spec_noise(audio, self.generator)
        targets = smooth_labels(targets, f.label_smoothing)
        audio, targets, _ = mix_batch(audio, targets, f.mixup, f.cutmix, f.mix_switch_prob,
                                      self.host_generator)
        return audio, targets

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.cfg.finetune.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, targets)
        return F.cross_entropy(logits, targets)  # soft targets: mixup, smoothing

    def run_pass(self, batch, last: bool) -> tuple[torch.Tensor, dict]:
        """One forward + backward of `batch`, adding the gradient of loss / passes into .grad;
        returns (loss, no terms), detached. `last`: the step's last pass."""
        audio = batch["audio"].to(self.device, non_blocking=True)
        targets = batch["labels"].to(self.device, non_blocking=True)
        audio, targets = self.augment(audio, targets)
        sync = last or not self.world.parallel  # all-reduce at the step's last pass
        with contextlib.nullcontext() if sync else self.forward_model.no_sync():
            with self.autocast:
                loss = self.loss(self.forward_model(audio), targets)
            (loss / self.passes).backward()
        return loss.detach(), {}

    def train_step(self, batches) -> torch.Tensor:
        """One optimizer step over this process's passes; StopIteration when the data ends."""
        self.optimizer.zero_grad(set_to_none=True)  # a step the data cut short added some
        total, _ = accumulate_gradients(self.run_pass, batches, self.passes, self.timer)
        grad_norm = clip_gradients(self.model, self.cfg.train.grad_clip)
        total = self.world.mean(total)  # every process's: they apply or skip a step together
        finite = torch.isfinite(total) & torch.isfinite(grad_norm)
        self.optimizer.found_inf = (~finite).float()  # the fused AdamW skips it on the device
        self.optimizer.step()
        self.streak.update(finite)
        return torch.where(finite, total, float("nan"))

    # --- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        """The evaluation clips' loss and metric. The random streams training draws from are
        left as they were (the loader's workers draw a seed from torch's), so a run evaluated
        more often, or resumed, trains the same."""
        with torch.random.fork_rng(devices=[]):
            return self._evaluate(epoch)

    def _evaluate(self, epoch: int) -> dict:
        f, t = self.cfg.finetune, self.cfg.train
        self.model.eval()
        scores, targets = [], []
        loader = build_loader(self.eval_data, t.pass_size,
                              self.cfg.data.num_workers, drop_last=False)
        for batch in loader:
            with self.autocast:
                logits = self.model(batch["audio"].to(self.device)).float()
            scores.append(logits.cpu())
            targets.append(batch["labels"])
        if not scores:  # a process whose share holds no evaluation clip
            scores.append(torch.zeros(0, len(self.labels)))
            targets.append(torch.zeros(0, len(self.labels)))
        self.model.train()
        # every process's share, on every process (each computes the same metric)
        shares = self.world.gather((torch.cat(scores), torch.cat(targets)))
        logits = torch.cat([share[0] for share in shares])
        labels = torch.cat([share[1] for share in shares])
        record = {"step": self.step, "epoch": epoch, "eval_clips": len(labels),
                  "eval_loss": float(self.loss(logits, labels))}
        probs = logits.sigmoid() if f.loss == "bce" else logits.softmax(dim=1)
        if f.metric == "map":
            record["eval_map"], record["eval_classes"] = mean_average_precision(probs, labels)
        else:
            record["eval_top1"] = top1_accuracy(probs, labels)
        return record

    # --- the loop ---------------------------------------------------------------------------
    def run(self, progress, stop: StopFlag) -> dict:
        f = self.cfg.finetune
        start_step, self.trained_steps = self.step, 0
        name = self.run_dir.name if self.fold else "finetune"
        task = progress.add_task(name, total=self.total_steps, completed=self.step, epoch="-",
                                 loss="-", rate="-")
        tensorboard = None if self.cfg.run.tensorboard else False
        main = self.world.main
        t = self.cfg.train
        self.checkpoint_clock = CheckpointClock(t.ckpt_every, t.ckpt_minutes, self.world)
        if main:
            record_launch(self.run_dir, self.device, self.world.size, self.step)
        with MetricsWriter(self.run_dir, tensorboard, self.step) if main else NoMetrics() \
                as writer:
            for plan in self.plans:
                start = first_step(plan.epoch, self.plans)
                end = min(start + plan.steps, self.total_steps)
                if self.step < end:
                    progress.update(task, epoch=plan.epoch)
                    self.run_epoch(plan, start, end, progress, task, writer, stop)
                    if stop.agreed(self.world):  # an epoch it finished is evaluated on resume
                        break
                last = end >= self.total_steps
                due = (plan.epoch + 1) % f.eval_every == 0 or last
                if due and not any(r["step"] == end for r in self.evals):
                    record = self.evaluate(plan.epoch)
                    self.evals.append(record)
                    # the checkpoint holding it first: a crash during the save then evaluates
                    # again on resume without a record of the first try in metrics.jsonl
                    self.checkpoint()
                    writer.write(record)
                    if main:
                        progress.console.print(_eval_line(record), soft_wrap=True)
                if last:
                    break
            if self.last_ckpt is None or self.last_ckpt.name != checkpoint_name(self.step):
                self.checkpoint()
        if main:
            write_atomically(self.run_dir / "results.json", json.dumps(
                {"evals": self.evals, "pretrained": self.pretrained, "step": self.step},
                indent=1))
        return {"run_dir": str(self.run_dir), "step": self.step, "total_steps": self.total_steps,
                "start_step": start_step, "trained_steps": self.trained_steps,
                "evals": self.evals, "checkpoint": str(self.last_ckpt),
                "pretrained": self.pretrained, "interrupted": stop.signal}

    def run_epoch(self, plan, start, end, progress, task, writer, stop) -> None:
        t = self.cfg.train
        workers = self.cfg.data.num_workers
        drop = self.train_data.set_epoch(plan.epoch, (self.step - start) * self.passes,
                                         plan.micro_batch, workers)
        with torch.random.fork_rng(devices=[]):  # its worker seed, drawn from torch's stream,
            # would shift stochastic depth's draws after a resume (the epoch's samples are
            # drawn from their own streams)
            batches = iter(build_loader(self.train_data, plan.micro_batch, workers))
        for _ in range(drop):
            next(batches, None)
        if self.world.parallel:  # the epoch ends on every process when one has no pass left
            batches = agreed_batches(batches, self.world)
        self.timer, losses, ran_out = StepTimer(), [], False
        while self.step < end and not stop.agreed(self.world):
            lr = learning_rate(self.cfg, self.step, self.plans)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            try:
                losses.append(self.train_step(batches))
            except StopIteration:  # each worker drops its partial batch: an epoch may end early
                ran_out = True  # on every process at once (agreed_batches)
                break
            self.step += 1
            self.trained_steps += 1
            self.timer.step_done()
            progress.advance(task)
            due_checkpoint = self.checkpoint_clock.due(self.step)
            # a checkpoint closes the log interval: a resume from it loses no step's record
            if self.step % t.log_every == 0 or due_checkpoint:
                self.log(plan, lr, losses, writer, progress, task)
                losses = []
            if due_checkpoint:
                with self.timer.left_out(device_sync(self.device)):
                    self.checkpoint()
        if losses:  # the epoch's last steps
            self.log(plan, lr, losses, writer, progress, task)
        if ran_out and self.step < end:  # the data ran short: the schedule goes on
            epoch_ended_early(plan, self.step - start, end - self.step, self.source,
                              self.workers, self.world.size)
            progress.advance(task, end - self.step)
            self.step = end

    def log(self, plan, lr, losses, writer, progress, task) -> None:
        self.streak.check(self.cfg.train.max_bad_steps, self.step, self.last_ckpt)  # a sync
        timing = self.timer.summary(device_sync(self.device))
        losses = torch.stack(losses)  # the mean of the finite ones (nan if none), one sync
        loss = float(losses.where(losses.isfinite(), float("nan")).nanmean())
        record = {"step": self.step, "epoch": plan.epoch, "lr": lr, "loss": loss,
                  "step_ms": timing["step_ms"],
                  "samples_per_s": plan.batch_size * 1e3 / timing["step_ms"],
                  "data_wait": timing["data_wait_share"]}
        writer.write(record)
        if not self.world.main:
            return
        progress.update(task, loss=f"{record['loss']:.4f}", rate=f"{record['samples_per_s']:.1f}")
        progress.console.print(
            f"step {self.step}/{self.total_steps} ep {plan.epoch} loss {record['loss']:.4f} "
            f"lr {lr:.2e} {record['step_ms']:.0f} ms {record['samples_per_s']:.1f} samples/s "
            f"data {record['data_wait'] * 100:.0f}%", soft_wrap=True)


def _eval_line(r: dict) -> str:
    metric = (f"mAP {r['eval_map']:.4f} over {r['eval_classes']} classes" if "eval_map" in r
              else f"top-1 {r['eval_top1'] * 100:.2f}%")
    return (f"eval epoch {r['epoch']}: {metric}, loss {r['eval_loss']:.4f} "
            f"({r['eval_clips']} clips)")


def metric_of(record: dict) -> float:
    return record["eval_map"] if "eval_map" in record else record["eval_top1"]


def finetune(cfg: FinetuneConfig, argv: list[str], world: World | None = None) -> dict:
    """Runs (or resumes) the configured fine-tuning, every fold of a cross-validation in turn,
    as rank `world.rank` of `world.size` processes under torchrun; returns the summary."""
    world = world or World()
    check_task(cfg)
    base = Path(cfg.run.dir) / cfg.run.name
    folds = list(range(1, cfg.finetune.folds + 1)) or [None]
    runs, started = [], time.perf_counter()
    progress = progress_bar(disable=not world.main)
    with StopFlag() as stop, progress:
        for fold in folds:
            run_dir = base / f"fold-{fold}" if fold else base
            with run_folder(run_dir, world):
                runs.append(_Run(cfg, run_dir, fold, world).run(progress, stop))
            if stop.agreed(world):  # every process stops before the next fold
                break
    summary = {"runs": runs, "seconds": time.perf_counter() - started,
               "metric": cfg.finetune.metric, "folds": cfg.finetune.folds,
               "interrupted": stop.signal}
    finals = [metric_of(r["evals"][-1]) for r in runs if r["evals"]]
    if cfg.finetune.folds and len(finals) == cfg.finetune.folds and stop.signal is None:
        summary["mean"] = statistics.fmean(finals)
        summary["std"] = statistics.pstdev(finals)
        if world.main:
            write_atomically(base / "cv.json", json.dumps(
                {"metric": cfg.finetune.metric, "folds": finals, "mean": summary["mean"],
                 "std": summary["std"]}, indent=1))
    if world.main:
        _print_summary(progress.console, summary, argv)
    return summary


def _print_summary(console, s: dict, argv: list[str]) -> None:
    from rich.table import Table
    name = "mAP" if s["metric"] == "map" else "top-1"

    def shown(value: float) -> str:  # as the eval lines print them
        return f"{value:.4f}" if s["metric"] == "map" else f"{value * 100:.2f}%"

    table = Table(title="fastmavil-finetune summary", show_header=False)
    for r in s["runs"]:
        label = Path(r["run_dir"]).name if s["folds"] else "run"
        evals = r["evals"]
        if evals:
            best = max(evals, key=metric_of)
            latest = "final" if r["step"] >= r["total_steps"] else "latest"
            text = (f"{latest} {name} {shown(metric_of(evals[-1]))} (epoch "
                    f"{evals[-1]['epoch']}), best {shown(metric_of(best))} (epoch "
                    f"{best['epoch']})")
        else:
            text = "not evaluated yet"
        passed_over = steps_passed_over(r["step"] - r["start_step"], r["trained_steps"])
        table.add_row(label, f"step {r['step']} / {r['total_steps']}: {text}"
                             + (f" ({passed_over} this run)" if passed_over else ""))
    if "mean" in s:
        table.add_row(f"{s['folds']}-fold mean", f"{name} {shown(s['mean'])} ± {shown(s['std'])}")
    if s["runs"]:
        table.add_row("pre-trained", str(s["runs"][0]["pretrained"] or "none (random weights)"))
        table.add_row("checkpoint", s["runs"][-1]["checkpoint"])
    table.add_row("time", f"{s['seconds']:.1f} s")
    console.print(table)
    if s["interrupted"]:
        console.print(f"stopped by {s['interrupted']}; resume with: "
                      + resume_command("fastmavil-finetune", "fastmavil.train.finetune", argv),
                      soft_wrap=True, markup=False, emoji=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    import argparse
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="fastmavil-finetune",
        description="Fine-tune a pre-trained audio encoder as a classifier (paper Table 4).",
        epilog="Override any config key: --finetune.checkpoint runs/r4 --data.shards DIR "
               "(sections: model, data, finetune, optim, train, run; keys and defaults: "
               f"fastmavil/config.py). {OVERRIDE_SYNTAX} The same command resumes the run.")
    parser.add_argument("config", help="TOML config, e.g. configs/finetune/esc50.toml")
    try:
        rest, overrides = split_overrides(argv)
    except ConfigError as err:
        parser.error(str(err))
    args = parser.parse_args(rest)
    return run_command("fastmavil-finetune", args.config,
                       lambda: load_config(args.config, overrides, FinetuneConfig),
                       lambda cfg, world: finetune(cfg, argv, world))


if __name__ == "__main__":
    sys.exit(main())
