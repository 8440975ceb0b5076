"""Triton kernels for the fast path (each file: kernel + autograd.Function + its reference).

One switch chooses the fast path or the plain PyTorch references: the model config's
`model.kernels`, overridden by the environment variable FASTMAVIL_KERNELS=0|1. A kernel runs
natively on CUDA tensors, or on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1,
for tests); anywhere else it falls back to its reference and says so once.

The rules every kernel here keeps (README "Adding a kernel" lists where a new one goes):
- deterministic: no float atomics; a sum across programs is written as partial sums, laid out
  the same whatever the autotuner picks, that torch adds, or the launch's last program (an
  integer arrival counter tells it, kernels._token_grads) adds in a fixed order (the order
  within a program's own sums follows its config, so the last bit may change with the pick);
- an autotuned kernel only stores (never accumulates into its output, and leaves a counter as
  it found it), since the autotuner runs each candidate on the real arguments; launch it
  through `launch`, which runs one fixed config under the interpreter;
- launched through `can_launch` (else the reference) and `on_device` (Triton launches on the
  current device);
- module-level numbers a kernel reads are `tl.constexpr(...)`: the interpreter accepts plain
  globals, the compiler does not, so run `python -m kernels.compile_check` after a change.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch

ENV_VAR = "FASTMAVIL_KERNELS"
log = logging.getLogger("fastmavil.kernels")
_warned: set[str] = set()


def kernels_enabled(config_value: bool = True) -> bool:
    """Whether the fast path is requested: FASTMAVIL_KERNELS (0|1) wins over the config."""
    env = os.environ.get(ENV_VAR)
    if env is None or env == "":
        return config_value
    if env not in ("0", "1"):
        raise ValueError(f"{ENV_VAR}={env!r}: expected 0 or 1")
    return env == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def can_launch(name: str, *tensors: torch.Tensor) -> bool:
    """True when kernel `name` can run on these tensors; otherwise logs once why the reference
    runs instead."""
    if not triton_available():
        reason = "triton is not installed"
    elif all(t.is_cuda for t in tensors) or (interpreting() and not any(t.is_cuda
                                                                        for t in tensors)):
        return True
    elif any(t.is_cuda for t in tensors):
        reason = f"tensors are on different devices ({sorted({str(t.device) for t in tensors})})"
    else:
        reason = "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    if name not in _warned:
        _warned.add(name)
        log.warning("kernel %s: %s; using the PyTorch reference", name, reason)
    return False


def on_device(tensor: torch.Tensor):
    """Context for a launch on `tensor`'s device: Triton launches on the current CUDA device,
    whatever device the tensors are on (a no-op for CPU tensors under the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def launch(tuned, grid, fixed: dict, *args, **constexprs) -> None:
    """Launches the autotuned kernel `tuned` (triton.autotune's wrapper) over `grid`, a tuple or
    a function of the chosen config. Under the interpreter its kernel runs with the one `fixed`
    config instead: autotuning there would time every candidate, at seconds each."""
    if interpreting():
        tuned.fn[grid(fixed) if callable(grid) else grid](*args, **constexprs, **fixed)
    else:
        tuned[grid](*args, **constexprs)
