"""kernels.bias_gelu: gelu(y + b) and the gradients of y and b against the plain computation.

Without CUDA the kernels run on the CPU through Triton's interpreter (tests/conftest.py).
Tolerances, relative to the largest reference value: fp32 1e-5 (the same fp32 arithmetic, erf
from another library); bf16 one bf16 step (2^-7) for values rounded once on both sides, and
for grad_b, which here sums the rounded grad_y where the reference sums it unrounded.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from conftest import nan_filled_empty
from kernels import bias_gelu as bg

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5
BF16_STEP = 2.0 ** -7


def assert_close(actual, expected, tol):
    scale = expected.detach().abs().max().item() + 1e-12
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


def run(fn, y, b, grad):
    out = fn(y, b)
    inputs = [y] + ([b] if b.requires_grad else [])
    return out, torch.autograd.grad(out, inputs, grad)


def inputs(shape, dtype, seed=0, bias_grad=True):
    """y in `dtype` (scaled so that GELU's curve, not its tails, is exercised), an fp32 bias."""
    gen = torch.Generator().manual_seed(seed)
    y = (2 * torch.randn(shape, generator=gen)).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(shape[-1], generator=gen).to(DEVICE).requires_grad_(bias_grad)
    grad = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    return y, b, grad


# (rows..., H): one row; odd rows over 2 tiles with H not a multiple of any feature block; a 3-D
# (B, n, H) input as the MLPs pass it; 40 row tiles, so the last program adds the partial sums
# in more than one chunk of 32.
SHAPES = {"1x16": (1, 16), "130x96": (130, 96), "3x37x300": (3, 37, 300), "2560x64": (2560, 64)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_and_gradients_match_the_reference(shape, dtype):
    y, b, grad = inputs(shape, dtype)
    assert kernels.can_launch("bias_gelu", y, b)  # the kernels run, not the reference
    with nan_filled_empty():
        out, (gy, gb) = run(bg.bias_gelu, y, b, grad)
    ref, (ref_gy, ref_gb) = run(bg.reference_bias_gelu, y, b, grad)
    assert out.dtype == gy.dtype == dtype and gb.dtype == torch.float32
    tol = TOL if dtype == torch.float32 else BF16_STEP
    for actual, expected in ((out, ref), (gy, ref_gy), (gb, ref_gb)):
        assert torch.isfinite(actual).all()
        assert_close(actual, expected, tol)


def test_against_torch_gelu_in_fp64():
    """The kernel's erf GELU and its derivative, not just agreement with the reference's fp32:
    against nn.GELU and autograd in fp64."""
    y, b, grad = inputs((70, 50), torch.float32)
    out, (gy, gb) = run(bg.bias_gelu, y, b, grad)
    y64, b64 = (t.detach().double().requires_grad_() for t in (y, b))
    ref = torch.nn.GELU()(y64 + b64)
    ref_gy, ref_gb = torch.autograd.grad(ref, (y64, b64), grad.double())
    for actual, expected in ((out, ref), (gy, ref_gy), (gb, ref_gb)):
        assert_close(actual.double(), expected, TOL)


def test_a_bias_without_gradient_and_strided_y():
    """b that needs no gradient (the kernel's BIAS=False pass) and y that is a strided view."""
    y, b, grad = inputs((40, 96), torch.float32, bias_grad=False)
    view = y[:, ::2]
    b = b[:48]
    out, (gy,) = run(bg.bias_gelu, view, b, grad[:, ::2])
    ref, (ref_gy,) = run(bg.reference_bias_gelu, view, b, grad[:, ::2])
    assert_close(out, ref, TOL)
    assert_close(gy, ref_gy, TOL)


def test_a_launch_leaves_its_arrival_counters_at_zero(monkeypatch):
    """The last program of each feature block resets its counter: two calls on one set of
    counters both get their own bias sums (the autotuner relaunches on the same arguments)."""
    from kernels import _token_grads as tg
    shared = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(tg, "_counters", lambda count, device: shared[:count])
    for seed in range(2):
        y, b, grad = inputs((300, 100), torch.float32, seed=seed)
        _, (_, gb) = run(bg.bias_gelu, y, b, grad)
        _, (_, ref_gb) = run(bg.reference_bias_gelu, y, b, grad)
        assert_close(gb, ref_gb, TOL)
        assert (shared == 0).all()


def test_no_rows_give_zero_bias_gradient():
    y, b, grad = inputs((0, 32), torch.float32)
    with nan_filled_empty():
        out, (gy, gb) = run(bg.bias_gelu, y, b, grad)
    assert out.shape == gy.shape == (0, 32) and (gb == 0).all()


def test_bad_arguments_are_named():
    y = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"b has shape \(7,\); expected \(8,\)"):
        bg.bias_gelu(y, torch.randn(7, device=DEVICE))
    with pytest.raises(TypeError, match="y has dtype torch.int64"):
        bg.bias_gelu(y.long(), torch.randn(8, device=DEVICE))


def test_double_backward_raises():
    """Backward is a kernel: its own gradient is not defined, and says so."""
    y, b, grad = inputs((8, 16), torch.float32)
    (gy,) = torch.autograd.grad(bg.bias_gelu(y, b), y, grad, create_graph=True)
    with pytest.raises(RuntimeError):
        gy.sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: the interpreter runs programs one after another, so "
                           "the last-program sum cannot race there")
def test_cuda_bias_sum_over_hundreds_of_tiles_is_deterministic():
    """314 row tiles per feature block arrive at once (the video encoder's MLP at R4, B = 32):
    the last one must see every partial, on every run, bit for bit."""
    y, b, grad = inputs((64 * 314, 3072), torch.bfloat16)
    runs = [run(bg.bias_gelu, y, b, grad)[1][1] for _ in range(20)]
    assert all(torch.equal(runs[0], later) for later in runs[1:])
    assert_close(runs[0], run(bg.reference_bias_gelu, y, b, grad)[1][1], BF16_STEP)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: the autotuner's candidates run natively only")
def test_cuda_every_config(monkeypatch):
    """Each candidate the autotuner may pick (the other tests check only its pick)."""
    import triton
    y, b, grad = inputs((130, 300), torch.bfloat16)
    ref, (ref_gy, ref_gb) = run(bg.reference_bias_gelu, y, b, grad)
    for config in bg._CONFIGS:
        monkeypatch.setattr(bg, "_forward_tuned",
                            triton.autotune([config], key=[])(bg._bias_gelu_forward_kernel))
        monkeypatch.setattr(bg, "_backward_tuned",
                            triton.autotune([config], key=[])(bg._bias_gelu_backward_kernel))
        with nan_filled_empty():
            out, (gy, gb) = run(bg.bias_gelu, y, b, grad)
        for actual, expected in ((out, ref), (gy, ref_gy), (gb, ref_gb)):
            assert_close(actual, expected, BF16_STEP)
