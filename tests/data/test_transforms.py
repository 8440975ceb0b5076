"""The loader's per-sample transforms: normalisation constants, the evaluation window and crop.

Each transform is checked directly (exact) and through the loader on clips whose content is
known (flat colours, frame-index brightness, gradients), with tolerances that fit VP9's error.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmavil.data.fbank import kaldi_fbank, normalize
from fastmavil.data.loader import LoaderSpec, ShardDataset, collate, to_device
from fastmavil.data.media import decode_audio, decode_video, encode_video
from fastmavil.data.shards import ShardWriter, read_shard
from fastmavil.data.synth import SynthSpec, make_clip
from fastmavil.data.video import normalize_video, resize_crop, window_start

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)  # unequal per channel: a swap shows
SPEC = LoaderSpec(audio_frames=128, mel_bins=64, video_frames=4, video_size=32,
                  video_seconds=1.0, video_mean=MEAN, video_std=STD, train=False, roll=False,
                  shuffle_buffer=1)
CODEC_LEVELS = 6  # VP9 (crf 32, yuv420p) error on flat or smooth frames, in 8-bit levels


def spec(**changes):
    return LoaderSpec(**{**SPEC.__dict__, **changes})


def decoded(tmp_path, members, spec, key="clip", seed=0):
    """Writes one clip into a shard under tmp_path and returns the loader's sample of it."""
    with ShardWriter(tmp_path / "shard-000000.tar") as writer:
        writer.add(key, members)
    dataset = ShardDataset(tmp_path, spec)
    clip = next(read_shard(dataset.shards[0]))
    return dataset.decode(clip, np.random.default_rng(seed))


# ---------------------------------------------------------------- colour normalisation

@pytest.mark.parametrize("shape", [(3, 2, 4, 5), (2, 3, 2, 4, 5)])
def test_normalize_video_subtracts_each_channels_mean_and_divides_by_its_std(shape):
    """normalize_video is (x / 255 - mean_c) / std_c per channel, with mean and std in that
    order, for a sample (3, T, H, W) and a batch (B, 3, T, H, W) of uint8 levels."""
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    out = normalize_video(x, MEAN, STD)
    assert out.dtype == torch.float32
    for c in range(3):
        torch.testing.assert_close(out[..., c, :, :, :], (x[..., c, :, :, :] / 255.0 - MEAN[c])
                                   / STD[c], rtol=0, atol=1e-6)


def test_loader_video_is_normalised_with_its_mean_and_std_per_channel(tmp_path):
    """Flat-colour frames come out of the loader as uint8 levels, and to_device turns them into
    (v / 255 - mean_c) / std_c per channel (guards it passing video_mean and video_std in the
    right order)."""
    colour = np.array([60, 130, 200], np.uint8)
    frames = np.broadcast_to(colour, (8, 32, 32, 3)).copy()
    members = {"webm": encode_video(frames, 8.0), "json": {"duration": 1.0},
               "flac": make_clip(0, SynthSpec(seconds=1.0, size=32), "train")[1]["flac"]}
    sample = decoded(tmp_path, members, spec())
    assert sample["video"].shape == (3, 4, 32, 32) and sample["video"].dtype == torch.uint8
    audio, video = to_device(collate([sample]), torch.device("cpu"), spec())
    assert torch.equal(audio[0], sample["audio"])
    video = video[0]
    for c in range(3):
        expected = (colour[c] / 255.0 - MEAN[c]) / STD[c]
        # CODEC_LEVELS levels of codec error, in normalised units of this channel
        tol = CODEC_LEVELS / 255.0 / STD[c]
        assert (video[c] - expected).abs().max() < tol, (c, video[c].mean(), expected)


# ---------------------------------------------------------------- evaluation window

def test_evaluation_window_is_centred_in_the_clip():
    """window_start centres the window for evaluation (for any rng) and starts at 0 when the
    clip is no longer than the window; training draws within the slack."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        assert window_start(3.0, 1.0, False, rng) == pytest.approx(1.0, abs=1e-12)
        assert window_start(10.0, 4.0, False, rng) == pytest.approx(3.0, abs=1e-12)
        assert window_start(0.5, 1.0, False, rng) == 0.0
        assert 0.0 <= window_start(3.0, 1.0, True, rng) <= 2.0


def test_loader_evaluation_window_shows_the_middle_of_the_clip(tmp_path):
    """A 3 s clip whose frame i has brightness 8 + 10 i, read in evaluation with a 1 s window,
    yields the middle second's frames 8..15 (guards the centred evaluation window)."""
    fps, n = 8.0, 24
    levels = 8 + 10 * np.arange(n)
    frames = np.broadcast_to(levels[:, None, None, None], (n, 32, 32, 3)).astype(np.uint8)
    members = {"webm": encode_video(frames, fps), "json": {"duration": 3.0},
               "flac": make_clip(0, SynthSpec(seconds=3.0, size=32), "train")[1]["flac"]}
    video = decoded(tmp_path, members, spec(video_frames=8))["video"]
    brightness = video.float().mean(dim=(0, 2, 3))  # (T,) levels
    index = torch.round((brightness - 8) / 10).long()
    assert index.tolist() == list(range(8, 16)), brightness
    assert (brightness - torch.tensor(levels[8:16], dtype=torch.float32)).abs().max() \
        < CODEC_LEVELS


# ---------------------------------------------------------------- evaluation crop

def gradient_frames(t, h, w):
    """(t, h, w, 3) uint8: channel 0 = row, channel 1 = column, channel 2 = frame index."""
    frames = np.zeros((t, h, w, 3), np.uint8)
    frames[..., 0] = np.arange(h)[None, :, None]
    frames[..., 1] = np.arange(w)[None, None, :]
    frames[..., 2] = np.arange(t)[:, None, None]
    return frames


@pytest.mark.parametrize("h, w, top, left", [(48, 32, 8, 0), (32, 48, 0, 8), (45, 32, 6, 0),
                                             (32, 45, 0, 6)])
def test_evaluation_crop_is_the_centre_square(h, w, top, left):
    """Without resizing (short side = crop size), evaluation crops the centre square of tall and
    wide frames, exactly; the same for any rng."""
    frames = gradient_frames(2, h, w)
    for seed in range(2):
        out = resize_crop(torch.from_numpy(frames), 32, False, np.random.default_rng(seed))
        expected = torch.from_numpy(frames[:, top:top + 32, left:left + 32]).permute(3, 0, 1, 2)
        assert torch.equal(out, expected)


@pytest.mark.parametrize("h, w", [(96, 64), (64, 96)])
def test_evaluation_crop_after_resize_is_the_centre_square(h, w):
    """With resizing (short side 64 -> 32, long side 96 -> 48), evaluation crops the centre of
    the resized frames: offset 8 along the long side, 0 along the short one. The resize runs on
    the uint8 frames; it stays within one level of resizing in float."""
    frames = gradient_frames(2, h, w)
    out = resize_crop(torch.from_numpy(frames), 32, False, np.random.default_rng(0))
    assert out.dtype == torch.uint8
    top, left = (8, 0) if h > w else (0, 8)
    for dtype, atol in ((torch.uint8, 0), (torch.float32, 1 + 1e-4)):
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).to(dtype)
        x = F.interpolate(x, size=(h // 2, w // 2), mode="bilinear", align_corners=False,
                          antialias=True).float()
        expected = x[..., top:top + 32, left:left + 32].permute(1, 0, 2, 3)
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=atol)


def test_loader_evaluation_crops_the_centre_of_tall_frames(tmp_path):
    """A 48x32 (tall) clip with a vertical gradient, read in evaluation at crop size 32, yields
    rows 8..39 of the decoded frames (guards the centred crop through the loader)."""
    h, w = 48, 32
    frames = np.zeros((8, h, w, 3), np.uint8)
    frames[...] = (40 + 4 * np.arange(h))[None, :, None, None]  # rows 40..228 levels
    data = encode_video(frames, 8.0)
    members = {"webm": data, "json": {"duration": 1.0},
               "flac": make_clip(0, SynthSpec(seconds=1.0, size=32), "train")[1]["flac"]}
    video = decoded(tmp_path, members, spec())["video"]
    assert video.shape == (3, 4, 32, 32)
    # against the decoder's own frames: exactly
    raw, _ = decode_video(data)
    assert torch.equal(video, torch.from_numpy(raw[[0, 2, 4, 6], 8:40]).permute(3, 0, 1, 2))
    # against the encoded gradient: the crop's rows are the source's rows 8..39
    rows = video.float().mean(dim=(0, 1, 3))  # (32,) levels per row
    source = torch.tensor(40 + 4 * np.arange(8, 40), dtype=torch.float32)
    assert (rows - source).abs().max() < CODEC_LEVELS, rows


# ---------------------------------------------------------------- audio normalisation

def test_normalize_is_fbank_minus_mean_over_twice_std():
    """fbank.normalize is (fbank - mean) / (2 std) (AST/AudioMAE), for non-default stats."""
    fbank = torch.randn(5, 7) * 4 - 3
    torch.testing.assert_close(normalize(fbank, -2.0, 3.0), (fbank + 2.0) / 6.0, rtol=0,
                               atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_loader_audio_uses_the_configured_mean_and_std(tmp_path, train):
    """With mean -2 and std 3 (roll off), the loader's audio is (kaldi_fbank - mean) / (2 std)
    of the clip's waveform, and padded frames are (0 - mean) / (2 std) = 1/3."""
    flac = make_clip(0, SynthSpec(seconds=1.0, size=32), "train")[1]["flac"]
    members = {"flac": flac, "json": {"duration": 1.0}}
    s = spec(audio_only=True, audio_mean=-2.0, audio_std=3.0, audio_frames=128, train=train,
             roll=False)
    audio = decoded(tmp_path, members, s)["audio"]
    wave, _ = decode_audio(flac)
    fbank = kaldi_fbank(torch.from_numpy(wave), 16000, 64)  # (98, 64): 1 s of audio
    assert fbank.shape == (98, 64) and audio.shape == (1, 128, 64)
    torch.testing.assert_close(audio[0, :98], (fbank + 2.0) / 6.0, rtol=0, atol=1e-5)
    torch.testing.assert_close(audio[0, 98:], torch.full((30, 64), 1 / 3), rtol=0, atol=1e-6)
