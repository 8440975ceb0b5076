"""Attention through one function, and the transformer blocks built on it.

Backends:
  flash  the flash-attn package's flash_attn_func (CUDA, fp16/bf16, no additive bias; it takes
         different query and key lengths, so it serves cross-attention too);
  sdpa   torch's scaled_dot_product_attention, which picks a flash, cuDNN, memory-efficient or
         math kernel itself;
  math   explicit softmax: the reference, and what FLOP counting uses (FlopCounterMode has no
         formula for some fused CPU kernels);
  auto   flash where it applies (importable, CUDA, fp16/bf16, no bias), otherwise sdpa;
  triton the Triton kernels of kernels.attention where the model's kernels are on (its `fused`
         switch, set by MAViL.use_kernels): self- and cross-attention straight from the packed
         qkv / kv projections, their gradients written back into them; elsewhere as auto.
         Opt-in until a GPU benchmark shows it faster than auto's choice (bench.attention).
Windowed attention with a shift mask or relative-position bias carries a bias, so `flash`,
`auto` and `triton` run it through sdpa; the Swin blocks (swin.py) run their windows through the
Triton kernels of kernels.window_attention instead under `auto` and `triton` when the model's
kernels are on.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from ..config import ATTENTION_BACKENDS as BACKENDS

# Whether flash-attn is installed, found without importing it: a constant that torch.compile'd
# blocks read instead of tracing the lazy import below on every call where it is absent.
FLASH_INSTALLED = importlib.util.find_spec("flash_attn") is not None


@functools.lru_cache(maxsize=1)
def flash_attn_func():
    """flash_attn.flash_attn_func, or None when the package is not installed (imported lazily)."""
    try:
        from flash_attn import flash_attn_func as func
    except ImportError:
        return None
    return func


def _flash_applies(q: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (FLASH_INSTALLED and bias is None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_func() is not None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
              backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v for q (B, H, Lq, d), k and v (B, H, Lk, d).

    `bias` is additive (-inf masks a pair) and broadcasts to (B, H, Lq, Lk).
    """
    if backend in ("auto", "flash", "triton") and _flash_applies(q, bias):
        # flash-attn wants (B, L, H, d)
        out = flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "flash" and bias is None:
        raise RuntimeError("attention backend 'flash' needs the flash-attn package, a CUDA "
                           f"device and fp16/bf16 inputs (got {q.dtype} on {q.device}); use "
                           "'auto' to fall back to sdpa")
    if bias is not None:
        bias = bias.to(q.dtype)
    if backend in ("auto", "flash", "sdpa", "triton"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    if backend != "math":
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


def set_attention_backend(model: nn.Module, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    for module in model.modules():
        if isinstance(module, (SelfAttention, CrossAttention)):
            module.backend = backend


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, heads * d) -> (..., heads, L, d)"""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-3, -2).flatten(-2)


def heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """`attention` on projections (..., L, heads * d): heads split, attended and merged again."""
    return _merge_heads(attention(*(_split_heads(t, heads) for t in (q, k, v)), bias, backend))


def _packed_kernels(module: nn.Module, width: int, *tensors: torch.Tensor) -> bool:
    """Whether `module` (heads over `width` features) runs kernels.attention on its packed
    projections `tensors`: backend triton, the model's kernels on, heads the kernels take, and
    tensors they can launch on (else kernels.can_launch says once why not; auto's choice runs)."""
    if not (module.fused and module.backend == "triton"):
        return False
    from kernels.attention import fits  # triton only where fused
    return (fits(tensors[0].shape[0], width, module.heads)
            and kernels.can_launch("attention", *tensors))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, backend: str = "auto"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.fused = False  # MAViL.use_kernels: the model's kernels switch (backend triton)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        if _packed_kernels(self, qkv.shape[-1] // 3, qkv):
            from kernels.attention import self_attention
            return self.proj(self_attention(qkv, self.heads))
        return self.proj(heads_attention(*qkv.chunk(3, dim=-1), self.heads, None, self.backend))


class CrossAttention(nn.Module):
    """Queries from x (B, Lq, D) attend to context (B, Lk, D) only."""

    def __init__(self, dim: int, heads: int, backend: str = "auto"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.fused = False  # as SelfAttention's
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, kv = self.q(x), self.kv(context)
        if _packed_kernels(self, q.shape[-1], q, kv):
            from kernels.attention import cross_attention
            return self.proj(cross_attention(q, kv, self.heads))
        return self.proj(heads_attention(q, *kv.chunk(2, dim=-1), self.heads, None, self.backend))


def residual_stream(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The tokens the blocks add into, in `dtype` (train.residual_precision); None leaves them as
    they come (fp32 under autocast: a bf16 branch output added to fp32 tokens gives fp32)."""
    return x if dtype is None else x.to(dtype)


def layer_norm(dim: int) -> nn.LayerNorm:
    """The blocks' LayerNorm, with MAE's and AudioMAE's eps of 1e-6 (PyTorch's default: 1e-5)."""
    return nn.LayerNorm(dim, eps=1e-6)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al.): in training, drops a residual branch for a random
    `rate` of the samples and scales the kept ones by 1 / (1 - rate), so its expectation is
    unchanged; the identity in evaluation."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device,
                           dtype=x.dtype).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Block(nn.Module):
    """Pre-norm ViT block: x + attn(norm(x)), then x + mlp(norm(x)); with `drop_path` > 0
    (fine-tuning) each branch is dropped per sample at that rate."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, backend: str = "auto",
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = SelfAttention(dim, heads, backend)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossBlock(nn.Module):
    """Pre-norm block whose queries attend only to a fixed context (no self-attention among
    queries): the DiffMAE "cross" decoder block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, backend: str = "auto"):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.norm_context = layer_norm(dim)
        self.attn = CrossAttention(dim, heads, backend)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), self.norm_context(context))
        return x + self.mlp(self.norm2(x))
