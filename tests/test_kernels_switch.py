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
