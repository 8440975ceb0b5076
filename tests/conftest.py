import contextlib
import os

import pytest
import torch

# Without CUDA the kernel tests run Triton's interpreter. Triton reads TRITON_INTERPRET when a
# kernel is decorated, so it is set here, before any test module can import one, whatever order
# the modules are collected in. Nothing else launches kernels on a CPU (models start with them
# off, and the trainer turns them on only on CUDA: fastmavil.train.pretrain.fast_path).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastmavil.config import Config, ModelConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(variant: str = "diffmavil", attention: str = "cross", **model) -> Config:
    return Config(model=ModelConfig(variant=variant, size="tiny",
                                    video_decoder_attention=attention, **model)).check()


def tiny_batch(cfg: Config, batch: int = 3):
    m = cfg.model
    audio = torch.randn(batch, 1, m.audio_frames, m.mel_bins)
    video = torch.randn(batch, 3, m.video_frames, m.video_size, m.video_size)
    return audio, video


@contextlib.contextmanager
def saved_floats():
    """Collects (shape, dtype) of every floating tensor autograd saves inside the block."""
    saved = []

    def pack(t):
        if t.is_floating_point():
            saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


@contextlib.contextmanager
def _empty_then(after):
    """Inside the block torch.empty returns after(tensor)."""
    empty = torch.empty
    torch.empty = lambda *args, **kwargs: after(empty(*args, **kwargs))
    try:
        yield
    finally:
        torch.empty = empty


@contextlib.contextmanager
def allocations():
    """Collects the shapes torch.empty is asked for inside the block."""
    shapes = []
    with _empty_then(lambda t: shapes.append(tuple(t.shape)) or t):
        yield shapes


@contextlib.contextmanager
def nan_filled_empty():
    """Inside the block torch.empty fills floating tensors with NaN, so an element that a kernel
    should write but misses shows up in its output."""
    with _empty_then(lambda t: t.fill_(float("nan")) if t.is_floating_point() else t):
        yield


@contextlib.contextmanager
def torch_flag(obj, name: str, value):
    """Sets a torch backend flag and restores it. (pytest's monkeypatch cannot restore these
    properties of torch.backends modules on every pytest version.)"""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@pytest.fixture
def true_fp32():
    """fp32 matmuls and convolutions in true fp32 (no TF32) on CUDA, through torch's
    fp32_precision API where it has one (mixing it with allow_tf32 makes torch raise)."""
    with contextlib.ExitStack() as stack:
        for backend in (torch.backends.cuda.matmul, torch.backends.cudnn):
            if hasattr(backend, "fp32_precision"):
                stack.enter_context(torch_flag(backend, "fp32_precision", "ieee"))
            else:
                stack.enter_context(torch_flag(backend, "allow_tf32", False))
        yield
