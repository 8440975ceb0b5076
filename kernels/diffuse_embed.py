"""DiffMAViL masked-token input: gather -> norm_pix -> diffuse -> project -> + pos.

The plain path (fastmavil.models.mavil `_reconstruct` + the decoder's `noisy_embed`) patchifies
the whole input, gathers the m masked patches, normalises them, diffuses them with noise of the
same size and projects them: four (B, m, P) tensors in HBM, and more casts under autocast. Here
the work takes three main launches (besides filling an int seed on the device and, when pos
trains, linking rows to tokens):

  1. `_diffuse_kernel`: per tile of BLOCK_M rows of the flattened (B * m) batch, reads the
     masked patches straight from x (kernels._patches.patch_offsets) and writes only
     x_t = sqrt(ab[t]) (x - mean) rstd + sqrt(1 - ab[t]) eps, (B * m, P) in the compute dtype:
     pass 1 over P (if norm_pix): per-token mean and M2, merged chunk by chunk (Chan et al.),
     exact for near-constant patches where sum(x^2) - P mean^2 cancels; pass 2 over P: reload
     the chunk and diffuse it, with eps loaded from `noise` or drawn from Philox
     (`philox_normals`: four neighbouring elements from one call);
  2. F.linear(x_t, W, bias) in the compute dtype: one cuBLAS matmul, as the plain path's;
  3. `kernels._add_pos`: + pos[ids] in fp32, written in x's dtype.

Why not one kernel with the matmul fused (as kernels.patch_embed also was): a program of such
a kernel covers a block of the decoder's features, so x_t was diffused again in each of the 2-4
programs sharing a row tile, Philox noise included, and that noise, not memory, set its speed
(on an H200 at f080127 the fused forward took 0.91-1.08 ms on video in training's setting
against 0.33-0.35 ms with given noise; BENCHMARKS.md). Backward keeps x_t anyway, for the
weight gradient, so the fused kernel wrote it too: fusion saved only the matmul's read of x_t,
and the split pays that read to draw each element's noise once and let cuBLAS do the projection.

Backward (weight, bias and pos only; the diffused patches are an input of the decoder, not a
function of a parameter): grad_weight = grad_out^T x_t is one cuBLAS matmul on the saved x_t;
grad_bias and grad_pos come from one deterministic pass over grad_out (kernels._token_grads),
as in kernels.patch_embed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import kernels
from fastmavil.diffusion import q_sample
from fastmavil.losses import normalize_patches

from ._add_pos import add_pos
from ._patches import (as_5d, check_ids, check_sample_span, check_tensors, compute_dtype,
                       geometry, reference_gather, tl, triton)
from ._token_grads import embedding_backward, link_tokens

NAME = "diffuse_embed"


def reference_diffuse_embed_masked(x: torch.Tensor, ids_mask: torch.Tensor, t: torch.Tensor,
                                   alpha_bar: torch.Tensor, weight: torch.Tensor,
                                   bias: torch.Tensor, pos: torch.Tensor,
                                   patch_size: tuple[int, ...], norm_pix: bool = True, *,
                                   noise: torch.Tensor) -> torch.Tensor:
    """The plain PyTorch path the kernel must equal; noise (B, m, P) is required. The
    projection runs in x_t's dtype (x's) or autocast's, pos is added in fp32, the output has
    x's dtype (bf16 x with fp32 weights, outside autocast, as the kernel accepts them)."""
    x0 = reference_gather(x, ids_mask, patch_size)
    if norm_pix:
        x0 = normalize_patches(x0)
    x_t = q_sample(alpha_bar, x0, t, noise)
    w2 = weight.reshape(weight.shape[0], -1)
    projected = F.linear(x_t, w2.to(x_t.dtype), bias.to(x_t.dtype))
    return (projected + pos[ids_mask]).to(x.dtype)


def diffuse_embed_masked(x: torch.Tensor, ids_mask: torch.Tensor, t: torch.Tensor,
                         alpha_bar: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         pos: torch.Tensor, patch_size: tuple[int, ...], norm_pix: bool = True,
                         noise: torch.Tensor | None = None,
                         seed: int | torch.Tensor | None = None) -> torch.Tensor:
    """Embedding (B, m, Dd) of the diffused masked patches, in x's dtype.

    x          audio (B, 1, T, F) with a 2-D patch, or video (B, C, Fr, H, W) with a 3-D patch
    ids_mask   (B, m) int64 masked token ids (row-major over the patch grid)
    t          (B,) int64 timesteps, one per sample
    alpha_bar  (T + 1,) table indexed by t directly, alpha_bar[0] = 1 (no noise), as
               fastmavil.diffusion.DiffusionSchedule.alpha_bar
    weight     (Dd, C, *patch_size) or (Dd, P), an nn.Linear(P, Dd) weight; bias (Dd,)
    pos        (N, Dd) positional embedding of every token; pos[ids_mask] is added
    norm_pix   normalise each patch by its own mean and unbiased variance (+1e-6) first, as
               losses.normalize_patches
    noise      (B, m, P) eps, or
    seed       an int or a 1-element integer tensor on x's device: eps is drawn in the kernel
               from Philox (`philox_normals` defines the stream, `philox_noise` returns it); a
               device tensor is read by the kernel, so the training step never syncs with the
               host. Exactly one of noise / seed must be given.

    The projection is F.linear in the dtype it would use in the plain path (the autocast dtype
    under autocast, else x's; fp32 with TF32 exactly when torch allows it), its output rounded
    to that dtype; the statistics and x_t are computed in fp32 and rounded once before the
    product, as the plain path rounds x_t; pos is added in fp32.
    x_t (B * m, P) in the compute dtype is written for the projection even when nothing trains
    (then freed on return). ids_mask and t are not range-checked (that would sync the device).
    Gradients flow to weight, bias and pos only (x, noise and alpha_bar must not require
    grad).
    Without a CUDA device or the Triton interpreter the reference runs; a seed then draws eps
    from torch.Generator(seed), a different stream of the same distribution.
    """
    if (noise is None) == (seed is None):
        raise ValueError("diffuse_embed_masked: pass exactly one of noise (B, m, P) and seed")
    x5, patch3 = as_5d(x, tuple(patch_size))
    geo = geometry(x5, patch3)
    _check(x, ids_mask, t, alpha_bar, weight, bias, pos, noise, geo)
    seed_t = None if seed is None else _seed_tensor(seed, x.device)
    extra = (noise,) if seed_t is None else (seed_t,)
    if not kernels.can_launch(NAME, x, ids_mask, t, alpha_bar, weight, bias, pos, *extra):
        if noise is None:
            generator = torch.Generator(x.device).manual_seed(int(seed_t.item()))
            noise = torch.randn((*ids_mask.shape, geo["P"]), generator=generator,
                                device=x.device, dtype=x.dtype)
        return reference_diffuse_embed_masked(x, ids_mask, t, alpha_bar, weight, bias, pos,
                                              patch_size, norm_pix, noise=noise)
    # Keep x_t only for a weight gradient, link rows to tokens only for grad_pos
    # (needs_input_grad ignores no_grad).
    grad = torch.is_grad_enabled()
    with kernels.on_device(x):  # backward runs on autograd's thread for x's device
        return _DiffuseEmbed.apply(x, ids_mask, t, alpha_bar, weight, bias, pos,
                                   tuple(patch_size), norm_pix, noise, seed_t, compute_dtype(x),
                                   weight.requires_grad and grad, pos.requires_grad and grad)


def philox_noise(seed: int | torch.Tensor, batch: int, m: int, patch_dim: int,
                 device: torch.device | str) -> torch.Tensor:
    """The eps (B, m, P) fp32 that `diffuse_embed_masked(..., seed=seed)` draws in its kernel
    (needs CUDA or the Triton interpreter)."""
    out = torch.empty(batch, m, patch_dim, device=device, dtype=torch.float32)
    seed_t = _seed_tensor(seed, out.device)
    rows, block_m, block_k = batch * m, 16, 256  # large blocks: the interpreter pays per program
    grid = (triton.cdiv(rows, block_m), triton.cdiv(patch_dim, block_k))
    with kernels.on_device(out):
        _philox_kernel[grid](seed_t, out, rows, patch_dim, BLOCK_M=block_m, BLOCK_K=block_k,
                             num_warps=8)
    return out


def _seed_tensor(seed: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(1,) int64 seed on device: a tensor is read by the kernel in stream order (the caller may
    advance it in place afterwards); an int is filled by a device kernel, not copied from the
    host."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex:
            raise ValueError(f"seed tensor must hold one integer, got {seed.dtype} of shape "
                             f"{tuple(seed.shape)}")
        if seed.device != device:
            raise ValueError(f"seed tensor is on {seed.device}, the input on {device}")
        return seed.reshape(1).to(torch.int64)
    return torch.full((1,), int(seed), dtype=torch.int64, device=device)


def _check(x, ids, t, alpha_bar, weight, bias, pos, noise, geo) -> None:
    b, p, n = x.shape[0], geo["P"], geo["N"]
    check_tensors(x.device, floats=dict(x=x, alpha_bar=alpha_bar, weight=weight, bias=bias,
                                        pos=pos, noise=noise),
                  ints=dict(ids_mask=ids, t=t),
                  no_grad=dict(x=x, noise=noise, alpha_bar=alpha_bar),
                  fn="diffuse_embed_masked")
    check_ids(ids, b, "ids_mask")
    if t.shape != (b,):
        raise ValueError(f"t must be (B={b},), got {tuple(t.shape)}")
    if alpha_bar.dim() != 1:
        raise ValueError(f"alpha_bar must be 1-D (T + 1,), got {tuple(alpha_bar.shape)}")
    dd = weight.shape[0]
    if weight.numel() != dd * p or bias.shape != (dd,) or pos.shape != (n, dd):
        raise ValueError(f"expected weight (Dd, {p}) in any view, bias (Dd,) and pos ({n}, Dd); "
                         f"got {tuple(weight.shape)}, {tuple(bias.shape)}, {tuple(pos.shape)}")
    if noise is not None and noise.shape != (*ids.shape, p):
        raise ValueError(f"noise must be {(*ids.shape, p)}, got {tuple(noise.shape)}")


class _DiffuseEmbed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids, t, alpha_bar, weight, bias, pos, patch, norm_pix, noise, seed_t,
                compute, save, link):
        x5, patch3 = as_5d(x, patch)
        check_sample_span(x5)
        geo = geometry(x5, patch3)
        ids, t, alpha_bar = ids.contiguous(), t.contiguous(), alpha_bar.contiguous()
        noise = None if noise is None else noise.contiguous()
        w2 = weight.reshape(weight.shape[0], -1)
        b, m = ids.shape
        rows, p = b * m, geo["P"]
        x_t = torch.empty(rows, p, device=x.device, dtype=compute)
        kernels.launch(
            _diffuse_tuned, lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),), _INTERPRET_CONFIG,
            x5, ids, t, alpha_bar, x5 if noise is None else noise,
            ids if seed_t is None else seed_t,  # unused pointers: typed, never read
            x_t, rows, m, p, geo["GH"], geo["GW"], *x5.stride(),
            PD=patch3[0], PH=patch3[1], PW=patch3[2], NORM=norm_pix, HAS_NOISE=noise is not None)
        # The projection as the plain path's F.linear under autocast: operands in the compute
        # dtype, its output rounded to it; bias and W cast here (x may be bf16 with fp32 weights).
        projected = F.linear(x_t, w2.to(compute), bias.to(compute))
        out = add_pos(projected, pos, ids, x.dtype)
        links = link_tokens(ids, geo["N"]) if link else (None, None)
        ctx.save_for_backward(x_t if save else None, *links)
        ctx.meta = (weight.shape, weight.dtype, bias.dtype, pos.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x_t, *links = ctx.saved_tensors
        grads = embedding_backward(grad_out, x_t, links, ctx.meta, ctx.needs_input_grad[4:7])
        return (None, None, None, None, *grads) + (None,) * 7


# Interpreter: one small fixed config (autotuning there is too slow); ragged edges still occur.
_INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_K=256)

if triton is not None:
    from ._patches import load_patches, patch_stats

    @triton.jit
    def _row_coefs(rows, row_mask, ids_ptr, t_ptr, ab_ptr, m):
        """Token id, sample index, sqrt(ab[t]) and sqrt(1 - ab[t]) of each row of (B * m)."""
        token = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(tl.int32)
        b = rows // m
        ab = tl.load(ab_ptr + tl.load(t_ptr + b, mask=row_mask, other=0), mask=row_mask,
                     other=1.0).to(tl.float32)
        return token, b, tl.sqrt_rn(ab), tl.sqrt_rn(1.0 - ab)

    @triton.jit
    def philox_normals(seed, rows, k0, P, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """eps[rows, k0 : k0 + BLOCK_K] (fp32) of the (rows, P) noise for `seed` (64-bit): for
        counter c = row * ceil(P / 4) + k // 4, element k is normal k % 4 of the four that one
        Philox-4x32 call at (c's low word, c's high word, 0, 0) gives (two Box-Muller pairs).
        k0 and BLOCK_K are multiples of 4. One call per four elements, 32-bit arithmetic: tl.randn
        makes a call per element, and a 64-bit one for 64-bit offsets."""
        tl.static_assert(BLOCK_K % 4 == 0, "philox_normals: BLOCK_K must be a multiple of 4")
        counter = (rows.to(tl.int64)[:, None] * tl.cdiv(P, 4)
                   + (k0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :])
        low = (counter & 0xFFFFFFFF).to(tl.uint32)
        zero = tl.zeros_like(low)
        i0, i1, i2, i3 = tl.philox(seed, low, (counter >> 32).to(tl.uint32), zero, zero)
        n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i0),
                                           tl.uint_to_uniform_float(i1))
        n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i2),
                                           tl.uint_to_uniform_float(i3))
        eps = tl.join(tl.join(n0, n2), tl.join(n1, n3))  # [row, j, a, b] = n_(2a + b)
        return tl.reshape(eps, (BLOCK_M, BLOCK_K))

    @triton.jit
    def _diffuse_kernel(x_ptr, ids_ptr, t_ptr, ab_ptr, noise_ptr, seed_ptr, xt_ptr,
                        R, m, P, GH, GW, stride_b, stride_c, stride_d, stride_h, stride_w,
                        PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                        NORM: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_K: tl.constexpr):
        """x_t (R, P) of BLOCK_M rows: (x - mean) sqrt(ab[t]) rstd + sqrt(1 - ab[t]) eps."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < R
        token, b, sqrt_ab, sigma = _row_coefs(rows, row_mask, ids_ptr, t_ptr, ab_ptr, m)
        base = x_ptr + b.to(tl.int64)[:, None] * stride_b
        if NORM:
            mean, rstd = patch_stats(base, token, row_mask, P, GH, GW, PD, PH, PW, stride_c,
                                     stride_d, stride_h, stride_w, 1e-6,  # normalize_patches'
                                     BLOCK_M, BLOCK_K)
        else:
            mean = tl.zeros((BLOCK_M,), tl.float32)
            rstd = tl.full((BLOCK_M,), 1.0, tl.float32)
        scale = sqrt_ab * rstd
        for k0 in range(0, P, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (k < P)[None, :]
            x = load_patches(base, token, row_mask, k, P, GH, GW, PD, PH, PW, stride_c,
                             stride_d, stride_h, stride_w)
            if HAS_NOISE:
                flat = rows.to(tl.int64)[:, None] * P + k[None, :]  # = offset in (B, m, P)
                eps = tl.load(noise_ptr + flat, mask=mask, other=0.0).to(tl.float32)
            else:
                eps = philox_normals(tl.load(seed_ptr), rows, k0, P, BLOCK_M, BLOCK_K)
            x_t = (x - mean[:, None]) * scale[:, None] + sigma[:, None] * eps
            tl.store(xt_ptr + rows.to(tl.int64)[:, None] * P + k[None, :],
                     x_t.to(xt_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _philox_kernel(seed_ptr, out_ptr, R, P, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        k0 = tl.program_id(1) * BLOCK_K
        k = k0 + tl.arange(0, BLOCK_K)
        eps = philox_normals(tl.load(seed_ptr), rows, k0, P, BLOCK_M, BLOCK_K)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * P + k[None, :], eps,
                 mask=(rows < R)[:, None] & (k < P)[None, :])

    # An elementwise pass (two reads of x with norm_pix, one write of x_t) with Philox's
    # arithmetic, whose registers grow with the elements a thread holds: 8 or 16 here (32 took
    # about 160-180 registers, a third of the warps per SM; ptxas's counts: BENCHMARKS.md).
    # No dot product: every candidate fits any GPU's shared memory. Keyed on what differs
    # between call sites, not on the row count B * m, which changes with the batch and ratio of
    # every curriculum shape: one tuning per call site (the work per row is the same).
    _diffuse_tuned = triton.autotune(
        [triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk), num_warps=w)
         for bm, bk, w in [(16, 64, 4), (32, 64, 8), (16, 128, 4), (32, 128, 8)]],
        key=["P", "NORM", "HAS_NOISE"])(_diffuse_kernel)
