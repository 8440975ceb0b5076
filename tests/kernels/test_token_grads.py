"""kernels._token_grads: the bias / position gradients and the cast of grad_out that both
embedding kernels' backwards share, against plain sums; through the kernels with repeated ids.

Without CUDA the kernels run through Triton's interpreter (tests/conftest.py sets it up).
Sums are compared with float64 references at 1e-5 relative to the largest value (fp32 sums of
up to a few hundred terms); casts to bf16 within one bf16 step, 2^-7 relative (the interpreter
truncates where CUDA rounds).
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import nan_filled_empty
from kernels import diffuse_embed as de
from kernels import masked_mse as mm
from kernels import patch_embed as pe
from kernels._token_grads import embedding_grads, link_tokens

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5
BF16_STEP = 2.0 ** -7

pytestmark = pytest.mark.usefixtures("true_fp32")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} x {scale:.3g}"


def python_links(ids: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The links as documented, built row by row in order (the kernels' order may differ)."""
    head = torch.zeros(ids.shape[0], num_tokens, dtype=torch.int32)
    nxt = torch.zeros(ids.shape, dtype=torch.int32)
    for b, row in enumerate(ids.tolist()):
        for i, token in enumerate(row):
            nxt[b, i], head[b, token] = head[b, token], i + 1
    return head.to(DEVICE), nxt.to(DEVICE)


def sums(grad: torch.Tensor, ids: torch.Tensor, num_tokens: int) -> tuple:
    """float64 grad_bias and grad_pos, by index_add."""
    g = grad.double().flatten(0, 1)
    pos = torch.zeros(num_tokens, grad.shape[-1], dtype=torch.float64, device=grad.device)
    return g.sum(0), pos.index_add_(0, ids.flatten(), g)


def repeated_ids(batch: int, n: int, num_tokens: int) -> torch.Tensor:
    """Random ids with repeats in every sample: one token three times, and tokens that no
    sample uses (the first five)."""
    ids = torch.randint(5, num_tokens, (batch, n))
    ids[:, 1] = ids[:, 4] = ids[:, n - 1] = ids[:, 0]
    return ids.to(DEVICE)


# (B, n, N, D): B under and over (not a multiple of) the 8 samples gathered per step, N not a
# multiple of the 16-token tile, D not of the 64-feature block; n > N has every token repeated.
SHAPES = [(5, 7, 37, 100), (19, 9, 23, 72), (3, 40, 21, 64), (1, 9, 9, 33)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-n{}-N{}-D{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gather_pass_matches_sums(shape, dtype):
    """grad_pos (every row written, unused tokens 0) and grad_bias equal the float64 sums, in
    pos's and bias's dtypes, with repeated ids in every sample."""
    batch, n, num_tokens, dim = shape
    ids = repeated_ids(batch, n, num_tokens) if n < num_tokens else torch.randint(
        num_tokens, (batch, n), device=DEVICE)
    grad = torch.randn(batch, n, dim, device=DEVICE).to(dtype)
    with nan_filled_empty():
        g_mm, grad_b, grad_pos = embedding_grads(
            grad, links=python_links(ids.cpu(), num_tokens), bias_dtype=torch.float32,
            pos_dtype=dtype, matmul_dtype=None)
    ref_b, ref_pos = sums(grad, ids, num_tokens)
    assert g_mm is None and grad_pos.dtype == dtype and grad_b.dtype == torch.float32
    assert not grad_pos.isnan().any()
    assert_close(grad_b, ref_b, TOL)
    assert_close(grad_pos, ref_pos, TOL if dtype == torch.float32 else BF16_STEP)
    if n < num_tokens:
        assert (grad_pos[:5] == 0).all()


@pytest.mark.parametrize("with_pos", [True, False], ids=["gather", "rows"])
def test_casts_grad_out_for_the_matmul(with_pos):
    """Under autocast grad_out is fp32 and the weight gradient multiplies in bf16: both passes
    write the bf16 copy of every row (NaN-poisoned before)."""
    batch, n, num_tokens, dim = 3, 11, 30, 70
    ids = torch.stack([torch.randperm(num_tokens)[:n] for _ in range(batch)]).to(DEVICE)
    grad = torch.randn(batch, n, dim, device=DEVICE)
    with nan_filled_empty():
        g_mm, grad_b, grad_pos = embedding_grads(
            grad, links=python_links(ids.cpu(), num_tokens), bias_dtype=torch.bfloat16,
            pos_dtype=torch.float32 if with_pos else None, matmul_dtype=torch.bfloat16)
    assert g_mm.shape == (batch * n, dim) and g_mm.dtype == torch.bfloat16
    assert not g_mm.isnan().any()
    assert_close(g_mm, grad.flatten(0, 1), BF16_STEP)
    ref_b, ref_pos = sums(grad, ids, num_tokens)
    assert grad_b.dtype == torch.bfloat16
    assert_close(grad_b, ref_b, BF16_STEP)
    assert (grad_pos is None) != with_pos
    if with_pos:
        assert_close(grad_pos, ref_pos, TOL)


def test_without_a_cast_or_pos_grad_g_is_grad_out():
    grad = torch.randn(2, 5, 8, device=DEVICE)
    g_mm, grad_b, grad_pos = embedding_grads(grad, links=None, bias_dtype=torch.float32,
                                             pos_dtype=None, matmul_dtype=torch.float32)
    assert torch.equal(g_mm, grad.flatten(0, 1)) and grad_pos is None
    assert_close(grad_b, grad.double().sum((0, 1)), TOL)


# (B, n, N): over 32 tiles of partial bias sums, so the last program adds them in more than one
# chunk: the gather's 16-token tiles (N = 600: 38) and the row pass's 64-row tiles (2100 rows: 33).
@pytest.mark.parametrize("shape", [(2, 300, 600), (3, 700, 900)], ids=["gather", "rows"])
def test_bias_sum_over_many_tiles(shape):
    batch, n, num_tokens = shape
    dim, with_pos = 40, shape[2] == 600
    ids = torch.stack([torch.randperm(num_tokens)[:n] for _ in range(batch)]).to(DEVICE)
    grad = torch.randn(batch, n, dim, device=DEVICE)
    with nan_filled_empty():
        _, grad_b, grad_pos = embedding_grads(
            grad, links=link_tokens(ids, num_tokens) if with_pos else None,
            bias_dtype=torch.float32, pos_dtype=torch.float32 if with_pos else None,
            matmul_dtype=None)
    ref_b, ref_pos = sums(grad, ids, num_tokens)
    assert_close(grad_b, ref_b, TOL)
    if with_pos:
        assert_close(grad_pos, ref_pos, TOL)


@pytest.mark.parametrize("with_pos", [True, False], ids=["gather", "rows"])
def test_a_launch_leaves_its_arrival_counters_at_zero(monkeypatch, with_pos):
    """The last program of each feature block resets its counter: two calls on one set of
    counters both get their own bias sums (the autotuner relaunches on the same arguments)."""
    from kernels import _token_grads as tg
    shared = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(tg, "_counters", lambda count, device: shared[:count])
    batch, n, num_tokens, dim = 3, 30, 70, 100
    ids = torch.stack([torch.randperm(num_tokens)[:n] for _ in range(batch)]).to(DEVICE)
    links = link_tokens(ids, num_tokens) if with_pos else None
    for _ in range(2):
        grad = torch.randn(batch, n, dim, device=DEVICE)
        with nan_filled_empty():
            _, grad_b, _ = embedding_grads(
                grad, links=links, bias_dtype=torch.float32,
                pos_dtype=torch.float32 if with_pos else None, matmul_dtype=torch.bfloat16)
        assert_close(grad_b, sums(grad, ids, num_tokens)[0], TOL)
        assert (shared == 0).all()


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)], ids=["B0", "n0"])
@pytest.mark.parametrize("with_pos", [True, False], ids=["gather", "rows"])
def test_no_rows_give_zero_sums(shape, with_pos):
    """An empty batch: no row program runs, and the sums are zeros, not uninitialised memory."""
    batch, n = shape
    num_tokens, dim = 20, 40
    grad = torch.randn(batch, n, dim, device=DEVICE)
    ids = torch.zeros(batch, n, dtype=torch.long, device=DEVICE)
    with nan_filled_empty():
        g_mm, grad_b, grad_pos = embedding_grads(
            grad, links=link_tokens(ids, num_tokens) if with_pos else None,
            bias_dtype=torch.float32, pos_dtype=torch.float32 if with_pos else None,
            matmul_dtype=torch.bfloat16)
    assert (grad_b == 0).all() and g_mm.shape == (0, dim)
    assert grad_pos is None or (grad_pos == 0).all()


def test_unrolled_candidates_only_for_small_batches():
    """Past 8 steps of 8 samples the autotuner times only the loops (unrolled, they compile for
    seconds and spill)."""
    from kernels import _token_grads as tg
    configs = tg._gather_tuned.configs
    assert tg._prune_unrolled(configs, {}, STEPS=8) == configs
    loops = tg._prune_unrolled(configs, {}, STEPS=9)
    assert loops and all(not c.kwargs["UNROLL"] for c in loops)
    assert len(loops) == len(configs) // 2


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: the interpreter runs programs one after another, so "
                           "the last-program sum cannot race there")
@pytest.mark.parametrize("with_pos", [True, False], ids=["gather", "rows"])
def test_cuda_bias_sum_over_hundreds_of_tiles_is_deterministic(with_pos):
    """Hundreds of programs per feature block arrive at once (256 gather tiles, 250 row tiles):
    the last one must see every partial, on every run, bit for bit."""
    batch, n, num_tokens, dim = (8, 2000, 4096, 768) if with_pos else (8, 2000, 2000, 768)
    ids = torch.stack([torch.randperm(num_tokens)[:n] for _ in range(batch)]).to(DEVICE)
    grad = torch.randn(batch, n, dim, device=DEVICE)
    links = link_tokens(ids, num_tokens) if with_pos else None
    runs = [embedding_grads(grad, links=links, bias_dtype=torch.float32,
                            pos_dtype=torch.float32 if with_pos else None,
                            matmul_dtype=torch.bfloat16)[1] for _ in range(30)]
    assert all(torch.equal(runs[0], later) for later in runs[1:])
    assert_close(runs[0], sums(grad, ids, num_tokens)[0], TOL)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CUDA: test_cuda_every_gather_config runs every candidate natively")
def test_gather_as_a_loop_matches_sums(monkeypatch):
    """The interpreter runs the unrolled gather; the loop over the samples (the other half of
    the autotuner's candidates) gives the same sums."""
    from kernels import _token_grads as tg
    monkeypatch.setattr(tg, "_INTERPRET", dict(tg._INTERPRET, UNROLL=False))
    batch, n, num_tokens, dim = 19, 9, 23, 72
    ids = repeated_ids(batch, n, num_tokens)
    grad = torch.randn(batch, n, dim, device=DEVICE)
    with nan_filled_empty():
        _, grad_b, grad_pos = embedding_grads(
            grad, links=link_tokens(ids, num_tokens), bias_dtype=torch.float32,
            pos_dtype=torch.float32, matmul_dtype=None)
    ref_b, ref_pos = sums(grad, ids, num_tokens)
    assert_close(grad_b, ref_b, TOL)
    assert_close(grad_pos, ref_pos, TOL)


def test_grad_pos_is_deterministic():
    """Distinct ids (a mask's): the same gradients bit for bit on every run (index_add_'s float
    atomics on CUDA give no such promise)."""
    batch, n, num_tokens, dim = 9, 13, 40, 96
    ids = torch.stack([torch.randperm(num_tokens)[:n] for _ in range(batch)]).to(DEVICE)
    grad = torch.randn(batch, n, dim, device=DEVICE)
    links = python_links(ids.cpu(), num_tokens)
    runs = [embedding_grads(grad, links=links, bias_dtype=torch.float32,
                            pos_dtype=torch.float32, matmul_dtype=None)[1:]
            for _ in range(3)]
    for later in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], later))
    for actual, expected in zip(runs[0], sums(grad, ids, num_tokens)):
        assert_close(actual, expected, TOL)


def chains(head: torch.Tensor, nxt: torch.Tensor) -> list[dict[int, list[int]]]:
    """Per sample, token -> its rows, by walking the links."""
    out = []
    for h_row, n_row in zip(head.tolist(), nxt.tolist()):
        sample = {}
        for token, r in enumerate(h_row):
            while r:
                sample.setdefault(token, []).append(r - 1)
                r = n_row[r - 1]
        out.append(sample)
    return out


def test_link_tokens_links_every_row_once():
    """Every row sits in its token's chain, exactly once, with repeated ids, from a strided
    (sliced) ids tensor; ids outside [0, N) stay unlinked (no write out of bounds)."""
    batch, n, num_tokens = 3, 50, 20
    full = torch.randint(0, num_tokens, (batch, n + 7), device=DEVICE)
    ids = full[:, 3:3 + n]
    assert not ids.is_contiguous()
    ids[0, 5], ids[1, 0], ids[2, n - 1] = -1, num_tokens, num_tokens + 1000
    head, nxt = link_tokens(ids, num_tokens)
    assert head.shape == (batch, num_tokens) and nxt.shape == (batch, n)
    expected = [{} for _ in range(batch)]
    for b, row in enumerate(ids.tolist()):
        for i, token in enumerate(row):
            if 0 <= token < num_tokens:
                expected[b].setdefault(token, []).append(i)
    assert [{t: sorted(r) for t, r in s.items()} for s in chains(head.cpu(), nxt.cpu())] == expected
    for b, i in ((0, 5), (1, 0), (2, n - 1)):
        assert nxt[b, i] == 0 and (head[b] != i + 1).all()


def test_patch_embed_sums_repeated_ids():
    """Through the forward kernel's links: a gather with repeated ids (not a mask, but a valid
    call) gets the reference's bias and position gradients."""
    batch, patch, dim = 3, (16, 16), 48
    x = torch.randn(batch, 1, 64, 80, device=DEVICE)
    num_tokens = 4 * 5
    ids = repeated_ids(batch, 9, num_tokens)
    params = [torch.randn(dim, 1, *patch, device=DEVICE) / 16, torch.randn(dim, device=DEVICE),
              torch.randn(num_tokens, dim, device=DEVICE)]
    params = [p.requires_grad_() for p in params]
    grad = torch.randn(batch, 9, dim, device=DEVICE)
    got = torch.autograd.grad(pe.patch_embed_visible(x, ids, *params, patch), params, grad)
    ref = torch.autograd.grad(pe.reference_patch_embed_visible(x, ids, *params, patch), params,
                              grad)
    for actual, expected in zip(got, ref):
        assert_close(actual, expected, TOL)


def test_diffuse_embed_sums_repeated_ids():
    batch, patch, dim = 2, (2, 16, 16), 40
    x = torch.randn(batch, 3, 4, 32, 48, device=DEVICE)
    num_tokens, p = 2 * 2 * 3, 3 * math.prod(patch)
    ids = repeated_ids(batch, 6, num_tokens)
    t = torch.tensor([3, 7], device=DEVICE)
    alpha_bar = torch.linspace(1.0, 0.05, 11, device=DEVICE)
    noise = torch.randn(batch, 6, p, device=DEVICE)
    params = [torch.randn(dim, p, device=DEVICE) / p ** 0.5, torch.randn(dim, device=DEVICE),
              torch.randn(num_tokens, dim, device=DEVICE)]
    params = [q.requires_grad_() for q in params]
    grad = torch.randn(batch, 6, dim, device=DEVICE)
    args = (x, ids, t, alpha_bar, *params, patch)
    got = torch.autograd.grad(de.diffuse_embed_masked(*args, noise=noise), params, grad)
    ref = torch.autograd.grad(de.reference_diffuse_embed_masked(*args, noise=noise), params,
                              grad)
    for actual, expected in zip(got, ref):
        assert_close(actual, expected, TOL)


def test_double_backward_raises():
    """The gradients come from kernels without a graph of their own: differentiating them again
    must fail loudly (once_differentiable), not return a second derivative that misses them."""
    x = torch.randn(2, 1, 32, 32, device=DEVICE)
    ids = torch.tensor([[0, 3], [2, 1]], device=DEVICE)
    params = [torch.randn(8, 1, 16, 16, device=DEVICE).requires_grad_(),
              torch.randn(8, device=DEVICE).requires_grad_(),
              torch.randn(4, 8, device=DEVICE).requires_grad_()]
    noise = torch.randn(2, 2, 256, device=DEVICE)
    t, alpha_bar = torch.tensor([1, 2], device=DEVICE), torch.linspace(1.0, 0.5, 3, device=DEVICE)
    outputs = (pe.patch_embed_visible(x, ids, *params, (16, 16)),
               de.diffuse_embed_masked(x, ids, t, alpha_bar, params[0].flatten(1), *params[1:],
                                       (16, 16), noise=noise))
    for out in outputs:
        grads = torch.autograd.grad(out.square().sum(), params, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            sum(g.square().sum() for g in grads).backward()
    pred = torch.randn(2, 2, 256, device=DEVICE, requires_grad=True)  # and the loss's
    (grad,) = torch.autograd.grad(mm.masked_patch_mse(pred, x, ids, (16, 16)).square(), pred,
                                  create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.square().sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: the autotuner's candidates run natively only")
@pytest.mark.parametrize("cast", [False, True], ids=["bf16", "amp-cast"])
def test_cuda_every_gather_config(monkeypatch, cast):
    """Each candidate the autotuner may pick (the other tests check only its pick), with repeated
    ids so the chain walk runs, B over two steps of samples, ragged N and D."""
    import triton

    from kernels import _token_grads as tg
    batch, n, num_tokens, dim = 19, 60, 37, 200
    ids = repeated_ids(batch, n, num_tokens)
    grad = torch.randn(batch, n, dim, device=DEVICE)
    grad = grad if cast else grad.bfloat16()
    ref_b, ref_pos = sums(grad, ids, num_tokens)
    for config in tg._gather_tuned.configs:
        monkeypatch.setattr(tg, "_gather_tuned", triton.autotune([config], key=[])(
            tg._gather_kernel))
        with nan_filled_empty():
            g_mm, grad_b, grad_pos = embedding_grads(
                grad, links=link_tokens(ids, num_tokens), bias_dtype=torch.float32,
                pos_dtype=torch.float32, matmul_dtype=torch.bfloat16 if cast else None)
        assert_close(grad_pos, ref_pos, TOL)
        assert_close(grad_b, ref_b, TOL)
        if cast:
            assert_close(g_mm, grad.flatten(0, 1), BF16_STEP)
