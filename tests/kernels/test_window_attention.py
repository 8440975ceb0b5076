"""kernels.window_attention: forward and the q, k, v and bias gradients against the math path.

Without CUDA the kernels run on the CPU through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET before kernels.* is imported). Tolerances, relative to the largest
reference value: interpreter fp32 1e-5; CUDA fp32 1e-4 (TF32 off). Half precision: at most
twice the error of the math path in that dtype, both against math in fp32, plus atol
(FlashAttention's criterion, as tests/test_attention.py).
"""
from __future__ import annotations

import pytest
import torch

import kernels
from conftest import allocations, nan_filled_empty, torch_flag
from fastmavil.models.swin import WindowBlock, shift_mask
from kernels import window_attention as wa
from kernels._patches import dot_constexprs

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FP32_TOL = 1e-4 if CUDA else 1e-5
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: native Triton parity")

pytestmark = pytest.mark.usefixtures("true_fp32")  # tests/conftest.py: TF32 off on CUDA

# (B, G, L, d, bias): Swin's 4x4 windows with a learned bias plus a shift mask (-inf); odd L
# and d (padded to the 16-wide blocks); no bias; B = 9, two chunks of samples, the last short.
CASES = {
    "swin-4x4-B3": (3, 5, 16, 32, "masked"),
    "L9-d24-B1": (1, 3, 9, 24, "learned"),
    "no-bias-B2": (2, 3, 16, 16, None),
    "L4-B9": (9, 2, 4, 16, "learned"),
    "largest-B2": (2, 2, wa.MAX_WINDOW, wa.MAX_HEAD_DIM, "learned"),  # the kernels' limits
}


def make_inputs(batch, windows, length, dim, bias_kind, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, windows, length, dim, generator=gen).to(DEVICE, dtype)
               .requires_grad_() for _ in range(3))
    bias = None
    if bias_kind is not None:
        bias = torch.randn(windows, length, length, generator=gen)
        if bias_kind == "masked":  # as a shifted Swin block's: -inf between regions
            bias = bias + shift_mask((8, 12), (4, 4), (2, 2))[:windows]  # 6 windows
        bias = bias.to(DEVICE).requires_grad_()
    return q, k, v, bias


def run(fn, q, k, v, bias, grad=None):
    """fn's output and the gradients of q, k, v and a trained bias under one output gradient."""
    out = fn(q, k, v, bias)
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    inputs = [q, k, v] + ([bias] if bias is not None and bias.requires_grad else [])
    return out, grad, torch.autograd.grad(out, inputs, grad)


def assert_close(actual, expected, tol):
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def check_against_reference(inputs, tol=FP32_TOL):
    out, grad, grads = run(wa.window_attention, *inputs)
    ref, _, ref_grads = run(wa.reference_window_attention, *inputs, grad)
    assert out.shape == inputs[0].shape and out.dtype == inputs[0].dtype
    assert len(grads) == len(ref_grads)
    for actual, expected in zip((out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(actual).all()
        assert_close(actual, expected, tol)


def test_interpreter_runs_on_cpu(monkeypatch):
    if CUDA:
        pytest.skip("CUDA present: kernels run natively")
    inputs = make_inputs(*CASES["swin-4x4-B3"])
    assert kernels.interpreting() and kernels.can_launch("window_attention", *inputs)
    assert type(wa._window_forward_kernel).__name__ == "InterpretedFunction"

    def no_reference(*args):
        raise AssertionError("the reference ran instead of the kernel")

    monkeypatch.setattr(wa, "reference_window_attention", no_reference)
    run(wa.window_attention, *inputs)


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_fp32(case):
    check_against_reference(make_inputs(*CASES[case]))


def test_every_output_element_is_written():
    """Output and gradients come from torch.empty: poisoned with NaN, a missed element shows."""
    inputs = make_inputs(*CASES["L4-B9"])
    ref, grad, ref_grads = run(wa.reference_window_attention, *inputs)
    with nan_filled_empty():
        out, _, grads = run(wa.window_attention, *inputs, grad)
    for actual, expected in zip((out, *grads), (ref, *ref_grads)):
        assert not actual.isnan().any()
        assert_close(actual, expected, FP32_TOL)


def test_a_fixed_bias_gets_no_gradient_and_no_partial_sums():
    """A shift mask alone (no learned bias) needs no gradient: none is summed or returned."""
    q, k, v, bias = make_inputs(*CASES["swin-4x4-B3"])
    bias.requires_grad_(False)
    with allocations() as shapes:
        out, _, grads = run(wa.window_attention, q, k, v, bias)
    assert len(grads) == 3 and not any(len(s) == 4 and s[1:] == bias.shape for s in shapes)
    check_against_reference((q, k, v, bias))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs(dtype):
    """Half q, k, v (as the decoder makes them under autocast) with an fp32 learned bias: the
    output and q, k, v gradients in that dtype, the bias gradient in fp32, each at most twice
    as far from fp32 math as the math path in that dtype is (three times in bf16 on the
    interpreter, whose casts to bf16 round toward zero, where CUDA and torch round to nearest:
    twice the rounding error)."""
    q, k, v, bias = make_inputs(*CASES["swin-4x4-B3"], dtype=dtype)
    out, grad, grads = run(wa.window_attention, q, k, v, bias)
    half, _, half_grads = run(wa.reference_window_attention, q, k, v, bias, grad)
    exact_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    exact, _, exact_grads = run(wa.reference_window_attention, *exact_inputs, bias,
                                grad.float())
    assert out.dtype == dtype and [g.dtype for g in grads] == [dtype] * 3 + [torch.float32]
    factor = 3 if kernels.interpreting() and dtype == torch.bfloat16 else 2
    for actual, math_half, truth in zip((out, *grads), (half, *half_grads),
                                        (exact, *exact_grads)):
        error = (actual.float() - truth).abs().max().item()
        math_error = (math_half.float() - truth).abs().max().item()
        assert error <= factor * math_error + 1e-3 * truth.abs().max().item(), (error,
                                                                                 math_error)


def test_autocast_runs_mixed_inputs_in_its_dtype():
    """Under autocast, fp32 q and k with a bf16 v (the cosine Swin block's, on CUDA, where
    autocast keeps the norm of F.normalize in fp32) run in bf16, as SDPA's inputs would."""
    q, k, v, bias = make_inputs(*CASES["swin-4x4-B3"])
    v16 = v.detach().bfloat16().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out, grad, grads = run(wa.window_attention, q, k, v16, bias)
    assert out.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.float32] * 2 + [torch.bfloat16, torch.float32]
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):  # outside autocast
        wa.window_attention(q, k, v16, bias)
    rounded = [t.detach().bfloat16() for t in (q, k)] + [v16.detach()]
    expected = wa.reference_window_attention(*rounded, bias.detach())
    assert_close(out.float(), expected.float(), 3e-2)


def test_window_block_uses_the_kernel_under_auto_and_trains_as_the_math_path(monkeypatch):
    """A shifted Swin block with the kernels on (`fused`, set by the model's use_kernels) and
    the `auto` backend calls the kernel once per forward, and gives the math backend's output
    and parameter gradients (the relative-position table's included)."""
    torch.manual_seed(0)
    blocks = [WindowBlock(64, 2, grid=(8, 4), window=(4, 4), shift=(2, 0),
                          backend=backend).to(DEVICE) for backend in ("auto", "math")]
    blocks[1].load_state_dict(blocks[0].state_dict())
    blocks[0].fused = True
    calls, real = [], wa.window_attention
    monkeypatch.setattr(wa, "window_attention", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(3, 32, 64, device=DEVICE)
    results = []
    for block in blocks:
        out = block(x)
        results.append((out, torch.autograd.grad(out, list(block.parameters()),
                                                 torch.ones_like(out))))
    assert len(calls) == 1 and calls[0][3].requires_grad  # the learned bias, shift mask added
    (out, grads), (ref, ref_grads) = results
    assert_close(out, ref, FP32_TOL)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, FP32_TOL)


def test_window_block_takes_sdpa_for_windows_larger_than_the_kernels(monkeypatch):
    """Windows past the kernels' sizes (here 8 x 4 = 32 tokens) go to the `auto` backend's
    attention (SDPA), not to the kernel's math fallback."""
    block = WindowBlock(64, 2, grid=(8, 4), window=(8, 4), backend="auto").to(DEVICE)
    block.fused = True
    calls = []
    monkeypatch.setattr(wa, "window_attention", lambda *a: calls.append(a))
    monkeypatch.setattr(wa, "reference_window_attention", lambda *a: calls.append(a))
    out = block(torch.randn(2, 32, 64, device=DEVICE))
    assert out.shape == (2, 32, 64) and not calls


def test_the_model_switches_its_window_blocks_with_its_kernels():
    from conftest import tiny_config
    from fastmavil.models import build_model
    model = build_model(tiny_config("diffmavil"))
    windows = [m for m in model.modules() if isinstance(m, WindowBlock)]
    assert windows and not any(w.fused for w in windows)
    model.use_kernels(True)
    assert all(w.fused for w in windows)
    model.use_kernels(False)
    assert not any(w.fused for w in windows)


def test_compiles_into_a_block_without_a_graph_break():
    """The kernels are torch.library custom ops: a compiled caller traces through them as one
    graph (fullgraph raises on a break), forward and backward equal to eager."""
    inputs = make_inputs(*CASES["L9-d24-B1"])
    compiled = torch.compile(wa.window_attention, backend="aot_eager", fullgraph=True)
    out, grad, grads = run(compiled, *inputs)
    ref, _, ref_grads = run(wa.window_attention, *inputs, grad)
    for actual, expected in zip((out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_bad_inputs_are_named():
    q, k, v, bias = make_inputs(*CASES["swin-4x4-B3"])
    with pytest.raises(ValueError, match=r"q, k, v must share one \(B, G, L, d\) shape"):
        wa.window_attention(q, k[:, :2], v, bias)
    with pytest.raises(ValueError, match=r"bias has shape \(5, 16, 8\); expected \(G, L, L\)"):
        wa.window_attention(q, k, v, bias[..., :8])
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        wa.window_attention(q, k.double(), v, bias)


@pytest.mark.parametrize("limit, value", [("MAX_WINDOW", 8), ("MAX_HEAD_DIM", 16)])
def test_windows_too_large_for_one_program_use_the_reference(monkeypatch, limit, value):
    monkeypatch.setattr(wa, limit, value)
    ran = []
    monkeypatch.setattr(wa, "_forward", lambda *a: ran.append(a))
    check_against_reference(make_inputs(*CASES["L9-d24-B1"]))
    assert not ran


@needs_cuda
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_cuda_bf16(case):
    q, k, v, bias = make_inputs(*CASES[case], dtype=torch.bfloat16)
    out, grad, grads = run(wa.window_attention, q, k, v, bias)
    exact_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    exact, _, exact_grads = run(wa.reference_window_attention, *exact_inputs, bias,
                                grad.float())
    for actual, truth in zip((out, *grads), (exact, *exact_grads)):
        assert_close(actual.float(), truth, 2e-2)


@needs_cuda
@pytest.mark.parametrize("index", range(len(wa._WARPS)))
def test_every_autotune_candidate_matches_cuda_fp32(index, monkeypatch):
    """Each warp count the autotuner may pick, forward and backward, in fp32 (TF32 off)."""
    import triton
    one = triton.autotune([wa._WARPS[index]], key=[])  # one config: no tuning
    monkeypatch.setattr(wa, "_forward_tuned", one(wa._window_forward_kernel))
    monkeypatch.setattr(wa, "_backward_tuned", one(wa._window_backward_kernel))
    for case in ("swin-4x4-B3", "L4-B9"):
        check_against_reference(make_inputs(*CASES[case]))


def test_cosine_window_block_under_autocast(monkeypatch):
    """The swinv2cr block under bf16 autocast (on CUDA its q and k come out of autocast in fp32)
    trains as with SDPA: each output and parameter gradient at most three times as far from the
    fp32 block as the SDPA path's under the same autocast, plus 1e-2 of its largest value. The
    block's post-norm and its temperature's gradient (a sum whose terms nearly cancel) make
    bf16 noise vary more than a single call's (test_half_inputs: twice), from seed to seed.
    The position-bias MLP's last bias is left out: its gradient is 0 in exact arithmetic
    (softmax ignores a constant added to a row), so both paths give rounding there;
    test_bias_gradient_rows_sum_to_zero checks that property exactly."""
    from fastmavil.models.swin import CosineWindowBlock
    torch.manual_seed(0)
    fused, sdpa = (CosineWindowBlock(64, 2, grid=(8, 4), window=(4, 4), shift=(2, 0))
                   .to(DEVICE).eval() for _ in range(2))
    sdpa.load_state_dict(fused.state_dict())
    fused.fused = True
    x = torch.randn(3, 32, 64, device=DEVICE)
    # A random cotangent: the block ends in a LayerNorm (post-norm), so the gradient of out.sum()
    # reaches the attention's parameters as rounding noise only (~1e-8), nothing to compare.
    cotangent = torch.randn_like(x)
    launches, launch = [], wa._forward  # the kernels' op: the fused block must reach it
    monkeypatch.setattr(wa, "_forward", lambda *a: launches.append(a) or launch(*a))

    def out_and_grads(block, autocast):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            out = block(x)
        return out.float(), *torch.autograd.grad(out.float(), list(block.parameters()),
                                                 cotangent)

    results = zip(out_and_grads(fused, True), out_and_grads(sdpa, True),
                  out_and_grads(sdpa, False))
    assert len(launches) == 1
    names = ["out"] + [name for name, _ in fused.named_parameters()]
    for name, (actual, sdpa_bf16, truth) in zip(names, results):
        if name == "meta_mlp.3.bias":
            continue
        error = (actual - truth).abs().max().item()
        sdpa_error = (sdpa_bf16 - truth).abs().max().item()
        assert error <= 3 * sdpa_error + 1e-2 * truth.abs().max().item(), (name, error,
                                                                           sdpa_error)


@pytest.mark.parametrize("case", ["swin-4x4-B3", "L9-d24-B1"])
def test_bias_gradient_rows_sum_to_zero(case):
    """softmax(s + c) = softmax(s) for a constant c added to a row, so each row of the bias
    gradient sums to 0. With bf16 q, k, v the kernel's rows sum to 0 at fp32 rounding (the
    softmax's row term is rowsum(P dP) from the same P); taking it from the output rounded to
    bf16 (FlashAttention's rowsum(dO O)) left them at ~1e-2 of the gradient, and bf16 math
    leaves ~3e-3 (interpreter, 2026-11-27)."""
    q, k, v, bias = make_inputs(*CASES[case], dtype=torch.bfloat16)
    out, grad, grads = run(wa.window_attention, q, k, v, bias)
    dbias = grads[3]
    assert dbias.dtype == torch.float32 and torch.isfinite(dbias).all()
    assert dbias.sum(-1).abs().max() <= 1e-5 * dbias.abs().max()


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="torch < 2.9: only the legacy allow_tf32 flag")
def test_fp32_dot_precision_follows_torch():
    assert dot_constexprs(torch.float32)["PRECISION"] == "ieee"  # the fixture: TF32 off
    assert dot_constexprs(torch.bfloat16)["PRECISION"] == "tf32"  # Triton's default
    with torch_flag(torch.backends.cuda.matmul, "fp32_precision", "tf32"):
        assert dot_constexprs(torch.float32)["PRECISION"] == "tf32"
