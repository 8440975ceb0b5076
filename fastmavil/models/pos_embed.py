"""Fixed sin-cos positional embeddings (MAE): 2-D for the audio grid, temporal + spatial for video."""
from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(L,) positions -> (L, dim): [sin(p * w_i), cos(p * w_i)], w_i = 10000 ** (-i / (dim / 2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, dim), row-major; the first half of dim encodes the column, the second the
    row, as MAE's and AudioMAE's embeddings do (so theirs load unchanged)."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, c.flatten()), sincos_1d(dim // 2, r.flatten())], dim=1)


def sincos_video(dim: int, frames: int, rows: int, cols: int) -> torch.Tensor:
    """(frames * rows * cols, dim): a temporal 1-D embedding plus a spatial 2-D one (separable,
    as the MAE-ST video encoder's temporal + spatial embeddings, but fixed instead of learned)."""
    temporal = sincos_1d(dim, torch.arange(frames))
    spatial = sincos_2d(dim, rows, cols)
    return (temporal[:, None, :] + spatial[None, :, :]).reshape(frames * rows * cols, dim)


def sincos_grid(dim: int, grid: tuple[int, ...]) -> torch.Tensor:
    """Positional embedding for an audio (T, F) or video (T, H, W) token grid."""
    return sincos_2d(dim, *grid) if len(grid) == 2 else sincos_video(dim, *grid)
