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
