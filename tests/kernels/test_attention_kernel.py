"""kernels.attention: self- and cross-attention on the packed projections, forward and
gradients, against the math path.

Without CUDA the kernels run on the CPU through Triton's interpreter (tests/conftest.py), in
INTERPRETER_BLOCKS (16 x 16 by default: the test sequences span several blocks, the last one
partial). Tolerances, relative to the largest reference value: interpreter fp32 1e-5; CUDA
fp32 1e-4 (TF32 off). Half precision: at most twice the error of the math path in that dtype,
both against math in fp32, plus atol (FlashAttention's criterion, as tests/test_attention.py).
"""
from __future__ import annotations

import copy

import pytest
import torch

import kernels
from conftest import nan_filled_empty
from fastmavil.models.attention import CrossAttention, SelfAttention
from kernels import attention as ka

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FP32_TOL = 1e-4 if CUDA else 1e-5
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: native Triton parity")

pytestmark = pytest.mark.usefixtures("true_fp32")  # tests/conftest.py: TF32 off on CUDA

# (B, Lq, Lk, heads, d): Lk None for self-attention. Odd lengths (partial last blocks), a head
# width padded to its block (24 -> 32), one query or key, a sequence of exactly one block.
CASES = {
    "self-L37-H3-d16": (2, 37, None, 3, 16),
    "self-L16-H2-d32": (1, 16, None, 2, 32),
    "self-L1-H1-d16": (3, 1, None, 1, 16),
    "cross-19x11-H2-d24": (2, 19, 11, 2, 24),
    "cross-5x40-H2-d16": (1, 5, 40, 2, 16),
    "cross-33x1-H1-d16": (2, 33, 1, 1, 16),
}


def make_inputs(batch, lq, lk, heads, dim, dtype=torch.float32, seed=0):
    """(fn, reference, inputs): the packed tensors of a case, requiring grad."""
    gen = torch.Generator().manual_seed(seed)

    def tensor(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()
    width = heads * dim
    if lk is None:
        return (lambda qkv: ka.self_attention(qkv, heads),
                lambda qkv: ka.reference_self_attention(qkv, heads), [tensor(batch, lq, 3 * width)])
    return (lambda q, kv: ka.cross_attention(q, kv, heads),
            lambda q, kv: ka.reference_cross_attention(q, kv, heads),
            [tensor(batch, lq, width), tensor(batch, lk, 2 * width)])


def run(fn, inputs, grad=None):
    out = fn(*inputs)
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return out, grad, torch.autograd.grad(out, inputs, grad)


def assert_close(actual, expected, tol):
    """Within tol of the largest expected value, or of 1 where all are smaller (inputs are
    O(1); with one key, dq is exactly 0 in exact arithmetic and rounding in the kernels)."""
    scale = max(expected.detach().abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def check_against_reference(shape, tol=FP32_TOL, **kwargs):
    fn, reference, inputs = make_inputs(*shape, **kwargs)
    out, grad, grads = run(fn, inputs)
    ref, _, ref_grads = run(reference, inputs, grad)
    assert out.shape == ref.shape and out.dtype == inputs[0].dtype
    for actual, expected in zip((out, *grads), (ref, *ref_grads), strict=True):
        assert torch.isfinite(actual).all()
        assert_close(actual, expected, tol)


def test_interpreter_runs_on_cpu(monkeypatch):
    if CUDA:
        pytest.skip("CUDA present: kernels run natively")
    fn, _, inputs = make_inputs(*CASES["self-L37-H3-d16"])
    assert kernels.interpreting() and kernels.can_launch("attention", *inputs)
    assert type(ka._attention_forward_kernel).__name__ == "InterpretedFunction"
    assert len(ka._QUERY_CONFIGS) == len(ka._KEY_CONFIGS)  # the CUDA candidate test pairs them

    def no_reference(*args):
        raise AssertionError("the reference ran instead of the kernels")

    monkeypatch.setattr(ka, "reference_self_attention", no_reference)
    run(fn, inputs)


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_fp32(case):
    check_against_reference(CASES[case])


@pytest.mark.skipif(CUDA, reason="sets the interpreter's block shape; CUDA runs the candidates")
@pytest.mark.parametrize("blocks", [(32, 16), (16, 32), (64, 64)], ids=str)
def test_other_block_shapes(blocks, monkeypatch):
    """Query and key blocks of different sizes, and blocks longer than the sequences."""
    monkeypatch.setattr(ka, "INTERPRETER_BLOCKS", {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1]})
    for case in ("self-L37-H3-d16", "cross-19x11-H2-d24"):
        check_against_reference(CASES[case])


def test_every_output_element_is_written():
    """Outputs and gradients come from torch.empty: poisoned with NaN, a missed element shows
    (the packed gradients' three column blocks included)."""
    for case in ("self-L37-H3-d16", "cross-19x11-H2-d24"):
        fn, reference, inputs = make_inputs(*CASES[case])
        ref, grad, ref_grads = run(reference, inputs)
        with nan_filled_empty():
            out, _, grads = run(fn, inputs, grad)
        for actual, expected in zip((out, *grads), (ref, *ref_grads)):
            assert not actual.isnan().any()
            assert_close(actual, expected, FP32_TOL)


def test_other_layouts_are_read_through_their_strides():
    """Batch strides that are not L rows (a sequence-major qkv; a kv sliced from a longer
    sequence), a q whose rows are further apart than its width, and a transposed output
    gradient: all equal the reference."""
    gen = torch.Generator().manual_seed(2)

    def tensor(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)
    qkv = tensor(37, 2, 144).transpose(0, 1).requires_grad_()  # (B, L, 3D), batch stride 144
    q = tensor(2, 19, 80)[..., 8:56].requires_grad_()           # row stride 80, width 48
    kv = tensor(2, 30, 96)[:, 5:16].requires_grad_()            # batch stride 30 rows
    for fn, reference, inputs, shape in (
            (ka.self_attention, ka.reference_self_attention, [qkv], (2, 37, 48)),
            (ka.cross_attention, ka.reference_cross_attention, [q, kv], (2, 19, 48))):
        grad = tensor(shape[1], shape[0], shape[2]).transpose(0, 1)
        out, _, grads = run(lambda *a: fn(*a, 3), inputs, grad)
        ref, _, ref_grads = run(lambda *a: reference(*a, 3), inputs, grad)
        for actual, expected in zip((out, *grads), (ref, *ref_grads), strict=True):
            assert_close(actual, expected, FP32_TOL)


def test_no_keys_give_the_references_zeros():
    q, kv = torch.randn(2, 5, 16, device=DEVICE), torch.randn(2, 0, 32, device=DEVICE)
    out = ka.cross_attention(q, kv, 2)
    assert out.shape == (2, 5, 16) and not out.isnan().any()
    torch.testing.assert_close(out, ka.reference_cross_attention(q, kv, 2), rtol=0, atol=0)


def test_more_sample_heads_than_the_grid_takes_use_the_reference(monkeypatch):
    monkeypatch.setattr(ka, "MAX_SAMPLE_HEADS", 5)  # the case's 2 x 3
    ran = []
    monkeypatch.setattr(ka, "_self_forward", lambda *a: ran.append(a))
    check_against_reference(CASES["self-L37-H3-d16"])
    assert not ran


def test_strided_inputs_are_read_in_place():
    """A packed projection that is a slice of a wider tensor (its rows further apart than its
    width) gives the same results as a contiguous copy, without copying."""
    fn, _, (qkv,) = make_inputs(*CASES["self-L37-H3-d16"])
    wide = torch.randn(*qkv.shape[:-1], qkv.shape[-1] + 5, device=DEVICE)
    wide[..., 3:3 + qkv.shape[-1]] = qkv.detach()
    sliced = wide[..., 3:3 + qkv.shape[-1]].requires_grad_()
    assert not sliced.is_contiguous() and sliced.stride(-1) == 1
    out, grad, (dsliced,) = run(fn, [sliced])
    ref, _, (dqkv,) = run(fn, [qkv], grad)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(dsliced, dqkv, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["self-L37-H3-d16", "cross-19x11-H2-d24"])
def test_half_inputs(case, dtype):
    """Half inputs (the projections' under autocast): the output and gradients in that dtype,
    each at most twice as far from fp32 math as the math path in that dtype is (three times in
    bf16 on the interpreter, whose casts to bf16 round toward zero: test_window_attention)."""
    fn, reference, inputs = make_inputs(*CASES[case], dtype=dtype)
    out, grad, grads = run(fn, inputs)
    half, _, half_grads = run(reference, inputs, grad)
    exact_inputs = [t.detach().float().requires_grad_() for t in inputs]
    exact, _, exact_grads = run(reference, exact_inputs, grad.float())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    factor = 3 if kernels.interpreting() and dtype == torch.bfloat16 else 2
    for actual, math_half, truth in zip((out, *grads), (half, *half_grads),
                                        (exact, *exact_grads)):
        error = (actual.float() - truth).abs().max().item()
        math_error = (math_half.float() - truth).abs().max().item()
        assert error <= factor * math_error + 1e-3 * truth.abs().max().item(), (error,
                                                                                 math_error)


def test_autocast_runs_in_its_dtype():
    """Under autocast fp32 inputs run in its dtype, as SDPA's would."""
    fn, reference, inputs = make_inputs(*CASES["cross-19x11-H2-d24"])
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = fn(*inputs)
    assert out.dtype == torch.bfloat16
    expected = reference(*(t.detach().bfloat16() for t in inputs))
    assert_close(out.float(), expected.float(), 3e-2)


def test_compiles_into_a_caller_without_a_graph_break():
    """The kernels are torch.library custom ops: a compiled caller traces through them as one
    graph (fullgraph raises on a break), forward and backward equal to eager."""
    for case in ("self-L16-H2-d32", "cross-19x11-H2-d24"):
        fn, _, inputs = make_inputs(*CASES[case])
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        out, grad, grads = run(compiled, inputs)
        ref, _, ref_grads = run(fn, inputs, grad)
        for actual, expected in zip((out, *grads), (ref, *ref_grads)):
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("cls", ["Block", "CrossBlock"])
def test_compiled_blocks_call_the_kernels_over_token_counts(cls, monkeypatch):
    """Blocks compiled by Inductor (as train.compile does, dynamic shapes) with the kernels'
    attention: they launch the kernels (the ops' launches counted), equal to the eager block,
    forward and parameter gradients, at two token counts (the masking curriculum's) in one
    graph."""
    from torch._dynamo.utils import counters

    from fastmavil.models import attention as blocks
    from fastmavil.models.compile import compile_blocks
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = getattr(blocks, cls)(32, 2, backend="triton").to(DEVICE)
    eager.attn.fused = True
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    launches = []  # the ops' launch helpers: called by the custom ops, eager or compiled
    for name in ("_forward", "_backward"):
        helper = getattr(ka, name)
        monkeypatch.setattr(ka, name, lambda *a, h=helper, n=name: launches.append(n) or h(*a))
    for tokens in (7, 37):  # one block, then three (16-row blocks on the interpreter)
        inputs = [torch.randn(3, tokens, 32, device=DEVICE)] + (
            [torch.randn(3, 5, 32, device=DEVICE)] if cls == "CrossBlock" else [])
        grad = torch.randn(3, tokens, 32, device=DEVICE)
        results = []
        for block in (eager, compiled):
            launches.clear()
            out = block(*inputs)
            results.append((out, torch.autograd.grad(out, list(block.parameters()), grad)))
            assert launches == ["_forward", "_backward"]
        (a, ga), (b, gb) = results
        assert_close(b, a, FP32_TOL)
        for g, h in zip(gb, ga, strict=True):
            assert_close(g, h, 10 * FP32_TOL)
    assert counters["stats"]["unique_graphs"] == 1


def test_bad_inputs_are_named():
    qkv = torch.randn(2, 5, 48, device=DEVICE)
    with pytest.raises(ValueError, match="width 16 does not split into 3 heads"):
        ka.self_attention(qkv, 3)
    with pytest.raises(ValueError, match="width 16 does not split into 0 heads"):
        ka.self_attention(qkv, 0)
    with pytest.raises(ValueError, match="qkv's width 47 is not 3 D"):
        ka.self_attention(qkv[..., :47], 2)
    with pytest.raises(ValueError, match=r"qkv must be \(B, L, features\)"):
        ka.self_attention(qkv[0], 2)
    q, kv = torch.randn(2, 5, 16, device=DEVICE), torch.randn(2, 7, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"kv's width 30 is not 2 x q's \(16\)"):
        ka.cross_attention(q, kv[..., :30], 2)
    with pytest.raises(TypeError, match="q, kv must share a dtype"):
        ka.cross_attention(q, kv.double(), 2)
    with pytest.raises(ValueError, match="q, kv must share a batch size"):
        ka.cross_attention(q, kv[:1], 2)


def test_heads_wider_than_the_kernels_take_use_the_reference(monkeypatch):
    monkeypatch.setattr(ka, "MAX_HEAD_DIM", 8)
    ran = []
    monkeypatch.setattr(ka, "_self_forward", lambda *a: ran.append(a))
    check_against_reference(CASES["self-L37-H3-d16"])
    assert not ran


@pytest.mark.parametrize("cls, args", [(SelfAttention, 1), (CrossAttention, 2)])
def test_modules_run_the_kernels_under_backend_triton_with_the_kernels_on(cls, args,
                                                                         monkeypatch):
    """backend triton with the model's kernels on (`fused`) calls the kernels' ops and trains
    as the math backend; with the kernels off, or another backend, they are not called."""
    torch.manual_seed(1)
    module = cls(48, 3).to(DEVICE)
    inputs = [torch.randn(2, 19, 48, device=DEVICE, requires_grad=True),
              torch.randn(2, 11, 48, device=DEVICE, requires_grad=True)][:args]
    calls = []
    for name in ("_self_forward", "_cross_forward"):
        op = getattr(ka, name)
        monkeypatch.setattr(ka, name, lambda *a, op=op: calls.append(a) or op(*a))

    def out_and_grads(module, backend, fused):
        module.backend, module.fused = backend, fused
        out = module(*inputs)
        grads = torch.autograd.grad(out.square().sum(), [*module.parameters(), *inputs])
        return out, *grads

    reference = out_and_grads(copy.deepcopy(module), "math", False)
    for backend, fused, launches in (("triton", False, 0), ("auto", True, 0), ("triton", True, 1)):
        calls.clear()
        results = out_and_grads(module, backend, fused)
        assert len(calls) == launches, (backend, fused)
        for actual, expected in zip(results, reference, strict=True):
            assert_close(actual, expected, FP32_TOL)


def test_the_model_switches_its_attention_with_its_kernels():
    from fastmavil.config import Config, ModelConfig
    from fastmavil.models import build_model
    model = build_model(Config(model=ModelConfig(size="tiny", attention="triton")))
    attn = [m for m in model.modules() if isinstance(m, (SelfAttention, CrossAttention))]
    assert attn and all(m.backend == "triton" and not m.fused for m in attn)
    model.use_kernels(True)
    assert all(m.fused for m in attn)


def check_bf16_against_fp32(shape):
    """bf16 inputs (CUDA: tensor-core products) within 2e-2 of the reference in fp32."""
    fn, reference, inputs = make_inputs(*shape, dtype=torch.bfloat16)
    out, grad, grads = run(fn, inputs)
    exact_inputs = [t.detach().float().requires_grad_() for t in inputs]
    exact, _, exact_grads = run(reference, exact_inputs, grad.float())
    for actual, truth in zip((out, *grads), (exact, *exact_grads)):
        assert_close(actual.float(), truth, 2e-2)


@needs_cuda
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_cuda_bf16(case):
    check_bf16_against_fp32(CASES[case])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("index", range(len(ka._QUERY_CONFIGS)))
def test_every_autotune_candidate_matches_cuda(index, dtype, monkeypatch):
    """Each block shape, warp count and stage count the autotuner may pick (the index-th of each
    kernel's candidates), forward and both backward kernels, at R4-like odd lengths and head
    widths: in fp32 (TF32 off: IEEE products) within FP32_TOL of the reference, and in bf16
    (training's tensor-core code) within 2e-2 of the reference in fp32."""
    import triton
    for name, kernel, configs in (
            ("_forward_tuned", ka._attention_forward_kernel, ka._QUERY_CONFIGS),
            ("_dq_tuned", ka._attention_dq_kernel, ka._QUERY_CONFIGS),
            ("_dkdv_tuned", ka._attention_dkdv_kernel, ka._KEY_CONFIGS)):
        one = triton.autotune([configs[index]], key=[])  # one config: no tuning
        monkeypatch.setattr(ka, name, one(kernel))
    for shape in ((2, 102, None, 2, 64), (2, 157, 45, 2, 32)):
        if dtype == torch.float32:
            check_against_reference(shape)
        else:
            check_bf16_against_fp32(shape)
