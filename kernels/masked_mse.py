"""Masked-patch reconstruction loss, fused: gather + per-patch normalisation + MSE in one kernel.

The plain path (`reference_masked_patch_mse`) patchifies x, gathers the masked patches into a
(B, m, P) target, normalises it per patch (norm_pix) and takes the mean of (pred - target)^2:
three materialised (B, m, P) tensors. The forward kernel instead reads each masked patch straight
from x through `patch_offsets`, so the target never exists in memory. One program owns BLOCK_M
tokens of one sample and loops over the P patch elements in BLOCK_K chunks, twice when norm_pix:
pass 1 computes the per-token mean and variance (chunk statistics merged with Chan's formula, so
large offsets do not cancel as sum/sum-of-squares would), pass 2 accumulates the squared error
in fp32. Two passes instead of one row kept in registers: P is 256 (audio) or 1536 (video, not a
power of two, so a whole-row tile would be 2048 wide with a quarter masked off), a register row
caps BLOCK_M and occupancy, and the second read of the program's small tile (BLOCK_M * P
elements) hits L1/L2, so DRAM still sees x and pred once. Each program writes the partial sums of
its BLOCK_M tokens; torch.sum over these B * m partials (no atomics) makes the result
deterministic. Per token rather than per program: the layout then does not depend on the block
config, so the autotuner's trial runs leave no stale partials behind.

Backward (to pred only; x is data and ids are indices) recomputes the target from x with the
per-token mean and rstd saved by the forward (2 * B * m floats) and writes
grad_pred = 2 * (pred - target) * grad_out / (B * m * P) in pred's dtype.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

import kernels
from fastmavil.losses import masked_mse, normalize_patches

from ._patches import (as_5d, check_ids, check_sample_span, check_tensors, geometry,
                       reference_gather, triton)

EPS = 1e-6  # normalize_patches' default: keeps constant patches (variance 0) finite
# The interpreter runs one fixed config (autotuning there is too slow); BLOCK_K = 1024 leaves a
# masked tail for both P = 256 and P = 1536, so tests exercise the masks.
INTERPRET_CONFIG = {"BLOCK_M": 4, "BLOCK_K": 1024}


def reference_masked_patch_mse(pred: torch.Tensor, x: torch.Tensor, ids_mask: torch.Tensor,
                               patch_size: tuple[int, ...], norm_pix: bool = True) -> torch.Tensor:
    """The plain PyTorch loss, in fp32: gather the masked patches of x, normalise, MSE."""
    target = reference_gather(x.detach(), ids_mask, tuple(patch_size)).float()
    if norm_pix:
        target = normalize_patches(target, EPS)
    return masked_mse(pred, target)


def masked_patch_mse(pred: torch.Tensor, x: torch.Tensor, ids_mask: torch.Tensor,
                     patch_size: tuple[int, ...], norm_pix: bool = True) -> torch.Tensor:
    """Mean of (pred - target)^2 over the masked patches (0-dim fp32).

    pred (B, m, P) in the order of ids_mask (B, m) int64; target = the patches of x at ids_mask,
    normalised per patch when norm_pix. Audio x (B, 1, T, F) with a 2-D patch, video
    (B, C, Fr, H, W) with a 3-D one; pred and x fp32, bf16 or fp16, on one device (checked on
    the reference path too). Gradient flows to pred only: x is data. ids must lie in [0, N) (not
    checked: that would synchronise the GPU).
    """
    patch_size = tuple(patch_size)
    _check(pred, x, ids_mask, patch_size)
    if kernels.can_launch("masked_patch_mse", pred, x):
        with kernels.on_device(x):  # backward runs on autograd's thread for x's device
            return _MaskedPatchMSE.apply(pred, x, ids_mask, patch_size, norm_pix)
    return reference_masked_patch_mse(pred, x, ids_mask, patch_size, norm_pix)


def _check(pred: torch.Tensor, x: torch.Tensor, ids: torch.Tensor,
           patch: tuple[int, ...]) -> None:
    geo = geometry(*as_5d(x, patch))
    check_ids(ids, x.shape[0], "ids_mask")
    check_tensors(x.device, floats=dict(pred=pred, x=x), ints=dict(ids_mask=ids))
    expected = (x.shape[0], ids.shape[1], geo["P"])
    if tuple(pred.shape) != expected:
        raise ValueError(f"pred has shape {tuple(pred.shape)}; expected (B, m, P) = {expected} "
                         f"from x {tuple(x.shape)}, patch {patch} and ids_mask "
                         f"{tuple(ids.shape)}")


if triton is not None:
    import triton.language as tl

    from ._patches import load_patches, patch_stats

    CUDA_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w)
                    for bm, bk, w in ((4, 256, 4), (8, 256, 4), (8, 512, 8))]

    @triton.jit
    def _token_block(ids_ptr, stride_ib, stride_im, M, BLOCK_M: tl.constexpr):
        """This program's sample b (int64: b * stride may pass 2^31), rows, and token ids
        (int32, as the other kernels: offsets within one sample fit, and the per-element index
        arithmetic then runs in 32 bits)."""
        b = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        token = tl.load(ids_ptr + b * stride_ib + rows * stride_im, mask=row_ok, other=0)
        return b, rows, row_ok, token.to(tl.int32)

    @triton.jit
    def _residual(x_base, p_base, token, row_ok, k0, mean, rstd, P, GH, GW, stride_pk,
                  stride_xc, stride_xd, stride_xh, stride_xw, PD: tl.constexpr,
                  PH: tl.constexpr, PW: tl.constexpr, BLOCK_K: tl.constexpr):
        """pred - target for patch elements k0 + [0, BLOCK_K) (0 outside), those k and mask."""
        k = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (k < P)[None, :]
        xv = load_patches(x_base, token, row_ok, k, P, GH, GW, PD, PH, PW,
                          stride_xc, stride_xd, stride_xh, stride_xw)
        pv = tl.load(p_base + k[None, :] * stride_pk, mask=mask, other=0.0).to(tl.float32)
        return tl.where(mask, pv - (xv - mean[:, None]) * rstd[:, None], 0.0), k, mask

    @triton.jit
    def _mse_fwd_kernel(pred_ptr, x_ptr, ids_ptr, mean_ptr, rstd_ptr, partial_ptr, eps,
                        M, P, GH, GW, stride_pb, stride_pm, stride_pk,
                        stride_xb, stride_xc, stride_xd, stride_xh, stride_xw,
                        stride_ib, stride_im,
                        PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                        NORM_PIX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        b, rows, row_ok, token = _token_block(ids_ptr, stride_ib, stride_im, M, BLOCK_M)
        x_base = x_ptr + b * stride_xb
        mean = tl.zeros([BLOCK_M], tl.float32)
        rstd = tl.full([BLOCK_M], 1.0, tl.float32)  # mean 0, rstd 1: target = x (exactly)
        if NORM_PIX:
            mean, rstd = patch_stats(x_base, token, row_ok, P, GH, GW, PD, PH, PW, stride_xc,
                                     stride_xd, stride_xh, stride_xw, eps, BLOCK_M, BLOCK_K)

        p_base = pred_ptr + b * stride_pb + rows[:, None] * stride_pm
        acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)  # reduced once at the end: fewer roundings
        for k0 in range(0, P, BLOCK_K):
            diff, _, _ = _residual(x_base, p_base, token, row_ok, k0, mean, rstd, P, GH, GW,
                                   stride_pk, stride_xc, stride_xd, stride_xh, stride_xw,
                                   PD, PH, PW, BLOCK_K)
            acc += diff * diff
        tl.store(partial_ptr + b * M + rows, tl.sum(acc, axis=1), mask=row_ok)
        tl.store(mean_ptr + b * M + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + b * M + rows, rstd, mask=row_ok)

    @triton.jit
    def _mse_bwd_kernel(pred_ptr, x_ptr, ids_ptr, mean_ptr, rstd_ptr, grad_out_ptr, grad_ptr,
                        scale, M, P, GH, GW, stride_pb, stride_pm, stride_pk,
                        stride_xb, stride_xc, stride_xd, stride_xh, stride_xw,
                        stride_ib, stride_im,
                        PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        b, rows, row_ok, token = _token_block(ids_ptr, stride_ib, stride_im, M, BLOCK_M)
        x_base = x_ptr + b * stride_xb
        mean = tl.load(mean_ptr + b * M + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + b * M + rows, mask=row_ok, other=1.0)
        # grad_out read on the device: no host sync. scale = 2 / (B * m * P).
        coef = tl.load(grad_out_ptr).to(tl.float32) * scale
        p_base = pred_ptr + b * stride_pb + rows[:, None] * stride_pm
        g_base = grad_ptr + (b * M + rows[:, None]) * P
        for k0 in range(0, P, BLOCK_K):
            diff, k, mask = _residual(x_base, p_base, token, row_ok, k0, mean, rstd, P, GH, GW,
                                      stride_pk, stride_xc, stride_xd, stride_xh, stride_xw,
                                      PD, PH, PW, BLOCK_K)
            tl.store(g_base + k[None, :], (diff * coef).to(grad_ptr.dtype.element_ty), mask=mask)

    # keyed on what changes the work: the forward's second pass over P with norm_pix
    _tuned = {_mse_fwd_kernel: triton.autotune(CUDA_CONFIGS, key=["M", "P", "NORM_PIX"])(
                  _mse_fwd_kernel),
              _mse_bwd_kernel: triton.autotune(CUDA_CONFIGS, key=["M", "P"])(_mse_bwd_kernel)}


def _launch(kernel, batch: int, m: int, *args, **constexprs) -> None:
    """Grid (token blocks, B)."""
    kernels.launch(_tuned[kernel], lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), batch),
                   INTERPRET_CONFIG, *args, **constexprs)


def _geometry_args(pred: torch.Tensor, x: torch.Tensor, patch: tuple[int, ...]) -> tuple:
    """(M, P, GH, GW, pred strides, x strides) and the patch constexprs, shared by both kernels."""
    x5, (pd, ph, pw) = as_5d(x, patch)
    check_sample_span(x5)
    geo = geometry(x5, (pd, ph, pw))
    return ((pred.shape[1], geo["P"], geo["GH"], geo["GW"], *pred.stride(), *x5.stride()),
            {"PD": pd, "PH": ph, "PW": pw})


class _MaskedPatchMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred: torch.Tensor, x: torch.Tensor, ids: torch.Tensor,
                patch: tuple[int, ...], norm_pix: bool) -> torch.Tensor:
        batch, m, p = pred.shape
        partials = torch.empty(batch, m, dtype=torch.float32, device=pred.device)
        stats = torch.empty(2, batch, m, dtype=torch.float32, device=pred.device)  # mean, rstd
        geo_args, constexprs = _geometry_args(pred, x, patch)
        _launch(_mse_fwd_kernel, batch, m, pred, x, ids, stats[0], stats[1], partials, EPS,
                *geo_args, *ids.stride(), NORM_PIX=norm_pix, **constexprs)
        ctx.save_for_backward(pred, x, ids, stats)
        ctx.patch = patch
        return partials.sum() / (batch * m * p)

    @staticmethod
    @once_differentiable  # the kernel's gradient has no graph to differentiate again
    def backward(ctx, grad_out: torch.Tensor):
        pred, x, ids, stats = ctx.saved_tensors
        batch, m, p = pred.shape
        grad = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
        geo_args, constexprs = _geometry_args(pred, x, ctx.patch)
        _launch(_mse_bwd_kernel, batch, m, pred, x, ids, stats[0], stats[1], grad_out, grad,
                2.0 / (batch * m * p), *geo_args, *ids.stride(), **constexprs)
        return grad, None, None, None, None
