"""Attention over whole sequences (no mask, no bias) read from, and its gradients written into,
the projections' packed layouts:

    self_attention(qkv, heads)       qkv (B, L, 3D): q, k, v its three column blocks
    cross_attention(q, kv, heads)    q (B, Lq, D), kv (B, Lk, 2D): k, v its two column blocks
    -> out (B, Lq, D), head h in columns [h d, (h + 1) d), d = D / heads

each equal to splitting the heads, softmax(q k^T / sqrt(d)) v per head (the model's math
backend) and merging them again. Why: the encoders' and the video decoder's attention took
11.4 ms of a 75 ms R4 step on an H200 in SDPA's fastest (cuDNN) kernels, about 150 TFLOP/s,
a sixth of the GPU's peak (bench/results/attention-NVIDIA_H200-base.json): the sequences are
short (102, 314 and 416 tokens; 1254 queries on 314 keys in the decoder, whose heads are 32
wide). Around cuDNN's main kernels (9.6 ms per step) the step's profile (fe81939,
bench/results/profile-NVIDIA_H200-r4-compile-graph.txt) shows ~3.2 ms that this layout and
backward avoid: the gradients' reassembly into the projection's layout (1.3 ms of copies; these
kernels read and write the packed layouts through strides) and cuDNN's auxiliary kernels
(1.9 ms: rowsum(dO * O), and dq accumulated in fp32 then converted; here the dq kernel computes
the first and owns its rows, no atomics). Whether that pays depends on the main kernels' speed
against cuDNN's, which only a GPU run tells (SDPA's flash kernel, the same algorithm, was
1.3-1.7x slower than cuDNN at these sites).

FlashAttention's algorithm: the forward streams key blocks through an online softmax and keeps
each row's log-sum-exp; the backward recomputes the probabilities from it, in two kernels that
each own their outputs (no atomics, deterministic): one per query block for dq (it also stores
D = rowsum(dO * O), the softmax gradient's row term), then one per key block for dk and dv.
Scores, softmax and sums in fp32 (exp2 with log2(e) folded into the scale); P and dS rounded to
the inputs' dtype for their matmuls, as flash kernels do. Through torch.library custom ops, so
compiled blocks call the kernels without a graph break. Block sizes and warps are autotuned on
the GPU; the interpreter runs INTERPRETER_BLOCKS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

import kernels
from kernels._patches import check_tensors, dot_constexprs, mma

# The widest head the kernels take (a program holds BLOCK_M x d and BLOCK_N x d tiles), and the
# most samples x heads (the grid's second axis, at most 65,535 on CUDA); beyond them the
# reference runs.
MAX_HEAD_DIM = 128
MAX_SAMPLE_HEADS = 65535
LOG2E = 1.4426950408889634
# The one block shape the interpreter runs (tests set others): small, so that short test
# sequences still span several blocks, the last one partial.
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def reference_self_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """The plain PyTorch computation (the model's math backend) on the packed layout."""
    from fastmavil.models.attention import heads_attention
    return heads_attention(*qkv.chunk(3, dim=-1), heads, backend="math")


def reference_cross_attention(q: torch.Tensor, kv: torch.Tensor, heads: int) -> torch.Tensor:
    from fastmavil.models.attention import heads_attention
    return heads_attention(q, *kv.chunk(2, dim=-1), heads, backend="math")


@triton.jit
def _offsets(b, h, rows, dims, stride_b, stride_l, L, HEAD_DIM: tl.constexpr):
    """Element offsets and mask of rows `rows` of head h of sample b in a (B, L, *) layout."""
    offs = b.to(tl.int64) * stride_b + rows[:, None] * stride_l + h * HEAD_DIM + dims[None, :]
    return offs, (rows < L)[:, None] & (dims < HEAD_DIM)[None, :]


@triton.jit
def _tile(ptr, b, h, rows, dims, stride_b, stride_l, L, HEAD_DIM: tl.constexpr):
    """Those rows' tile; rows past L and dims past HEAD_DIM read 0."""
    offs, mask = _offsets(b, h, rows, dims, stride_b, stride_l, L, HEAD_DIM)
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _program(H, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's sample-head (bh = b * H + h, b, h), the rows of its block (BLOCK long)
    and the head's dims. The blocks of one head are neighbours on the grid's first axis, so
    they run close in time and re-read the head's keys and values from L2."""
    block, bh = tl.program_id(0), tl.program_id(1)
    return bh, bh // H, bh % H, block * BLOCK + tl.arange(0, BLOCK), tl.arange(0, BLOCK_D)


@triton.jit
def _key_block(q, k_ptr, v_ptr, b, h, start, dims, sk_b, sk_l, sv_b, sv_l, Lk,
               HEAD_DIM: tl.constexpr, scale_log2, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
               ROUND_ONLY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key block at `start`: its k and v tiles, which of its keys are real, and the query
    tile's scores against it, scaled to log2 units."""
    cols = start + tl.arange(0, BLOCK_N)
    k = _tile(k_ptr, b, h, cols, dims, sk_b, sk_l, Lk, HEAD_DIM)
    v = _tile(v_ptr, b, h, cols, dims, sv_b, sv_l, Lk, HEAD_DIM)
    s = mma(tl.zeros((BLOCK_M, BLOCK_N), tl.float32), q, tl.trans(k), COMPUTE, PRECISION,
            ROUND_ONLY) * scale_log2
    return k, v, cols < Lk, s


@triton.jit
def _attention_forward_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, H, Lq, Lk,
                              HEAD_DIM: tl.constexpr, sq_b, sq_l, sk_b, sk_l, sv_b, sv_l, so_b,
                              so_l, scale_log2, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                              ROUND_ONLY: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A query block of a sample-head: out, and the rows' log2-sum-exp2 of the scaled scores
    into lse (B * H, Lq)."""
    bh, b, h, rows, dims = _program(H, BLOCK_M, BLOCK_D)
    q = _tile(q_ptr, b, h, rows, dims, sq_b, sq_l, Lq, HEAD_DIM)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # the running row maximum
    l = tl.zeros((BLOCK_M,), tl.float32)                # and sum of exp2(s - m)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, Lk, BLOCK_N):
        _, v, key_ok, s = _key_block(q, k_ptr, v_ptr, b, h, start, dims, sk_b, sk_l, sv_b, sv_l,
                                     Lk, HEAD_DIM, scale_log2, COMPUTE, PRECISION, ROUND_ONLY,
                                     BLOCK_M, BLOCK_N)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every block holds a real key
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = mma(acc * alpha[:, None], p, v, COMPUTE, PRECISION, ROUND_ONLY)
        m = m_new
    offs, mask = _offsets(b, h, rows, dims, so_b, so_l, Lq, HEAD_DIM)
    tl.store(out_ptr + offs, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + bh.to(tl.int64) * Lq + rows, m + tl.log2(l), mask=rows < Lq)


@triton.jit
def _attention_dq_kernel(q_ptr, k_ptr, v_ptr, out_ptr, grad_ptr, lse_ptr, delta_ptr, dq_ptr, H,
                         Lq, Lk, HEAD_DIM: tl.constexpr, sq_b, sq_l, sk_b, sk_l, sv_b, sv_l,
                         so_b, so_l, sg_b, sg_l, sdq_b, sdq_l, scale, scale_log2,
                         COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                         ROUND_ONLY: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq of a query block, and its rows' D = rowsum(dO * O) into delta (B * H, Lq)."""
    bh, b, h, rows, dims = _program(H, BLOCK_M, BLOCK_D)
    q = _tile(q_ptr, b, h, rows, dims, sq_b, sq_l, Lq, HEAD_DIM)
    grad = _tile(grad_ptr, b, h, rows, dims, sg_b, sg_l, Lq, HEAD_DIM)
    out = _tile(out_ptr, b, h, rows, dims, so_b, so_l, Lq, HEAD_DIM)
    delta = tl.sum(grad.to(tl.float32) * out.to(tl.float32), axis=1)
    row_ok = rows < Lq
    tl.store(delta_ptr + bh.to(tl.int64) * Lq + rows, delta, mask=row_ok)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, Lk, BLOCK_N):
        k, v, key_ok, s = _key_block(q, k_ptr, v_ptr, b, h, start, dims, sk_b, sk_l, sv_b, sv_l,
                                     Lk, HEAD_DIM, scale_log2, COMPUTE, PRECISION, ROUND_ONLY,
                                     BLOCK_M, BLOCK_N)
        p = tl.where(key_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = mma(tl.zeros((BLOCK_M, BLOCK_N), tl.float32), grad, tl.trans(v), COMPUTE,
                 PRECISION, ROUND_ONLY)
        dq = mma(dq, p * (dp - delta[:, None]), k, COMPUTE, PRECISION, ROUND_ONLY)
    offs, mask = _offsets(b, h, rows, dims, sdq_b, sdq_l, Lq, HEAD_DIM)
    tl.store(dq_ptr + offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attention_dkdv_kernel(q_ptr, k_ptr, v_ptr, grad_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, H,
                           Lq, Lk, HEAD_DIM: tl.constexpr, sq_b, sq_l, sk_b, sk_l, sv_b, sv_l,
                           sg_b, sg_l, sdk_b, sdk_l, sdv_b, sdv_l, scale, scale_log2,
                           COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                           ROUND_ONLY: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk and dv of a key block, over every query block, transposed: the block's keys are the
    rows of P^T."""
    bh, b, h, cols, dims = _program(H, BLOCK_N, BLOCK_D)
    k = _tile(k_ptr, b, h, cols, dims, sk_b, sk_l, Lk, HEAD_DIM)
    v = _tile(v_ptr, b, h, cols, dims, sv_b, sv_l, Lk, HEAD_DIM)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start in range(0, Lq, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < Lq
        q = _tile(q_ptr, b, h, rows, dims, sq_b, sq_l, Lq, HEAD_DIM)
        grad = _tile(grad_ptr, b, h, rows, dims, sg_b, sg_l, Lq, HEAD_DIM)
        lse = tl.load(lse_ptr + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
        s_t = mma(tl.zeros((BLOCK_N, BLOCK_M), tl.float32), k, tl.trans(q), COMPUTE, PRECISION,
                  ROUND_ONLY) * scale_log2
        p_t = tl.where(row_ok[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        dv = mma(dv, p_t, grad, COMPUTE, PRECISION, ROUND_ONLY)
        dp_t = mma(tl.zeros((BLOCK_N, BLOCK_M), tl.float32), v, tl.trans(grad), COMPUTE,
                   PRECISION, ROUND_ONLY)
        dk = mma(dk, p_t * (dp_t - delta[None, :]), q, COMPUTE, PRECISION, ROUND_ONLY)
    offs, mask = _offsets(b, h, cols, dims, sdk_b, sdk_l, Lk, HEAD_DIM)
    tl.store(dk_ptr + offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask)
    offs, mask = _offsets(b, h, cols, dims, sdv_b, sdv_l, Lk, HEAD_DIM)
    tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


# Candidates for the GPU (R4's sequences are 102-416 keys: a few key blocks per program), 4 or 8
# warps, 2 or 3 pipeline stages; few, since each compiles per head width and length class. The
# forward and dq kernels own a query block (BLOCK_M rows) and loop over key blocks; the dk/dv
# kernel owns a key block (BLOCK_N) and loops over query blocks, and holds two accumulators, so
# it gets narrower loop blocks (ptxas spilled its 128 x 64 tiles
# at 4 warps). Each kernel only stores, so the autotuner's timing runs can repeat.
_QUERY_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                  for m, n, w, s in ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2),
                                     (128, 64, 4, 3))]
_KEY_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in ((32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 8, 2),
                                   (64, 128, 8, 2))]
_TUNE_KEY = ["Lq", "Lk", "HEAD_DIM", "PRECISION"]
_forward_tuned = triton.autotune(_QUERY_CONFIGS, key=_TUNE_KEY)(_attention_forward_kernel)
_dq_tuned = triton.autotune(_QUERY_CONFIGS, key=_TUNE_KEY)(_attention_dq_kernel)
_dkdv_tuned = triton.autotune(_KEY_CONFIGS, key=_TUNE_KEY)(_attention_dkdv_kernel)


def _launch(tuned, blocks_of, length: int, sample_heads: int, *args, **const):
    """Launches `tuned` over (cdiv(length, its config's blocks_of block), sample_heads)."""
    def grid(meta):
        return triton.cdiv(length, meta[blocks_of]), sample_heads
    with kernels.on_device(args[0]):  # under torch.compile too, whatever device is current
        kernels.launch(tuned, grid, {**INTERPRETER_BLOCKS, "num_warps": 4}, *args, **const)


def _constants(q: torch.Tensor, heads: int) -> tuple[int, dict]:
    head_dim = q.shape[-1] // heads
    return head_dim, dict(**dot_constexprs(q.dtype),
                          BLOCK_D=max(16, triton.next_power_of_2(head_dim)))


def _forward(q, k, v, heads):
    """q (B, Lq, D), k and v (B, Lk, D), each with unit stride along D -> (out, lse)."""
    batch, lq, dim = q.shape
    lk = k.shape[1]
    out = torch.empty((batch, lq, dim), device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, lq), device=q.device, dtype=torch.float32)
    head_dim, const = _constants(q, heads)
    _launch(_forward_tuned, "BLOCK_M", lq, batch * heads, q, k, v, out, lse, heads, lq, lk,
            head_dim, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), out.stride(0), out.stride(1), head_dim ** -0.5 * LOG2E, **const)
    return out, lse


def _backward(grad, q, k, v, out, lse, dq, dk, dv, heads) -> None:
    """Writes dq, dk, dv (views with q's, k's and v's shapes, unit stride along D)."""
    batch, lq, _ = q.shape
    lk = k.shape[1]
    head_dim, const = _constants(q, heads)
    scale = head_dim ** -0.5
    delta = torch.empty((batch, heads, lq), device=q.device, dtype=torch.float32)
    grad, lse = _unit_stride(grad), lse.contiguous()  # lse indexed as (B * H, Lq) rows
    _launch(_dq_tuned, "BLOCK_M", lq, batch * heads, q, k, v, out, grad, lse, delta, dq, heads,
            lq, lk, head_dim, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), out.stride(0), out.stride(1), grad.stride(0), grad.stride(1),
            dq.stride(0), dq.stride(1), scale, scale * LOG2E, **const)
    _launch(_dkdv_tuned, "BLOCK_N", lk, batch * heads, q, k, v, grad, lse, delta, dk, dv, heads,
            lq, lk, head_dim, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), grad.stride(0), grad.stride(1), dk.stride(0), dk.stride(1),
            dv.stride(0), dv.stride(1), scale, scale * LOG2E, **const)


def _fake_outputs(q: torch.Tensor, heads: int, dim: int):
    return (q.new_empty((q.shape[0], q.shape[1], dim)),
            q.new_empty((q.shape[0], heads, q.shape[1]), dtype=torch.float32))


@torch.library.custom_op("fastmavil::self_attention", mutates_args=())
def _self_forward(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(*qkv.chunk(3, dim=-1), heads)


@_self_forward.register_fake
def _(qkv, heads):
    return _fake_outputs(qkv, heads, qkv.shape[-1] // 3)


@torch.library.custom_op("fastmavil::self_attention_backward", mutates_args=())
def _self_backward(grad: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   heads: int) -> torch.Tensor:
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    _backward(grad, *qkv.chunk(3, dim=-1), out, lse, *dqkv.chunk(3, dim=-1),
              heads)
    return dqkv


@_self_backward.register_fake
def _(grad, qkv, out, lse, heads):
    return qkv.new_empty(qkv.shape)


@torch.library.custom_op("fastmavil::cross_attention", mutates_args=())
def _cross_forward(q: torch.Tensor, kv: torch.Tensor, heads: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, *kv.chunk(2, dim=-1), heads)


@_cross_forward.register_fake
def _(q, kv, heads):
    return _fake_outputs(q, heads, q.shape[-1])


@torch.library.custom_op("fastmavil::cross_attention_backward", mutates_args=())
def _cross_backward(grad: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dkv = torch.empty(kv.shape, device=kv.device, dtype=kv.dtype)
    _backward(grad, q, *kv.chunk(2, dim=-1), out, lse, dq,
              *dkv.chunk(2, dim=-1), heads)
    return dq, dkv


@_cross_backward.register_fake
def _(grad, q, kv, out, lse, heads):
    return q.new_empty(q.shape), kv.new_empty(kv.shape)


def _save(ctx, inputs, output):
    ctx.heads = inputs[-1]
    ctx.save_for_backward(*inputs[:-1], *output)


def _self_grads(ctx, grad, _grad_lse):
    qkv, out, lse = ctx.saved_tensors
    return _self_backward(grad, qkv, out, lse, ctx.heads), None


def _cross_grads(ctx, grad, _grad_lse):
    q, kv, out, lse = ctx.saved_tensors
    return *_cross_backward(grad, q, kv, out, lse, ctx.heads), None


_self_forward.register_autograd(_self_grads, setup_context=_save)
_cross_forward.register_autograd(_cross_grads, setup_context=_save)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride along its last dimension (the kernels' D): a copy only if not."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _prepared(name: str, heads: int, **tensors: torch.Tensor) -> list[torch.Tensor]:
    """The inputs cast to the autocast dtype where it is on (as SDPA's are), checked, with unit
    stride along D; errors name the argument."""
    first = next(iter(tensors.values()))
    if torch.is_autocast_enabled(first.device.type):
        dtype = torch.get_autocast_dtype(first.device.type)
        tensors = {n: t.to(dtype) for n, t in tensors.items()}
    for n, t in tensors.items():
        if t.dim() != 3:
            raise ValueError(f"{name}: {n} must be (B, L, features); got {tuple(t.shape)}")
    if len({t.dtype for t in tensors.values()}) > 1:
        raise TypeError(f"{name}: {', '.join(tensors)} must share a dtype; got "
                        f"{', '.join(str(t.dtype) for t in tensors.values())}")
    if len({t.shape[0] for t in tensors.values()}) > 1:
        raise ValueError(f"{name}: {', '.join(tensors)} must share a batch size; got "
                         f"{', '.join(str(tuple(t.shape)) for t in tensors.values())}")
    check_tensors(first.device, floats=tensors)
    return [_unit_stride(t) for t in tensors.values()]


def _check_heads(name: str, dim: int, heads: int) -> None:
    if heads < 1 or dim % heads:
        raise ValueError(f"{name}: width {dim} does not split into {heads} heads")


def fits(batch: int, dim: int, heads: int) -> bool:
    """Whether `batch` samples of `heads` heads over `dim` features are within the kernels'
    sizes (and the heads split dim)."""
    return (heads >= 1 and dim % heads == 0 and dim // heads <= MAX_HEAD_DIM
            and batch * heads <= MAX_SAMPLE_HEADS)


def self_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Self-attention of qkv (B, L, 3D), q, k and v its column blocks, with `heads` heads ->
    (B, L, D). The Triton kernels where kernels.can_launch allows and `fits`, else the math
    reference."""
    (qkv,) = _prepared("self_attention", heads, qkv=qkv)
    if qkv.shape[-1] % 3:
        raise ValueError(f"self_attention: qkv's width {qkv.shape[-1]} is not 3 D")
    dim = qkv.shape[-1] // 3
    _check_heads("self_attention", dim, heads)
    if fits(qkv.shape[0], dim, heads) and kernels.can_launch("attention", qkv):
        return _self_forward(qkv, heads)[0]
    return reference_self_attention(qkv, heads)


def cross_attention(q: torch.Tensor, kv: torch.Tensor, heads: int) -> torch.Tensor:
    """Queries q (B, Lq, D) attending to kv (B, Lk, 2D), k and v its column blocks, with `heads`
    heads -> (B, Lq, D). The Triton kernels where they can launch, `fits` and there are keys,
    else the math reference."""
    q, kv = _prepared("cross_attention", heads, q=q, kv=kv)
    dim = q.shape[-1]
    if kv.shape[-1] != 2 * dim:
        raise ValueError(f"cross_attention: kv's width {kv.shape[-1]} is not 2 x q's ({dim})")
    _check_heads("cross_attention", dim, heads)
    # no keys: the softmax is empty, and the reference's 0 is the convention
    if kv.shape[1] and fits(q.shape[0], dim, heads) and kernels.can_launch("attention", q, kv):
        return _cross_forward(q, kv, heads)[0]
    return reference_cross_attention(q, kv, heads)
