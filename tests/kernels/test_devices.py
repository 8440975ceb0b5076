"""Triton launches on the current CUDA device, not the tensors': every kernel entry point must
switch to its inputs' device (kernels.on_device). Needs two GPUs: cuda:1's tensors, cuda:0
current."""
import pytest
import torch

import kernels
from kernels import diffuse_embed as de
from kernels import masked_mse as mm
from kernels import patch_embed as pe
from kernels import window_attention as wa

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="needs two CUDA devices: runs each kernel on cuda:1 while cuda:0 is current")


def _close(fast, ref):
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _run(fn, inputs, grads_of):
    """fn's output and the gradients of grads_of, with cuda:0 current."""
    for t in grads_of:
        t.grad = None
    with torch.cuda.device(0):
        out = fn(*inputs)
        out.float().square().sum().backward()
    torch.cuda.synchronize(1)
    return [out.detach()] + [t.grad for t in grads_of]


def test_kernels_run_on_their_tensors_device_not_the_current_one(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    dev = torch.device("cuda:1")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(2, 3, 4, 64, 64, device=dev, generator=g)  # 2 x 4 x 4 = 32 tokens
    ids = torch.stack([torch.randperm(32, device=dev, generator=g)[:7] for _ in range(2)])
    d, p = 64, 3 * 2 * 16 * 16
    w = torch.randn(d, 3, 2, 16, 16, device=dev, generator=g).mul_(0.02).requires_grad_()
    b = torch.randn(d, device=dev, generator=g).requires_grad_()
    pos = torch.randn(32, d, device=dev, generator=g).requires_grad_()
    patch = (2, 16, 16)
    params = (w, b, pos)

    inputs = (x, ids, w, b, pos, patch)
    _close(_run(pe.patch_embed_visible, inputs, params),
           _run(pe.reference_patch_embed_visible, inputs, params))

    t = torch.tensor([3, 700], device=dev)
    alpha_bar = torch.linspace(1.0, 0.01, 1001, device=dev)
    noise = torch.randn(2, 7, p, device=dev, generator=g)
    inputs = (x, ids, t, alpha_bar, w, b, pos, patch)
    _close(_run(lambda *a: de.diffuse_embed_masked(*a, noise=noise), inputs, params),
           _run(lambda *a: de.reference_diffuse_embed_masked(*a, noise=noise), inputs, params))
    seeded = de.diffuse_embed_masked(x, ids, t, alpha_bar, w, b, pos, patch, seed=5)
    assert seeded.device == dev and torch.isfinite(seeded).all()

    pred = torch.randn(2, 7, p, device=dev, generator=g, requires_grad=True)
    inputs = (pred, x, ids, patch)
    _close(_run(mm.masked_patch_mse, inputs, (pred,)),
           _run(mm.reference_masked_patch_mse, inputs, (pred,)))

    q, k, v = (torch.randn(2, 3, 16, 32, device=dev, generator=g, requires_grad=True)
               for _ in range(3))
    bias = torch.randn(3, 16, 16, device=dev, generator=g, requires_grad=True)
    assert kernels.can_launch("window_attention", q, k, v, bias)
    inputs = (q, k, v, bias)
    _close(_run(wa.window_attention, inputs, inputs),
           _run(wa.reference_window_attention, inputs, inputs))
