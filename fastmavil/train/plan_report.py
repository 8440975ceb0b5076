"""`fastmavil-train CONFIG --plan`: a run's schedule, printed without training it.

One row per run of epochs at one shape: the masking ratio, the batch (samples per optimizer
step) as passes x samples per pass, the steps, and per step the visible tokens and the training
FLOPs (3x the forward's, as fastmavil-flops counts them); then how far those stray from their
mean over the epochs. That is what the adaptive batch's rule (`train.adaptive_batch_rule`) and
the rounding of its passes (`train.passes_per_step`) hold constant, seen before a long run.
"""
from __future__ import annotations

import statistics

from ..config import Config
from ..flops import forward_flops_per_sample
from ..schedule import EpochPlan


def spread(values: list[float]) -> float:
    """The largest distance of a value from the values' mean, relative to the mean: "within
    +-x % of the mean" (half the range would understate an asymmetric spread)."""
    mean = statistics.mean(values)
    return max(abs(v - mean) for v in values) / mean


def work_per_step(cfg: Config, flops: dict[float, float], ratio: float, samples: float) -> dict:
    """A step of `samples` samples at mask ratio `ratio`: its samples, training FLOPs (3x the
    forward's, `flops` from forward_flops_per_sample, as fastmavil-flops counts them) and visible
    tokens."""
    return {"samples": samples, "flops": 3.0 * flops[ratio] * samples,
            "tokens": sum(cfg.model.visible_tokens(ratio)) * samples}


def plan_summary(cfg: Config, plans: list[EpochPlan]) -> dict:
    """Rows (consecutive epochs of one shape together) and the per-step spreads of the plan."""
    flops = forward_flops_per_sample(cfg, {p.mask_ratio for p in plans})
    work = [work_per_step(cfg, flops, p.mask_ratio, p.batch_size) for p in plans]
    for w in work:
        w["tflop"] = w["flops"] / 1e12
    rows = []
    for p, w in zip(plans, work):
        shape = (p.mask_ratio, p.batch_size, p.micro_batch)
        if rows and rows[-1]["shape"] == shape:
            rows[-1]["last"] = p.epoch
        else:
            rows.append({"shape": shape, "first": p.epoch, "last": p.epoch, "plan": p, **w})
    return {"rows": rows, "steps": sum(p.steps for p in plans),
            "tflop_spread": spread([w["tflop"] for w in work]),
            "token_spread": spread([w["tokens"] for w in work]),
            "total_tflop": sum(w["tflop"] * p.steps for p, w in zip(plans, work))}


def print_plan(cfg: Config, plans: list[EpochPlan], clips: int, console=None) -> dict:
    """Prints the plan's table and summary (to stdout unless `console` is given)."""
    from rich.console import Console
    from rich.table import Table
    summary = plan_summary(cfg, plans)
    t = cfg.train
    batch = (f"adaptive, {t.adaptive_batch_rule} rule, passes {t.passes_per_step}"
             if t.adaptive_batch else "fixed")
    table = Table(title=f"plan: {len(plans)} epochs of {clips} clips, {summary['steps']} steps "
                        f"(batch: {batch})")
    for column in ("epochs", "rho", "batch", "passes x samples", "steps", "visible tokens/step",
                   "TFLOP/step"):
        table.add_column(column, justify="right")
    for row in summary["rows"]:
        p = row["plan"]
        table.add_row(f"{row['first']}-{row['last']}", f"{p.mask_ratio:.3f}", str(p.batch_size),
                      f"{p.passes} x {p.micro_batch}", str(p.steps), str(row["tokens"]),
                      f"{row['tflop']:.4g}")
    console = console or Console()
    console.print(table)
    total = summary["total_tflop"]
    total = f"{total / 1e3:,.0f} PFLOP" if total >= 1e3 else f"{total:.3g} TFLOP"
    console.print(f"per step over the epochs: training FLOPs within ±{summary['tflop_spread']:.2%}"
                  f" of their mean, visible tokens within ±{summary['token_spread']:.2%}; "
                  f"{total} in all (fastmavil-flops' count)")
    return summary
