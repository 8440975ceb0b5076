"""Visible-patch embedding: the patch projection of only the kept tokens, plus their positions.

    out[b, i] = W @ patch(x[b], ids[b, i]) + bias + pos[ids[b, i]]        W = weight.view(D, P)

equals `conv(x, weight, bias, stride=patch)` flattened to tokens and gathered at ids, plus
pos[ids] (fastmavil.models.patch.PatchEmbed). The plain path patchifies the whole input (a copy
of x), gathers the kept patches (a second copy), casts them under autocast (a third) and adds a
gathered copy of pos. Here three launches, as in kernels.diffuse_embed:

  1. `_patch_gather_kernel`: reads only the kept patches straight from x by index arithmetic
     (kernels._patches.patch_offsets) and writes them once, (B*n, P) in the compute dtype: the
     A operand of the projection and the tensor F.linear's backward keeps, so the whole
     patchified input (B, N, P) is never materialised;
  2. F.linear(patches, W, bias) in the compute dtype: one cuBLAS matmul, as the plain path's;
  3. `kernels._add_pos`: + pos[ids] in fp32, written in x's dtype.

Why not one kernel with the matmul fused: it was one until 2026-11-27. On an H200 its programs,
one per block of features, each gathered their row tile again, and its Triton matmul ran at a
fraction of cuBLAS's speed (24 us for the audio embedding's forward at B = 32, rho = 0.8 in
training's setting, where cuBLAS's projection of the same rows took 5 us; 101 us on video); it
also stored the patches for backward from inside its pipelined matmul loop, which raced in bf16
(Triton 3.6, the pattern of triton-lang/triton#8139). The same split took kernels.diffuse_embed
from 1.1-1.3x to 3.0-4.3x its reference in that setting (BENCHMARKS.md has all of these).

Backward (weight, bias and pos; x and the integer ids get none): grad_weight = grad_out^T
patches is one cuBLAS matmul on the saved patches; grad_bias and grad_pos come from one
deterministic pass over grad_out (kernels._token_grads; for grad_pos the forward also links each
row to its token); under autocast that pass also casts grad_out for the matmul.

Dtypes: the patches and the projection use x's dtype, or the autocast dtype when autocast is on
for x's device (as F.linear would), with W and bias cast to it per call as autocast casts them;
fp32 matmuls use TF32 exactly when torch allows it; pos is added in fp32 and the output has x's
dtype (so under autocast with fp32 x it is fp32, as the plain path's bf16 linear + fp32 pos).
weight, bias and pos may be fp32, bf16 or fp16, each independently; their gradients come back
in their own dtypes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

import kernels
from kernels._add_pos import add_pos
from kernels._patches import (as_5d, check_ids, check_sample_span, check_tensors, compute_dtype,
                              geometry, patch_offsets, reference_gather)
from kernels._token_grads import embedding_backward, link_tokens


def reference_patch_embed_visible(x: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor, pos: torch.Tensor,
                                  patch_size: tuple[int, ...]) -> torch.Tensor:
    """The plain PyTorch computation: patchify + gather + F.linear + pos gather -> (B, n, D)."""
    visible = reference_gather(x, ids_keep, patch_size)
    tokens = F.linear(visible, weight.flatten(1).to(x.dtype), bias.to(x.dtype))
    return (tokens + pos[ids_keep].to(x.dtype)).to(x.dtype)


@triton.jit
def _patch_gather_kernel(x_ptr, ids_ptr, out_ptr, R, n, P, GH, GW, stride_ib, stride_in,
                         stride_xb, stride_xc, stride_xd, stride_xh, stride_xw,
                         PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Elements of BLOCK_K of the patches of BLOCK_M rows of the (B*n) kept tokens, read from x
    and written to out (B*n, P) in its dtype."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < R
    b = rows // n
    tok = tl.load(ids_ptr + b * stride_ib + (rows - b * n) * stride_in, mask=row_ok,
                  other=0).to(tl.int32)
    mask = row_ok[:, None] & (ks < P)[None, :]
    offs = patch_offsets(tok, ks, GH, GW, PD, PH, PW, stride_xc, stride_xd, stride_xh, stride_xw)
    # Offsets within one sample fit int32; the batch term may not, hence int64.
    a = tl.load(x_ptr + b.to(tl.int64)[:, None] * stride_xb + offs, mask=mask, other=0.0)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * P + ks[None, :],
             a.to(out_ptr.dtype.element_ty), mask=mask)


# A copy: 32 rows x 128 elements a program (P = 256 or 1536 splits evenly), 4 warps.
GATHER_BLOCK_M, GATHER_BLOCK_K = 32, 128


def gather_visible(x: torch.Tensor, ids: torch.Tensor, patch: tuple[int, ...],
                   dtype: torch.dtype) -> torch.Tensor:
    """The kept patches (B*n, P) of x in `dtype`: reference_gather(x, ids, patch) flattened."""
    x5, patch3 = as_5d(x, patch)
    check_sample_span(x5)
    g = geometry(x5, patch3)
    rows, p = ids.numel(), g["P"]
    out = torch.empty(rows, p, device=x.device, dtype=dtype)
    grid = (triton.cdiv(rows, GATHER_BLOCK_M), triton.cdiv(p, GATHER_BLOCK_K))
    _patch_gather_kernel[grid](x5, ids, out, rows, ids.shape[1], p, g["GH"], g["GW"],
                               *ids.stride(), *x5.stride(), PD=patch3[0], PH=patch3[1],
                               PW=patch3[2], BLOCK_M=GATHER_BLOCK_M, BLOCK_K=GATHER_BLOCK_K,
                               num_warps=4)
    return out


class _PatchEmbedVisible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                pos: torch.Tensor, patch: tuple[int, ...], compute: torch.dtype, save: bool,
                link: bool) -> torch.Tensor:
        patches = gather_visible(x, ids, patch, compute)
        # The projection as the plain path's F.linear under autocast: operands in the compute
        # dtype, its output rounded to it (x may be bf16 with fp32 weights outside autocast).
        w2 = weight.reshape(weight.shape[0], -1)
        out = add_pos(F.linear(patches, w2.to(compute), bias.to(compute)), pos, ids, x.dtype)
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
    Runs the kernels (and cuBLAS) where kernels.can_launch allows, else the PyTorch reference.
    """
    patch = tuple(int(s) for s in patch_size)
    _check(x, ids_keep, weight, bias, pos, patch)
    if kernels.can_launch("patch_embed_visible", x, weight):
        # Keep the patches only for a weight gradient, link rows to tokens only for grad_pos
        # (needs_input_grad ignores no_grad).
        grad = torch.is_grad_enabled()
        with kernels.on_device(x):  # backward runs on autograd's thread for x's device
            return _PatchEmbedVisible.apply(x, ids_keep, weight, bias, pos, patch,
                                            compute_dtype(x), weight.requires_grad and grad,
                                            pos.requires_grad and grad)
    return reference_patch_embed_visible(x, ids_keep, weight, bias, pos, patch)
