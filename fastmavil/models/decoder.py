"""Decoders: reconstruct the masked patches from visible latents and masked-token inputs.

Masked-token inputs are a learned [MASK] token (MAViL, AudioMAE) or the diffused masked patches
x_t projected to the decoder width (DiffMAViL, DiffMAE); either gets the fixed positional
embedding of its token. Attention over the decoder tokens is one of:
  self    full self-attention over all N tokens (MAE, MAViL video, R1)
  cross   masked queries attend only to the visible latents, never to each other (R2-R4 video)
  window  Swin-style (shifted) windows over the full (time, frequency) grid (audio)
The head predicts masked patches only: pred (B, m, patch_dim) in the order of ids_mask.
"""
from __future__ import annotations

import torch
from torch import nn

from ..masking import Masking, gather_tokens
from .attention import Block, CrossBlock, layer_norm, residual_stream
from .swin import CosineWindowBlock, WindowBlock


class Decoder(nn.Module):
    def __init__(self, attention: str, encoder_dim: int, dim: int, depth: int, heads: int,
                 mlp_ratio: float, patch_dim: int, pos: torch.Tensor, diffusion: bool,
                 grid: tuple[int, ...] = (), window: tuple[int, int] = (4, 4),
                 shift: tuple[int, int] = (0, 0), rel_pos: bool = True, backend: str = "auto",
                 window_block: str = "swin"):
        super().__init__()
        self.attention = attention
        self.embed = nn.Linear(encoder_dim, dim)
        if diffusion:
            self.noisy_embed = nn.Linear(patch_dim, dim)
        else:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("pos", pos, persistent=False)  # (N, dim)
        if attention == "self":
            blocks = (Block(dim, heads, mlp_ratio, backend) for _ in range(depth))
        elif attention == "cross":
            blocks = (CrossBlock(dim, heads, mlp_ratio, backend) for _ in range(depth))
        elif attention == "window":
            # Swin alternates plain and shifted windows.
            block = {"swin": WindowBlock, "swinv2cr": CosineWindowBlock}[window_block]
            blocks = (block(dim, heads, grid, window, shift if i % 2 else (0, 0), mlp_ratio,
                            rel_pos, backend) for i in range(depth))
        else:
            raise ValueError(f"unknown decoder attention {attention!r}")
        self.blocks = nn.ModuleList(blocks)
        self.norm = layer_norm(dim)
        self.head = nn.Linear(dim, patch_dim)
        self.residual_dtype: torch.dtype | None = None  # set by MAViL.set_residual_dtype

    def forward(self, latents: torch.Tensor, ids: Masking, noisy: torch.Tensor | None = None,
                masked: torch.Tensor | None = None) -> torch.Tensor:
        """latents (B, n, encoder_dim) of the visible tokens; ids with keep (B, n), mask (B, m).
        Masked tokens: `noisy` (B, m, patch_dim) diffused patches, projected here; or `masked`
        (B, m, dim) already projected with positions (kernels.diffuse_embed_masked); or neither,
        for [MASK] tokens -> predicted masked patches (B, m, patch_dim)."""
        visible = self.embed(latents) + self.pos[ids.keep]
        if noisy is not None:  # x_t alone: no embedding of t (App. B.2 gives the decoder none)
            masked = self.noisy_embed(noisy) + self.pos[ids.mask]
        elif masked is None:
            masked = self.mask_token + self.pos[ids.mask]
        if self.attention == "cross":  # the context, read by every block, in that dtype too
            masked, visible = (residual_stream(t, self.residual_dtype) for t in (masked, visible))
            for block in self.blocks:
                masked = block(masked, visible)
            return self.head(self.norm(masked))
        x = gather_tokens(torch.cat([visible, masked], dim=1), ids.restore)  # original order
        x = residual_stream(x, self.residual_dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(gather_tokens(x, ids.mask)))
