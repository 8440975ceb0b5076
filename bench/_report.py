"""Helpers shared by the benchmarks: a table (rich when installed, plain text otherwise, since
the GPU image may lack rich), the commit, the device name and what a record says of its
machine, and a call's time: on the GPU from the profiler, on a CPU by the clock."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from fastmavil.files import write_atomically

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def add_results_option(parser) -> None:
    """--results DIR: where a bench writes its records (bench/results holds the committed ones,
    which a quick check would overwrite)."""
    parser.add_argument("--results", type=Path, default=RESULTS, metavar="DIR",
                        help="folder for the records (default: bench/results, where the "
                             "committed records are; give another for a quick check)")


def config_path(text: str) -> Path:
    """A config named on the command line: the path as given where it exists, else under the
    repository's root (`configs/r4.toml` from anywhere)."""
    path = Path(text)
    return path if path.exists() else ROOT / path


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        import argparse
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        print(title)
        for line in (columns, *rows):
            print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(Console().width, 150)).print(table)


def commit() -> str:
    """FASTMAVIL_COMMIT if set (a copied tree's git metadata can be stale), else git's HEAD with
    "+dirty" when tracked files other than benchmark records differ from it."""
    if os.environ.get("FASTMAVIL_COMMIT"):
        return os.environ["FASTMAVIL_COMMIT"]
    try:
        def git(*args: str) -> str:  # the repository's, wherever the bench runs from
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=ROOT).stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                    ":!bench/results")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment(device: torch.device) -> dict:
    """What every record says of the run's machine and code: the device, the versions (CUDA's
    and the driver's on a GPU) and the commit."""
    env = {"device": device_name(device), "torch": torch.__version__,
           "triton": triton_version(), "python": platform.python_version(), "commit": commit()}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        try:
            import pynvml
            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # no pynvml, or NVML failed: the record goes without it
            env["driver"] = None
    return env


def write_json(path: Path, record) -> None:
    """Writes `record` whole or not at all: a run stopped mid-write (a time limit) leaves the
    previous file, never a truncated one."""
    write_atomically(path, json.dumps(record, indent=2) + "\n")


def file_slug(name: str) -> str:
    """A device name as the records' file names carry it ("NVIDIA H200" -> NVIDIA_H200)."""
    return name.replace(" ", "_").replace("/", "_")


def kernel_rows(events) -> list:
    """The device-kernel rows of a profiler's key_averages(): an operator's own row repeats the
    time of the kernels it launched, so device time is summed over these alone."""
    from torch.autograd import DeviceType
    return [e for e in events if e.device_type == DeviceType.CUDA]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model: what the records' file names carry."""
    from fastmavil.train.launches import cpu_model
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def gpu_time_ms(fn, reps: int = 20) -> tuple[float | None, list[tuple[str, float, float]]]:
    """Milliseconds of GPU kernels per call, from the profiler: the device time alone, without
    the host's launch overhead, which dominates do_bench at these sizes and which a training step
    hides (its host runs ahead of the GPU); and the kernels it is made of (`breakdown`). None,
    with a warning, when the profiler saw no kernel (a CUDA-only trace can come back empty),
    rather than a time of zero."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    parts = breakdown(kernel_rows(prof.key_averages()), reps)
    total = sum(us for _, us, _ in parts)
    if total <= 0:
        print("warning: the profiler recorded no GPU kernel; device time left empty")
        return None, parts
    return total / 1e3, parts


def breakdown(rows, reps: int) -> list[tuple[str, float, float]]:
    """(kernel name, microseconds per call, launches per call) of the profiler's kernel rows,
    longest first: which part of a backward holds the time."""
    parts = [(e.key, e.self_device_time_total / reps, e.count / reps) for e in rows]
    return sorted(parts, key=lambda part: -part[1])


# What a training step's device time is spent on, by kernel name (lower case), the first
# match deciding: the MFU question is how much goes to matmuls and attention, and how much to
# everything around them. Attention comes first (its kernels' names also say flash, cutlass or
# wgmma); torch.compile's kernels are named triton_*.
KERNEL_CATEGORIES = (
    ("attention", ("fmha", "flash", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "wgmma", "cublas", "splitk")),
    ("Triton (torch.compile)", ("triton_",)),
    ("optimizer", ("multi_tensor_apply", "adam")),
    ("LayerNorm", ("layer_norm", "layernorm", "gammabeta")),
    ("reduction", ("reduce_kernel",)),
    ("copy, cast, fill", ("copy", "memcpy", "memset", "fill")),
    ("other elementwise", ("elementwise",)),
)


def project_kernels() -> dict[str, str]:
    """fastmavil's own Triton functions (kernels, and the helpers they inline), by the name a
    profiler shows, each with the module that defines it."""
    import importlib
    import pkgutil

    import kernels
    found = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"kernels.{info.name}")
        for value in vars(module).values():
            if (type(value).__name__ in ("JITFunction", "InterpretedFunction")
                    and value.fn.__module__ == module.__name__):
                found[value.__name__] = info.name
    return found


def kernel_category(name: str, project: dict[str, str]) -> str:
    if name in project:
        return ("attention" if project[name] in ("window_attention", "attention")
                else "Triton (fastmavil)")
    lower = name.lower()
    return next((category for category, parts in KERNEL_CATEGORIES
                 if any(part in lower for part in parts)), "other")


def time_by_category(rows, steps: int) -> list[tuple[str, float, float]]:
    """(category, device ms per step, launches per step) of a profile's kernel rows, longest
    first."""
    project = project_kernels()
    sums: dict[str, list[float]] = {}
    for e in rows:
        total = sums.setdefault(kernel_category(e.key, project), [0.0, 0.0])
        total[0] += e.self_device_time_total / 1e3 / steps
        total[1] += e.count / steps
    return sorted(((c, ms, n) for c, (ms, n) in sums.items()), key=lambda row: -row[1])


def wall_times_ms(fn, reps: int) -> list[float]:
    """Milliseconds of each of `reps` calls after one warm-up call (a CPU's timing: on a GPU the
    host's clock sees launches, not the work)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times
