import contextlib
import os
from pathlib import Path

import pytest
import torch

# Without CUDA the kernel tests run Triton's interpreter. Triton reads TRITON_INTERPRET when a
# kernel is decorated, so it is set here, before any test module can import one, whatever order
# the modules are collected in. Nothing else launches kernels on a CPU (models start with them
# off, and the trainer turns them on only on CUDA: fastmavil.train.runtime.fast_path).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
from fastmavil.config import Config, ModelConfig  # noqa: E402

KERNEL_TESTS = Path(__file__).parent / "kernels"


def _interpreter_defect() -> str | None:
    """Why this Triton's interpreter cannot run the kernels, or None (also when not used).

    Triton 3.6's interpreter (torch 2.11) converts a loop's runtime bound with int() of a
    1-element array, which NumPy 2.4 refuses; every kernel loops over the patch dimension.
    """
    if torch.cuda.is_available() or not kernels.interpreting():
        return None
    import triton
    import triton.language as tl

    @triton.jit
    def _loop(out_ptr, n):
        acc = 0.0
        for _ in range(0, n):
            acc += 1.0
        tl.store(out_ptr, acc)

    out = torch.zeros(1)
    try:
        _loop[(1,)](out, 3)
    except Exception as err:  # noqa: BLE001 -- any failure: report it
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop over a runtime "
                f"bound here ({type(err).__name__}: {err}); with NumPy >= 2.4 it needs Triton "
                ">= 3.7 (torch >= 2.12), or install 'numpy<2.4'")
    assert out.item() == 3.0, f"the interpreter's probe loop gave {out.item()}, not 3"
    return None


def pytest_collection_modifyitems(config, items):
    """Stop before the kernel tests that run the interpreter where it is broken (skipped, they
    would pass over every kernel with one line in the counts; test_compile_check compiles for
    CUDA instead)."""
    interpreted = [item for item in items if KERNEL_TESTS in item.path.parents
                   and item.path.name != "test_compile_check.py"]
    reason = _interpreter_defect() if interpreted else None
    if reason:
        raise pytest.UsageError(f"the kernel tests cannot run: {reason}")


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
def fits_this_gpu():
    """Around a launch of one autotune candidate: a candidate that needs more shared memory than
    this GPU has skips, since the autotuner drops it there too (`python -m
    kernels.compile_check --arch N` lists them per architecture)."""
    from triton.runtime.errors import OutOfResources
    try:
        yield
    except OutOfResources as err:
        pytest.skip(f"this candidate does not fit this GPU, and the autotuner skips it: {err}")


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
    """Inside the block torch.empty and torch.empty_like return after(tensor)."""
    empty, empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *args, **kwargs: after(empty(*args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: after(empty_like(*args, **kwargs))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


@contextlib.contextmanager
def allocations():
    """Collects the shapes torch.empty and torch.empty_like are asked for inside the block."""
    shapes = []
    with _empty_then(lambda t: shapes.append(tuple(t.shape)) or t):
        yield shapes


@contextlib.contextmanager
def nan_filled_empty():
    """Inside the block torch.empty and torch.empty_like fill floating tensors with NaN, so an
    element that a kernel should write but misses shows up in its output."""
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
