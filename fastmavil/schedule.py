"""Schedules of the paper's efficiency ideas (Sec. 3) and the learning rate.

Masking ratio per epoch (`fixed` or `linear` from rho1 to rho2), and with the adaptive batch
B_e = (1 - min(rho1, rho2)) / (1 - rho_e) * B0, so the visible tokens per step stay constant
(`train.adaptive_batch_rule = "tokens"`, the paper's formula). The paper's aim is "constant
compute at each iteration", which that formula misses: the decoders' work follows the masked
tokens, so at rho = 0.9 a token-budget step does ~1.4x the FLOPs of one at 0.8. `"flops"`
scales B0 by the model's forward FLOPs per sample instead, F(min rho) / F(rho_e).
An epoch is a pass over the dataset, so larger batches mean fewer steps, and each forward pass
carries the same work at every ratio, so the device stays as busy at rho = 0.9 as at 0.8: the
wall-clock saving. With gradient accumulation (`train.micro_batch_size`) each pass therefore
grows with B_e (the paper: 2048 over 256 GPUs, 8 per GPU at rho = 0.8 and 16 at 0.9); a fixed
micro-batch would only cut optimizer steps, running as many small passes as the fixed batch does.
`train.passes_per_step = "fixed"` keeps B0 / micro_batch_size passes in every epoch, as the
paper's GPUs, so B_e rounds to a multiple of them (256 in r4.toml: a step of 2304 samples at
rho = 0.82 where the FLOPs rule asks for 2191); `"fit"` rounds each pass to the nearest sample
and takes as many passes as come nearest B_e (243 to 269 of them in r4.toml under either rule),
so a step misses its budget by at most half a pass.

Compiled graphs and autotuned kernels specialise on shapes, so the ratio is quantised to at most
`train.max_shapes` levels between rho1 and rho2 and the batch rounded to a multiple of
`train.batch_multiple` (or to whole passes, above): a run sees at most `max_shapes` distinct
(rho, samples per pass) shapes. Everything is a function of the epoch alone, so every rank
derives the same plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import Config, ConfigError, MaskConfig


def mask_ratio(mask: MaskConfig, epoch: int, epochs: int) -> float:
    """rho_e: `fixed` -> start; `linear` -> start at epoch 0 to end at epoch epochs - 1."""
    if mask.schedule == "fixed" or epochs == 1:
        return mask.start
    return mask.start + (mask.end - mask.start) * epoch / (epochs - 1)


def _token_budget_batch(mask: MaskConfig, ratio: float, base: int) -> float:
    """The paper's B_e = (1 - min(rho1, rho2)) / (1 - rho_e) * B0, unrounded: as many visible
    tokens per step as B0 at the lowest ratio."""
    return (1.0 - min(mask.start, mask.end)) / (1.0 - ratio) * base


def quantized_mask_ratio(mask: MaskConfig, epoch: int, epochs: int, levels: int) -> float:
    """rho_e snapped to the nearest of `levels` evenly spaced values from start to end."""
    ratio = mask_ratio(mask, epoch, epochs)
    if mask.start == mask.end or levels < 2:
        return ratio
    step = (mask.end - mask.start) / (levels - 1)
    return round(mask.start + step * round((ratio - mask.start) / step), 9)


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    mask_ratio: float
    batch_size: int   # samples per optimizer step (the effective batch)
    micro_batch: int  # samples per forward pass
    steps: int        # optimizer steps: full batches only

    @property
    def passes(self) -> int:
        """Forward passes per optimizer step, each of micro_batch samples."""
        return self.batch_size // self.micro_batch


def _flops_budget_batches(cfg: Config, ratios: set[float]) -> dict[float, float]:
    """The batch at each ratio with as many forward FLOPs as B0 at the lowest ratio."""
    from .flops import forward_flops_per_sample  # builds the model on the meta device
    lowest = min(cfg.mask.start, cfg.mask.end)
    flops = forward_flops_per_sample(cfg, ratios | {lowest})
    return {r: flops[lowest] / flops[r] * cfg.train.batch_size for r in ratios}


def batch_rounding(train) -> tuple[int, int]:
    """(passes per step at B0, unit): B0 / micro_batch_size (1 without micro-batches), and
    the multiple every epoch's batch rounds to with that many passes in every epoch, a multiple
    of train.batch_multiple and of the passes (B0 is one of both: TrainConfig.check)."""
    passes = train.batch_size // train.micro_batch_size if train.micro_batch_size else 1
    return passes, math.lcm(train.batch_multiple, passes)


def fits_passes(train) -> bool:
    """Whether train.passes_per_step = "fit" changes the plan: it needs the adaptive batch and
    more than one pass per step at B0."""
    return (train.passes_per_step == "fit" and train.adaptive_batch
            and batch_rounding(train)[0] > 1)


def fit_passes(exact: float, passes: int) -> tuple[int, int]:
    """(samples per pass, passes) for a step of `exact` samples that had `passes` passes at B0:
    each pass the nearest whole sample to exact / passes, and as many passes as bring the step
    nearest `exact`, so it misses by at most half a pass."""
    size = max(1, round(exact / passes))
    return size, max(1, round(exact / size))


def plan_epochs(cfg: Config, num_clips: int) -> list[EpochPlan]:
    """The (rho, B, steps) of every epoch for a dataset of `num_clips` clips."""
    t, mask = cfg.train, cfg.mask
    ratios = [quantized_mask_ratio(mask, epoch, t.epochs, t.max_shapes)
              for epoch in range(t.epochs)]
    if t.adaptive_batch and t.adaptive_batch_rule == "flops":
        exact = _flops_budget_batches(cfg, set(ratios))
    else:
        exact = {r: _token_budget_batch(mask, r, t.batch_size) for r in set(ratios)}
    passes, unit = batch_rounding(t)
    plans = []
    for epoch, ratio in enumerate(ratios):
        batch, micro = t.batch_size, t.batch_size // passes
        if fits_passes(t):
            micro, fitted = fit_passes(exact[ratio], passes)
            batch = micro * fitted
        elif t.adaptive_batch:
            batch = max(unit, unit * round(exact[ratio] / unit))
            micro = batch // passes
        if t.max_batch_size and micro > t.max_batch_size:
            raise ConfigError(f"epoch {epoch} runs {micro} samples per forward pass (mask ratio "
                              f"{ratio:.3f}) but train.max_batch_size = {t.max_batch_size}; "
                              "set or lower train.micro_batch_size (the pass at the lowest "
                              "ratio) or raise the limit")
        if num_clips < batch:
            raise ConfigError(f"the dataset has {num_clips} clips, fewer than one batch of "
                              f"{batch} (epoch {epoch}); lower train.batch_size")
        plans.append(EpochPlan(epoch, ratio, batch, micro, num_clips // batch))
    return plans


def learning_rate(cfg: Config, step: int, plans: list[EpochPlan]) -> float:
    """Linear warm-up over the first `optim.warmup_epochs` epochs, then cosine decay to
    `optim.min_lr`, set per iteration.

    `optim.lr_schedule = "epochs"` runs both over the fractional epoch of the step, e + i / S_e
    (step i of epoch e's S_e), exactly as MAE and AudioMAE's lr_sched: 0 at the first step, lr
    after warm-up, min_lr at the end of the last epoch. `"steps"` runs them over optimizer steps:
    lr / W at the first of the W warm-up steps, min_lr exactly at the last step. With a fixed
    batch the two trace the same curve, a step apart; with the adaptive batch an epoch's share of
    the decay is its share of the epochs or of the steps.

    Batch-size rule: `optim.lr_batch_scaling` = `none` keeps lr independent of the changing
    batch (the paper's adaptive batch keeps the visible tokens per step constant, so each step's
    gradient averages the same number of tokens); `linear` or `sqrt` scale lr by B_e / B0 or
    its square root.
    """
    o, plan = cfg.optim, epoch_at(step, plans)
    if o.lr_schedule == "epochs":  # the fractional epoch, as MAE's lr_sched
        epoch = plan.epoch + min(1.0, (step - first_step(plan.epoch, plans)) / plan.steps)
        warm = epoch / o.warmup_epochs if epoch < o.warmup_epochs else None
        progress = (epoch - o.warmup_epochs) / max(1, len(plans) - o.warmup_epochs)
    else:  # optimizer steps
        warmup = sum(p.steps for p in plans[:o.warmup_epochs])
        warm = (step + 1) / warmup if step < warmup else None
        progress = (step - warmup) / max(1, sum(p.steps for p in plans) - 1 - warmup)
    if warm is not None:
        lr = o.lr * warm
    else:
        lr = o.min_lr + (o.lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if o.lr_batch_scaling != "none":
        ratio = plan.batch_size / cfg.train.batch_size
        lr *= ratio if o.lr_batch_scaling == "linear" else math.sqrt(ratio)
    return lr


def epoch_at(step: int, plans: list[EpochPlan]) -> EpochPlan:
    """The epoch that optimizer step `step` (0-based) falls in; the last one past the end."""
    for plan in plans:
        if step < plan.steps:
            return plan
        step -= plan.steps
    return plans[-1]


def first_step(epoch: int, plans: list[EpochPlan]) -> int:
    return sum(p.steps for p in plans[:epoch])
