"""The MLP's activation with its first layer's bias, and its gradients, in one pass each.

    act = gelu(y + b)          y (R, H) = x W^T, the first layer's matmul without its bias
    grad_y = grad_act * gelu'(y + b)        grad_b = sum over rows of grad_y

GELU is the exact (erf) one, as nn.GELU's default. Why: in the blocks that torch.compile
compiles, Inductor keeps the first layer's output for backward and there recomputes the
activation (the second layer's weight gradient needs it) in the kernel that applies GELU's
derivative (2 tensors of (R, H) read, 2 written), then reads both inputs again for the bias
gradient's column sums: 6 passes over (R, H) per MLP in backward, ~5 ms of R4's 78.5 ms step on
an H200 (bench/results/profile-NVIDIA_H200-r4-compile-graph.txt). Here forward writes act once
and the second layer keeps it (a custom op is not recomputed), and backward reads y and
grad_act and writes grad_y, summing grad_b in the same tiles: 3 passes, at the memory of act
(R x H in the compute dtype per MLP: ~4 GB more for R4 at B = 32). The bias sum is the one of
kernels._token_grads: each program stores its tile's column sums, the last of a feature block
to finish adds them in tile order (deterministic, no float atomics, no launch after).

Dtypes: y in the compute dtype (bf16 under autocast, x's otherwise); b any float dtype, added in
fp32; GELU and its derivative in fp32; act and grad_y rounded once to y's dtype, grad_b (summed
in fp32) to b's. Under autocast the plain path adds the bias in the matmul's epilogue and rounds
once there, then rounds GELU's output again; here y is rounded before the bias is added: the
same count of roundings, at another place. Through torch.library custom ops, so compiled blocks
call the kernels without a graph break. `model.fused_mlp` turns them on in the MLPs (off until
measured on a GPU: `bench.throughput --fused-mlp` against the compiled blocks' own fusion, the
baseline that matters; `bench.kernels` against the eager plain path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels
from kernels import _token_grads
from kernels._patches import check_tensors, tl, triton
from kernels._token_grads import _finish_bias

# Row tiles of 64: the partial bias sums have one row per tile, so every candidate shares their
# layout and the order they are added in.
BLOCK_R = 64
_INTERPRET = dict(BLOCK_D=64)


def reference_bias_gelu(y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The plain PyTorch computation, in fp32, rounded once to y's dtype."""
    return F.gelu(y.float() + b.float()).to(y.dtype)


if triton is not None:
    @triton.jit
    def _tile(y_ptr, b_ptr, R, H, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """The program's tile: element offsets, mask, columns, and y + b in fp32."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < H
        mask = (rows < R)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        pre = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        return offs, mask, cols, col_ok, pre

    @triton.jit
    def _bias_gelu_forward_kernel(y_ptr, b_ptr, act_ptr, R, H, BLOCK_R: tl.constexpr,
                                  BLOCK_D: tl.constexpr):
        offs, mask, _, _, pre = _tile(y_ptr, b_ptr, R, H, BLOCK_R, BLOCK_D)
        act = 0.5 * pre * (1.0 + tl.math.erf(pre * 0.7071067811865476))
        tl.store(act_ptr + offs, act.to(act_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_gelu_backward_kernel(grad_ptr, y_ptr, b_ptr, gy_ptr, partial_ptr, counter_ptr,
                                   gb_ptr, R, H, tiles, BIAS: tl.constexpr,
                                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """grad_y of the tile; with BIAS its column sums to partial[tile], and the feature block's
        last program writes grad_b."""
        offs, mask, cols, col_ok, pre = _tile(y_ptr, b_ptr, R, H, BLOCK_R, BLOCK_D)
        cdf = 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476))
        pdf = tl.exp(-0.5 * pre * pre) * 0.3989422804014327  # 1 / sqrt(2 pi)
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gy = grad * (cdf + pre * pdf)
        tl.store(gy_ptr + offs, gy.to(gy_ptr.dtype.element_ty), mask=mask)
        if BIAS:  # the sum of the rounded grad_y, as the plain path sums what it stored
            rounded = gy.to(gy_ptr.dtype.element_ty).to(tl.float32)
            tl.store(partial_ptr + tl.program_id(0) * H + cols,
                     tl.sum(tl.where(mask, rounded, 0.0), axis=0), mask=col_ok)
            _finish_bias(partial_ptr, counter_ptr, gb_ptr, tiles, H, cols, col_ok, BLOCK_D)

    # Memory-bound passes: feature block x warps, 16 or 32 elements a thread (sm_90 with Triton
    # 3.6: 40-90 registers; 64 took 160-180). The same candidates for both kernels; both only
    # store, and backward leaves its counters as it found them, so timing runs may repeat.
    _CONFIGS = [triton.Config(dict(BLOCK_D=d), num_warps=w) for d, w in ((64, 4), (64, 8),
                                                                         (128, 8), (256, 16))]
    _forward_tuned = triton.autotune(_CONFIGS, key=["H"])(_bias_gelu_forward_kernel)
    _backward_tuned = triton.autotune(_CONFIGS, key=["H", "BIAS"])(_bias_gelu_backward_kernel)
    # one arrival counter per feature block of the narrowest block any launch uses
    _MIN_BLOCK_D = min([c.kwargs["BLOCK_D"] for c in _CONFIGS] + [_INTERPRET["BLOCK_D"]])


def _grid(rows: int, dim: int):
    return lambda meta: (triton.cdiv(rows, BLOCK_R), triton.cdiv(dim, meta["BLOCK_D"]))


@torch.library.custom_op("fastmavil::bias_gelu", mutates_args=())
def _forward(y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    y, b = y.contiguous(), b.contiguous()  # as bias_gelu passes them (a compiler might not)
    rows, dim = y.shape
    act = torch.empty_like(y)
    if rows:
        with kernels.on_device(y):
            kernels.launch(_forward_tuned, _grid(rows, dim), _INTERPRET, y, b, act, rows, dim,
                           BLOCK_R=BLOCK_R)
    return act


@_forward.register_fake
def _(y, b):
    return torch.empty_like(y)


@torch.library.custom_op("fastmavil::bias_gelu_backward", mutates_args=())
def _backward(grad: torch.Tensor, y: torch.Tensor, b: torch.Tensor,
              bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_y, grad_b); grad_b is empty unless bias_grad."""
    grad, y, b = grad.contiguous(), y.contiguous(), b.contiguous()
    rows, dim = y.shape
    gy = torch.empty_like(y)
    gb = torch.empty(dim if bias_grad else 0, device=y.device, dtype=b.dtype)
    if rows == 0:  # no program would write grad_b
        return gy, gb.zero_()
    tiles = triton.cdiv(rows, BLOCK_R)
    if bias_grad:
        partial = torch.empty(tiles, dim, device=y.device, dtype=torch.float32)
        counters = _token_grads._counters(triton.cdiv(dim, _MIN_BLOCK_D), y.device)
    else:
        partial = counters = gb  # never read (BIAS=False)
    with kernels.on_device(y):
        kernels.launch(_backward_tuned, _grid(rows, dim), _INTERPRET, grad, y, b, gy, partial,
                       counters, gb, rows, dim, tiles, BIAS=bias_grad, BLOCK_R=BLOCK_R)
    return gy, gb


@_backward.register_fake
def _(grad, y, b, bias_grad):
    return torch.empty_like(y), y.new_empty((y.shape[1] if bias_grad else 0,), dtype=b.dtype)


def _setup_context(ctx, inputs, output):
    y, b = inputs
    ctx.bias_grad = ctx.needs_input_grad[1]
    ctx.save_for_backward(y, b)


def _backward_autograd(ctx, grad):
    y, b = ctx.saved_tensors
    gy, gb = _backward(grad, y, b, ctx.bias_grad)
    return gy, gb if ctx.bias_grad else None


_forward.register_autograd(_backward_autograd, setup_context=_setup_context)


def bias_gelu(y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gelu(y + b) (exact GELU) for y (..., H) and b (H,): the Triton kernels where
    kernels.can_launch allows, else the reference; y is made contiguous (one copy if it is
    not), what backward keeps."""
    if y.shape[-1:] != b.shape:
        raise ValueError(f"b has shape {tuple(b.shape)}; expected ({y.shape[-1]},), y's last "
                         f"dimension (y: {tuple(y.shape)})")
    check_tensors(y.device, floats=dict(y=y, b=b))
    if not kernels.can_launch("bias_gelu", y, b):
        return reference_bias_gelu(y, b)
    shape = y.shape
    return _forward(y.contiguous().view(-1, shape[-1]), b).view(shape)
