"""What may change when a run resumes from its checkpoint.

A checkpoint keeps the config it was trained under, the clip count and the schedule it was
planned with, and the precision it ran in. Resuming under a config that trains something else
(model, data pipeline, masking, schedule, optimiser) is refused with the changed keys named;
settings of how the run executes may change freely; a few that change which samples come next,
or the numerics, are allowed with a warning.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..config import Config, ConfigError, config_changes
from .distributed import SAME_ON_EVERY_RANK

log = logging.getLogger("fastmavil.train")

# How the run executes, not what it trains (the attention backends compute the same
# attention; a run folder may be copied or moved under another name).
FREE = {"train.max_steps", "train.log_every", "train.ckpt_every", "train.ckpt_minutes",
        "train.keep_checkpoints",
        "train.max_bad_steps", "train.compile", "train.compile_mode", "train.cuda_graphs",
        "train.device", "train.deterministic",
        "train.max_batch_size", "run.dir", "run.name", "run.tensorboard", "model.attention",
        "finetune.eval_every"}
# A dataset moved to another disk, a machine with other cores, another micro-batch size (each
# loader worker forms its own micro-batches, so the resumed epoch skips other samples), another
# loader (DALI reads in one process; its pixels differ by a few levels), the kernels on or off
# (their in-kernel noise is another stream): the samples or noise from here on differ from an
# uninterrupted run's. Under the adaptive batch the micro-batch size is refused instead: the
# passes per step it sets also round every epoch's batch.
WARN = {"data.shards", "data.num_workers", "data.synth_clips", "data.loader",
        "data.dali_device", "train.micro_batch_size", "model.kernels", "finetune.eval_shards"}


# What a checkpoint's numbers mean beyond its config, raised when code changes them for the same
# config. 2 (2026-11-27): the 2-D sin-cos positions put the column first, as MAE's, and each
# sample's augmentations have their own random stream (checkpoints before it hold no format).
FORMAT = 2


def check_format(path: Path, state: dict) -> None:
    """Refuses a checkpoint whose model would resume under other fixed positions or data."""
    found = state.get("format", 1)
    if found != FORMAT:
        raise ConfigError(f"{path} has checkpoint format {found}, this fastmavil writes "
                          f"{FORMAT}: the fixed positional embeddings or the order of the data "
                          "changed in between (fastmavil/train/resume.py, FORMAT), so resuming "
                          "would go on under other positions; resume with the fastmavil "
                          "that wrote it or start a new run with --run.name")


def check_config(path: Path, saved: str | None, cfg: Config) -> None:
    """Before any work: refuses a config that trains something else than the checkpoint's."""
    if saved is None:
        log.warning("%s holds no config (written by an older fastmavil): resuming without "
                    "checking that the config is the one it was trained under", path,
                    extra=SAME_ON_EVERY_RANK)
        return
    changes = config_changes(saved, cfg)
    warn = WARN - ({"train.micro_batch_size"} if cfg.train.adaptive_batch else set())
    refused = {k: v for k, v in changes.items() if k not in FREE | warn}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(f"{path} was written under a different config ({listed}); resume "
                          "with the checkpoint's values (its config is in the run's config.toml) "
                          "or start a new run with --run.name")
    for key in sorted(changes.keys() & warn):
        old, new = changes[key]
        log.warning("resuming with %s changed (%r -> %r): the samples from here on differ from "
                    "an uninterrupted run's", key, old, new, extra=SAME_ON_EVERY_RANK)


def check_run(path: Path, state: dict, clips: int, precision: str, plans) -> None:
    """Once the data is known and planned: the schedule must be the checkpoint's (same clip
    count, same per-epoch plan); a precision change (train.precision = auto on another device)
    is allowed with a warning.

    The plan is compared as well as the clip count because the same config and data can still
    plan differently under other code (the FLOPs batch rule counts the model's FLOPs;
    quantisation rules), and the resumed step would then land in another epoch, batch or lr."""
    planned = state.get("clips")
    if planned is not None and planned != clips:
        raise ConfigError(f"{path} was trained on {planned} clips, the data now holds {clips}: "
                          "the schedule (steps per epoch, batch per epoch) would shift under "
                          "the resumed step; point data.shards at the run's data or start a "
                          "new run with --run.name")
    saved, now = state.get("plan"), plan_record(plans)
    if saved is None:
        log.warning("%s holds no schedule (written by an older fastmavil): resuming without "
                    "checking that the schedule plans as it did", path, extra=SAME_ON_EVERY_RANK)
    elif saved != now:
        epoch = next((e for e, (a, b) in enumerate(zip(saved, now)) if a != b),
                     min(len(saved), len(now)))
        raise ConfigError(f"{path} was planned differently: epoch {epoch} was "
                          f"{_describe(saved, epoch)}, now {_describe(now, epoch)} (the code "
                          "that plans the schedule changed, or under the FLOPs batch rule the "
                          "FLOP count, e.g. with another torch); resume with the versions that "
                          "wrote it or start a new run with --run.name")
    if state.get("precision") not in (None, precision):
        log.warning("resuming in %s; the checkpoint was trained in %s", precision,
                    state["precision"], extra=SAME_ON_EVERY_RANK)


def plan_record(plans) -> list[list]:
    """The schedule as a checkpoint stores it: [mask ratio, batch, steps] per epoch."""
    return [[p.mask_ratio, p.batch_size, p.steps] for p in plans]


def _describe(plan: list[list], epoch: int) -> str:
    if epoch >= len(plan):
        return "absent"
    ratio, batch, steps = plan[epoch]
    return f"rho {ratio:.9g}, batch {batch}, {steps} steps"
