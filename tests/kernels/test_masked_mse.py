"""kernels.masked_mse against its PyTorch reference: loss and grad_pred, audio and video geometry.

Without CUDA the kernels run on the CPU through Triton's interpreter; with CUDA they run natively
on the GPU (and the interpreter-only checks are skipped).
"""
import logging
import math

import pytest
import torch

import kernels
from conftest import fits_this_gpu, nan_filled_empty
from fastmavil.masking import random_masking
from fastmavil.models.patch import patch_grid, patchify, unpatchify
from kernels import masked_mse as mm

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Error = max |actual - expected| / max |expected| (rtol 0, atol = RTOL * max |expected|): the
# interpreter computes in fp32 like the reference, a GPU reduces in another order.
RTOL = 1e-4 if CUDA else 1e-5
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: native Triton fp32/bf16 parity")
interpreter_only = pytest.mark.skipif(CUDA, reason="checks the CPU interpreter path")

AUDIO = (16, 16)
VIDEO = (2, 16, 16)
# (x shape, patch, masking ratio): sizes not multiples of the blocks (m = 11, 11, 6, 15, 11, 14)
CASES = {
    "audio-B1": ((1, 1, 48, 80), AUDIO, 0.75),
    "audio-B3": ((3, 1, 64, 48), AUDIO, 0.9),
    "video-B1": ((1, 3, 4, 32, 32), VIDEO, 0.75),
    "video-B3-6x32x48": ((3, 3, 6, 32, 48), VIDEO, 0.85),
    "audio-odd-patch": ((2, 1, 12, 30), (4, 6), 0.75),
    "video-odd-patch": ((2, 2, 3, 9, 10), (1, 3, 5), 0.8),
}


def make_case(name: str, device: str = DEVICE, dtype: torch.dtype = torch.float32,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
    """Fresh random pred, x and masked ids (from random_masking) for CASES[name]."""
    shape, patch, ratio = CASES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    ids = random_masking((shape[0],), num_tokens(shape, patch), ratio, generator=g).mask
    pred = torch.randn(shape[0], ids.shape[1], shape[1] * math.prod(patch), generator=g)
    return pred.to(device, dtype), x.to(device, dtype), ids.to(device), patch


def num_tokens(shape: tuple, patch: tuple) -> int:
    return math.prod(patch_grid(tuple(shape[2:]), patch))


def loss_and_grad(fn, pred, x, ids, patch, norm_pix, grad_out=3.7):
    """fn's loss and grad_pred for upstream gradient grad_out (!= 1: the scale must pass)."""
    pred = pred.detach().requires_grad_()
    loss = fn(pred, x, ids, patch, norm_pix)
    (loss * grad_out).backward()
    return loss.detach(), pred.grad


def assert_parity(pred, x, ids, patch, norm_pix, rtol=RTOL):
    loss, grad = loss_and_grad(mm.masked_patch_mse, pred, x, ids, patch, norm_pix)
    ref_loss, ref_grad = loss_and_grad(mm.reference_masked_patch_mse, pred, x, ids, patch,
                                       norm_pix)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    for actual, expected in ((loss, ref_loss), (grad, ref_grad)):
        torch.testing.assert_close(actual.float(), expected.float(), rtol=0,
                                   atol=rtol * expected.abs().max().item())


def set_patch(x: torch.Tensor, patch: tuple, b: int, token: int, value) -> torch.Tensor:
    """x with patch `token` of sample b replaced by value (a scalar or a (P,) tensor)."""
    patches = patchify(x, patch)
    patches[b, token] = value
    return unpatchify(patches, patch, patch_grid(tuple(x.shape[2:]), patch), x.shape[1])


def test_kernel_path_is_taken():
    pred, x, ids, patch = make_case("audio-B1")
    assert kernels.can_launch("masked_patch_mse", pred, x)  # on the CPU: the interpreter is on
    loss = mm.masked_patch_mse(pred.requires_grad_(), x, ids, patch)
    assert type(loss.grad_fn).__name__ == "_MaskedPatchMSEBackward"


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, norm_pix):
    assert_parity(*make_case(name), norm_pix)


@pytest.mark.parametrize("name", ["audio-B3", "video-B3-6x32x48"])
def test_first_and_last_tokens(name):
    pred, x, ids, patch = make_case(name)
    n, m = num_tokens(x.shape, patch), ids.shape[1]
    ids = torch.stack([torch.cat([torch.tensor([n - 1, 0]), torch.randperm(n - 2)[:m - 2] + 1])
                       for _ in range(x.shape[0])]).to(ids.device)
    assert_parity(pred, x, ids, patch, norm_pix=True)


@pytest.mark.parametrize("value", [0.5, 0.1])  # variance exactly 0, and 0 up to rounding
@pytest.mark.parametrize("name", ["audio-B3", "video-B1"])
def test_constant_patch(name, value):
    pred, x, ids, patch = make_case(name)
    x = set_patch(x, patch, 0, ids[0, 3].item(), value)  # a masked patch: only eps keeps it finite
    assert_parity(pred, x, ids, patch, norm_pix=True)
    loss, _ = loss_and_grad(mm.masked_patch_mse, pred, x, ids, patch, True)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("scale,offset", [(1e4, 0.0), (1.0, 100.0)])
def test_large_magnitude(scale, offset, norm_pix):
    pred, x, ids, patch = make_case("video-B1")
    if not norm_pix:
        pred = pred * scale + offset
    assert_parity(pred, x * scale + offset, ids, patch, norm_pix)


def test_deterministic():
    pred, x, ids, patch = make_case("video-B3-6x32x48")
    first = loss_and_grad(mm.masked_patch_mse, pred, x, ids, patch, True)
    second = loss_and_grad(mm.masked_patch_mse, pred, x, ids, patch, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("name", ["audio-B3", "video-B1"])
def test_visible_patches_do_not_matter(name):
    shape, patch, ratio = CASES[name]
    pred, x, _, _ = make_case(name)
    masking = random_masking((shape[0],), num_tokens(shape, patch), ratio)
    ids = masking.mask.to(DEVICE)
    changed = x
    for b in range(shape[0]):
        changed = set_patch(changed, patch, b, masking.keep[b, 0].item(), 1e3)
    before = loss_and_grad(mm.masked_patch_mse, pred, x, ids, patch, True)
    after = loss_and_grad(mm.masked_patch_mse, pred, changed, ids, patch, True)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# Other blocks: several K chunks merged by Chan's formula (a partial last one for P = 30), one or
# many token blocks per sample.
def test_every_output_element_is_written(monkeypatch):
    """The per-token partial sums, the saved (mean, rstd) and grad_pred come from torch.empty:
    poisoned with NaN, any element a tile misses shows up (m = 14 in blocks of 4 tokens, P = 30
    in chunks of 16; the reference runs unpoisoned)."""
    if not CUDA:
        monkeypatch.setattr(mm, "INTERPRET_CONFIG", {"BLOCK_M": 4, "BLOCK_K": 16})
    pred, x, ids, patch = make_case("video-odd-patch")
    want = loss_and_grad(mm.reference_masked_patch_mse, pred, x, ids, patch, True)
    with nan_filled_empty():
        got = loss_and_grad(mm.masked_patch_mse, pred, x, ids, patch, True)
    for actual, expected in zip(got, want):
        assert not actual.isnan().any()
        torch.testing.assert_close(actual, expected, rtol=0,
                                   atol=RTOL * expected.abs().max().item())


@pytest.mark.parametrize("norm_pix", [True, False])
def test_strided_inputs(norm_pix):
    """x, pred and ids as non-contiguous views (the kernels take their strides)."""
    pred, x, ids, patch = make_case("video-B3-6x32x48")
    x_view = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, W stride != 1
    pred_view = pred.transpose(1, 2).contiguous().transpose(1, 2)
    ids_view = torch.stack([ids, ids], dim=-1)[..., 0]
    assert not (x_view.is_contiguous() or pred_view.is_contiguous() or ids_view.is_contiguous())
    assert_parity(pred_view, x_view, ids_view, patch, norm_pix)


CONFIGS = [{"BLOCK_M": 2, "BLOCK_K": 256}, {"BLOCK_M": 16, "BLOCK_K": 16}]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['BLOCK_M']}x{c['BLOCK_K']}")
def test_block_configs(monkeypatch, config):
    monkeypatch.setattr(mm, "INTERPRET_CONFIG", config)
    monkeypatch.setattr(kernels, "interpreting", lambda: True)  # choose the fixed config
    for name in ("video-B1", "video-odd-patch"):
        assert_parity(*make_case(name), norm_pix=True)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: native Triton fp32/bf16 parity")
@pytest.mark.parametrize("index", range(len(mm.CUDA_CONFIGS)))
def test_cuda_every_autotune_config(monkeypatch, index):
    """Each candidate the autotuner may pick, with its warps, forward and backward: the other
    tests check only the one it picked."""
    import triton
    one = triton.autotune([mm.CUDA_CONFIGS[index]], key=[])  # one config: no tuning
    monkeypatch.setattr(mm, "_tuned", {k: one(k) for k in mm._tuned})
    for name in ("video-B1", "video-odd-patch"):
        with fits_this_gpu():
            assert_parity(*make_case(name), norm_pix=True)


def test_shape_errors():
    pred, x, ids, patch = make_case("audio-B3", device="cpu")
    with pytest.raises(ValueError, match=r"pred has shape \(3, 11, 255\); expected \(B, m, P\)"):
        mm.masked_patch_mse(pred[..., :255], x, ids, patch)
    with pytest.raises(ValueError, match=r"expected \(B, m, P\) = \(3, 10, 256\)"):
        mm.masked_patch_mse(pred, x, ids[:, :10], patch)
    with pytest.raises(ValueError, match=r"ids_mask must be \(B=3, n >= 1\) int64"):
        mm.masked_patch_mse(pred, x, ids[:2], patch)
    with pytest.raises(ValueError, match="int64"):
        mm.masked_patch_mse(pred, x, ids.int(), patch)
    with pytest.raises(TypeError, match="pred has dtype torch.float64"):
        mm.masked_patch_mse(pred.double(), x, ids, patch)
    with pytest.raises(ValueError, match="ids_mask is on meta but x is on cpu"):
        mm.masked_patch_mse(pred, x, ids.to("meta"), patch)
    with pytest.raises(ValueError, match="not divisible by patch"):
        mm.masked_patch_mse(pred, x[..., :40], ids, patch)
    with pytest.raises(ValueError, match="does not fit patch"):
        mm.masked_patch_mse(pred, x, ids, VIDEO)


def test_fallback_uses_reference_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    monkeypatch.setattr(kernels, "_warned", set())
    pred, x, ids, patch = make_case("video-B1", device="cpu")
    with caplog.at_level(logging.WARNING, logger="fastmavil.kernels"):
        losses = [mm.masked_patch_mse(pred, x, ids, patch) for _ in range(2)]
    assert all(torch.equal(loss, mm.reference_masked_patch_mse(pred, x, ids, patch))
               for loss in losses)
    warnings = [r for r in caplog.records if "masked_patch_mse" in r.getMessage()]
    assert len(warnings) == 1 and "using the PyTorch reference" in warnings[0].getMessage()


@needs_cuda
@pytest.mark.parametrize("shape,patch,ratio", [((8, 1, 1024, 128), AUDIO, 0.8),
                                               ((4, 3, 16, 112, 112), VIDEO, 0.9)])
def test_cuda_fp32_paper_sizes(shape, patch, ratio):
    x = torch.randn(shape, device=DEVICE)
    ids = random_masking((shape[0],), num_tokens(shape, patch), ratio, DEVICE).mask
    pred = torch.randn(shape[0], ids.shape[1], shape[1] * math.prod(patch), device=DEVICE)
    for norm_pix in (True, False):
        assert_parity(pred, x, ids, patch, norm_pix, rtol=1e-4)


@needs_cuda
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["audio-B3", "video-B3-6x32x48"])
def test_cuda_bf16(name, x_dtype):
    pred, x, ids, patch = make_case(name, dtype=torch.bfloat16)
    assert_parity(pred, x.to(x_dtype), ids, patch, norm_pix=True, rtol=1e-2)
