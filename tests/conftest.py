import pytest
import torch

from fastmavil.config import Config, ModelConfig


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
