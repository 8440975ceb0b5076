"""Patches of audio (B, 1, T, F) and video (B, C, Fr, H, W) inputs, and their embedding.

Tokens are numbered row-major over the patch grid; a patch vector is flattened in (C, *patch)
order, the order of a convolution weight, so `proj.weight.flatten(1)` projects a patch vector.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..masking import gather_tokens


def patch_grid(spatial: tuple[int, ...], patch: tuple[int, ...]) -> tuple[int, ...]:
    if len(spatial) != len(patch) or any(s % p for s, p in zip(spatial, patch)):
        raise ValueError(f"input size {tuple(spatial)} is not divisible by patch {tuple(patch)}")
    return tuple(s // p for s, p in zip(spatial, patch))


def patchify(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """(B, C, *S) -> (B, N, C * prod(patch))."""
    b, c, *spatial = x.shape
    grid, k = patch_grid(tuple(spatial), patch), len(patch)
    x = x.reshape(b, c, *[d for g, p in zip(grid, patch) for d in (g, p)])
    # dims: 0 batch, 1 channel, 2 + 2i grid axis i, 3 + 2i patch axis i
    x = x.permute(0, *range(2, 2 + 2 * k, 2), 1, *range(3, 3 + 2 * k, 2))
    return x.reshape(b, math.prod(grid), c * math.prod(patch))


def unpatchify(patches: torch.Tensor, patch: tuple[int, ...], grid: tuple[int, ...],
               channels: int) -> torch.Tensor:
    """(B, N, C * prod(patch)) -> (B, C, *S), the inverse of `patchify`."""
    b, k = patches.shape[0], len(patch)
    x = patches.reshape(b, *grid, channels, *patch)
    # dims: 0 batch, 1..k grid, k + 1 channel, k + 2.. patch
    x = x.permute(0, k + 1, *[d for i in range(k) for d in (1 + i, k + 2 + i)])
    return x.reshape(b, channels, *[g * p for g, p in zip(grid, patch)])


class PatchEmbed(nn.Module):
    """Linear patch projection, in one of two orders:

    mask_first=True   gather the visible patches, then project only those (DiffMAViL);
    mask_first=False  project every patch (a strided convolution), then gather (MAViL).
    Both give the same tokens; they differ in FLOPs and in what the decoder can reuse.
    """

    def __init__(self, channels: int, patch: tuple[int, ...], dim: int, mask_first: bool):
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[len(patch)]
        self.proj = conv(channels, dim, kernel_size=patch, stride=patch)
        self.patch = tuple(patch)
        self.mask_first = mask_first
        self.fused = False  # mask-first through kernels.patch_embed_visible (set by the model)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None,
                pos: torch.Tensor) -> torch.Tensor:
        """x (B, C, *S), ids_keep (..., B, n) or None for all tokens, pos (N, D) fixed positions
        -> tokens with their positions (..., B, n, D)."""
        if ids_keep is None or not self.mask_first:
            tokens = self.proj(x).flatten(2).transpose(1, 2) + pos
            return tokens if ids_keep is None else gather_tokens(tokens, ids_keep)
        if self.fused:
            from kernels.patch_embed import patch_embed_visible
            views = ids_keep.reshape(-1, *ids_keep.shape[-2:])
            out = [patch_embed_visible(x, v, self.proj.weight, self.proj.bias, pos, self.patch)
                   for v in views]  # one launch per masked view, x read in place
            return torch.stack(out).view(*ids_keep.shape, -1)
        visible = gather_tokens(patchify(x, self.patch), ids_keep)
        return F.linear(visible, self.proj.weight.flatten(1), self.proj.bias) + pos[ids_keep]
