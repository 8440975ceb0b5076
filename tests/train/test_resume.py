import logging

import pytest

from fastmavil.config import Config, ConfigError, to_toml
from fastmavil.train.resume import FORMAT, check_config, check_format


def _config(adaptive: bool, micro: int) -> Config:
    cfg = Config()
    cfg.train.adaptive_batch, cfg.train.micro_batch_size = adaptive, micro
    return cfg.check()


def test_another_micro_batch_warns_with_a_fixed_batch(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fastmavil.train"):
        check_config(tmp_path / "step.pt", to_toml(_config(False, 8)), _config(False, 16))
    assert "train.micro_batch_size changed (8 -> 16)" in caplog.text


def test_another_micro_batch_is_refused_under_the_adaptive_batch(tmp_path):
    """The passes per step (B0 / micro) round every epoch's batch: another plan."""
    with pytest.raises(ConfigError, match=r"train.micro_batch_size: 8 -> 16"):
        check_config(tmp_path / "step.pt", to_toml(_config(True, 8)), _config(True, 16))


def test_a_run_copied_under_another_name_resumes(tmp_path, caplog):
    saved, now = _config(True, 8), _config(True, 8)
    saved.run.name, now.run.name = "a", "b"
    with caplog.at_level(logging.WARNING, logger="fastmavil.train"):
        check_config(tmp_path / "step.pt", to_toml(saved), now)
    assert "run.name" not in caplog.text


def test_a_checkpoint_of_another_format_is_refused(tmp_path):
    """Code that changes what a checkpoint's numbers mean for the same config (the fixed 2-D
    positions' order, the data order) raises FORMAT; an older checkpoint would go on silently
    under other positions."""
    check_format(tmp_path / "step.pt", {"format": FORMAT})
    with pytest.raises(ConfigError, match=f"checkpoint format 1, this fastmavil writes {FORMAT}"):
        check_format(tmp_path / "step.pt", {"step": 3})
