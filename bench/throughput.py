"""Training-step throughput: the fast path against the plain PyTorch reference path.

    python -m bench.throughput                      # r1-r4 and mavil; paper size on CUDA
    python -m bench.throughput --size small         # the default without CUDA

reference path: kernels off, math attention, eager, AdamW (for-each)
fast path:      kernels on (where they run), auto attention, fused AdamW (as the trainer),
                compiled transformer blocks with --compile (models/compile.py), the whole step
                replayed as a CUDA graph per shape with --cuda-graph (fastmavil/cuda_graph.py)
--residual bf16 keeps the residual stream in bf16 on both paths (train.residual_precision).
Both train the same model (same weights) on the same synthetic batch already on the device, so
this measures the model, not the loader (bench.dataload does that). Steps alternate between
the paths after a warm-up; medians over --repeats. bf16 autocast on CUDA, fp32 on a CPU.

Curriculum view (R3 and R4, and R1's single shape as the baseline): the fast path alone timed
at every distinct (rho, B) shape of the schedule, with per-epoch step time, samples/s, visible
tokens and model FLOPs per step and GPU utilisation, and the projected epoch time of R4
relative to R1 and R3 (the paper: 0.82x of R1). --batch-rule flops plans R4's batches by
FLOPs rather than visible tokens (train.adaptive_batch_rule, fastmavil/schedule.py), and
--passes fit fits each step's passes to its budget (train.passes_per_step); --no-compare runs
the views alone, --compare-first compares the first config alone.
Writes bench/results/throughput-<device>-<size>[-b<B0>][-compile][-autotune][-res16][-triton]
[-graph][-<rule>][-fit][-first][-views].json (-b<B0> where --batch is not the default,
-autotune with --compile-mode max-autotune, -res16 with --residual bf16, -triton with
--attention triton (the fast path's attention in kernels/attention.py), -<rule> where
--batch-rule is given, -fit with --passes fit, -views where the views run alone; each config's
record carries `speedup`, fast over reference samples/s) and a PNG plot when matplotlib is
installed.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import kernels
from fastmavil.config import Config, ConfigError, load_config
from fastmavil.cuda_graph import GraphedStep
from fastmavil.flops import forward_flops_per_sample
from fastmavil.models import build_model, compile_blocks
from fastmavil.models.compile import MAX_AUTOTUNE_NEEDS_KERNELS
from fastmavil.models.attention import set_attention_backend
from fastmavil.schedule import fits_passes, plan_epochs
from fastmavil.train.metrics import (GpuUtilization, device_peak_flops, mfu, peak_memory_bytes,
                                     reset_peak_memory, tflops)
from fastmavil.train.plan_report import spread, work_per_step
from fastmavil.train.runtime import fast_path

from ._report import (add_results_option, config_path, device_name, environment, file_slug,
                      kernel_rows, positive_int, print_table, time_by_category, write_json)

CONFIGS = ["configs/r1.toml", "configs/r2.toml", "configs/r3.toml", "configs/r4.toml",
           "configs/mavil.toml"]


class Trainer:
    """One path (reference or fast) of one config: model, optimiser, a step on a fixed batch."""

    def __init__(self, cfg: Config, device: torch.device, fast: bool, compile_model: bool,
                 state: dict | None, cuda_graph: bool = False, pool: tuple | None = None,
                 compile_mode: str = "default", residual_dtype: torch.dtype | None = None,
                 attention: str = "auto"):
        with device:  # initialised on the device: seconds less per paper-size model
            self.model = build_model(cfg)
        self.model.to(device)  # buffers made from CPU arrays
        if state is not None:
            self.model.load_state_dict(state)
        self.model.use_kernels(fast and fast_path(cfg, device))
        set_attention_backend(self.model, attention if fast else "math")
        self.model.set_residual_dtype(residual_dtype)  # both paths: a training setting
        if fast and compile_model:
            if compile_mode == "max-autotune" and not self.model.fused:
                raise SystemExit(f"bench.throughput: {MAX_AUTOTUNE_NEEDS_KERNELS}")
            compile_blocks(self.model, compile_mode)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4,
                                           fused=fast or None, foreach=None if fast else True,
                                           capturable=cuda_graph)
        self.device = device
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else contextlib.nullcontext())
        self.generator = torch.Generator(device).manual_seed(0)
        # one eager step per shape before its capture: the bench's own warm-up (>= 2 steps with
        # --cuda-graph) then captures, so that timed steps are replays
        self.graphed = (GraphedStep(self.model, self.optimizer, self.generator, warmup=1,
                                    pool=pool) if fast and cuda_graph else None)

    def step(self, audio, video, ratio: float) -> None:
        if self.graphed is not None:
            self.graphed.step(audio, video, ratio)
            return
        with self.autocast:
            out = self.model(audio, video, ratio, self.generator)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def time(self, audio, video, ratio: float, steps: int) -> float:
        """Milliseconds per step over `steps` steps (synchronised at both ends)."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step(audio, video, ratio)
        sync()
        return (time.perf_counter() - start) * 1e3 / steps


def resident_bytes(trainer: Trainer, device: torch.device) -> int:
    """Bytes a trainer keeps on a CUDA device between steps (parameters, buffers, optimiser
    state, gradients where kept: an eager step frees them, a graphed one keeps its own, and a
    graphed trainer's input buffers), 0 on a CPU, whose peak is the process's."""
    if device.type != "cuda":
        return 0
    params = list(trainer.model.parameters())
    tensors = [*params, *trainer.model.buffers(),
               *(p.grad for p in params if p.grad is not None),
               *(t for state in trainer.optimizer.state.values() for t in state.values()
                 if torch.is_tensor(t))]
    if trainer.graphed is not None:
        tensors += [t for inputs in trainer.graphed.inputs.values() for t in inputs
                    if t is not None]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if t.is_cuda}
    return sum(storages.values())


def graph_pool_idle_bytes(trainer: Trainer) -> int | None:
    """What a graphed trainer's memory pool holds beyond its live tensors (the activations its
    graphs write on each replay); 0 for an eager trainer; None, with a warning, where this
    torch cannot say."""
    if trainer.graphed is None:
        return 0
    idle = trainer.graphed.pool_idle_bytes()
    if idle is None:
        print("warning: no memory snapshot of the CUDA graph pool; peak GB left empty")
    return idle


def batch_for(cfg: Config, batch: int, device: torch.device):
    m = cfg.model
    audio = torch.randn(batch, 1, m.audio_frames, m.mel_bins, device=device)
    video = torch.randn(batch, 3, m.video_frames, m.video_size, m.video_size, device=device) \
        if m.has_video else None
    return audio, video


def compare(path: str, cfg: Config, device: torch.device, args, peak) -> dict:
    """Reference vs fast path at args.batch, halved while the reference path (math attention
    keeps every attention matrix for backward) runs out of GPU memory."""
    batch = args.batch
    while True:
        try:
            return _compare(path, cfg, device, args, peak, batch)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            print(f"{path}: out of memory at B={batch}; retrying at B={batch // 2}")
            batch //= 2
        finally:
            release_memory(device)


def _mean(samples: list) -> float | None:
    """Mean of the utilisation samples; None where none were taken (no CUDA or no NVML)."""
    taken = [u for u in samples if u is not None]
    return statistics.mean(taken) if taken else None


def release_memory(device: torch.device) -> None:
    """Frees the models of a finished comparison: compiled modules sit in reference cycles, so
    collect them before returning the cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _compare(path: str, cfg: Config, device: torch.device, args, peak, batch: int) -> dict:
    """Reference vs fast path on one config at its final masking ratio, interleaved."""
    ratio = cfg.mask.end
    audio, video = batch_for(cfg, batch, device)
    residual = _residual_dtype(args)
    reference = Trainer(cfg, device, fast=False, compile_model=False, state=None,
                        residual_dtype=residual)
    fast = Trainer(cfg, device, fast=True, compile_model=args.compile,
                   state=reference.model.state_dict(), cuda_graph=args.cuda_graph,
                   compile_mode=args.compile_mode, residual_dtype=residual,
                   attention=args.attention)
    work = work_per_step(cfg, forward_flops_per_sample(cfg, {ratio}), ratio, batch)
    flops = work["flops"]
    record = {"config": path, "mask_ratio": ratio, "batch": batch, "flops_per_step": flops,
              "fast_runs_kernels": fast.model.fused}  # on a CPU: the references, SDPA, fused AdamW
    warmup_s = {}  # wall time of the warm-up steps, which compile (--compile) and autotune
    for name, trainer in (("reference", reference), ("fast", fast)):
        warmup_s[name] = (trainer.time(audio, video, ratio, args.warmup) * args.warmup / 1e3
                          if args.warmup else None)
    times = {"reference": [], "fast": []}
    utils = {"reference": [], "fast": []}
    memory = {}
    paths = {"reference": reference, "fast": fast}
    for repeat in range(args.repeats):
        order = ("reference", "fast") if repeat % 2 == 0 else ("fast", "reference")  # no bias
        for name in order:
            reset_peak_memory(device)
            with GpuUtilization(device) as util:
                times[name].append(paths[name].time(audio, video, ratio, args.steps))
            utils[name].append(util.mean())
            # The other path's model and optimiser state sit on the device meanwhile.
            other = paths["fast" if name == "reference" else "reference"]
            idle = graph_pool_idle_bytes(paths[name])
            # a CPU's peak is the process's whole life (it cannot be reset): not this path's
            if device.type != "cuda" or idle is None or memory.get(name, 0) is None:
                memory[name] = None
            else:
                own = peak_memory_bytes(device) - resident_bytes(other, device) + idle
                memory[name] = max(memory.get(name, 0), own)
    for name in times:
        ms = statistics.median(times[name])
        seconds = ms / 1e3
        record[name] = {"step_ms": ms, "step_ms_repeats": times[name],
                        "samples_per_s": batch / seconds,
                        "tokens_per_s": work["tokens"] / seconds,
                        "tflops": tflops(flops, seconds), "mfu": mfu(flops, seconds, peak),
                        "peak_memory_gb": None if memory[name] is None else memory[name] / 2 ** 30,
                        "gpu_util": _mean(utils[name]), "warmup_s": warmup_s[name]}
    record["speedup"] = record["fast"]["samples_per_s"] / record["reference"]["samples_per_s"]
    return record


def _residual_dtype(args) -> torch.dtype | None:
    """--residual as Trainer takes it: bf16, or None for autocast's fp32."""
    return torch.bfloat16 if args.residual == "bf16" else None


def profile(label: str, cfg: Config, device: torch.device, args, batch: int,
            steps: int = 3) -> str:
    """The fast path's operators by device time over a few steps, and how much of the step's wall
    time the device was busy (a CPU-bound step shows a low share)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    trainer = Trainer(cfg, device, fast=True, compile_model=args.compile, state=None,
                      cuda_graph=args.cuda_graph, compile_mode=args.compile_mode,
                      residual_dtype=_residual_dtype(args), attention=args.attention)
    audio, video = batch_for(cfg, batch, device)
    ratio = cfg.mask.end
    for _ in range(args.warmup):
        trainer.step(audio, video, ratio)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with torch_profile(activities=activities) as prof:
        wall_ms = trainer.time(audio, video, ratio, steps)
    events = prof.key_averages()
    cuda = device.type == "cuda"
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = kernel_rows(events) if cuda else events
    busy_ms = sum(getattr(e, key) for e in rows) / 1e3 / steps
    head = (f"{label} fast path, B={batch}, rho={ratio}: {wall_ms:.1f} ms per step while "
            f"profiled, {'device kernels' if cuda else 'CPU operators'} {busy_ms:.1f} ms per step"
            + (f" in {sum(e.count for e in rows) / steps:.0f} launches" if cuda else ""))
    if cuda and busy_ms <= 0:  # CUPTI can miss kernels replayed from CUDA graphs
        head += ("\n  warning: the profiler recorded no kernel time; the device figures above "
                 "are missing, not zero")
    elif cuda:  # what the kernels' time goes to: matmuls and attention against the rest
        head += "".join(f"\n  {category:26s} {ms:8.2f} ms {ms / busy_ms:6.1%} {n:6.0f} launches"
                        for category, ms, n in time_by_category(rows, steps))
    return head + "\n" + events.table(sort_by=key, row_limit=40, max_name_column_width=70)


def curriculum(configs: dict[str, Config], device: torch.device, args,
               save: Callable[[dict], None]) -> dict[str, dict]:
    """The fast path at every distinct (rho, B) shape of each config's schedule, timed in one
    round robin: each repeat times every (config, shape) once, so a drift of the machine's speed
    during the run (clocks, other load) spreads over all of them instead of biasing the ones
    timed last, and R4's projected epoch time against R1 and R3 compares steps timed side by
    side. The views so far are saved after each repeat."""
    # with --cuda-graph, every config's graphs in one memory pool: they never run at once, and
    # separate pools would each keep their own activations
    pool = torch.cuda.graph_pool_handle() if args.cuda_graph else None
    runs = {Path(path).stem: _schedule(path, cfg, device, args, pool)
            for path, cfg in configs.items()}
    for run in runs.values():
        for ratio, batch in run["keys"]:
            for _ in range(args.warmup):
                run["trainer"].step(*run["batches"][batch], ratio)
    views = {}
    for _ in range(args.repeats):
        for run in runs.values():
            for ratio, batch in run["keys"]:
                with GpuUtilization(device) as util:
                    run["times"][ratio, batch].append(
                        run["trainer"].time(*run["batches"][batch], ratio, args.steps))
                run["utils"][ratio, batch].append(util.mean())
        views = {stem: _view(run) for stem, run in runs.items()}
        _project(views)
        save(views)
    return views


def _schedule(path: str, cfg: Config, device: torch.device, args,
              pool: tuple | None = None) -> dict:
    """One config's curriculum at B0 = args.batch: its epochs, distinct shapes, a batch for each
    (slices of one batch of the largest size: 9.6 MB of video per sample at paper size) and a
    fast-path trainer."""
    # The config's own plan, scaled to args.batch: each epoch's forward pass is timed at
    # args.batch / (samples per pass at B0) of its size, to the nearest sample, and its step
    # is that pass times the epoch's passes per step over B0's. r4.toml runs passes of 8 at
    # B0 = 2048 (the paper's 2048 on 256 GPUs), each growing in whole samples, so they are
    # timed as passes of 32, 36, 40, ... at args.batch = 32; in 256 passes per step that
    # rounding alone moves its FLOPs per step by up to +-4.5 % under the flops rule at paper
    # size, and train.passes_per_step = "fit" (243 to 265 passes) by +-0.19 %. Without
    # micro-batches the one pass of B_e is timed at args.batch / B0 of it.
    t = cfg.train
    per_pass = t.pass_size  # at B0
    scale, base_passes = args.batch / per_pass, t.batch_size // per_pass
    epochs = [{"epoch": p.epoch, "mask_ratio": p.mask_ratio,
               "batch": max(1, round(p.micro_batch * scale)), "passes": p.passes / base_passes}
              for p in plan_epochs(cfg, args.clips)]
    keys = list(dict.fromkeys((e["mask_ratio"], e["batch"]) for e in epochs))
    largest = batch_for(cfg, max(b for _, b in keys), device)
    return {"path": path, "cfg": cfg, "epochs": epochs, "keys": keys, "clips": args.clips,
            "passes_per_step": "fit" if fits_passes(t) else "fixed",
            "flops": forward_flops_per_sample(cfg, {e["mask_ratio"] for e in epochs}),
            "trainer": Trainer(cfg, device, fast=True, compile_model=args.compile, state=None,
                               cuda_graph=args.cuda_graph, pool=pool,
                               compile_mode=args.compile_mode,
                               residual_dtype=_residual_dtype(args), attention=args.attention),
            "batches": {b: tuple(x if x is None else x[:b] for x in largest)
                        for b in {b for _, b in keys}},
            "times": {key: [] for key in keys}, "utils": {key: [] for key in keys}}


def _view(run: dict) -> dict:
    """Per-epoch step time, throughput, work and utilisation of one config's curriculum, from
    the medians of its shapes' timings so far. A step is `passes` (relative to B0's count)
    passes of `batch` samples; an epoch covers the dataset (--clips) in whole steps."""
    cfg, flops = run["cfg"], run["flops"]
    shapes = {key: {"step_ms": statistics.median(run["times"][key]),
                    "gpu_util": _mean(run["utils"][key])} for key in run["keys"]}
    epochs = []
    for e in run["epochs"]:
        shape = shapes[e["mask_ratio"], e["batch"]]
        samples, ms = e["batch"] * e["passes"], shape["step_ms"] * e["passes"]
        steps = int(run["clips"] // samples)
        work = work_per_step(cfg, flops, e["mask_ratio"], samples)
        epochs.append({**e, "steps": steps, "step_ms": ms, "samples_per_s": samples / ms * 1e3,
                       "tokens_per_step": work["tokens"], "tflop_per_step": work["flops"] / 1e12,
                       "gpu_util": shape["gpu_util"], "epoch_s": steps * ms / 1e3})
    step_ms = [e["step_ms"] for e in epochs]
    work = [e["tflop_per_step"] for e in epochs]
    return {"config": run["path"], "shapes": len(shapes), "epochs": epochs,
            "batch_rule": cfg.train.adaptive_batch_rule if cfg.train.adaptive_batch else "fixed",
            "passes_per_step": run["passes_per_step"],
            "repeats": len(next(iter(run["times"].values()))),
            "mean_epoch_s": statistics.mean(e["epoch_s"] for e in epochs),
            "step_ms_spread": spread(step_ms), "flops_spread": spread(work)}


def _plot(views: dict, out: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, left = plt.subplots(figsize=(8, 4))
    right = left.twinx()
    for name, view in views.items():
        epochs = [e["epoch"] for e in view["epochs"]]
        left.plot(epochs, [e["samples_per_s"] for e in view["epochs"]], label=f"{name} samples/s")
        util = [e["gpu_util"] for e in view["epochs"]]
        if all(u is not None for u in util):
            right.plot(epochs, util, "--", label=f"{name} GPU util %")
    left.set_xlabel("epoch")
    left.set_ylabel("samples/s")
    right.set_ylabel("GPU utilisation %")
    handles, labels = (a + b for a, b in zip(left.get_legend_handles_labels(),
                                              right.get_legend_handles_labels()))
    left.legend(handles, labels, loc="upper left")
    fig.tight_layout()
    fig.savefig(out)
    return f"wrote {out}"


def _print_comparison(records: list, title: str) -> None:
    rows = []
    for r in records:
        for path_name in ("reference", "fast"):
            p = r[path_name]
            rows.append([Path(r["config"]).stem, path_name, str(r["batch"]), f"{p['step_ms']:.1f}",
                         f"{p['samples_per_s']:.1f}", f"{p['tokens_per_s']:.0f}",
                         f"{r['flops_per_step'] / 1e12:.4g}", f"{p['tflops']:.3g}",
                         "-" if p["mfu"] is None else f"{p['mfu']:.1%}",
                         "-" if p["peak_memory_gb"] is None else f"{p['peak_memory_gb']:.2f}",
                         "-" if p["gpu_util"] is None else f"{p['gpu_util']:.0f}%",
                         "-" if p["warmup_s"] is None else f"{p['warmup_s']:.1f}",
                         f"{r['speedup']:.2f}x" if path_name == "fast" else ""])
    print_table(title, ["config", "path", "B", "step ms", "samples/s", "vis tokens/s",
                        "TFLOP/step", "TFLOP/s", "MFU", "peak GB", "GPU util", "warm-up s",
                        "speedup"], rows)


def _print_view(stem: str, view: dict) -> None:
    runs = []  # consecutive epochs at one shape share a row
    for e in view["epochs"]:
        if runs and runs[-1][0]["mask_ratio"] == e["mask_ratio"]:
            runs[-1].append(e)
        else:
            runs.append([e])
    fit = view.get("passes_per_step") == "fit"
    rule = view["batch_rule"] + (", passes fit" if fit else "")
    print_table(f"Curriculum view {stem} (batch: {rule}): {view['shapes']} "
                f"shapes, per-epoch step time within ±{view['step_ms_spread']:.1%} of its mean, "
                f"FLOPs per step within ±{view['flops_spread']:.1%}",
                ["epochs", "rho", "B x passes / B0's" if fit else "B", "step ms", "samples/s",
                 "tokens/step", "TFLOP/step", "GPU util", "epoch s"],
                [[f"{r[0]['epoch']}-{r[-1]['epoch']}", f"{r[0]['mask_ratio']:.2f}",
                  f"{r[0]['batch']} x {r[0]['passes']:.3f}" if fit else str(r[0]["batch"]),
                  f"{r[0]['step_ms']:.1f}", f"{r[0]['samples_per_s']:.1f}",
                  f"{r[0]['tokens_per_step']:.0f}", f"{r[0]['tflop_per_step']:.4g}",
                  "-" if r[0]["gpu_util"] is None else f"{r[0]['gpu_util']:.0f}%",
                  f"{r[0]['epoch_s']:.0f}"] for r in runs])


def _project(views: dict) -> None:
    """R4's projected epoch time relative to R1 and R3, where their views exist."""
    for base in ("r1", "r3"):
        if "r4" in views and base in views:
            views["r4"][f"relative_to_{base}"] = (views["r4"]["mean_epoch_s"]
                                                  / views[base]["mean_epoch_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=CONFIGS)
    parser.add_argument("--size", choices=["tiny", "small", "base"], default=None,
                        help="model size (default: base on CUDA, small on a CPU)")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="B0 (default 32 CUDA, 8 CPU)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="steps per timing (default 5 CUDA, 2 CPU)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timings per path, interleaved; the median is reported, each "
                             "kept in the record (step_ms_repeats)")
    parser.add_argument("--warmup", type=positive_int, default=2,
                        help="untimed steps per path and shape first (compiles, autotunes)")
    parser.add_argument("--clips", type=positive_int, default=1_900_000,
                        help="dataset size for the projected epoch times (AS-2M)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the fast path's transformer blocks (regional torch.compile)")
    parser.add_argument("--compile-mode", choices=["default", "max-autotune"], default="default",
                        help="with --compile: Inductor's mode (max-autotune: Triton matmul "
                             "templates with fused epilogues where faster than cuBLAS)")
    parser.add_argument("--residual", choices=["fp32", "bf16"], default="fp32",
                        help="the residual stream under bf16 autocast, on both paths "
                             "(train.residual_precision; bf16 needs CUDA)")
    parser.add_argument("--attention", choices=["auto", "triton"], default="auto",
                        help="the fast path's attention backend (model.attention; triton: the "
                             "Triton sequence kernels, kernels/attention.py)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay the fast path's whole step as a CUDA graph per shape (CUDA)")
    parser.add_argument("--no-curriculum", action="store_true",
                        help="skip the curriculum views: the comparison alone")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the reference-vs-fast comparison: curriculum views only")
    parser.add_argument("--compare-first", action="store_true",
                        help="compare the paths on the first config only (the curriculum views "
                             "still cover every config)")
    parser.add_argument("--batch-rule", choices=["tokens", "flops"], default=None,
                        help="train.adaptive_batch_rule for configs with the adaptive batch "
                             "(default: each config's own; the paper's is tokens)")
    parser.add_argument("--passes", choices=["fixed", "fit"], default=None,
                        help="train.passes_per_step for configs with the adaptive batch and "
                             "micro-batches (default: each config's own, fixed)")
    parser.add_argument("--profile", action="store_true",
                        help="profile the fast path of the first config: where a step's time goes")
    add_results_option(parser)
    args = parser.parse_args(argv)
    if args.no_compare and args.no_curriculum and not args.profile:
        parser.error("--no-compare with --no-curriculum leaves nothing to measure")
    if args.compile_mode != "default" and not args.compile:
        parser.error("--compile-mode needs --compile")
    cuda = torch.cuda.is_available()
    if args.cuda_graph and not cuda:
        parser.error("--cuda-graph needs a CUDA GPU")
    if args.residual == "bf16" and not cuda:
        parser.error("--residual bf16 needs a CUDA GPU (the bench runs fp32 on a CPU)")
    if args.cuda_graph and args.warmup < 2:
        parser.error("--cuda-graph needs --warmup >= 2 (an eager step per shape, then capture)")
    device = torch.device("cuda" if cuda else "cpu")
    args.size = args.size or ("base" if cuda else "small")
    default_batch = 32 if cuda else 8
    args.batch = args.batch or default_batch
    args.steps = args.steps or (5 if cuda else 2)
    peak, peak_source = device_peak_flops(device, torch.bfloat16 if cuda else torch.float32)
    name = device_name(device)
    slug = file_slug(name)
    # variants get their own record, so a run of one never overwrites the default's
    variant = "".join(suffix for suffix, on in ((f"-b{args.batch}", args.batch != default_batch),
                                                ("-compile", args.compile),
                                                ("-autotune", args.compile_mode != "default"),
                                                ("-res16", args.residual == "bf16"),
                                                ("-triton", args.attention == "triton"),
                                                ("-graph", args.cuda_graph),
                                                (f"-{args.batch_rule}", args.batch_rule),
                                                ("-fit", args.passes == "fit"),
                                                ("-first", args.compare_first),
                                                ("-views", args.no_compare
                                                 and not args.no_curriculum)) if on)
    env = environment(device)
    args.results.mkdir(parents=True, exist_ok=True)

    def save(records: list, views: dict) -> Path:
        out = args.results / f"throughput-{slug}-{args.size}{variant}.json"
        write_json(out, {
            "bench": "throughput", **env, "peak": peak_source, "size": args.size,
            "batch": args.batch, "kernels_env": kernels.kernels_enabled(True),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "configs": records, "curriculum": views})
        return out

    try:
        configs = {path: load_config(config_path(path),
                                     {"model.size": args.size}) for path in args.configs}
    except ConfigError as err:
        parser.error(str(err))
    for cfg in configs.values():
        cfg.train.adaptive_batch_rule = args.batch_rule or cfg.train.adaptive_batch_rule
        cfg.train.passes_per_step = args.passes or cfg.train.passes_per_step
    # R3 and R4's schedules, and R1 (one shape), the baseline of R4's projected epoch time
    # (paper Table 2), timed as R4 is: fast path alone at B0 (the comparison halves R1's batch
    # where its reference path runs out of memory: it peaked at 98.9 GB at B = 32 on an H200)
    viewed = {} if args.no_curriculum else {
        path: cfg for path, cfg in configs.items()
        if cfg.mask.schedule == "linear" or Path(path).stem == "r1"}
    for path, cfg in viewed.items():  # a schedule the clips cannot fill: before any timing
        try:
            plan_epochs(cfg, args.clips)
        except ConfigError as err:
            parser.error(f"--clips {args.clips}, {path}: {err}")
    records = []  # saved after each config and view: a run cut short keeps what it measured
    compared = ({} if args.no_compare else
                dict(list(configs.items())[:1]) if args.compare_first else configs)
    for path, cfg in compared.items():
        records.append(compare(path, cfg, device, args, peak))
        save(records, {})
    if args.profile:
        path, cfg = next(iter(configs.items()))
        batch = records[0]["batch"] if records else args.batch
        text = profile(Path(path).stem, cfg, device, args, batch)
        release_memory(device)
        out = args.results / f"profile-{slug}-{Path(path).stem}{variant}.txt"
        out.write_text(text + "\n")
        print(text, f"\nwrote {out}", sep="\n")
    if records:
        _print_comparison(records, f"Training step, {args.size} size, {name} "
                                   f"(peak: {peak_source})")

    views = curriculum(viewed, device, args, lambda views: save(records, views)) if viewed else {}
    release_memory(device)
    for stem, view in views.items():
        _print_view(stem, view)
    if "relative_to_r1" in views.get("r4", {}):
        print(f"projected R4 epoch time: {views['r4']['relative_to_r1']:.2f}x of R1 "
              "(paper: 0.82x)")
    if "relative_to_r3" in views.get("r4", {}):
        print(f"projected R4 epoch time: {views['r4']['relative_to_r3']:.2f}x of R3")
    if not (records or views):  # a profile alone
        return 0
    out = save(records, views)
    print(f"wrote {out}")
    if views:
        print(_plot(views, out.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
