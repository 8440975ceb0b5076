"""kernels.patch_embed: forward and the weight/bias/pos gradients against the PyTorch reference.

Without CUDA the kernels run on the CPU through Triton's interpreter. Triton reads
TRITON_INTERPRET when a @triton.jit function is decorated, so tests/conftest.py sets it before
any test module imports kernels.* (test_interpreter_runs_on_cpu fails if that came too late).
Tolerances, relative to the largest reference value: interpreter fp32 1e-5; CUDA fp32 1e-4 (TF32
off); bf16 1e-2.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

import kernels
from fastmavil.masking import random_masking
from fastmavil.models.patch import PatchEmbed, patch_grid
from conftest import nan_filled_empty, saved_floats
from kernels import patch_embed as pe

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FP32_TOL = 1e-4 if CUDA else 1e-5
BF16_TOL = 1e-2
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: native Triton fp32/bf16 "
                                "parity")

# (x shape, patch, D, masking ratio): B in {1, 3}, D in {64, 192, 768}, audio and video (one
# with 6 frames and a non-square 32x48 frame). n is never a multiple of the token block.
CASES = {
    "audio-B3-D64": ((3, 1, 160, 96), (16, 16), 64, 0.75),
    "audio-B1-D192": ((1, 1, 96, 64), (16, 16), 192, 0.8),
    "audio-B3-D768": ((3, 1, 128, 64), (16, 16), 768, 0.9),
    "video-B1-D192-6x32x48": ((1, 3, 6, 32, 48), (2, 16, 16), 192, 0.8),
    "video-B3-D64": ((3, 3, 6, 48, 32), (2, 16, 16), 64, 0.85),
}


pytestmark = pytest.mark.usefixtures("true_fp32")  # tests/conftest.py: TF32 off on CUDA


def visible_ids(batch: int, num_tokens: int, ratio: float) -> torch.Tensor:
    """random_masking's keep ids (a non-contiguous slice, as in the model), with every sample's
    first and last grid token moved into the kept part."""
    m = random_masking((batch,), num_tokens, ratio)
    n, order = m.keep.shape[1], torch.cat([m.keep, m.mask], -1)
    edges = torch.tensor([0, num_tokens - 1])
    for row in order:
        row.copy_(torch.cat([edges, row[(row != 0) & (row != num_tokens - 1)]]))
        row[:n] = row[:n][torch.randperm(n)]
    keep = order.to(DEVICE)[:, :n]  # sliced on the device: .to() of a slice would compact it
    assert batch == 1 or not keep.is_contiguous()  # (1, n) slices count as contiguous
    assert (keep == 0).any(1).all() and (keep == num_tokens - 1).any(1).all()
    return keep


def make_inputs(shape: tuple[int, ...], patch: tuple[int, ...], dim: int, ratio: float,
                x_dtype: torch.dtype = torch.float32) -> tuple:
    num_tokens = math.prod(patch_grid(shape[2:], patch))
    p = shape[1] * math.prod(patch)
    x = torch.randn(shape).to(DEVICE, x_dtype)
    params = (torch.randn(dim, shape[1], *patch) / p ** 0.5, torch.randn(dim),
              torch.randn(num_tokens, dim))
    return x, visible_ids(shape[0], num_tokens, ratio), *(t.to(DEVICE).requires_grad_()
                                                          for t in params)


def run(fn, x, ids, weight, bias, pos, patch, grad: torch.Tensor | None = None):
    """fn's output and its gradients for weight, bias, pos under a fixed output gradient."""
    out = fn(x, ids, weight, bias, pos, patch)
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return out, grad, torch.autograd.grad(out, (weight, bias, pos), grad)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def check_against_reference(x, ids, weight, bias, pos, patch, tol: float = FP32_TOL) -> None:
    out, grad, grads = run(pe.patch_embed_visible, x, ids, weight, bias, pos, patch)
    ref, _, ref_grads = run(pe.reference_patch_embed_visible, x, ids, weight, bias, pos, patch,
                            grad)
    assert out.shape == (*ids.shape, weight.shape[0]) and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    for actual, expected in zip((out, *grads), (ref, *ref_grads)):
        assert_close(actual, expected, tol)


def test_interpreter_runs_on_cpu(monkeypatch):
    if CUDA:
        pytest.skip("CUDA present: kernels run natively")
    x, ids, weight, bias, pos = make_inputs((1, 1, 64, 32), (16, 16), 64, 0.75)
    assert kernels.interpreting() and kernels.can_launch("patch_embed_visible", x, weight)
    # Decorated under the interpreter, i.e. TRITON_INTERPRET was set before the import.
    assert type(pe._patch_gather_kernel).__name__ == "InterpretedFunction"

    def no_reference(*args):
        raise AssertionError("the reference ran instead of the kernel")

    monkeypatch.setattr(pe, "reference_patch_embed_visible", no_reference)
    pe.patch_embed_visible(x, ids, weight, bias, pos, (16, 16))


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_fp32(case):
    shape, patch, dim, ratio = CASES[case]
    check_against_reference(*make_inputs(shape, patch, dim, ratio), patch)


def test_ragged_tiles(monkeypatch):
    """Odd sizes everywhere (P = 2*3*5 = 30, D = 50, n = 11) with 16-wide gather blocks, so the
    rows and patch elements have several tiles and a partial last one (the patches the matmul
    reads and grad W keeps); x is read through transposed strides."""
    monkeypatch.setattr(pe, "GATHER_BLOCK_M", 16)
    monkeypatch.setattr(pe, "GATHER_BLOCK_K", 16)
    x, ids, weight, bias, pos = make_inputs((3, 2, 12, 55), (3, 5), 50, 0.75)
    x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert ids.shape == (3, 11) and not x.is_contiguous()
    check_against_reference(x, ids, weight, bias, pos, (3, 5))


def test_every_output_element_is_written():
    """The output and the patches saved for grad W come from torch.empty: poison it with NaN,
    so any element a tile misses shows up (the references run unpoisoned)."""
    x, ids, weight, bias, pos = make_inputs((3, 1, 48, 80), (16, 16), 192, 0.8)
    ref, grad, ref_grads = run(pe.reference_patch_embed_visible, x, ids, weight, bias, pos,
                               (16, 16))
    with nan_filled_empty():
        out, _, grads = run(pe.patch_embed_visible, x, ids, weight, bias, pos, (16, 16), grad)
    for actual, expected in zip((out, *grads), (ref, *ref_grads)):
        assert not actual.isnan().any()
        assert_close(actual, expected, FP32_TOL)


@pytest.mark.parametrize("case, dtype", [("audio-B3-D64", torch.bfloat16),
                                         ("video-B1-D192-6x32x48", torch.bfloat16),
                                         ("audio-B1-D192", torch.float16)],
                         ids=["audio-bf16", "video-bf16", "audio-fp16"])
def test_half_input(case, dtype):
    """bf16/fp16 x: output in x's dtype; fp32 parameters (exact in x's dtype) get fp32
    gradients. Against the fp32 reference on the same values the error is the output's
    rounding."""
    shape, patch, dim, ratio = CASES[case]
    x, ids, *params = make_inputs(shape, patch, dim, ratio, dtype)
    weight, bias, pos = (p.detach().to(dtype).float().requires_grad_() for p in params)
    out, grad, grads = run(pe.patch_embed_visible, x, ids, weight, bias, pos, patch)
    ref, _, ref_grads = run(pe.reference_patch_embed_visible, x.float(), ids, weight, bias, pos,
                            patch, grad.float())
    assert out.dtype == dtype and all(g.dtype == torch.float32 for g in grads)
    for actual, expected in zip((out.float(), *grads), (ref, *ref_grads)):
        assert_close(actual, expected, BF16_TOL)


def test_autocast_multiplies_in_bf16():
    """Under autocast with fp32 x the projection runs on bf16 operands to a bf16 result (as
    F.linear would) and pos is added in fp32: the output is fp32 and equals the plain path's
    (bf16 linear + fp32 pos). Operands sit just above bf16 values (by 2^-12, under half a bf16
    ulp), so rounding to nearest (CUDA) and toward zero (the interpreter's cast) both give those
    values."""
    shape, patch, dim, ratio = CASES["audio-B3-D64"]
    x, ids, weight, bias, pos = make_inputs(shape, patch, dim, ratio)
    up = 1 + 2 ** -12
    x16, w16 = x.bfloat16().float(), weight.detach().bfloat16().float().requires_grad_()
    x_up, w_up = x16 * up, (w16.detach() * up).requires_grad_()
    grad16 = torch.randn(*ids.shape, dim).bfloat16().float().to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out, _, grads = run(pe.patch_embed_visible, x_up, ids, w_up, bias, pos, patch,
                            grad16 * up)
        plain = pe.reference_patch_embed_visible(x_up, ids, w_up, bias, pos, patch)
    assert out.dtype == plain.dtype == torch.float32
    assert_close(out, plain, FP32_TOL)  # the same bf16 operands, the same F.linear
    unrounded = pe.reference_patch_embed_visible(x_up, ids, w_up, bias, pos, patch)
    assert not torch.allclose(out, unrounded, rtol=FP32_TOL, atol=0)
    exact = pe.reference_patch_embed_visible(x16, ids, w16, bias, pos, patch)
    exact_grads = (*torch.autograd.grad(exact, w16, grad16, retain_graph=True),  # rounded too
                   *torch.autograd.grad(exact, (bias, pos), grad16 * up))
    for actual, expected in zip(grads[1:], exact_grads[1:]):  # bias and pos: fp32 sums
        assert_close(actual, expected, FP32_TOL)
    # grad W is a bf16 matmul with fp32 sums, as F.linear's backward under autocast, rounded once
    # to bf16 there and here on a CPU; on CUDA written in fp32 (within half a bf16 step of that)
    assert grads[0].dtype == torch.float32
    assert_close(grads[0], exact_grads[0].bfloat16().float(), 2 ** -8)


def test_keeps_the_patches_only_for_a_weight_gradient():
    """Backward keeps the visible patches in the compute dtype (bf16 under autocast, as the plain
    path's F.linear input) when weight trains; nothing with a frozen weight or without grad mode
    (the projection's operand is then freed on return), and bias / pos gradients still match the
    reference."""
    shape, patch, dim, ratio = CASES["audio-B3-D64"]
    x, ids, weight, bias, pos = make_inputs(shape, patch, dim, ratio)
    rows, p = ids.numel(), weight[0].numel()
    with torch.autocast(DEVICE, dtype=torch.bfloat16), saved_floats() as saved:
        pe.patch_embed_visible(x, ids, weight, bias, pos, patch)
    assert saved == [((rows, p), torch.bfloat16)]
    with torch.no_grad(), saved_floats() as saved:
        assert pe.patch_embed_visible(x, ids, weight, bias, pos, patch).grad_fn is None
    assert saved == []
    weight.requires_grad_(False)
    with saved_floats() as saved:
        out = pe.patch_embed_visible(x, ids, weight, bias, pos, patch)
    assert saved == []
    grad = torch.randn_like(out)
    ref = pe.reference_patch_embed_visible(x, ids, weight, bias, pos, patch)
    for actual, expected in zip(torch.autograd.grad(out, (bias, pos), grad),
                                torch.autograd.grad(ref, (bias, pos), grad)):
        assert_close(actual, expected, FP32_TOL)


def test_equals_model_patch_embed():
    """The model's plain paths (strided conv, then gather; mask-first gather + linear) and its
    fused path over two masked views all give the kernel's tokens."""
    shape, patch, dim, ratio = CASES["video-B1-D192-6x32x48"]
    x, _, _, _, pos = make_inputs(shape, patch, dim, ratio)
    pos = pos.detach()
    ids = torch.stack([visible_ids(shape[0], pos.shape[0], ratio) for _ in range(2)])
    embed = PatchEmbed(shape[1], patch, dim, mask_first=False).to(DEVICE)
    conv = embed(x, ids, pos)
    embed.mask_first = True
    plain = embed(x, ids, pos)
    embed.fused = True
    fused = embed(x, ids, pos)
    kernel = torch.stack([pe.patch_embed_visible(x, v, embed.proj.weight, embed.proj.bias, pos,
                                                 patch) for v in ids])
    for tokens in (conv, plain, fused):
        assert_close(tokens, kernel, FP32_TOL)


def test_falls_back_to_reference_and_logs_once(monkeypatch, caplog):
    """CPU tensors without the interpreter: the reference runs, and says so once."""
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    monkeypatch.setattr(kernels, "_warned", set())

    def no_kernel(*args):
        raise AssertionError("the kernel ran without CUDA or the interpreter")

    monkeypatch.setattr(pe._PatchEmbedVisible, "apply", no_kernel)
    x, ids, weight, bias, pos = (t.cpu() for t in make_inputs((2, 1, 32, 48), (16, 16), 64,
                                                              0.75))
    with caplog.at_level(logging.WARNING, logger="fastmavil.kernels"):
        outs = [pe.patch_embed_visible(x, ids, weight, bias, pos, (16, 16)) for _ in range(2)]
    assert [r.getMessage() for r in caplog.records] == [
        "kernel patch_embed_visible: tensors are on the CPU and TRITON_INTERPRET=1 is not set; "
        "using the PyTorch reference"]
    expected = pe.reference_patch_embed_visible(x, ids, weight, bias, pos, (16, 16))
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("change, error", [
    (lambda a: {**a, "ids_keep": a["ids_keep"].int()}, "got torch.int32"),
    (lambda a: {**a, "ids_keep": a["ids_keep"][:1]}, r"ids_keep must be \(B=2, n >= 1\) int64"),
    (lambda a: {**a, "weight": a["weight"][:, :, :8]}, "weight has shape"),
    (lambda a: {**a, "bias": a["bias"][:-1]}, "bias has shape"),
    (lambda a: {**a, "pos": a["pos"][:-1]}, "pos has shape"),
    (lambda a: {**a, "x": a["x"][..., :40]}, "not divisible by patch"),
    (lambda a: {**a, "patch_size": (2, 16, 16)}, "does not fit patch"),
    (lambda a: {**a, "x": a["x"].double()}, "x has dtype torch.float64"),
    (lambda a: {**a, "x": a["x"].requires_grad_()}, "x requires grad"),
])
def test_rejects_bad_inputs(change, error):
    x, ids, weight, bias, pos = make_inputs((2, 1, 32, 48), (16, 16), 64, 0.75)
    args = dict(x=x, ids_keep=ids, weight=weight, bias=bias, pos=pos, patch_size=(16, 16))
    with pytest.raises((ValueError, TypeError), match=error):
        pe.patch_embed_visible(**change(args))


@needs_cuda
@pytest.mark.parametrize("setting, tol", [("fp32", FP32_TOL), ("bf16", BF16_TOL),
                                          ("amp", BF16_TOL)])
@pytest.mark.parametrize("shape, patch", [((16, 1, 1024, 128), (16, 16)),
                                          ((4, 3, 16, 224, 224), (2, 16, 16))])
def test_cuda_full_size(shape, patch, setting, tol):
    """Paper-size inputs (D=768, 80% masked) with fp32 x, bf16 x, and fp32 x under bf16
    autocast (training's setting). Inputs and parameters hold bf16 values, so each setting
    differs from the fp32 reference by its own rounding only."""
    dtype = torch.float32 if setting == "fp32" else torch.bfloat16
    x, ids, *params = make_inputs(shape, patch, 768, 0.8, dtype)
    weight, bias, pos = (p.detach().to(dtype).float().requires_grad_() for p in params)
    if setting == "amp":
        x = x.float()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=setting == "amp"):
        out, grad, grads = run(pe.patch_embed_visible, x, ids, weight, bias, pos, patch)
    ref, _, ref_grads = run(pe.reference_patch_embed_visible, x.float(), ids, weight, bias, pos,
                            patch, grad.float())
    for actual, expected in zip((out.float(), *grads), (ref, *ref_grads)):
        assert_close(actual, expected, tol)
