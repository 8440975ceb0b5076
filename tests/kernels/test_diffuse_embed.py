"""kernels.diffuse_embed against its PyTorch reference: forward, grads of weight / bias / pos,
in-kernel Philox noise, fallback. Without CUDA the kernels run in Triton's interpreter."""
import logging
import math

import pytest
import torch

import kernels
import kernels.diffuse_embed as de
from conftest import fits_this_gpu, nan_filled_empty, saved_floats
from fastmavil.diffusion import DiffusionSchedule
from fastmavil.masking import random_masking
from kernels.diffuse_embed import (diffuse_embed_masked, philox_noise,
                                   reference_diffuse_embed_masked)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = 1e-4 if CUDA else 1e-5  # fp32 rtol = atol; inputs are scaled so values are O(1..30)
STEPS = 1000
needs_cuda = pytest.mark.skipif(not CUDA,
                                reason="needs a CUDA GPU: native Triton fp32/bf16 parity")

AUDIO = ((1, 64, 48), (16, 16))          # grid 4 x 3
VIDEO = ((3, 4, 32, 48), (2, 16, 16))    # non-square, grid 2 x 2 x 3
ODD = ((1, 12, 20), (3, 5))              # P = 15: ragged patch-dim blocks


pytestmark = pytest.mark.usefixtures("true_fp32")  # tests/conftest.py: TF32 off on CUDA


def make_inputs(batch, geometry, dd, ratio, t, dtype=torch.float32, device=DEVICE):
    """Random inputs of nn.Linear-like scale; masked ids from random_masking, forced to include
    the grid's first and last tokens."""
    shape, patch = geometry
    x = torch.randn(batch, *shape) * 2 + 0.5
    n = math.prod(s // p for s, p in zip(shape[1:], patch))
    p = shape[0] * math.prod(patch)
    ids = random_masking((batch,), n, ratio).mask.clone()
    if 0 not in ids[0]:  # replacing a masked token keeps the ids of a sample distinct
        ids[0, 0] = 0
    if n - 1 not in ids[-1]:
        ids[-1, -1] = n - 1
    weight = torch.randn(dd, shape[0], *patch) / math.sqrt(p)
    bias, pos = torch.randn(dd) * 0.1, torch.randn(n, dd) * 0.5
    to = dict(device=device, dtype=dtype)
    return dict(x=x.to(**to), ids_mask=ids.to(device), t=torch.as_tensor(t).to(device),
                alpha_bar=DiffusionSchedule(STEPS).alpha_bar.to(device),
                weight=weight.to(**to).requires_grad_(), bias=bias.to(**to).requires_grad_(),
                pos=pos.to(**to).requires_grad_(), patch_size=patch)


def grads(out, inputs, grad_out=None):
    """Grads of weight, bias, pos for grad_out (default: a fixed random one)."""
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return torch.autograd.grad(out, (inputs["weight"], inputs["bias"], inputs["pos"]), grad_out)


def run(fn, inputs, grad_out=None, **kw):
    out = fn(**inputs, **kw)
    return out.detach(), grads(out, inputs, grad_out)


def assert_matches(inputs, tol=TOL, **kw):
    """Kernel vs reference (explicit noise, or the kernel's Philox noise for a seed)."""
    ref_kw = dict(kw)
    if "seed" in kw:
        b, m = inputs["ids_mask"].shape
        ref_kw["noise"] = philox_noise(ref_kw.pop("seed"), b, m, inputs["weight"][0].numel(),
                                       DEVICE)
    got, got_grads = run(diffuse_embed_masked, inputs, **kw)
    want, want_grads = run(reference_diffuse_embed_masked, inputs, **ref_kw)
    for name, a, b in zip(("out", "weight", "bias", "pos"), (got, *got_grads),
                          (want, *want_grads)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(CUDA, reason="the interpreter path is for machines without CUDA")
def test_can_launch_on_cpu_under_interpreter():
    assert kernels.can_launch("diffuse_embed", torch.zeros(1))


@pytest.mark.parametrize("batch, geometry, dd, ratio, t, norm_pix", [
    (3, AUDIO, 64, 0.75, [1, STEPS, 500], True),
    (1, AUDIO, 768, 0.9, [STEPS], False),
    (1, VIDEO, 192, 0.8, [1], True),
    (3, VIDEO, 64, 0.9, [STEPS, 1, 37], False),
    (3, ODD, 192, 0.85, [7, STEPS, 1], True),
])
def test_matches_reference_with_noise(batch, geometry, dd, ratio, t, norm_pix):
    inputs = make_inputs(batch, geometry, dd, ratio, t)
    b, m = inputs["ids_mask"].shape
    noise = torch.randn(b, m, inputs["weight"][0].numel(), device=DEVICE)
    assert_matches(inputs, norm_pix=norm_pix, noise=noise)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "autocast"])
def test_every_output_element_is_written(amp):
    """The output and the x_t saved for grad W come from torch.empty (under autocast the output
    from torch.empty_like, x_t being bf16): poison them with NaN, so any element a tile misses
    shows up (ragged row, feature and patch tiles; the reference runs unpoisoned)."""
    inputs = make_inputs(3, ODD, 192, 0.85, [7, STEPS, 1])
    b, m = inputs["ids_mask"].shape
    noise = torch.randn(b, m, inputs["weight"][0].numel(), device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=amp):
        want, want_grads = run(reference_diffuse_embed_masked, inputs, noise=noise)
        with nan_filled_empty():
            got, got_grads = run(diffuse_embed_masked, inputs, noise=noise)
    for a, w in zip((got, *got_grads), (want, *want_grads)):
        assert not a.isnan().any()
        if amp:  # bf16 products rounded at different steps: as test_autocast_multiplies_in_bf16
            assert (a - w).abs().max() / w.abs().max() <= 1e-2
        else:
            torch.testing.assert_close(a, w, rtol=TOL, atol=TOL)


@pytest.mark.skipif(CUDA, reason="sets the interpreter's fixed block config")
@pytest.mark.parametrize("noise", [True, False], ids=["given-noise", "seed"])
def test_ragged_patch_chunks(monkeypatch, noise):
    """P = 30 in chunks of 16: a full chunk and then a ragged one, for the chunk-merged patch
    statistics, the noise offsets and the stored x_t (the default interpreter chunk, 256,
    divides the paper's P)."""
    monkeypatch.setattr(de, "_INTERPRET_CONFIG", dict(BLOCK_M=8, BLOCK_K=16))
    inputs = make_inputs(3, ((2, 12, 15), (3, 5)), 50, 0.8, [1, STEPS, 400])
    b, m = inputs["ids_mask"].shape
    kw = dict(noise=torch.randn(b, m, 30, device=DEVICE)) if noise else dict(seed=99)
    assert_matches(inputs, **kw)


def test_strided_inputs():
    """x, ids, t, noise and alpha_bar as non-contiguous views of the same values."""
    inputs = make_inputs(3, VIDEO, 64, 0.8, [3, STEPS, 1])
    b, m = inputs["ids_mask"].shape
    noise = torch.randn(b, m, inputs["weight"][0].numel(), device=DEVICE)
    want, want_grads = run(reference_diffuse_embed_masked, inputs, noise=noise)
    table = inputs["alpha_bar"]
    strided = dict(inputs, x=inputs["x"].transpose(-1, -2).contiguous().transpose(-1, -2),
                   ids_mask=torch.stack([inputs["ids_mask"]] * 2, -1)[..., 0],
                   t=torch.stack([inputs["t"]] * 2, -1)[..., 1],
                   alpha_bar=torch.stack([table, torch.zeros_like(table)], -1)[:, 0])
    views = (strided["x"], strided["ids_mask"], strided["t"], strided["alpha_bar"])
    assert not any(v.is_contiguous() for v in views)
    got, got_grads = run(diffuse_embed_masked, strided, noise=noise.transpose(1, 2).contiguous()
                         .transpose(1, 2))
    for a, w in zip((got, *got_grads), (want, *want_grads)):
        torch.testing.assert_close(a, w, rtol=TOL, atol=TOL)


def test_bad_inputs_name_the_argument():
    inputs = make_inputs(2, AUDIO, 64, 0.75, [1, 5])
    b, m = inputs["ids_mask"].shape
    noise = torch.randn(b, m, 256, device=DEVICE)
    cases = [(dict(x=inputs["x"].double()), TypeError, "x has dtype torch.float64"),
             (dict(t=inputs["t"].float()), TypeError, "t has dtype torch.float32"),
             (dict(weight=inputs["weight"].detach().long()), TypeError, "weight has dtype"),
             (dict(alpha_bar=inputs["alpha_bar"].view(1, -1)), ValueError, "alpha_bar must be"),
             (dict(alpha_bar=inputs["alpha_bar"].to("meta")), ValueError,
              "alpha_bar is on meta"),
             (dict(x=inputs["x"].clone().requires_grad_()), ValueError,
              "x requires grad, but diffuse_embed_masked gives it no gradient")]
    cases.append((dict(alpha_bar=inputs["alpha_bar"].clone().requires_grad_()), ValueError,
                  "alpha_bar requires grad"))
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            diffuse_embed_masked(**{**inputs, **change}, noise=noise)
    with pytest.raises(ValueError, match="noise requires grad"):
        diffuse_embed_masked(**inputs, noise=noise.requires_grad_())


@pytest.mark.parametrize("batch, geometry, dd", [(3, AUDIO, 64), (1, VIDEO, 192)])
def test_seeded_kernel_matches_reference_with_its_philox_noise(batch, geometry, dd):
    inputs = make_inputs(batch, geometry, dd, 0.8, [STEPS, 1, 250][:batch])
    assert_matches(inputs, seed=1234)


def test_seed_determinism_and_device_tensor_seed():
    inputs = make_inputs(2, AUDIO, 64, 0.75, [STEPS, STEPS])  # t = T: mostly noise
    a, grads_a = run(diffuse_embed_masked, inputs, seed=5)
    seed = torch.tensor([5], device=DEVICE)
    b = diffuse_embed_masked(**inputs, seed=seed)
    seed.add_(1)  # the caller advancing its seed in place must not change backward
    grads_b = grads(b, inputs)
    assert torch.equal(a, b) and all(torch.equal(g, h) for g, h in zip(grads_a, grads_b))
    assert torch.equal(a, diffuse_embed_masked(**inputs, seed=torch.tensor(5, device=DEVICE)))
    d = diffuse_embed_masked(**inputs, seed=6).detach()
    assert (d - a).abs().mean() > 0.1


def test_philox_noise_statistics():
    batch, m, p = 2, 100, 1000  # 200k elements
    eps = philox_noise(7, batch, m, p, DEVICE).double().cpu()
    assert abs(eps.mean()) < 0.01 and abs(eps.var() - 1) < 0.02
    corr = lambda u, v: torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1].abs()
    assert corr(eps[:, :-1], eps[:, 1:]) < 0.02    # neighbouring tokens
    assert corr(eps[:, 0::2], eps[:, 1::2]) < 0.02  # any two tokens
    assert corr(eps[0], eps[1]) < 0.02              # samples
    assert torch.unique(eps.flatten(0, 1), dim=0).shape[0] == batch * m  # no shared token noise
    assert not torch.equal(eps[:, :2], philox_noise(8, batch, 2, p, DEVICE).double().cpu())


def _philox_reference(seed: int, rows: int, p: int) -> torch.Tensor:
    """The kernel's noise as `philox_normals` documents it, written out in NumPy: counter
    c = row * ceil(P / 4) + k // 4, Philox-4x32 (10 rounds, the key the 64-bit seed's words),
    then Triton's uint-to-uniform and Box-Muller on outputs (0, 1) and (2, 3); element k is
    normal k % 4."""
    import numpy as np
    mask32 = np.uint64(0xFFFFFFFF)
    groups = -(-p // 4)
    counter = (np.arange(rows, dtype=np.uint64)[:, None] * np.uint64(groups)
               + np.arange(groups, dtype=np.uint64)[None, :])
    c0, c1 = counter & mask32, counter >> np.uint64(32)
    c2 = c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    round_a, round_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        prod_a, prod_b = round_a * c0, round_b * c2  # 32 x 32 bits: exact in 64
        c0, c1, c2, c3 = ((prod_b >> np.uint64(32)) ^ c1 ^ k0, prod_b & mask32,
                          (prod_a >> np.uint64(32)) ^ c3 ^ k1, prod_a & mask32)
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask32, (k1 + np.uint64(0xBB67AE85)) & mask32

    def uniform(x):
        x = x.astype(np.uint32).view(np.int32).astype(np.int64)
        return np.where(x < 0, ~x, x).astype(np.float64) * 4.6566127342e-10

    def normals(u1, u2):
        radius = np.sqrt(-2.0 * np.log(np.maximum(1e-7, u1)))
        return radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)

    n0, n1 = normals(uniform(c0), uniform(c1))
    n2, n3 = normals(uniform(c2), uniform(c3))
    return torch.from_numpy(np.stack([n0, n1, n2, n3], axis=-1).reshape(rows, -1)[:, :p])


@pytest.mark.parametrize("seed, batch, m, p", [(7, 2, 5, 256), (2 ** 40 + 3, 1, 3, 30)])
def test_philox_noise_is_the_documented_stream(seed, batch, m, p):
    """philox_noise (and so the kernel: test_seeded_kernel_matches_reference_with_its_philox_noise)
    against an independent NumPy Philox, for a P not a multiple of 4 and a seed over 32 bits."""
    eps = philox_noise(seed, batch, m, p, DEVICE).double().cpu()
    want = _philox_reference(seed, batch * m, p).reshape(batch, m, p)
    torch.testing.assert_close(eps, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geometry", [AUDIO, VIDEO])
def test_autocast_multiplies_in_bf16(geometry):
    """Under bf16 autocast with fp32 x the projection runs on bf16 operands (as F.linear would
    in the plain path) and the output stays fp32. Both paths round x_t and W to bf16 (CUDA to
    nearest, the interpreter toward zero), so they agree to bf16 accuracy and both differ from
    the fp32 result; the projection's output is rounded to bf16 and pos added in fp32, as the
    plain path does, so out - pos[ids] lies on the bf16 grid (to fp32 rounding)."""
    inputs = make_inputs(3, geometry, 192, 0.8, [1, STEPS, 40])
    b, m = inputs["ids_mask"].shape
    noise = torch.randn(b, m, inputs["weight"][0].numel(), device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, got_grads = run(diffuse_embed_masked, inputs, noise=noise)
        want, want_grads = run(reference_diffuse_embed_masked, inputs, noise=noise)
    fp32 = reference_diffuse_embed_masked(**inputs, noise=noise).detach()
    assert got.dtype == want.dtype == torch.float32
    for name, a, w in zip(("out", "weight", "bias", "pos"), (got, *got_grads),
                          (want, *want_grads)):
        error = (a.float() - w.float()).abs().max() / w.float().abs().max()
        assert error <= 1e-2, f"{name}: {error:.2e}"
    assert (got - fp32).abs().max() / fp32.abs().max() > 1e-4  # rounded: not an fp32 product
    projected = got - inputs["pos"].detach()[inputs["ids_mask"]]
    off_grid = (projected - projected.bfloat16().float()).abs().max() / got.abs().max()
    assert off_grid <= 1e-6, f"projection not rounded to bf16 before + pos: {off_grid:.1e}"
    if CUDA:  # both round to nearest and multiply with cuBLAS: closer than bf16 accuracy
        assert (got - want).abs().max() / want.abs().max() <= 2e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_x_with_fp32_parameters(dtype):
    """Half x with fp32 weight, bias and pos outside autocast (the kernel casts the weights to
    x's dtype, as the reference does): output in x's dtype, gradients in fp32, equal to half
    accuracy. The reference is also the fallback without CUDA or the interpreter."""
    inputs = make_inputs(3, AUDIO, 64, 0.8, [1, STEPS, 40])
    inputs["x"] = inputs["x"].to(dtype)
    b, m = inputs["ids_mask"].shape
    noise = torch.randn(b, m, 256, device=DEVICE, dtype=dtype)
    got, got_grads = run(diffuse_embed_masked, inputs, noise=noise)
    want, want_grads = run(reference_diffuse_embed_masked, inputs, noise=noise)
    assert got.dtype == want.dtype == dtype
    assert all(g.dtype == torch.float32 for g in (*got_grads, *want_grads))
    for name, a, w in zip(("out", "weight", "bias", "pos"), (got, *got_grads),
                          (want, *want_grads)):
        error = (a.float() - w.float()).abs().max() / w.float().abs().max()
        assert error <= 1e-2, f"{name}: {error:.2e}"


def test_keeps_x_t_only_for_a_weight_gradient():
    """Backward keeps x_t in the compute dtype (bf16 under autocast, as the plain path's
    F.linear input) when weight trains; nothing with a frozen weight (x_t is then only the
    projection's input, freed on return), and bias / pos gradients still match the
    reference."""
    inputs = make_inputs(2, VIDEO, 64, 0.8, [3, STEPS])
    (b, m), p = inputs["ids_mask"].shape, inputs["weight"][0].numel()
    noise = torch.randn(b, m, p, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16), saved_floats() as saved:
        diffuse_embed_masked(**inputs, noise=noise)
    assert saved == [((b * m, p), torch.bfloat16)]
    inputs["weight"].requires_grad_(False)
    with saved_floats() as saved:
        out = diffuse_embed_masked(**inputs, noise=noise)
    assert saved == []
    params = (inputs["bias"], inputs["pos"])
    grad = torch.randn_like(out)
    ref = reference_diffuse_embed_masked(**inputs, noise=noise)
    for actual, expected in zip(torch.autograd.grad(out, params, grad),
                                torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(actual, expected, rtol=TOL, atol=TOL)


def test_needs_exactly_one_of_noise_and_seed():
    inputs = make_inputs(1, AUDIO, 64, 0.75, [1])
    noise = torch.randn(1, inputs["ids_mask"].shape[1], 256, device=DEVICE)
    with pytest.raises(ValueError, match="exactly one of noise"):
        diffuse_embed_masked(**inputs)
    with pytest.raises(ValueError, match="exactly one of noise"):
        diffuse_embed_masked(**inputs, noise=noise, seed=1)


def test_falls_back_to_reference_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    monkeypatch.setattr(kernels, "_warned", set())
    inputs = make_inputs(2, AUDIO, 64, 0.75, [1, STEPS], device="cpu")
    noise = torch.randn(2, inputs["ids_mask"].shape[1], 256)
    with caplog.at_level(logging.WARNING, logger="fastmavil.kernels"):
        got = diffuse_embed_masked(**inputs, noise=noise)
        seeded = diffuse_embed_masked(**inputs, seed=3)
    assert torch.equal(got, reference_diffuse_embed_masked(**inputs, noise=noise))
    generator = torch.Generator().manual_seed(3)  # the fallback's documented stream
    eps = torch.randn(noise.shape, generator=generator)
    assert torch.equal(seeded, reference_diffuse_embed_masked(**inputs, noise=eps))
    assert [r.getMessage() for r in caplog.records] == [
        "kernel diffuse_embed: tensors are on the CPU and TRITON_INTERPRET=1 is not set; "
        "using the PyTorch reference"]


@needs_cuda
@pytest.mark.parametrize("geometry, batch, dd", [
    (((1, 1024, 128), (16, 16)), 4, 512),
    (((3, 16, 224, 224), (2, 16, 16)), 2, 512),
])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_cuda_fp32_at_model_size(geometry, batch, dd, norm_pix):
    inputs = make_inputs(batch, geometry, dd, 0.8, torch.randint(1, STEPS + 1, (batch,)))
    b, m = inputs["ids_mask"].shape
    noise = torch.randn(b, m, inputs["weight"][0].numel(), device=DEVICE)
    assert_matches(inputs, tol=1e-4, norm_pix=norm_pix, noise=noise)
    assert_matches(inputs, tol=1e-4, norm_pix=norm_pix, seed=99)


def relative_errors_against_fp32(half, dd, seed=None):
    """The kernel on `half`'s values against the fp32 reference on the same values: its output
    and gradients, each with max |error| / max |ref|. With a seed the kernel draws its noise and
    the reference gets that noise (philox_noise, fp32)."""
    full = {k: (v.detach().float().requires_grad_(v.requires_grad)
                if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in half.items()}
    (b, m), p = half["ids_mask"].shape, half["weight"][0].numel()
    dtype = half["x"].dtype
    grad_out = torch.randn(b, m, dd, device=DEVICE).to(dtype)
    if seed is None:
        noise = torch.randn(b, m, p, device=DEVICE).to(dtype)
        got = run(diffuse_embed_masked, half, grad_out, noise=noise)
    else:
        noise = philox_noise(seed, b, m, p, DEVICE)
        got = run(diffuse_embed_masked, half, grad_out, seed=seed)
    want = run(reference_diffuse_embed_masked, full, grad_out.float(), noise=noise.float())
    return [(a, ((a.float() - w).abs().max() / w.abs().max()).item())
            for a, w in zip((got[0], *got[1]), (want[0], *want[1]))]


@needs_cuda
@pytest.mark.parametrize("geometry, batch", [(((1, 1024, 128), (16, 16)), 4),
                                             (((3, 16, 224, 224), (2, 16, 16)), 2)])
def test_cuda_bf16_close_to_fp32_reference(geometry, batch):
    """bf16 kernel vs the fp32 reference on the same bf16 values: max |error| / max |ref|."""
    t = torch.randint(1, STEPS + 1, (batch,))
    half = make_inputs(batch, geometry, 512, 0.8, t, dtype=torch.bfloat16)
    for a, error in relative_errors_against_fp32(half, 512):
        assert a.dtype == torch.bfloat16
        assert error <= 1e-2


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seeded", [False, True], ids=["given-noise", "seed"])
@pytest.mark.parametrize("index", range(len(de._diffuse_tuned.configs)))
def test_cuda_every_autotune_config(monkeypatch, index, seeded, dtype):
    """Each candidate the autotuner may pick, with its warps, on the video geometry (P = 1536)
    with given and in-kernel noise: the other tests check only the one it picked."""
    import triton
    one = triton.autotune([de._diffuse_tuned.configs[index]], key=[])  # one config: no tuning
    monkeypatch.setattr(de, "_diffuse_tuned", one(de._diffuse_kernel))
    half = make_inputs(2, ((3, 16, 64, 96), (2, 16, 16)), 192, 0.8,
                       torch.randint(1, STEPS + 1, (2,)), dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    with fits_this_gpu():
        for _, error in relative_errors_against_fp32(half, 192, seed=11 if seeded else None):
            assert error <= tol
