import copy

import pytest
import torch

from fastmavil.masking import random_masking
from fastmavil.models.attention import CrossAttention, SelfAttention, attention, flash_attn_func
from fastmavil.models.decoder import Decoder
from fastmavil.models.pos_embed import sincos_grid
from fastmavil.models.swin import (CosineWindowBlock, WindowBlock, from_windows,
                                   relative_position_index, shift_mask, to_windows)


def _grads(module, *inputs):
    out = module(*inputs)
    out.square().sum().backward()
    return out, [p.grad.clone() for p in module.parameters()] + [x.grad.clone() for x in inputs]


FLASH = pytest.mark.skipif(
    flash_attn_func() is None or not torch.cuda.is_available(),
    reason="needs the flash-attn package and a CUDA GPU (not installable on the CPU machines)")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# (backend, device, dtype, rtol, atol): every backend present against math on the same inputs
CASES = [pytest.param("sdpa", "cpu", torch.float32, 1e-5, 1e-5, id="sdpa-cpu-fp32"),
         pytest.param("auto", "cpu", torch.float32, 1e-5, 1e-5, id="auto-cpu-fp32"),
         pytest.param("sdpa", "cpu", torch.bfloat16, 1e-2, 1e-2, id="sdpa-cpu-bf16"),
         pytest.param("sdpa", "cuda", torch.bfloat16, 1e-2, 1e-2, id="sdpa-cuda-bf16",
                      marks=CUDA),
         pytest.param("flash", "cuda", torch.bfloat16, 1e-2, 1e-2, id="flash-cuda-bf16",
                      marks=FLASH)]


def _assert_agree(got, want, exact, rtol, atol):
    """A backend's tensors `got` against math's `want`, both in the case's dtype. In fp32 they
    must be close. In bf16 two correct paths differ by their own rounding, which a post-norm
    block amplifies past any fixed tolerance (sdpa and math 0.025 apart on an H200, where
    rtol = atol = 0.02 allowed 0.022), so there the backend may be at most twice as far as
    math from `exact`, math in fp32 on the same weights and inputs, plus atol: the criterion
    of flash-attn's own tests."""
    for g, w, e in zip(got, want, exact, strict=True):
        if g.dtype == torch.float32:
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
            continue
        err, own = ((t.float() - e).abs().max().item() for t in (g, w))
        assert err <= 2 * own + atol, \
            f"backend off the fp32 result by {err:.3g}, bf16 math by {own:.3g}"


@pytest.mark.parametrize("backend, device, dtype, rtol, atol", CASES)
@pytest.mark.parametrize("lq, lk, with_bias", [(7, 7, True), (5, 11, True), (9, 9, False),
                                               (4, 13, False)])
def test_backends_match_math(backend, device, dtype, rtol, atol, lq, lk, with_bias):
    """Output and the gradients of q, k, v and of a learned bias (as the Swin relative-position
    bias is); flash-attn takes no bias, so its biased calls run (and are checked) through sdpa."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, device=device, dtype=dtype, requires_grad=True)
               for n in (lq, lk, lk))
    bias = torch.randn(3, lq, lk, device=device, requires_grad=True) if with_bias else None
    inputs = (q, k, v) + ((bias,) if with_bias else ())

    def run(name, inputs):
        out = attention(*inputs[:3], inputs[3] if with_bias else None, name)
        return out, *torch.autograd.grad(out.float().square().sum(), inputs)
    exact = run("math", [t.detach().float().requires_grad_() for t in inputs])
    (out, *grads), (want, *want_grads) = run(backend, inputs), run("math", inputs)
    _assert_agree([out], [want], exact[:1], rtol, atol)
    _assert_agree(grads, want_grads, exact[1:], 10 * rtol, 10 * atol)


def test_flash_backend_explains_when_it_cannot_run():
    if flash_attn_func() is not None and torch.cuda.is_available():
        pytest.skip("flash-attn runs here")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="needs the flash-attn package, a CUDA device"):
        attention(q, q, q, None, "flash")


def test_flash_call_layout_and_bias_fallback(monkeypatch):
    """The flash branch hands flash-attn (B, L, H, d) tensors and transposes its output back
    (a stand-in with flash-attn's layout, on the CPU), and a biased call never reaches it."""
    import fastmavil.models.attention as attention_module
    calls = []

    def stand_in(q, k, v):  # flash_attn_func's layout: (B, L, H, d)
        calls.append((tuple(q.shape), tuple(k.shape)))
        return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
                         "math").transpose(1, 2)
    monkeypatch.setattr(attention_module, "flash_attn_func", lambda: stand_in)
    # the device and dtype conditions need CUDA (test_flash_backend_explains_when_it_cannot_run)
    monkeypatch.setattr(attention_module, "_flash_applies", lambda q, bias: bias is None)
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, n, 16) for n in (5, 11, 11))
    for backend in ("flash", "auto"):
        torch.testing.assert_close(attention(q, k, v, None, backend),
                                   attention(q, k, v, None, "math"), rtol=0, atol=0)
    assert calls == [((2, 5, 3, 16), (2, 11, 3, 16))] * 2
    bias = torch.randn(3, 5, 11)
    torch.testing.assert_close(attention(q, k, v, bias, "flash"),
                               attention(q, k, v, bias, "math"), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2


@pytest.mark.parametrize("backend, device, dtype, rtol, atol", CASES)
@pytest.mark.parametrize("cls, args", [(SelfAttention, 1), (CrossAttention, 2)])
def test_modules_agree_across_backends(cls, args, backend, device, dtype, rtol, atol):
    torch.manual_seed(1)
    module = cls(32, 4).to(device, dtype)
    inputs = [torch.randn(2, 9, 32, device=device, dtype=dtype, requires_grad=True),
              torch.randn(2, 5, 32, device=device, dtype=dtype, requires_grad=True)][:args]

    def run(module, name, inputs):
        module.backend = name
        module.zero_grad()
        for x in inputs:
            x.grad = None
        out, grads = _grads(module, *inputs)
        return out, *grads
    exact = run(copy.deepcopy(module).float(), "math",
                [x.detach().float().requires_grad_() for x in inputs])
    (out, *grads), (want, *want_grads) = run(module, backend, inputs), run(module, "math", inputs)
    _assert_agree([out], [want], exact[:1], rtol, atol)
    _assert_agree(grads, want_grads, exact[1:], 10 * rtol, 10 * atol)


def _cross_decoder():
    grid = (2, 3, 3)
    dec = Decoder("cross", encoder_dim=24, dim=32, depth=2, heads=4, mlp_ratio=4.0, patch_dim=10,
                  pos=sincos_grid(32, grid), diffusion=True)
    ids = random_masking((2,), 18, 0.75)
    return dec.eval(), ids


def test_cross_decoder_masked_queries_never_attend_to_each_other():
    dec, ids = _cross_decoder()
    latents, noisy = torch.randn(2, ids.keep.shape[1], 24), torch.randn(2, ids.mask.shape[1], 10)
    out = dec(latents, ids, noisy)
    changed = noisy.clone()
    changed[1, 3] += 1.0
    diff = (dec(latents, ids, changed) - out).abs().amax(dim=-1)
    assert diff[1, 3] > 1e-3
    diff[1, 3] = 0
    assert diff.max() == 0  # no other query moved, in either sample


def test_cross_decoder_visible_latent_reaches_every_query():
    dec, ids = _cross_decoder()
    latents, noisy = torch.randn(2, ids.keep.shape[1], 24), torch.randn(2, ids.mask.shape[1], 10)
    out = dec(latents, ids, noisy)
    changed = latents.clone()
    changed[0, 1] += 1.0
    diff = (dec(changed, ids, noisy) - out).abs().amax(dim=-1)
    assert (diff[0] > 1e-6).all() and diff[1].max() == 0


def test_window_partition_round_trip():
    x = torch.randn(2, 8, 6, 5)
    assert torch.equal(from_windows(to_windows(x, (4, 3)), (8, 6), (4, 3)), x)


def _window_of(grid, window, shift):
    """Set of token indices that share a window with each token, computed independently:
    windows tile the grid rolled by -shift, and a rolled window never joins tokens that the roll
    wrapped around from opposite edges."""
    rows, cols = grid
    members = {}
    for r in range(rows):
        for c in range(cols):
            rr, cc = (r - shift[0]) % rows, (c - shift[1]) % cols  # position after the roll
            wrap_r, wrap_c = r < shift[0], c < shift[1]
            key = (rr // window[0], cc // window[1], wrap_r, wrap_c)
            members.setdefault(key, set()).add(r * cols + c)
    return {i: group for group in members.values() for i in group}


@pytest.mark.parametrize("block_type", [WindowBlock, CosineWindowBlock])
@pytest.mark.parametrize("shift", [(0, 0), (2, 0), (2, 1)])
def test_window_block_sees_only_its_window(shift, block_type):
    grid, window = (8, 4), (4, 2)
    torch.manual_seed(2)
    block = block_type(16, 2, grid, window, shift).eval()
    x = torch.randn(1, 32, 16)
    out = block(x)
    window_of = _window_of(grid, window, shift)
    for token in (0, 5, 13, 31):
        outside = [i for i in range(32) if i not in window_of[token]]
        y = x.clone()
        y[0, outside] += torch.randn(len(outside), 16)
        assert torch.allclose(block(y)[0, token], out[0, token], atol=1e-6), token
        inside = [i for i in window_of[token] if i != token]
        y = x.clone()
        y[0, inside] += torch.randn(len(inside), 16)
        assert not torch.allclose(block(y)[0, token], out[0, token], atol=1e-4), token


@pytest.mark.parametrize("window", [(4, 4), (4, 2), (3, 5)])
def test_relative_position_index_is_one_entry_per_offset(window):
    """Two query-key pairs share a bias-table entry exactly when their (row, col) offsets are
    equal, and every one of the (2 wr - 1)(2 wc - 1) offsets has its own entry."""
    index = relative_position_index(window)
    cells = [divmod(i, window[1]) for i in range(window[0] * window[1])]
    entry_of = {}
    for i, (ri, ci) in enumerate(cells):
        for j, (rj, cj) in enumerate(cells):
            entry_of.setdefault((ri - rj, ci - cj), set()).add(int(index[i, j]))
    assert all(len(entries) == 1 for entries in entry_of.values())
    assert len({e for entries in entry_of.values() for e in entries}) == len(entry_of) \
        == (2 * window[0] - 1) * (2 * window[1] - 1)
    assert int(index.min()) == 0 and int(index.max()) == len(entry_of) - 1


def test_shift_mask_blocks_wrapped_regions():
    mask = shift_mask((8, 4), (4, 4), (2, 0))
    assert mask.shape == (2, 16, 16)
    assert (mask[0] == 0).all()                       # first window: one region
    assert torch.isinf(mask[1]).any() and (mask[1].diagonal() == 0).all()


@pytest.mark.parametrize("block_type", [WindowBlock, CosineWindowBlock])
@pytest.mark.parametrize("backend, device, dtype, rtol, atol", CASES)
def test_window_block_backends_agree(backend, device, dtype, rtol, atol, block_type):
    """A shifted window block (-inf shift mask plus the learned relative-position bias): the
    path the Swin audio decoder trains through, on every backend present."""
    torch.manual_seed(3)
    block = block_type(16, 2, (8, 4), (4, 2), (2, 1)).to(device, dtype).eval()
    x = torch.randn(2, 32, 16, device=device, dtype=dtype, requires_grad=True)

    def run(block, name, x):
        bias_params = ([block.rel_pos_table] if block_type is WindowBlock
                       else [block.tau, block.meta_mlp[0].weight])
        block.attn.backend = name
        block.zero_grad()
        x.grad = None
        out = block(x)
        out.float().square().sum().backward()
        return out, x.grad.clone(), *(p.grad.clone() for p in bias_params)
    exact = run(copy.deepcopy(block).float(), "math", x.detach().float().requires_grad_())
    (out, *grads), (want, *want_grads) = run(block, backend, x), run(block, "math", x)
    assert not out.isnan().any()
    _assert_agree([out], [want], exact[:1], rtol, atol)
    _assert_agree(grads, want_grads, exact[1:], 10 * rtol, 10 * atol)


@pytest.mark.parametrize("shift", [(0, 0), (2, 1)])
def test_cosine_window_block_equals_its_definition(shift):
    """AudioMAE's block written out token by token over the whole grid: post-norm,
    softmax(cos(q_i, k_j) / tau_h + MLP(log-spaced offset of i from j)_h) over i's window."""
    grid, window, dim, heads = (8, 4), (4, 2), 16, 2
    torch.manual_seed(5)
    block = CosineWindowBlock(dim, heads, grid, window, shift).eval()
    with torch.no_grad():
        block.tau.copy_(torch.tensor([0.5, 2.0]))
    x = torch.randn(1, 32, dim)
    q, k, v = block.attn.qkv(x[0]).chunk(3, -1)                       # (32, dim) each
    split = lambda t: t.view(32, heads, dim // heads)                   # noqa: E731
    q, k, v = split(q), split(k), split(v)
    window_of = _window_of(grid, window, shift)

    def in_window(token):  # (row, col) inside its window of the grid rolled by -shift
        r, c = divmod(token, grid[1])
        return ((r - shift[0]) % grid[0] % window[0], (c - shift[1]) % grid[1] % window[1])
    attended = torch.zeros(32, heads, dim // heads)
    for i in range(32):
        keys = sorted(window_of[i])
        offsets = torch.tensor([[a - b for a, b in zip(in_window(i), in_window(j))]
                                for j in keys], dtype=torch.float32)
        bias = block.meta_mlp(offsets.sign() * torch.log1p(offsets.abs()))  # (keys, heads)
        for h in range(heads):
            cos = torch.nn.functional.cosine_similarity(q[i, h][None], k[keys, h], dim=-1)
            weights = (cos / block.tau[h] + bias[:, h]).softmax(0)
            attended[i, h] = weights @ v[keys, h]
    y = x[0] + block.norm1(block.attn.proj(attended.flatten(1)))
    expected = y + block.norm2(block.mlp(y))
    torch.testing.assert_close(block(x)[0], expected, rtol=1e-5, atol=1e-5)
