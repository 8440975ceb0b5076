"""Patch geometry shared by the kernels: every input is seen as 5-D (B, C, D, H, W) with a 3-D
patch (pd, ph, pw), so one kernel serves audio (B, 1, T, F) with patch (16, 16) -> viewed as
(B, 1, 1, T, F) with patch (1, 16, 16) and video (B, C, Fr, H, W) with patch (2, 16, 16).

Token n is row-major over the grid (GD, GH, GW); element k of a patch vector is row-major over
(C, pd, ph, pw), the order of a convolution weight, as in fastmavil.models.patch.patchify.
Kernels read patch elements straight from the input by this index arithmetic: the patchified
tensor is never materialised.
"""
from __future__ import annotations

import torch

import kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # the references below still work; kernels need triton
    triton = tl = None


def as_5d(x: torch.Tensor, patch: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """A (B, C, *S) input with a 2-D or 3-D patch -> a 5-D view and a 3-D patch (no copy)."""
    if x.dim() == 4 and len(patch) == 2:
        return x.unsqueeze(2), (1, *patch)
    if x.dim() == 5 and len(patch) == 3:
        return x, tuple(patch)
    raise ValueError(f"input of shape {tuple(x.shape)} does not fit patch {tuple(patch)}: "
                     "expected (B, C, T, F) with a 2-D patch or (B, C, D, H, W) with a 3-D one")


def geometry(x5: torch.Tensor, patch3: tuple[int, int, int]) -> dict:
    """Grid sizes and patch dimension of a 5-D input; errors name the shapes."""
    _, c, d, h, w = x5.shape
    pd, ph, pw = patch3
    if d % pd or h % ph or w % pw:
        raise ValueError(f"input size {(d, h, w)} is not divisible by patch {patch3}")
    return {"GD": d // pd, "GH": h // ph, "GW": w // pw, "N": (d // pd) * (h // ph) * (w // pw),
            "P": c * pd * ph * pw}


FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def check_tensors(device: torch.device, *, floats: dict, ints: dict | None = None,
                  no_grad: dict | None = None, fn: str = "") -> None:
    """Argument checks the kernels share; errors name the argument. floats / ints: name ->
    tensor that must be fp32/bf16/fp16 / an integer dtype, on `device` (x's); no_grad: tensors
    that must not require grad, since `fn` gives them no gradient. None (an optional argument
    not given) passes."""
    floats, ints, no_grad = ({k: t for k, t in d.items() if t is not None}
                             for d in (floats, ints or {}, no_grad or {}))
    for name, t in {**floats, **ints}.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}")
    for name, t in floats.items():
        if t.dtype not in FLOATS:
            raise TypeError(f"{name} has dtype {t.dtype}; expected one of {FLOATS}")
    for name, t in ints.items():
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} has dtype {t.dtype}; expected an integer dtype")
    for name, t in no_grad.items():
        if t.requires_grad:  # rather than silently dropping it
            raise ValueError(f"{name} requires grad, but {fn} gives it no gradient; detach it "
                             f"or use reference_{fn}")


def check_ids(ids: torch.Tensor, batch: int, name: str) -> None:
    """Token ids: (B, n >= 1) int64 with B = x's batch (their range is not checked: that would
    synchronise the GPU)."""
    if ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] != batch or ids.shape[1] < 1:
        raise ValueError(f"{name} must be (B={batch}, n >= 1) int64, B being x's batch; got "
                         f"{ids.dtype} {tuple(ids.shape)}")


def check_sample_span(x5: torch.Tensor) -> None:
    """The kernels index within one sample in 32 bits (the batch term is 64-bit): the farthest
    element of a sample must lie less than 2^31 elements from its first."""
    span = sum((size - 1) * abs(stride) for size, stride in zip(x5.shape[1:], x5.stride()[1:]))
    if span >= 2**31:
        raise ValueError(f"one sample of the input spans {span} elements (shape "
                         f"{tuple(x5.shape)}, strides {x5.stride()}); the kernels need < 2^31")


def reference_gather(x: torch.Tensor, ids: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """The patches of x at ids (B, n) -> (B, n, P), by patchify + gather (the plain path)."""
    from fastmavil.masking import gather_tokens
    from fastmavil.models.patch import patchify
    return gather_tokens(patchify(x, tuple(patch)), ids)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would multiply in: the autocast dtype if autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _tf32_allowed() -> bool:
    """torch's TF32 setting for fp32 matmuls: its fp32_precision API where torch has one, since
    reading the legacy allow_tf32 raises once that API was used (torch >= 2.9)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return matmul.allow_tf32


def dot_constexprs(compute: torch.dtype) -> dict:
    """Constexprs of `mma` for a compute dtype: IEEE fp32 unless torch allows TF32 matmuls (half
    dtypes ignore the precision: "tf32" is Triton's default)."""
    ieee = compute == torch.float32 and not _tf32_allowed()
    tl_dtype = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                torch.float16: tl.float16}[compute]
    return dict(COMPUTE=tl_dtype, PRECISION="ieee" if ieee else "tf32",
                ROUND_ONLY=kernels.interpreting() and compute == torch.bfloat16)


if triton is not None:
    @triton.jit
    def patch_offsets(token, k, GH, GW, PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                      stride_c, stride_d, stride_h, stride_w):
        """Element offsets (without the batch term) of patch elements k (BLOCK_K,) of tokens
        token (BLOCK_M,) -> (BLOCK_M, BLOCK_K)."""
        gw = token % GW
        gh = (token // GW) % GH
        gd = token // (GW * GH)
        kw = k % PW
        kh = (k // PW) % PH
        kd = (k // (PW * PH)) % PD
        c = k // (PW * PH * PD)
        # A token's corner plus an element's place in its patch, (BLOCK_M,) + (BLOCK_K,) terms:
        # one add per element and fewer live registers (ptxas's counts: BENCHMARKS.md).
        corner = gd * PD * stride_d + gh * PH * stride_h + gw * PW * stride_w
        within = c * stride_c + kd * stride_d + kh * stride_h + kw * stride_w
        return corner[:, None] + within[None, :]

    @triton.jit
    def load_patches(base, token, row_ok, k, P, GH, GW, PD: tl.constexpr, PH: tl.constexpr,
                     PW: tl.constexpr, stride_c, stride_d, stride_h, stride_w):
        """Elements k (BLOCK_K,) of the patches `token` (BLOCK_M,) -> (BLOCK_M, BLOCK_K) fp32, 0
        outside; `base` points at each row's sample: a scalar, or (BLOCK_M, 1) pointers."""
        offs = patch_offsets(token, k, GH, GW, PD, PH, PW, stride_c, stride_d, stride_h, stride_w)
        mask = row_ok[:, None] & (k < P)[None, :]
        return tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def patch_stats(base, token, row_ok, P, GH, GW, PD: tl.constexpr, PH: tl.constexpr,
                    PW: tl.constexpr, stride_c, stride_d, stride_h, stride_w, eps,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """Per-patch mean and 1 / sqrt(unbiased variance + eps), as losses.normalize_patches, over
        BLOCK_K chunks merged with Chan et al.'s formula, which stays exact for near-constant
        patches where sum(x^2) - P mean^2 would cancel."""
        mean = tl.zeros((BLOCK_M,), tl.float32)
        m2 = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, P, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            chunk = load_patches(base, token, row_ok, k, P, GH, GW, PD, PH, PW,
                                 stride_c, stride_d, stride_h, stride_w)
            n_c = tl.minimum(P - k0, BLOCK_K).to(tl.float32)
            n = k0 + n_c
            mean_c = tl.sum(chunk, axis=1) / n_c
            dev = tl.where((k < P)[None, :], chunk - mean_c[:, None], 0.0)
            delta = mean_c - mean
            mean += delta * (n_c / n)
            m2 += tl.sum(dev * dev, axis=1) + delta * delta * (k0 * n_c / n)
        return mean, 1.0 / tl.sqrt_rn(m2 / (P - 1) + eps)

    @triton.jit
    def mma(acc, a, b, COMPUTE: tl.constexpr, PRECISION: tl.constexpr, ROUND_ONLY: tl.constexpr):
        """acc + a @ b on operands rounded to COMPUTE. ROUND_ONLY multiplies the rounded values in
        fp32 (exact products, same sums): the interpreter's tl.dot reads bf16 as raw integers
        (triton-lang/triton#11584)."""
        a, b = a.to(COMPUTE), b.to(COMPUTE)
        if ROUND_ONLY:
            a, b = a.to(tl.float32), b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)
