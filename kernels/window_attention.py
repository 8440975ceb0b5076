"""Attention within small windows (the Swin audio decoder's), a whole window in registers.

    out[b, g] = softmax(q[b, g] k[b, g]^T / sqrt(d) + bias[g]) v[b, g]     q, k, v (B, G, L, d)

equals fastmavil.models.attention.attention(q, k, v, bias, "math") for a bias (G, L, L) shared
by the batch (-inf allowed: Swin's shift mask) or none; G folds windows and heads. Why: the
decoder's 4x4 windows (L = 16) with a learned bias send SDPA to its memory-efficient kernel,
which took 0.64 ms per call on an H200 (5 ms of an R4 step, bench/results/profile-NVIDIA_H200-
r4-f080127-eager.txt) for about 13 GFLOP; the call's tensors are ~17 MB each in bf16, so its
memory traffic is tens of microseconds.

A window is small (L <= MAX_WINDOW = 16), so one program holds all L x L scores: an exact softmax,
no online rescaling. Each program takes one window-head g for B_PER samples: the bias is read once
and its gradient, a sum over the batch, stays in registers and is written as one partial sum per
chunk of samples (summed by torch: deterministic, no atomics). Backward recomputes the
probabilities from q, k and the bias, and takes the softmax gradient's row term from them too,
D = rowsum(P * dP) in fp32, not from the output as FlashAttention must (rowsum(dO * O), its P
never whole): O is stored rounded to q's dtype, so each row's dS would then miss summing to 0 by
that rounding, and the bias gradient, a sum of dS over the batch, gathered it (5x the SDPA
path's error in the cosine Swin block's position-bias gradient). The output is not kept.

Dtypes: q, k, v share one of fp32, bf16, fp16 (under autocast, its dtype); scores, softmax and
every sum in fp32; P and dS are rounded to that dtype for their matmuls (as flash kernels do);
fp32 matmuls are IEEE unless torch allows TF32. The bias (any float dtype) is added in fp32 and
its gradient returned in its own dtype. Through torch.library custom ops, so compiled blocks
call the kernels without a graph break. The warps per program are autotuned on the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

import kernels
from kernels._patches import check_tensors, dot_constexprs, mma

# The largest window the kernels take (one program holds L x L fp32 scores): the Swin decoder's
# 4 x 4 windows with heads up to 64 wide, the sizes kernels.compile_check compiles (larger ones
# need more shared memory than some GPUs have); beyond them window_attention runs the reference
# (and the Swin block, SDPA).
MAX_WINDOW = 16
MAX_HEAD_DIM = 64


def reference_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """The plain PyTorch computation: explicit softmax (the model's math backend)."""
    from fastmavil.models.attention import attention
    return attention(q, k, v, bias, "math")


@triton.jit
def _probabilities(q, k, bias, key_ok, scale, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                   ROUND_ONLY: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr):
    """softmax(q k^T * scale + bias) over the real keys -> (BLOCK_L, BLOCK_L) fp32."""
    s = mma(tl.zeros((BLOCK_L, BLOCK_L), tl.float32), q, tl.trans(k), COMPUTE, PRECISION,
            ROUND_ONLY) * scale
    if HAS_BIAS:
        s += bias
    s = tl.where(key_ok[None, :], s, float("-inf"))  # the block's padding keys
    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _window(q_ptr, k_ptr, v_ptr, bias, b, B, g, L, D, scale, COMPUTE: tl.constexpr,
            PRECISION: tl.constexpr, ROUND_ONLY: tl.constexpr, HAS_BIAS: tl.constexpr,
            BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sample b's window-head g (tensors contiguous): its element offsets, their mask (nothing
    past the last sample), q, k, v and the probabilities P."""
    rows, dims = tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_D)
    ok = (rows < tl.where(b < B, L, 0))[:, None] & (dims < D)[None, :]
    offs = (b.to(tl.int64) * tl.num_programs(0) + g) * L * D + rows[:, None] * D + dims[None, :]
    q = tl.load(q_ptr + offs, mask=ok, other=0.0)
    k = tl.load(k_ptr + offs, mask=ok, other=0.0)
    v = tl.load(v_ptr + offs, mask=ok, other=0.0)
    p = _probabilities(q, k, bias, rows < L, scale, COMPUTE, PRECISION, ROUND_ONLY, HAS_BIAS,
                       BLOCK_L)
    return offs, ok, q, k, v, p


@triton.jit
def _pairs(g, L, BLOCK_L: tl.constexpr):
    """Offsets and mask of window-head g's (L, L) query-key pairs."""
    rows = tl.arange(0, BLOCK_L)
    return g * L * L + rows[:, None] * L + rows[None, :], (rows < L)[:, None] & (rows < L)[None, :]


@triton.jit
def _window_forward_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, B, L, D, scale,
                           COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                           ROUND_ONLY: tl.constexpr, HAS_BIAS: tl.constexpr, B_PER: tl.constexpr,
                           BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Window-head g (one per program along axis 0) of samples [chunk * B_PER, (chunk + 1) *
    B_PER)."""
    g, chunk = tl.program_id(0), tl.program_id(1)
    bias = 0.0
    if HAS_BIAS:
        pairs, pair_ok = _pairs(g, L, BLOCK_L)
        bias = tl.load(bias_ptr + pairs, mask=pair_ok, other=0.0).to(tl.float32)
    for i in range(B_PER):
        offs, ok, q, k, v, p = _window(q_ptr, k_ptr, v_ptr, bias, chunk * B_PER + i, B, g, L, D,
                                       scale, COMPUTE, PRECISION, ROUND_ONLY, HAS_BIAS, BLOCK_L,
                                       BLOCK_D)
        out = mma(tl.zeros((BLOCK_L, BLOCK_D), tl.float32), p, v, COMPUTE, PRECISION, ROUND_ONLY)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _window_backward_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, grad_ptr, dq_ptr, dk_ptr, dv_ptr,
                            dbias_ptr, B, L, D, scale, COMPUTE: tl.constexpr,
                            PRECISION: tl.constexpr, ROUND_ONLY: tl.constexpr,
                            HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, B_PER: tl.constexpr,
                            BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq, dk, dv of the same samples; with BIAS_GRAD the chunk's sum of dS into
    dbias_ptr[chunk, g] (fp32)."""
    g, chunk = tl.program_id(0), tl.program_id(1)
    pairs, pair_ok = _pairs(g, L, BLOCK_L)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + pairs, mask=pair_ok, other=0.0).to(tl.float32)
    dbias = tl.zeros((BLOCK_L, BLOCK_L), tl.float32)
    for i in range(B_PER):
        offs, ok, q, k, v, p = _window(q_ptr, k_ptr, v_ptr, bias, chunk * B_PER + i, B, g, L, D,
                                       scale, COMPUTE, PRECISION, ROUND_ONLY, HAS_BIAS, BLOCK_L,
                                       BLOCK_D)
        grad = tl.load(grad_ptr + offs, mask=ok, other=0.0)
        zeros = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
        dv = mma(zeros, tl.trans(p), grad, COMPUTE, PRECISION, ROUND_ONLY)
        dp = mma(tl.zeros((BLOCK_L, BLOCK_L), tl.float32), grad, tl.trans(v), COMPUTE, PRECISION,
                 ROUND_ONLY)
        # rows with no gradient (padding, samples past B) have dS = 0: they add nothing below
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        if BIAS_GRAD:
            dbias += ds
        dq = mma(zeros, ds, k, COMPUTE, PRECISION, ROUND_ONLY) * scale
        dk = mma(zeros, tl.trans(ds), q, COMPUTE, PRECISION, ROUND_ONLY) * scale
        tl.store(dq_ptr + offs, dq.to(dq_ptr.dtype.element_ty), mask=ok)
        tl.store(dk_ptr + offs, dk.to(dk_ptr.dtype.element_ty), mask=ok)
        tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=ok)
    if BIAS_GRAD:  # the partial sums of chunk c start at c * G * L * L
        tl.store(dbias_ptr + chunk * tl.num_programs(0) * L * L + pairs, dbias, mask=pair_ok)


# A window's tiles are small (16 x 32 at R4's decoder): fewer warps per program may let more
# programs share an SM. Autotuned on the GPU (the grid is the same for each, and both kernels
# only store, so timing runs can repeat); the interpreter runs 4 warps.
_WARPS = [triton.Config({}, num_warps=w) for w in (1, 2, 4)]
_TUNE_KEY = ["L", "D", "HAS_BIAS", "B_PER", "PRECISION"]
_forward_tuned = triton.autotune(_WARPS, key=_TUNE_KEY)(_window_forward_kernel)
_backward_tuned = triton.autotune(_WARPS, key=_TUNE_KEY + ["BIAS_GRAD"])(_window_backward_kernel)


def _launch(tuned, grid, *args, **const):
    # the ops run under torch.compile too, with whatever device is current
    with kernels.on_device(args[0]):
        kernels.launch(tuned, grid, {"num_warps": 4}, *args, **const)


def _launch_constants(q: torch.Tensor, bias: torch.Tensor | None) -> tuple[tuple, dict]:
    """(grid, constexprs) shared by both kernels."""
    batch, windows, length, dim = q.shape
    # a few samples per program: the bias read once and its gradient summed in registers, and
    # still B * G / B_PER programs (2048 for R4's decoder at B = 32) to fill the GPU
    b_per = min(8, triton.next_power_of_2(batch))
    block_l = max(16, triton.next_power_of_2(length))  # tl.dot's smallest tile side is 16
    block_d = max(16, triton.next_power_of_2(dim))
    grid = (windows, triton.cdiv(batch, b_per))
    return grid, dict(**dot_constexprs(q.dtype), HAS_BIAS=bias is not None, B_PER=b_per,
                      BLOCK_L=block_l, BLOCK_D=block_d)


@torch.library.custom_op("fastmavil::window_attention", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    q, k, v = (t.contiguous() for t in (q, k, v))
    bias = None if bias is None else bias.contiguous()
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    grid, const = _launch_constants(q, bias)
    _launch(_forward_tuned, grid, q, k, v, q if bias is None else bias, out, q.shape[0],
            q.shape[2], q.shape[3], q.shape[3] ** -0.5, **const)
    return out


@_forward.register_fake
def _(q, k, v, bias):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastmavil::window_attention_backward", mutates_args=())
def _backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              bias: torch.Tensor | None, bias_grad: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias); dbias is empty unless bias_grad."""
    grad, q, k, v = (t.contiguous() for t in (grad, q, k, v))
    bias = None if bias is None else bias.contiguous()
    dq, dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    grid, const = _launch_constants(q, bias)
    windows, length = q.shape[1], q.shape[2]
    partial = torch.empty((grid[1], windows, length, length) if bias_grad else (0,),
                          device=q.device, dtype=torch.float32)
    _launch(_backward_tuned, grid, q, k, v, q if bias is None else bias, grad, dq, dk, dv,
            partial, q.shape[0], length, q.shape[3], q.shape[3] ** -0.5, BIAS_GRAD=bias_grad,
            **const)
    dbias = partial.sum(0).to(bias.dtype) if bias_grad else partial
    return dq, dk, dv, dbias


@_backward.register_fake
def _(grad, q, k, v, bias, bias_grad):
    dbias = (torch.empty(bias.shape, device=q.device, dtype=bias.dtype) if bias_grad
             else q.new_empty((0,), dtype=torch.float32))
    return (*(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)),
            dbias)


def _setup_context(ctx, inputs, output):
    q, k, v, bias = inputs
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[3]
    ctx.save_for_backward(q, k, v, bias)


def _backward_autograd(ctx, grad):
    q, k, v, bias = ctx.saved_tensors
    dq, dk, dv, dbias = _backward(grad, q, k, v, bias, ctx.bias_grad)
    return dq, dk, dv, dbias if ctx.bias_grad else None


_forward.register_autograd(_backward_autograd, setup_context=_setup_context)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one (B, G, L, d) shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    _, windows, length, dim = q.shape
    if bias is not None and tuple(bias.shape) != (windows, length, length):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected (G, L, L) = "
                         f"{(windows, length, length)}, shared by the batch")
    check_tensors(q.device, floats=dict(q=q, k=k, v=v, bias=bias))


def fits(q: torch.Tensor) -> bool:
    """Whether windows of q (B, G, L, d) are within the kernels' sizes."""
    return q.shape[2] <= MAX_WINDOW and q.shape[3] <= MAX_HEAD_DIM


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v for q, k, v (B, G, L, d) and bias (G, L, L) or None.

    Under autocast q, k, v are first cast to the autocast dtype, as torch casts SDPA's inputs
    (the cosine Swin block's normalised q and k come out of autocast in fp32, its v in bf16).
    The Triton kernels where kernels.can_launch allows and the window fits (L <= MAX_WINDOW,
    d <= MAX_HEAD_DIM), else the math reference."""
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t.to(dtype) for t in (q, k, v))
    _check(q, k, v, bias)
    tensors = (q, k, v) if bias is None else (q, k, v, bias)
    if fits(q) and kernels.can_launch("window_attention", *tensors):
        # contiguous here, so that what backward keeps is what the kernels read (no copy there)
        return _forward(q.contiguous(), k.contiguous(), v.contiguous(),
                        None if bias is None else bias.contiguous())
    return reference_window_attention(q, k, v, bias)
