import pytest

from kernels import ENV_VAR, kernels_enabled


def test_env_wins_over_config(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert kernels_enabled(True) and not kernels_enabled(False)
    monkeypatch.setenv(ENV_VAR, "0")
    assert not kernels_enabled(True)
    monkeypatch.setenv(ENV_VAR, "1")
    assert kernels_enabled(False)
    monkeypatch.setenv(ENV_VAR, "yes")
    with pytest.raises(ValueError, match="FASTMAVIL_KERNELS='yes': expected 0 or 1"):
        kernels_enabled()


def test_can_launch_names_mixed_devices(monkeypatch, caplog):
    """A CUDA tensor beside a CPU one falls back with that reason, not with the CPU's."""
    import logging
    import types

    import kernels
    monkeypatch.setattr(kernels, "_warned", set())
    cuda = types.SimpleNamespace(is_cuda=True, device="cuda:0")  # stands in: no GPU needed
    cpu = types.SimpleNamespace(is_cuda=False, device="cpu")
    with caplog.at_level(logging.WARNING, logger="fastmavil.kernels"):
        assert not kernels.can_launch("k", cuda, cpu)
    assert "tensors are on different devices (['cpu', 'cuda:0'])" in caplog.text


def test_kernels_index_one_sample_in_32_bits():
    """An input whose sample spans 2^31 elements or more is refused before any launch (meta
    tensors: strides without memory)."""
    import torch

    from kernels._patches import check_sample_span
    check_sample_span(torch.empty(64, 3, 16, 224, 224, device="meta"))
    huge = torch.empty_strided((2, 1, 1, 1024, 128), (1, 1, 1, 2**22, 2**14), device="meta")
    with pytest.raises(ValueError, match="one sample of the input spans"):
        check_sample_span(huge)


def test_the_fast_path_without_triton_runs_the_references(monkeypatch, caplog):
    """Where triton does not import, the kernel modules cannot either: the model's switch keeps
    the references and says why, instead of failing at the first forward."""
    import logging
    import sys

    import torch

    import kernels
    from fastmavil.config import load_config
    from fastmavil.models import build_model
    cfg = load_config(__import__("pathlib").Path(__file__).parents[1] / "configs" / "demo.toml")
    model = build_model(cfg)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setattr(kernels, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="fastmavil.kernels"):
        model.use_kernels(True)
    assert "kernel fast path: triton is not installed; using the PyTorch reference" in caplog.text
    assert not any(getattr(m, "fused", False) for m in model.modules())
    m = cfg.model
    audio = torch.randn(2, 1, m.audio_frames, m.mel_bins)
    video = torch.randn(2, 3, m.video_frames, m.video_size, m.video_size)
    assert torch.isfinite(model(audio, video, 0.8, torch.Generator().manual_seed(0)).loss)


def test_the_trainers_switch_needs_the_request_cuda_and_triton(monkeypatch):
    """runtime.fast_path: the kernels run only where requested (model.kernels, FASTMAVIL_KERNELS
    winning) and runnable (CUDA and triton); a CUDA device object launches nothing here."""
    import sys

    import torch

    from fastmavil.config import Config
    from fastmavil.train.runtime import fast_path
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    on, off = Config(), Config()
    off.model.kernels = False
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert fast_path(on, cuda) and not fast_path(off, cuda) and not fast_path(on, cpu)
    monkeypatch.setenv(ENV_VAR, "0")
    assert not fast_path(on, cuda)
    monkeypatch.setenv(ENV_VAR, "1")
    assert fast_path(off, cuda) and not fast_path(off, cpu)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    assert not fast_path(on, cuda)
