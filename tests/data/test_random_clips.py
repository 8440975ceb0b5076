"""The in-memory random dataset the trainer measures its speed on (data.random_clips)."""
import pytest
import torch

from fastmavil.data.loader import LoaderSpec
from fastmavil.data.random_clips import RandomClips

SPEC = LoaderSpec(audio_frames=32, mel_bins=16, video_frames=4, video_size=8)


def test_batches_have_the_loaders_shapes_and_dtypes():
    data = RandomClips(10, SPEC, max_batch=4)
    batches = list(data.batches(3))
    assert len(batches) == 3  # 10 // 3, the partial batch dropped as in training
    for batch in batches:
        assert batch["audio"].shape == (3, 1, 32, 16) and batch["audio"].dtype == torch.float32
        assert batch["video"].shape == (3, 3, 4, 8, 8) and batch["video"].dtype == torch.uint8
    # consecutive batches differ (two halves of the pool), every other one repeats
    assert not torch.equal(batches[0]["audio"], batches[1]["audio"])
    assert torch.equal(batches[0]["video"], batches[2]["video"])
    assert 0.4 < batches[0]["audio"].std() < 0.6  # about a normalised fbank's spread


def test_audio_only_has_no_video_and_a_seed_fixes_the_samples():
    spec = LoaderSpec(audio_frames=32, mel_bins=16, audio_only=True)
    a, b = (next(RandomClips(8, spec, 4, seed=1).batches(4)) for _ in range(2))
    assert set(a) == {"audio"} and torch.equal(a["audio"], b["audio"])
    assert not torch.equal(a["audio"], next(RandomClips(8, spec, 4, seed=2).batches(4))["audio"])


def test_a_resumed_epoch_goes_on_from_its_batch():
    data = RandomClips(12, SPEC, max_batch=2)
    whole = list(data.batches(2))
    assert data.set_epoch(1, resume_batches=3, batch_size=2) == 0  # nothing to drop
    resumed = list(data.batches(2))
    assert len(resumed) == 3
    assert all(torch.equal(x["audio"], y["audio"]) for x, y in zip(whole[3:], resumed))


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="clips = 0"):
        RandomClips(0, SPEC, 4)
    with pytest.raises(ValueError, match=r"batch_size = 5 must be in \[1, 4\]"):
        next(RandomClips(8, SPEC, 4).batches(5))
