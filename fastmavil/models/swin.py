"""Swin-style local attention on the audio decoder's (time, frequency) token grid.

Attention runs within non-overlapping windows; a shifted block first rolls the grid by -shift,
so windows straddle the previous block's borders, and masks pairs that the roll brought
together from opposite edges (Swin). Two blocks (`model.audio_decoder_block`): `swin`, Swin (v1)
blocks, pre-norm like the encoders', each window adding a learned relative-position bias table
(the paper cites Swin); `swinv2cr`, the timm Swin-V2-CR blocks AudioMAE's code used (post-norm,
scaled cosine attention, a position bias from an MLP over log-spaced offsets). README "Choices".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Mlp, SelfAttention, _merge_heads, _split_heads, attention, layer_norm


def to_windows(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, R, C, D) grid -> (B, windows, wr * wc, D), windows row-major."""
    b, rows, cols, d = x.shape
    wr, wc = window
    x = x.view(b, rows // wr, wr, cols // wc, wc, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, -1, wr * wc, d)


def from_windows(x: torch.Tensor, grid: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """(B, windows, wr * wc, D) -> (B, R, C, D), the inverse of `to_windows`."""
    (rows, cols), (wr, wc) = grid, window
    b, d = x.shape[0], x.shape[-1]
    x = x.view(b, rows // wr, cols // wc, wr, wc, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, rows, cols, d)


def shift_mask(grid: tuple[int, int], window: tuple[int, int],
               shift: tuple[int, int]) -> torch.Tensor:
    """(windows, L, L) additive mask: -inf between tokens from different regions of the rolled grid."""
    labels = []
    for size, w, s in zip(grid, window, shift):
        lab = torch.zeros(size, dtype=torch.long)
        if s:
            lab[size - w:size - s] = 1
            lab[size - s:] = 2
        labels.append(lab)
    region = (labels[0][:, None] * 3 + labels[1][None, :]).float()
    region = to_windows(region[None, :, :, None], window)[0, :, :, 0]  # (windows, L)
    mask = torch.zeros(region.shape[0], region.shape[1], region.shape[1])
    return mask.masked_fill(region[:, :, None] != region[:, None, :], float("-inf"))


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """(L, L) index into a ((2 wr - 1) * (2 wc - 1),) table of relative offsets."""
    wr, wc = window
    r, c = torch.meshgrid(torch.arange(wr), torch.arange(wc), indexing="ij")
    coords = torch.stack([r.flatten(), c.flatten()])          # (2, L)
    rel = coords[:, :, None] - coords[:, None, :]             # (2, L, L)
    return (rel[0] + wr - 1) * (2 * wc - 1) + (rel[1] + wc - 1)


class WindowBlock(nn.Module):
    """Pre-norm transformer block with (shifted) window attention over a (rows, cols) grid."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int], window: tuple[int, int],
                 shift: tuple[int, int] = (0, 0), mlp_ratio: float = 4.0, rel_pos: bool = True,
                 backend: str = "auto"):
        super().__init__()
        # A window as large as the grid cannot shift (Swin does the same).
        self.window = tuple(min(w, g) for w, g in zip(window, grid))
        self.shift = tuple(0 if w >= g else s for s, w, g in zip(shift, window, grid))
        self.grid, self.heads = tuple(grid), heads
        self.norm1 = layer_norm(dim)
        self.attn = SelfAttention(dim, heads, backend)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        self.rel_pos_table = None
        if rel_pos:
            self.rel_pos_table = nn.Parameter(
                torch.zeros((2 * self.window[0] - 1) * (2 * self.window[1] - 1), heads))
            nn.init.trunc_normal_(self.rel_pos_table, std=0.02)
            self.register_buffer("rel_pos_index", relative_position_index(self.window),
                                 persistent=False)
        windows = (grid[0] // self.window[0]) * (grid[1] // self.window[1])
        mask = shift_mask(self.grid, self.window, self.shift) if any(self.shift) else None
        self.register_buffer("mask", mask if mask is None else mask[:, None], persistent=False)
        self._windows = windows
        # kernels.window_attention under the `auto` and `triton` backends (set by the model's
        # use_kernels)
        self.fused = False

    def position_bias(self) -> torch.Tensor | None:
        """(1, heads, L, L) relative-position bias, or None."""
        if self.rel_pos_table is None:
            return None
        return self.rel_pos_table[self.rel_pos_index].permute(2, 0, 1)[None]

    def attention_bias(self) -> torch.Tensor | None:
        """(windows * heads, L, L) or None: relative-position bias plus the shift mask."""
        bias = self.position_bias()
        if self.mask is not None:
            bias = self.mask if bias is None else bias + self.mask           # (windows, H|1, L, L)
        if bias is None:
            return None
        return bias.expand(self._windows, self.heads, -1, -1).reshape(-1, *bias.shape[-2:])

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d = x.shape
        grid = x.view(b, *self.grid, d)
        if any(self.shift):
            grid = torch.roll(grid, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        windows = to_windows(grid, self.window)                          # (B, W, L, D)
        q, k, v = (_split_heads(t, self.heads) for t in self.attn.qkv(windows).chunk(3, -1))
        q, k = self.scale_qk(q, k)
        # fold windows into the head axis: one attention call over (B, W * H, L, d)
        q, k, v = (t.flatten(1, 2) for t in (q, k, v))
        out = None
        if self.fused and self.attn.backend in ("auto", "triton"):
            from kernels import window_attention as kernel  # triton only where fused
            if kernel.fits(q):  # larger windows take SDPA under `auto`, as without kernels
                out = kernel.window_attention(q, k, v, self.attention_bias())
        if out is None:
            out = attention(q, k, v, self.attention_bias(), self.attn.backend)
        out = self.attn.proj(_merge_heads(out.unflatten(1, (self._windows, self.heads))))
        grid = from_windows(out, self.grid, self.window)
        if any(self.shift):
            grid = torch.roll(grid, shifts=self.shift, dims=(1, 2))
        return grid.reshape(b, -1, d)

    def scale_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k) as attention() takes them: it scales q k^T by 1 / sqrt(d)."""
        return q, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.window_attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def log_spaced_offsets(window: tuple[int, int]) -> torch.Tensor:
    """(L * L, 2) relative (row, col) offsets of every query-key pair in a window, mapped by
    sign(x) log(1 + |x|) (Swin V2's log-spaced coordinates)."""
    r, c = torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")
    coords = torch.stack([r.flatten(), c.flatten()])                   # (2, L)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)   # (L, L, 2)
    rel = rel.reshape(-1, 2).float()
    return rel.sign() * torch.log1p(rel.abs())


class CosineWindowBlock(WindowBlock):
    """AudioMAE's audio decoder block (timm's Swin-V2-CR): post-norm (x + norm(attn(x)), then
    x + norm(mlp(x))), scaled cosine attention cos(q, k) / tau with a learned temperature per
    head (clamped at 0.01), and a position bias from a 2-layer MLP (hidden 384, ReLU, dropout
    0.1 after each layer, as timm's Mlp) over log-spaced offsets instead of a table. Same
    windows and shifts; the shift mask is -inf where AudioMAE's is -100, which logits of up to
    1 / 0.01 can overcome."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int], window: tuple[int, int],
                 shift: tuple[int, int] = (0, 0), mlp_ratio: float = 4.0, rel_pos: bool = True,
                 backend: str = "auto", meta_hidden: int = 384):
        super().__init__(dim, heads, grid, window, shift, mlp_ratio, False, backend)
        self.tau = nn.Parameter(torch.ones(heads))
        self.meta_mlp = None
        if rel_pos:
            self.meta_mlp = nn.Sequential(nn.Linear(2, meta_hidden), nn.ReLU(), nn.Dropout(0.1),
                                          nn.Linear(meta_hidden, heads), nn.Dropout(0.1))
            self.register_buffer("log_offsets", log_spaced_offsets(self.window),
                                 persistent=False)

    def position_bias(self) -> torch.Tensor | None:
        if self.meta_mlp is None:
            return None
        length = self.window[0] * self.window[1]
        return self.meta_mlp(self.log_offsets).t().reshape(1, self.heads, length, length)

    def scale_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # cos(q, k) / tau, given to attention() as (unit q) * sqrt(d) / tau and unit k
        scale = q.shape[-1] ** 0.5 / self.tau.clamp(min=0.01)
        q = F.normalize(q, dim=-1, eps=1e-6) * scale[:, None, None].to(q.dtype)
        return q, F.normalize(k, dim=-1, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # autocast's LayerNorm returns fp32: cast, so a bf16 residual stream stays bf16
        x = x + self.norm1(self.window_attention(x)).to(x.dtype)
        return x + self.norm2(self.mlp(x)).to(x.dtype)
