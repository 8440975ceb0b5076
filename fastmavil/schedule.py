"""Per-epoch schedules of the paper's efficiency ideas (Sec. 3): masking ratio and batch size."""
from __future__ import annotations

from .config import MaskConfig


def mask_ratio(mask: MaskConfig, epoch: int, epochs: int) -> float:
    """rho_e: `fixed` -> start; `linear` -> start at epoch 0 to end at epoch epochs - 1."""
    if mask.schedule == "fixed" or epochs == 1:
        return mask.start
    return mask.start + (mask.end - mask.start) * epoch / (epochs - 1)


def adaptive_batch_size(mask: MaskConfig, epoch: int, epochs: int, base: int) -> float:
    """B_e = (1 - min(rho1, rho2)) / (1 - rho_e) * B0: a constant budget of visible tokens.

    Unrounded; the trainer rounds and quantises it.
    """
    low = min(mask.start, mask.end)
    return (1.0 - low) / (1.0 - mask_ratio(mask, epoch, epochs)) * base
