"""Per-sample random masking (MAE's shape: noise -> argsort -> keep / mask / restore)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def num_visible(num_tokens: int, ratio: float) -> int:
    """round((1 - ratio) * N), half up, kept within [1, N - 1] so both sides are non-empty.

    The 1e-9 absorbs float error such as (1 - 0.8) * 512 = 102.39999999999999.
    """
    n = math.floor((1.0 - ratio) * num_tokens + 0.5 + 1e-9)
    return min(max(n, 1), num_tokens - 1)


@dataclass
class Masking:
    """Token indices of one masking; leading dims are (views, batch) or (batch,).

    keep:    (..., n)      visible tokens, in shuffled order
    mask:    (..., N - n)  masked tokens, in shuffled order
    restore: (..., N)      gathers cat([keep, mask]) back into the original token order
    """
    keep: torch.Tensor
    mask: torch.Tensor
    restore: torch.Tensor

    def view(self, index) -> "Masking":
        return Masking(self.keep[index], self.mask[index], self.restore[index])


def random_masking(shape: tuple[int, ...], num_tokens: int, ratio: float, device=None,
                   generator: torch.Generator | None = None) -> Masking:
    """Masks `ratio` of `num_tokens` independently for every sample of `shape`.

    Every sample keeps the same number of tokens, so the visible tokens stack into one tensor.
    """
    n = num_visible(num_tokens, ratio)
    noise = torch.rand(*shape, num_tokens, device=device, generator=generator)
    shuffle = noise.argsort(dim=-1)
    return Masking(keep=shuffle[..., :n], mask=shuffle[..., n:], restore=shuffle.argsort(dim=-1))


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), ids (..., B, n) -> (..., B, n, C): the tokens of x at ids, per sample.

    One gather per sample over all its views' ids: gathering from x expanded to every view
    would make gather's backward a zero tensor of that expanded size (MAViL's two views)."""
    *lead, batch, n = ids.shape
    flat = ids.movedim(-2, 0).reshape(batch, -1)  # (B, views * n)
    out = torch.gather(x, 1, flat.unsqueeze(-1).expand(*flat.shape, x.shape[-1]))
    return out.view(batch, *lead, n, x.shape[-1]).movedim(0, -3)
