"""Measurements for the training loop and benchmarks: peak FLOP/s and MFU, peak memory, GPU
utilisation, step time and data-wait share, and the metrics.jsonl (+ TensorBoard) writer.

Nothing here synchronises the host with the GPU except where reading a measurement is the
point (`StepTimer.summary` with `sync`, tensors passed to `MetricsWriter.write`), so the loop
can call these helpers on every step.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..files import write_atomically

log = logging.getLogger("fastmavil.train")

# Dense peak TFLOP/s (no 2:4 sparsity) from the NVIDIA H100, H200 and A100 datasheets, whose
# headline Tensor Core figures are with sparsity, twice these. fp32 is the non-tensor-core rate;
# tf32 applies to fp32 matmuls when torch.get_float32_matmul_precision() is "high" or "medium".
_H100_SXM = {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": _H100_SXM,
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H200": _H100_SXM,  # same GH100 die and clocks as H100 SXM; only the memory differs
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}

# Device-name fragment -> PEAK_TFLOPS row, most specific first: "NVIDIA H100 PCIe" must not
# match the bare "H100" (SXM, e.g. "NVIDIA H100 80GB HBM3"). A100 PCIe and SXM share dense peaks.
# H100 NVL and H200 NVL (lower clocks) fall on the H100 SXM and H200 rows: their MFU reads low.
_NAME_FRAGMENTS = (("H100 PCIe", "H100 PCIe"), ("H100", "H100 SXM"), ("H200", "H200"),
                   ("A100", "A100"))

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _gpu_row(name: str) -> str | None:
    """The PEAK_TFLOPS row whose fragment occurs in the device name (case-insensitive)."""
    for fragment, row in _NAME_FRAGMENTS:
        if fragment.lower() in name.lower():
            return row
    return None


def _dtype_key(dtype: torch.dtype, tf32: bool) -> str | None:
    key = _DTYPE_KEYS.get(dtype)
    return "tf32" if key == "fp32" and tf32 else key


def gpu_peak_flops(name: str, dtype: torch.dtype, tf32: bool) -> float | None:
    """Dense peak FLOP/s of the named GPU for matmuls in `dtype`; None when unknown, so MFU is
    left out rather than computed against a wrong peak."""
    row, key = _gpu_row(name), _dtype_key(dtype, tf32)
    if row is None or key is None:
        return None
    return PEAK_TFLOPS[row][key] * 1e12


@functools.lru_cache(maxsize=None)
def _cpu_matmul_peak(dtype: torch.dtype, size: int, seconds: float, threads: int) -> float:
    # `threads` is only part of the cache key: the matmul uses torch's current thread count.
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    for _ in range(2):  # warm-up: first calls pay for allocation and kernel selection
        torch.mm(a, b, out=out)
    flops_per_matmul = 2 * size ** 3
    trials = 3
    best = 0.0
    for _ in range(trials):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / trials:
            torch.mm(a, b, out=out)
            count += 1
        best = max(best, count * flops_per_matmul / elapsed)
    return best


def measure_cpu_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 1024,
                            seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul on this CPU with torch's current thread count: the best of a
    few timed trials after a warm-up. Cached per (dtype, size, seconds, threads), so a run pays
    for the measurement once."""
    return _cpu_matmul_peak(dtype, size, seconds, torch.get_num_threads())


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s for matmuls in `dtype`, where the figure comes from) for MFU: the datasheet
    on CUDA, a measured matmul on CPU, None where neither applies.

    The CPU peak is always the fp32 matmul's: CPUs without bf16/fp16 matrix units run those
    dtypes far slower (measuring one 1024^3 bf16 matmul can take seconds), so fp32 is what the
    CPU can do at best and MFU says how much of that a run uses.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = torch.get_float32_matmul_precision() != "highest"  # fp32 matmuls run as TF32
        peak, row = gpu_peak_flops(name, dtype, tf32), _gpu_row(name)
        if peak is None:
            return None, f"no datasheet peak for {name!r} {dtype}"
        return peak, f"{row} datasheet {_dtype_key(dtype, tf32)}"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return measure_cpu_matmul_peak(), f"measured CPU matmul fp32, {threads} threads"
    return None, f"no peak for device type {device.type!r}"


def tflops(flops: float, seconds: float) -> float:
    """Achieved TFLOP/s: `flops` done in `seconds`."""
    return flops / seconds / 1e12


def mfu(model_flops_per_step: float, step_seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation, a fraction of `peak` FLOP/s; None when the peak is unknown.

    `model_flops_per_step` counts forward and backward, which the caller takes as 3x the forward
    FLOPs (backward costs twice the forward); recomputation is not counted, as MFU defines it.
    """
    if peak is None:
        return None
    return model_flops_per_step / step_seconds / peak


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since the last `reset_peak_memory`: tensors allocated on a CUDA device, or the
    peak resident set of the whole process on CPU (which cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for `peak_memory_bytes` on CUDA; a no-op on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def nvml_index(torch_index: int, visible: str | None = None) -> int:
    """The NVML (physical) index of torch's CUDA device `torch_index`.

    `visible` defaults to $CUDA_VISIBLE_DEVICES. Only a list of integers is mapped; UUIDs, MIG
    names and anything else fall back to the torch index, which may then name another GPU. NVML
    numbers GPUs in PCI bus order: this also assumes CUDA_DEVICE_ORDER=PCI_BUS_ID or identical
    GPUs, where CUDA's default fastest-first order is the same.
    """
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    entries = [entry.strip() for entry in visible.split(",")]
    if all(entry.isdigit() for entry in entries) and torch_index < len(entries):
        return int(entries[torch_index])
    return torch_index


class GpuUtilization:
    """Mean GPU utilisation (NVML's percent of time a kernel was running) sampled by a daemon
    thread every `interval` seconds after `start()` and once at `stop()`; `close()`, or the end
    of a `with` block, also releases NVML, after which it is inert (`mean()` keeps its samples).

    Inert, with `mean()` None, when pynvml (package nvidia-ml-py) is missing, the device is not
    CUDA or NVML fails; the reason is logged once and nothing raises, so a run never stops for
    a missing utilisation figure.
    """

    def __init__(self, device: torch.device, interval: float = 0.1):
        self.interval = interval
        self._lock = threading.Lock()
        self._total = 0.0
        self._count = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml, self._handle = None, None
        reason = self._open(torch.device(device))
        if reason is not None:
            log.info("GPU utilisation not reported: %s", reason)

    def _open(self, device: torch.device) -> str | None:
        """Connect to NVML for `device`; the reason it cannot, or None."""
        if device.type != "cuda" or not torch.cuda.is_available():
            return f"no CUDA device ({device})"
        try:
            import pynvml
        except ImportError:
            return "pynvml is not installed (pip install nvidia-ml-py)"
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            pynvml.nvmlInit()
        except Exception as error:  # pynvml.NVMLError and driver mismatches alike
            return f"NVML failed: {error}"
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index(index))
        except Exception as error:
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()
            return f"NVML failed: {error}"
        self._nvml = pynvml
        return None

    def _sample(self) -> None:
        # NVML's figure covers its own last sample period (1/6 s to 1 s, by GPU): read at start,
        # it describes the time before the window (the likely reason a 225 ms window of graphed
        # steps read 51 % on an H200 where the same step read 97 %). So: after each interval,
        # and once at stop.
        while True:
            stopped = self._stop.wait(self.interval)
            try:
                percent = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
            except Exception as error:  # e.g. the GPU fell off the bus: keep training without it
                log.warning("GPU utilisation sampling stopped: %s", error)
                return
            with self._lock:
                self._total += percent
                self._count += 1
            if stopped:
                return

    def start(self) -> None:
        """Start sampling (no-op when inert or already started)."""
        if self._nvml is None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="gpu-utilization", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling; the samples taken so far stay for `mean()`."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def mean(self) -> float | None:
        """Mean utilisation in percent over the samples since the last `reset()`; None when inert
        or nothing has been sampled yet."""
        with self._lock:
            return self._total / self._count if self._count else None

    def reset(self) -> None:
        """Forget the samples taken so far (sampling goes on if started)."""
        with self._lock:
            self._total, self._count = 0.0, 0

    def close(self) -> None:
        """Stop sampling and release NVML (whose init is reference-counted); `mean()` keeps the
        samples taken."""
        self.stop()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception as error:  # nothing to keep a run from finishing for
                log.info("NVML shutdown failed: %s", error)
            self._nvml = None

    def __enter__(self) -> GpuUtilization:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _json_value(value):
    """A record value as JSON can hold it: tensors and numpy scalars via .item(), and non-finite
    floats as null, since NaN and Infinity are not valid JSON."""
    if isinstance(value, (torch.Tensor, np.generic)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends one JSON object per line to `run_dir/metrics.jsonl`, and the numeric fields as
    TensorBoard scalars `train/<key>` at the record's step under `run_dir/tensorboard`.

    The file is opened for appending, so a resumed run continues it (from `start_step`: records
    past it are dropped first), and synced to disk after every record (one per log interval),
    so a crash, even of the machine, loses nothing written. Records are flat dicts; NaN and
    infinities are written as null. Tensor values are read with .item(), a host sync on CUDA,
    so write at log intervals. `tensorboard`: None uses
    it if the package is installed, True requires it, False turns it off.
    """

    def __init__(self, run_dir: Path, tensorboard: bool | None = None,
                 start_step: int | None = None):
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        # An earlier attempt may have logged steps past the checkpoint this run starts from
        # (a crash before its next checkpoint): they are replayed now, so drop their records
        # (and TensorBoard's events, purge_step) to keep one record per step.
        if start_step is not None:
            _drop_records_after(self.path, start_step)
        self._tb = None
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                if tensorboard:
                    raise RuntimeError("tensorboard=True but the tensorboard package is not "
                                       "installed: pip install tensorboard") from error
                log.info("TensorBoard off: the tensorboard package is not installed")
            else:
                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                         purge_step=None if start_step is None else start_step + 1)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        """Append `record`, which must have a "step"."""
        if "step" not in record:
            raise KeyError(f"metrics record needs a 'step': {sorted(record)}")
        record = {key: _json_value(value) for key, value in record.items()}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for key, value in record.items():
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if key != "step" and numeric:
                    self._tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NoMetrics:
    """The metrics writer of the processes other than rank 0: writes nothing."""

    def write(self, record: dict) -> None:
        pass

    def __enter__(self) -> NoMetrics:
        return self

    def __exit__(self, *exc) -> None:
        pass


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrites `path` (atomically) without the records past `step` and any line a crash cut
    short."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    if len(kept) < len(lines) or not text.endswith("\n"):  # the next record needs a new line
        write_atomically(path, "".join(line + "\n" for line in kept))


def device_sync(device: torch.device) -> Callable[[], object] | None:
    """What waits for `device`'s queued work (StepTimer's `sync`): None off CUDA."""
    return functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else None


class StepTimer:
    """Mean step wall time and the share of it the host spent waiting for data, without a host
    sync per step.

    The loop calls `data_ready()` once a batch is fetched and `step_done()` after the optimizer
    step; the time from one `step_done()` to the next `data_ready()` (any logging in between
    included) counts as data wait. On CUDA, between log steps these are CPU-side enqueue times:
    pass `torch.cuda.synchronize` as `sync` to `summary()` so the interval's total includes the
    GPU work still queued and is correct. The data-wait share is the host's view: while the host
    runs ahead the GPU may keep busy during the wait, so it bounds the GPU's data stall from above.
    The first interval starts when the timer is made.
    """

    def __init__(self) -> None:
        self._interval_start = time.perf_counter()
        self._last_step = self._interval_start
        self._wait = 0.0
        self._steps = 0

    def fetch_start(self) -> None:
        """Marks the start of a fetch that does not follow a step (the next micro-batch of a
        step), so the compute before it does not count as data wait."""
        self._last_step = time.perf_counter()

    @contextlib.contextmanager
    def left_out(self, sync: Callable[[], object] | None = None):
        """Leaves the block's time (a checkpoint's save) out of the interval: neither a step's
        compute nor its data wait. `sync` (torch.cuda.synchronize on CUDA) runs first, so that
        the steps queued before the block are counted as compute."""
        if sync is not None:
            sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            now = time.perf_counter()
            self._interval_start += now - start
            self._last_step = now  # the next fetch's wait starts after the block

    def data_ready(self) -> None:
        self._wait += time.perf_counter() - self._last_step

    def step_done(self) -> None:
        self._last_step = time.perf_counter()
        self._steps += 1

    def summary(self, sync: Callable[[], object] | None = None) -> dict:
        """step_ms, data_wait_share (None without steps) and steps since the last summary, which
        starts the next interval. `sync` runs first (torch.cuda.synchronize on CUDA)."""
        if sync is not None:
            sync()
        now = time.perf_counter()
        total, steps = now - self._interval_start, self._steps
        result = {"step_ms": total / steps * 1e3 if steps else None,
                  "data_wait_share": self._wait / total if steps else None,
                  "steps": steps}
        self._interval_start = self._last_step = now
        self._wait, self._steps = 0.0, 0
        return result
