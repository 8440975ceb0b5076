"""Visible-patch embedding: the patch projection of only the kept tokens, plus their positions.

    out[b, i] = W @ patch(x[b], ids[b, i]) + bias + pos[ids[b, i]]        W = weight.view(D, P)

equals `conv(x, weight, bias, stride=patch)` flattened to tokens and gathered at ids, plus
pos[ids] (fastmavil.models.patch.PatchEmbed). Fusion: one tiled matmul whose A operand is read
straight from x by index arithmetic (kernels._patches.patch_offsets), so the patchified input
(B, N, P) is never materialised; bias and positions are added in the epilogue.

When weight needs a gradient, the programs of the first feature block also write the A tiles
they loaded, i.e. the visible patches (B*n, P) in the compute dtype (the tensor the plain path
saves for F.linear's backward), and backward computes grad_weight = grad_out^T @ patches with
one cuBLAS matmul. (A Triton weight-grad kernel that re-gathered the patches from x was slower
than the reference's backward on an H200 in seven of eight cases; BENCHMARKS.md.) grad_bias and
grad_pos come from one deterministic pass over grad_out (kernels._token_grads; for grad_pos the
forward also links each row to its token); under autocast that pass also casts grad_out for the
matmul. x and the integer ids get no gradient.

Dtypes: the matmul runs in x's dtype, or in the autocast dtype when autocast is on for x's
device (as F.linear would), with x's tiles cast inside the kernel (no copy of x), the weight
transposed and cast once per call as F.linear's autocast casts it (D*P elements), and fp32
accumulation; bias and pos are added to the fp32 accumulator, which is rounded once, to x's
dtype (so under autocast with fp32 x the output is fp32, as the plain path's bf16 linear + fp32
pos, but a little more precise: the plain path rounds x W^T + bias to bf16 before adding pos,
and kernels.diffuse_embed, whose projection is a cuBLAS call, does too). weight, bias and pos may be
fp32, bf16 or fp16, each independently; their gradients come back in their own dtypes. fp32
matmuls use TF32 exactly when torch's own fp32 matmuls may (fp32_precision / allow_tf32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

import kernels
from kernels._patches import (as_5d, check_ids, check_sample_span, check_tensors, compute_dtype,
                              dot_constexprs, geometry, mma, patch_offsets, reference_gather)
from kernels._token_grads import embedding_backward, link_tokens


def reference_patch_embed_visible(x: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor, pos: torch.Tensor,
                                  patch_size: tuple[int, ...]) -> torch.Tensor:
    """The plain PyTorch computation: patchify + gather + F.linear + pos gather -> (B, n, D)."""
    visible = reference_gather(x, ids_keep, patch_size)
    tokens = F.linear(visible, weight.flatten(1).to(x.dtype), bias.to(x.dtype))
    return (tokens + pos[ids_keep].to(x.dtype)).to(x.dtype)


@triton.jit
def _patch_embed_kernel(x_ptr, ids_ptr, w_ptr, bias_ptr, pos_ptr, out_ptr, patches_ptr, R, n,
                        D, P, GH, GW, stride_ib, stride_in, stride_xb, stride_xc, stride_xd,
                        stride_xh, stride_xw, PD: tl.constexpr, PH: tl.constexpr,
                        PW: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                        ROUND_ONLY: tl.constexpr, SAVE_PATCHES: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_M rows of the (B*n) tokens, BLOCK_N features) tile: gathered patches @ W^T;
    with SAVE_PATCHES the first feature block also stores the patches (B*n, P) for backward."""
    # Feature blocks vary fastest: the programs sharing a row tile run together, so its gathered
    # patches are re-read from L2. Row tiles span samples, so a small n (51 audio tokens at
    # rho = 0.9) does not leave most of each tile empty.
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < R, cols < D
    b = rows // n
    i = rows - b * n
    tok = tl.load(ids_ptr + b * stride_ib + i * stride_in, mask=row_ok, other=0).to(tl.int32)
    # Offsets within one sample fit int32; the batch term may not, hence int64.
    x_b = x_ptr + b.to(tl.int64)[:, None] * stride_xb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, P, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < P
        offs = patch_offsets(tok, ks, GH, GW, PD, PH, PW,
                             stride_xc, stride_xd, stride_xh, stride_xw)
        a = tl.load(x_b + offs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if SAVE_PATCHES:
            if pid_n == 0:
                tl.store(patches_ptr + rows.to(tl.int64)[:, None] * P + ks[None, :],
                         a.to(patches_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & k_ok[None, :])
        w = tl.load(w_ptr + ks[:, None] * D + cols[None, :],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(acc, a, w, COMPUTE, PRECISION, ROUND_ONLY)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc += tl.load(pos_ptr + tok[:, None] * D + cols[None, :], mask=tile_ok,
                   other=0.0).to(tl.float32)
    out = out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


def _config(m: int, n: int, k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=warps,
                         num_stages=stages)


# H100 candidates (B*n ~ 800-13000 rows, D 384-1024, P 256 or 1536): every candidate is one
# more compile (seconds) per dtype and patch geometry. 64x128x32 needs about half the shared
# memory of the others with fp32 x, and no spills, so several programs fit an SM (ptxas's
# counts per candidate: BENCHMARKS.md, `python -m kernels.compile_check`).
# The interpreter runs one fixed config instead (autotuning would time every candidate), with
# wide tiles since its cost is per operation rather than per element.
_forward_tuned = triton.autotune(
    [_config(128, 128, 64, 8, 3), _config(64, 128, 64, 4, 3), _config(128, 64, 64, 4, 3),
     _config(64, 128, 32, 4, 3)],
    key=["R", "D", "P", "COMPUTE", "PRECISION", "SAVE_PATCHES"])(_patch_embed_kernel)
_FWD_INTERPRET = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128}


def _geometry_args(x: torch.Tensor, ids: torch.Tensor, patch: tuple[int, ...]) -> tuple:
    x5, patch3 = as_5d(x, patch)
    check_sample_span(x5)
    g = geometry(x5, patch3)
    runtime = (g["GH"], g["GW"], *ids.stride(), *x5.stride())
    return x5, runtime, dict(zip(("PD", "PH", "PW"), patch3))


class _PatchEmbedVisible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                pos: torch.Tensor, patch: tuple[int, ...], compute: torch.dtype, save: bool,
                link: bool) -> torch.Tensor:
        b, n = ids.shape
        d, p = weight.shape[0], weight.shape[1:].numel()
        # W^T (P, D) in the compute dtype, as F.linear's autocast cast (one copy of D*P per call):
        # every program loads its W tiles, so fp32 tiles would double their L2 traffic and shared
        # memory. Row-major (K, N) tiles, the layout of Triton's own matmul: on an H200 (Triton
        # 3.6) bf16 tiles of W read K-major as (64, 128) gave wrong sums (bench/results at 15d37cf).
        w = weight.reshape(d, p).t().to(compute).contiguous()
        x5, runtime, patch3 = _geometry_args(x, ids, patch)
        out = torch.empty(b, n, d, device=x.device, dtype=x.dtype)
        # Without a weight gradient nothing is stored: out stands in as a typed, unused pointer.
        patches = torch.empty(b * n, p, device=x.device, dtype=compute) if save else out
        const = dict(**dot_constexprs(compute), **patch3, SAVE_PATCHES=save)
        args = (x5, ids, w, bias.contiguous(), pos.contiguous(), out, patches, b * n, n, d, p,
                *runtime)
        grid = lambda meta: (triton.cdiv(d, meta["BLOCK_N"]), triton.cdiv(b * n, meta["BLOCK_M"]))
        kernels.launch(_forward_tuned, grid, _FWD_INTERPRET, *args, **const)
        links = link_tokens(ids, pos.shape[0]) if link else (None, None)
        ctx.save_for_backward(patches if save else None, *links)
        ctx.meta = (weight.shape, weight.dtype, bias.dtype, pos.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        patches, *links = ctx.saved_tensors
        grads = embedding_backward(grad_out, patches, links, ctx.meta, ctx.needs_input_grad[2:5])
        return None, None, *grads, None, None, None, None


def _check(x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
           pos: torch.Tensor, patch: tuple[int, ...]) -> None:
    x5, patch3 = as_5d(x, patch)
    g = geometry(x5, patch3)
    b, c = x.shape[:2]
    d = weight.shape[0]
    check_ids(ids, b, "ids_keep")
    check_tensors(x.device, floats=dict(x=x, weight=weight, bias=bias, pos=pos),
                  ints=dict(ids_keep=ids), no_grad=dict(x=x), fn="patch_embed_visible")
    expected = {"weight": (d, c, *patch), "bias": (d,), "pos": (g["N"], d)}
    for name, t in (("weight", weight), ("bias", bias), ("pos", pos)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {expected[name]} "
                             f"for x {tuple(x.shape)} and patch {tuple(patch)}")


def patch_embed_visible(x: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor, pos: torch.Tensor,
                        patch_size: tuple[int, ...]) -> torch.Tensor:
    """Embeddings of the visible patches with their positions.

    x (B, C, T, F) with a 2-D patch or (B, C, Fr, H, W) with a 3-D one (any strides);
    ids_keep (B, n) int64 token ids in [0, N) (not range-checked: that would sync the device);
    weight (D, C, *patch_size), bias (D,), pos (N, D) -> (B, n, D) in x's dtype.
    Runs the Triton kernel where kernels.can_launch allows, else the PyTorch reference.
    """
    patch = tuple(int(s) for s in patch_size)
    _check(x, ids_keep, weight, bias, pos, patch)
    if kernels.can_launch("patch_embed_visible", x, weight):
        # Store the patches only for a weight gradient, link rows to tokens only for grad_pos
        # (needs_input_grad ignores no_grad).
        grad = torch.is_grad_enabled()
        with kernels.on_device(x):  # backward runs on autograd's thread for x's device
            return _PatchEmbedVisible.apply(x, ids_keep, weight, bias, pos, patch,
                                            compute_dtype(x), weight.requires_grad and grad,
                                            pos.requires_grad and grad)
    return reference_patch_embed_visible(x, ids_keep, weight, bias, pos, patch)
