"""Triton kernels for the fast path (each file: kernel + autograd.Function + its reference).

One switch chooses the fast path or the plain PyTorch references: the model config's
`model.kernels`, overridden by the environment variable FASTMAVIL_KERNELS=0|1.
"""
from __future__ import annotations

import os

ENV_VAR = "FASTMAVIL_KERNELS"


def kernels_enabled(config_value: bool = True) -> bool:
    """Whether the fast path is requested: FASTMAVIL_KERNELS (0|1) wins over the config."""
    env = os.environ.get(ENV_VAR)
    if env is None or env == "":
        return config_value
    if env not in ("0", "1"):
        raise ValueError(f"{ENV_VAR}={env!r}: expected 0 or 1")
    return env == "1"
