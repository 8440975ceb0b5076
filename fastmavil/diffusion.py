"""Forward diffusion of masked patches (paper Sec. 3, App. B.2 and C; DiffMAE).

beta_t goes linearly from beta_start to beta_end over t = 1..T; the noise variance of step t
is beta_t ** phi (phi = 0.8 amplifies the noise at low t), alpha_bar_t = prod_{i<=t}(1 - beta_i**phi)
and x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps.
"""
from __future__ import annotations

import torch
from torch import nn


class DiffusionSchedule(nn.Module):
    """Holds alpha_bar as a (T + 1,) buffer indexed by t directly: alpha_bar[0] = 1 (no noise)."""

    def __init__(self, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 phi: float = 0.8):
        super().__init__()
        self.steps = steps
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        alpha_bar = torch.cumprod(1.0 - betas ** phi, dim=0)
        alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar])
        self._fp32 = alpha_bar.float()  # kept from casts, see _apply
        self.register_buffer("alpha_bar", self._fp32.clone(), persistent=False)

    def _apply(self, fn, recurse=True):
        """Moves alpha_bar with the module but keeps it fp32: `model.to(torch.bfloat16)` would
        round alpha_bar_1 to 1 and leave t = 1, 2 without noise (q_sample computes in fp32)."""
        super()._apply(fn, recurse)
        self.alpha_bar = self._fp32.to(self.alpha_bar.device)
        return self

    def sample_timesteps(self, batch: int, device=None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ Uniform{1..T}, one per sample."""
        return torch.randint(1, self.steps + 1, (batch,), device=device, generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0, noise (B, ...), t (B,) -> x_t (B, ...); see q_sample."""
        return q_sample(self.alpha_bar, x0, t, noise)


def q_sample(alpha_bar: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) noise, per sample of x0 and noise
    (B, ...) with t (B,), in x0's dtype, computed in fp32: in bf16 the noise scale
    sqrt(1 - alpha_bar[t]) rounds to 0 for t = 1, 2."""
    a = alpha_bar[t].float().view(-1, *([1] * (x0.dim() - 1)))
    return (a.sqrt() * x0.float() + (1.0 - a).sqrt() * noise.float()).to(x0.dtype)
