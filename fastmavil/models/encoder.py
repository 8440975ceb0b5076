"""ViT encoders over visible patches, and the fusion encoder over both modalities."""
from __future__ import annotations

import torch
from torch import nn

from .attention import Block, layer_norm, residual_stream
from .patch import PatchEmbed


class Encoder(nn.Module):
    """Patch embedding + fixed positions + pre-norm ViT blocks + final norm (no [CLS] token:
    the contrastive terms mean-pool the tokens, as a fine-tuning head would)."""

    def __init__(self, channels: int, patch: tuple[int, ...], pos: torch.Tensor, dim: int,
                 depth: int, heads: int, mlp_ratio: float, mask_first: bool,
                 backend: str = "auto", drop_path: float = 0.0):
        super().__init__()
        self.patch_embed = PatchEmbed(channels, patch, dim, mask_first)
        self.register_buffer("pos", pos, persistent=False)  # (N, dim)
        # stochastic depth rising linearly from 0 at the first block to drop_path at the last
        # (timm's ViT, as MAE and AudioMAE fine-tune)
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, backend, rate) for rate in rates)
        self.norm = layer_norm(dim)
        self.residual_dtype: torch.dtype | None = None  # set by MAViL.set_residual_dtype

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, *S); ids_keep (V, B, n) for V masked views of the same clips, or None for
        every token -> (V * B, n, dim)."""
        tokens = self.patch_embed(x, ids_keep, self.pos)
        if tokens.dim() > 3:  # a copy, not a view: a compiled block guards on a view's base and
            # would trace the first block again (the copy: ~80 MB per step at paper size, B = 32;
            # the cast to the residual stream's dtype, if any, makes it)
            tokens = tokens.flatten(0, -3).to(self.residual_dtype or tokens.dtype, copy=True)
        else:
            tokens = residual_stream(tokens, self.residual_dtype)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


class FusionEncoder(nn.Module):
    """Transformer blocks over the concatenated audio and video tokens (MAViL's g_av)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, backend: str = "auto"):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, backend) for _ in range(depth))
        self.norm = layer_norm(dim)
        self.residual_dtype: torch.dtype | None = None

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the tokens as the encoders left them: no modality-type embedding (the paper names none)
        x = residual_stream(torch.cat([audio, video], dim=1), self.residual_dtype)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, :audio.shape[1]], x[:, audio.shape[1]:]
