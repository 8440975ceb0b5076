"""The DALI loader against the reference loader, on the CPU (VP9 video, FLAC audio): the same
clips, order, draws and skips; features within the decoders' differences."""
import io
import logging

import av

import numpy as np
import pytest
import torch

from fastmavil.data.dali_loader import (DaliLoader, dali_available, dali_device, from_keyframe,
                                        open_video)
from fastmavil.data.loader import LoaderSpec, ShardDataset, SkipClip, build_loader
from fastmavil.data.media import decode_video, encode_flac, encode_video

from .clips import SPEC, good, raw_tar

pytestmark = pytest.mark.skipif(not dali_available(),
                                reason="NVIDIA DALI is not installed (its wheels are for Linux "
                                       "x86_64 only)")

EVAL = LoaderSpec(**{**SPEC.__dict__, "train": False})
# Normalised fbank (log-mel / 9.1): the same FLAC samples through the same float32 arithmetic,
# batched, so rounding apart (up to 1.3e-4 seen, in the near-empty bins of a pure tone)
AUDIO_TOL = 5e-4
FRAME_TOL = 3.0   # mean |difference| per frame in 0-255 levels: DALI's YUV -> RGB and resize


def clip_members(clips, garbled=(), meta=b'{"labels": [], "duration": 1.0}'):
    """Tar members of `clips` synthetic clips; those in `garbled` have random bytes for their
    frames' data, in packets that still demux: planned, then failed by DALI (and the reference)."""
    members = []
    for i in range(clips):
        key, m = good(i)
        video = m["webm"]
        if i in garbled:
            video = bytearray(video)
            with av.open(io.BytesIO(m["webm"])) as container:
                for packet in container.demux(container.streams.video[0]):
                    if packet.size:  # past the block's 4-byte header
                        video[packet.pos + 4:packet.pos + packet.size] = bytes(
                            np.random.default_rng(i).integers(0, 256, packet.size - 4,
                                                              np.uint8))
            video = bytes(video)
        members += [(f"{key}.webm", video), (f"{key}.flac", m["flac"]), (f"{key}.json", meta)]
    return members


def long_clips(folder, clips=4, meta=b'{"labels": [], "duration": 3.0}'):
    """3 s clips at 16 fps, 64 x 48 (WebM's millisecond timestamps fall between frame periods,
    the window starts anywhere, the crop has room across), with 3 s of a chirp in noise (longer
    than SPEC's fbank window: a segment of it is heard)."""
    t = np.arange(48000) / 16000
    members = []
    for c in range(clips):
        ramp = np.linspace(0, 255, 64)[None, :, None] * np.linspace(0.3, 1, 48)[:, None, None]
        frames = np.stack([np.roll(ramp, 5 * f + 7 * c, axis=1) for f in range(48)])
        frames = np.broadcast_to(frames, (48, 48, 64, 3)).astype(np.uint8)
        wave = 0.3 * np.sin(2 * np.pi * (200 + 300 * c + 400 * t) * t)
        wave = wave + 0.05 * np.random.default_rng(c).standard_normal(len(t))
        members += [(f"long{c}.webm", encode_video(np.ascontiguousarray(frames), 16.0)),
                    (f"long{c}.flac", encode_flac(wave)), (f"long{c}.json", meta)]
    raw_tar(folder / "shard-000000.tar", members)
    return folder


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("duration", ["in the json", "not in the json"])
def test_long_clips_with_a_window_a_segment_and_room_to_crop(tmp_path, train, duration):
    """The draws that the synthetic 1 s clips leave no room for: the window's start, the crop
    across, the audio segment's start; frames picked at WebM's rounded 16 fps timestamps; and,
    without a duration, frames over the whole clip and the audio segment anywhere."""
    long_clips(tmp_path, meta=b'{"labels": []}' if duration == "not in the json" else
               b'{"labels": [], "duration": 3.0}')
    spec = LoaderSpec(**{**SPEC.__dict__, "train": train})
    reference, dali = both(ShardDataset(tmp_path, spec), 2)
    assert sum(len(b["keys"]) for b in dali) == 4
    assert_same_batches(reference, dali)


def test_a_clip_from_its_keyframe_has_the_same_frames():
    """What the loader hands DALI for a window that starts after the clip's first keyframe:
    the packets from the window's keyframe on, decoded (by PyAV) to the whole clip's frames
    from there, with their times. Keyframes at 0, 1.1 and 2.2 s, whose millisecond timestamps
    are not floats' (1.1 s as a float is not 1100 / 1000): found by their exact timestamps."""
    video = encode_video(np.stack([np.full((32, 32, 3), 8 * f, np.uint8) for f in range(30)]),
                         10.0, keyframe_interval=11)
    whole, times = decode_video(video)
    with open_video(video) as headers:
        assert list(headers.keyframes) == [0.0, 1.1, 2.2]
        trimmed = from_keyframe(headers, int(headers.keyframe_pts[1]))
    assert len(trimmed) < len(video)
    frames, trimmed_times = decode_video(trimmed)
    assert np.array_equal(frames, whole[11:]) and np.array_equal(trimmed_times, times[11:])
    with open_video(video) as headers, \
            pytest.raises(ValueError, match="is not a keyframe"):  # the loader sends it whole
        from_keyframe(headers, int(headers.keyframe_pts[1]) + 1)
    assert headers.packets is None  # freed with the container


def test_a_video_whose_headers_do_not_read_is_a_skipped_clip():
    """A codec ID no decoder knows (no codec context): skipped as corrupt, as the reference
    loader skips it, not an AttributeError that check_codec would raise at the run's start."""
    video = encode_video(np.zeros((4, 32, 32, 3), np.uint8), 10.0)
    assert video.count(b"V_VP9") == 1
    with pytest.raises(SkipClip, match="corrupt video"), open_video(video.replace(b"V_VP9",
                                                                                 b"V_QQ9")):
        pass


def test_a_wrong_window_crop_segment_or_roll_would_be_seen(tmp_path):
    """The comparisons above are not met by chance: the same clips with another epoch's draws
    are far apart in both audio and video."""
    dataset = ShardDataset(long_clips(tmp_path), LoaderSpec(**{**SPEC.__dict__, "train": True,
                                                               "shuffle_buffer": 1}))
    dataset.set_epoch(0)
    (first, *_) = DaliLoader(dataset, 4, device="cpu")
    dataset.set_epoch(1)
    (second, *_) = build_loader(dataset, 4, num_workers=0)
    assert first["keys"] == second["keys"]
    assert ((first["audio"] - second["audio"]).abs().amax(dim=(1, 2, 3)) > 100 * AUDIO_TOL).all()
    assert (frame_error(first["video"], second["video"]).amax(-1) > 2 * FRAME_TOL).all()


def both(dataset, batch_size, **dali):
    """The reference's batches and the DALI loader's over the same epoch."""
    dataset.set_epoch(0)
    reference = list(build_loader(dataset, batch_size, num_workers=0))
    dataset.set_epoch(0)
    return reference, list(DaliLoader(dataset, batch_size, device="cpu", **dali))


def frame_error(a, b):
    """Mean |a - b| per sample and frame of two (B, 3, Fr, H, W) uint8 batches."""
    return (a.float() - b.float()).abs().mean(dim=(1, 3, 4))


def assert_same_batches(reference, dali):
    assert [b["keys"] for b in dali] == [b["keys"] for b in reference]
    for ref, out in zip(reference, dali):
        assert torch.equal(out["labels"], ref["labels"])
        assert out["audio"].dtype == torch.float32 and out["audio"].shape == ref["audio"].shape
        torch.testing.assert_close(out["audio"], ref["audio"], rtol=0, atol=AUDIO_TOL)
        if "video" in ref:
            assert out["video"].dtype == torch.uint8 and out["video"].shape == ref["video"].shape
            assert frame_error(out["video"], ref["video"]).max() < FRAME_TOL


@pytest.mark.parametrize("train", [False, True])
def test_dali_batches_are_the_reference_loaders(dataset_dir, train):
    """Training too: the same window, frames, crop, segment and roll drawn for each clip."""
    spec = LoaderSpec(**{**SPEC.__dict__, "train": train})
    reference, dali = both(ShardDataset(dataset_dir, spec), 4)
    assert len(dali) == 3
    assert_same_batches(reference, dali)
    # FRAME_TOL tells frames apart: most sampled frames differ from the next by more than
    # twice as much, so picking a neighbour of those would fail
    video = torch.cat([b["video"] for b in reference])
    moved = frame_error(video[:, :, 1:], video[:, :, :-1]) > 2 * FRAME_TOL
    assert moved.float().mean() > 0.5


def test_a_wide_video_is_resized_by_its_short_side_and_cropped(tmp_path):
    """Height and width kept apart: 48 x 80 frames with a horizontal ramp."""
    ramp = np.broadcast_to(np.linspace(0, 255, 80).astype(np.uint8)[None, :, None], (48, 80, 3))
    frames = np.stack([np.roll(ramp, 3 * t, axis=1) for t in range(16)])
    _, ok = good(0)
    raw_tar(tmp_path / "shard-000000.tar", [
        ("wide.webm", encode_video(np.ascontiguousarray(frames), 16.0)), ("wide.flac", ok["flac"]),
        ("wide.json", b'{"duration": 1.0}')])
    for train in (False, True):
        spec = LoaderSpec(**{**SPEC.__dict__, "train": train})
        assert_same_batches(*both(ShardDataset(tmp_path, spec), 1))


def test_bad_clips_are_skipped_as_the_reference_skips_them(bad_shard, caplog):
    """The reference's bad-clip shard, one clip a batch: the same clips come through, the same
    skips are counted, the same features (within the decoders' differences) but for audio
    at another rate."""
    reference_set = ShardDataset(bad_shard, EVAL)
    reference = list(build_loader(reference_set, 1, num_workers=0))
    dataset = ShardDataset(bad_shard, EVAL)
    with caplog.at_level(logging.WARNING, logger="fastmavil.data"):
        dali = list(DaliLoader(dataset, 1, device="cpu"))
    assert "DALI failed" not in caplog.text  # DALI decoded every clip planned
    assert "loader consumer 0/1: 12 clips read, 6 skipped (corrupt video: 1, corrupt audio: 2" \
        in caplog.text  # counted when the planner threads' last clips are in
    assert [b["keys"] for b in dali] == [b["keys"] for b in reference]
    assert dict(dataset.skipped) == dict(reference_set.skipped)
    assert "skipping shard-000000.tar/corrupt_video: corrupt video" in caplog.text
    for ref, out in zip(reference, dali):
        if ref["keys"] == ["stereo_44k"]:  # resampled by DALI's filter, not libswresample's
            assert (out["audio"] - ref["audio"]).abs().mean() < 0.05
        else:
            torch.testing.assert_close(out["audio"], ref["audio"], rtol=0, atol=AUDIO_TOL,
                                       msg=f"audio of {ref['keys']}")
        assert frame_error(out["video"], ref["video"]).max() < FRAME_TOL, ref["keys"]


def test_a_clip_dali_cannot_decode_sends_its_batch_to_the_reference_decoder(tmp_path, caplog):
    """Headers that read, frames that do not: DALI fails on the batch, the reference decoder
    decodes it (skipping and naming the bad clip) and tops it up with the next clip."""
    raw_tar(tmp_path / "shard-000000.tar", clip_members(5, garbled={1}))
    reference_set, dataset = ShardDataset(tmp_path, EVAL), ShardDataset(tmp_path, EVAL)
    reference = list(build_loader(reference_set, 2, num_workers=0))
    with caplog.at_level(logging.WARNING, logger="fastmavil.data"):
        dali = list(DaliLoader(dataset, 2, device="cpu"))
    assert "DALI failed on a batch (Assert on \"ret >= 0\" failed: Failed to send packet to " \
        "decoder: Invalid data" in caplog.text
    # The same clips in full batches; the top-up is the next clip DALI was not yet given, so
    # the order can differ from the reference's by the batches DALI had queued
    assert [len(b["keys"]) for b in dali] == [len(b["keys"]) for b in reference] == [2, 2]
    assert sorted(k for b in dali for k in b["keys"]) == \
        sorted(k for b in reference for k in b["keys"])
    assert dict(dataset.skipped) == dict(reference_set.skipped)
    # the pass's summary counts the clip the fallback skipped, after the plans ran out
    assert "loader consumer 0/1: 5 clips read, 1 skipped (corrupt video: 1)" in caplog.text


def test_too_few_clips_left_after_a_failed_batch_drops_it_and_goes_on(tmp_path, caplog):
    """Training (partial batches dropped) with 4 clips in batches of 2, the second garbled:
    DALI fails on [0, 1] while it holds [2, 3]; the reference decoder finds only clip 0 and no
    clip left to top up with, so that batch is dropped and [2, 3] still comes."""
    raw_tar(tmp_path / "shard-000000.tar", clip_members(4, garbled={1}))
    dataset = ShardDataset(tmp_path, LoaderSpec(**{**SPEC.__dict__, "shuffle_buffer": 1}))
    dataset.set_epoch(0)
    with caplog.at_level(logging.WARNING, logger="fastmavil.data"):
        batches = list(DaliLoader(dataset, 2, device="cpu"))
    assert "DALI failed on a batch" in caplog.text
    assert [b["keys"] for b in batches] == [["synth000002", "synth000003"]]


def test_audio_only(dataset_dir):
    spec = LoaderSpec(**{**SPEC.__dict__, "audio_only": True})
    reference, dali = both(ShardDataset(dataset_dir, spec), 4)
    assert "video" not in dali[0]
    assert_same_batches(reference, dali)


def test_a_resumed_epoch_goes_on_with_the_reference_loaders_batches(dataset_dir):
    dataset = ShardDataset(dataset_dir, SPEC)
    dataset.set_epoch(0)
    whole = list(build_loader(dataset, 2, num_workers=0))
    assert dataset.set_epoch(0, resume_batches=2, batch_size=2) == 0
    resumed = list(DaliLoader(dataset, 2, device="cpu"))
    assert [b["keys"] for b in resumed] == [b["keys"] for b in whole[2:]]


def test_the_last_partial_batch_is_dropped_in_training_only(dataset_dir):
    train = ShardDataset(dataset_dir, SPEC)
    train.set_epoch(0)
    assert [len(b["keys"]) for b in DaliLoader(train, 5, device="cpu")] == [5, 5]
    evaluation = ShardDataset(dataset_dir, EVAL)
    assert [len(b["keys"]) for b in DaliLoader(evaluation, 5, device="cpu")] == [5, 5, 2]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="data.dali_device = 'tpu'"):
        dali_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            dali_device("gpu")
    assert dali_device("auto") == ("gpu" if torch.cuda.is_available() else "cpu")


def test_h264_on_the_cpu_is_named_not_skipped_clip_by_clip(tmp_path):
    _, ok = good(0)
    h264 = encode_video(np.full((8, 48, 48, 3), 90, np.uint8), 8.0, codec="h264")
    raw_tar(tmp_path / "shard-000000.tar", [("a.mp4", h264), ("a.flac", ok["flac"]),
                                            ("a.json", b'{"duration": 1.0}')])
    dataset = ShardDataset(tmp_path, EVAL)
    with pytest.raises(ValueError, match=r"a: h264 video; DALI on the CPU decodes vp8, vp9, "
                                         r"mjpeg only: use data.dali_device = 'gpu'"):
        list(DaliLoader(dataset, 1, device="cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: the GPU path (NVDEC)")
def test_the_gpu_path_gives_the_cpu_paths_batches_on_the_gpu(dataset_dir):
    dataset = ShardDataset(dataset_dir, SPEC)
    dataset.set_epoch(0)
    cpu = list(DaliLoader(dataset, 4, device="cpu"))
    dataset.set_epoch(0)
    gpu = list(DaliLoader(dataset, 4, device="gpu"))
    assert gpu[0]["audio"].is_cuda and gpu[0]["video"].is_cuda
    assert_same_batches(cpu, [{**b, "audio": b["audio"].cpu(), "video": b["video"].cpu()}
                              for b in gpu])
