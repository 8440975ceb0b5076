"""The trainer's own speed, as `fastmavil-train` runs it, on random clips (no data, no decoder).

    python -m bench.train                   # R4 at paper size on CUDA (small on a CPU)
    python -m bench.train --compile         # and with compiled blocks + CUDA graphs
    python -m bench.train --compile --kinds compiled --residual bf16   # the fastest setting only

bench.throughput times the model's step; this runs the whole trainer (its loop, the copy of
each batch to the device, gradient accumulation, clipping, the AdamW step, logging) with
`--data.random_clips`, once per variant in its own process: eager, and with the passes replayed
as CUDA graphs (`train.cuda_graphs`, CUDA only), each in one pass of B0 samples per step and
in passes of `--micro` samples (r4.toml's 8, the paper's per-GPU share). The masking ratio is
fixed at 0.8 (R4's curriculum ends there) and the batch at B0, so every step has one shape.
Step time, samples/s, MFU and GPU utilisation are the trainer's own log records (metrics.jsonl)
after the first, which holds the warm-up (Triton autotuning, graph capture, compilation); peak
memory is the trainer's too. --kinds picks the kinds of variant to run (compiled, graphs, eager),
--residual and --compile-mode pass train.residual_precision and train.compile_mode to every run.
Writes bench/results/train-<device>-<size>[-<options>].json: a suffix per option off its
default (e.g. -b64-m32-compile-compiled-res16), so runs of other settings keep their records.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fastmavil.config import ConfigError, load_config

from ._report import (ROOT, add_results_option, config_path, device_name, environment, file_slug,
                      positive_int, print_table, write_json)


KINDS = ("compiled", "graphs", "eager")


def variants(b0: int, micro: int, cuda: bool, compile_blocks: bool,
             kinds: tuple[str, ...] = KINDS) -> dict[str, dict]:
    """{name: overrides}, in the order they run: the graphed ones first (on CUDA only: the
    trainer refuses them elsewhere), passes of `micro` (the paper's setting) before one pass of
    B0, so that a run cut short by a time limit loses the least telling ones. `kinds` keeps
    those of KINDS: compiled blocks with CUDA graphs (with compile_blocks), CUDA graphs, eager."""
    passes = {}
    if micro < b0:
        passes[f"{b0 // micro} passes of {micro}"] = {"train.micro_batch_size": str(micro)}
    passes[f"1 pass of {b0}"] = {"train.micro_batch_size": str(b0)}
    out = {}
    for shape, over in passes.items():
        if cuda and compile_blocks and "compiled" in kinds:
            out[f"compiled + CUDA graphs, {shape}"] = {**over, "train.cuda_graphs": "true",
                                                       "train.compile": "true"}
        if cuda and "graphs" in kinds:
            out[f"CUDA graphs, {shape}"] = {**over, "train.cuda_graphs": "true"}
    if "eager" in kinds:
        for shape, over in passes.items():
            out[f"eager, {shape}"] = over
    return out


def run_trainer(config: str, overrides: dict, run_dir: Path, timeout: float) -> list[dict]:
    """One trainer run in its own process; its metrics records (raises with its output's tail
    when it fails)."""
    argv = [sys.executable, "-m", "fastmavil.train.pretrain", config,
            *(x for k, v in overrides.items() for x in (f"--{k}", v))]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv[2:])} exited {done.returncode}:\n"
                           + (done.stdout + done.stderr)[-3000:])
    metrics = run_dir / overrides["run.name"] / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def summarise(records: list[dict]) -> dict:
    """Medians over the log intervals after the first (the warm-up's)."""
    timed = records[1:] or records
    def median(key):
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(values) if values else None
    return {"intervals": len(timed), "step_ms": median("step_ms"),
            "samples_per_s": median("samples_per_s"), "tflops": median("tflops"),
            "mfu": median("mfu"), "gpu_util": median("gpu_util"),
            "data_wait": median("data_wait"),
            "peak_memory_gb": max(r["peak_memory_gb"] for r in records),
            "warmup_step_ms": records[0]["step_ms"]}


def _run_space() -> str | None:
    """Where the runs write: in memory (/dev/shm) when it can hold a run's final checkpoint
    (2.9 GB at base size, written and fsynced per variant), else the default temporary folder."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > 8e9 else None


def _cell(value, form: str) -> str:
    return "-" if value is None else format(value, form)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/r4.toml")
    parser.add_argument("--size", choices=["tiny", "small", "base"], default=None,
                        help="model size (default: base on CUDA, small on a CPU)")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="B0 (default 32 CUDA, 8 CPU)")
    parser.add_argument("--micro", type=positive_int, default=8, help="samples per pass of "
                        "the accumulating variants (r4.toml's 8)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="steps per run (default 40 CUDA, 6 CPU), logged every steps / 4")
    parser.add_argument("--compile", action="store_true",
                        help="also compiled blocks with CUDA graphs (minutes of compilation)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                        help="the kinds of variant to run (default: all; compiled needs "
                        "--compile, compiled and graphs need CUDA)")
    parser.add_argument("--residual", choices=["fp32", "bf16"], default="fp32",
                        help="train.residual_precision (bf16 needs CUDA)")
    parser.add_argument("--compile-mode", choices=["default", "max-autotune"],
                        default="default", help="train.compile_mode of the compiled variants")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run")
    add_results_option(parser)
    args = parser.parse_args(argv)
    config = str(config_path(args.config).resolve())  # the runs start in the repository root
    try:  # here, rather than in each run's process
        load_config(config)
    except ConfigError as err:
        parser.error(str(err))
    cuda = torch.cuda.is_available()
    size = args.size or ("base" if cuda else "small")
    b0 = args.batch or (32 if cuda else 8)
    steps = args.steps or (40 if cuda else 6)
    every = max(1, steps // 4)
    if not 1 <= args.micro <= b0 or b0 % args.micro:
        parser.error(f"--micro {args.micro} must divide B0 = {b0}")
    if args.residual == "bf16" and not cuda:
        parser.error("--residual bf16 needs a CUDA GPU (bf16 autocast)")
    runs = variants(b0, args.micro, cuda, args.compile, tuple(args.kinds))
    if not runs:
        parser.error(f"--kinds {' '.join(args.kinds)}: nothing to run here (compiled needs "
                     "--compile, compiled and graphs need CUDA)")
    device = torch.device("cuda" if cuda else "cpu")
    name, env = device_name(device), environment(device)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = Path(config).stem
    suffix = "".join(part for part, on in (
        (f"-{stem}", stem != "r4"), (f"-b{b0}", args.batch is not None),
        (f"-m{args.micro}", args.micro != 8), ("-compile", args.compile),
        (f"-{'-'.join(args.kinds)}", tuple(args.kinds) != KINDS),
        ("-autotune", args.compile_mode == "max-autotune"),
        ("-res16", args.residual == "bf16")) if on)
    out = args.results / f"train-{file_slug(name)}-{size}{suffix}.json"
    results, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="bench-train-", dir=_run_space()) as tmp:
        for label, over in runs.items():
            if "train.compile" in over:
                over = {**over, "train.compile_mode": args.compile_mode}
            overrides = {"train.residual_precision": args.residual,
                         "model.size": size, "data.random_clips": str(b0 * steps),
                         "mask.schedule": "fixed", "mask.start": "0.8", "mask.end": "0.8",
                         "train.adaptive_batch": "false", "train.batch_size": str(b0),
                         "train.max_steps": str(steps), "train.log_every": str(every),
                         "train.ckpt_every": str(10 * steps), "train.keep_checkpoints": "1",
                         "run.dir": tmp, "run.name": f"run{len(results)}", **over}
            try:
                r = results[label] = summarise(run_trainer(config, overrides, Path(tmp),
                                                           args.timeout))
                rows.append([label, *(_cell(r[key], form) for key, form in (
                    ("step_ms", ".1f"), ("samples_per_s", ".1f"), ("mfu", ".1%"),
                    ("gpu_util", ".0f"), ("peak_memory_gb", ".1f")))])
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                print(f"{label}: failed: {err}")
                results[label] = {"error": str(err)[-3000:]}
                rows.append([label, "failed", "-", "-", "-", "-"])
            shutil.rmtree(Path(tmp) / overrides["run.name"], ignore_errors=True)  # its checkpoint
            # after each run: a stage cut short keeps what it measured
            write_json(out, {
                "bench": "train", **env, "config": args.config, "size": size, "batch": b0,
                "micro": args.micro, "residual": args.residual,
                "compile_mode": args.compile_mode, "mask_ratio": 0.8, "steps": steps,
                "log_every": every, "variants": results})
    print_table(f"fastmavil-train {Path(args.config).stem}, {size}, B0 = {b0}, rho 0.8, "
                f"random clips, {name}: medians of the log intervals after the first",
                ["variant", "step ms", "samples/s", "MFU", "GPU util %", "peak GB"], rows)
    print(f"wrote {out}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
