import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
import io

from fastmavil.data.media import (MediaError, _window, decode_audio, decode_video,
                                  encode_flac, encode_video, resample)
from fastmavil.data.video import pick_frames, sample_times


def moving_square(frames=24, size=64):
    video = np.zeros((frames, size, size, 3), np.uint8)
    for t in range(frames):
        video[t, 20:40, t:t + 20] = (200, 60, 30)
    return video


@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_video_round_trip_and_window(codec):
    frames = moving_square()
    data = encode_video(frames, fps=8.0, codec=codec, keyframe_interval=4, crf=10)
    decoded, times = decode_video(data)
    assert decoded.shape == frames.shape
    np.testing.assert_allclose(times, np.arange(24) / 8.0)
    assert np.abs(decoded.astype(int) - frames).mean() < 6
    window, wtimes = decode_video(data, start=1.1, end=2.0, size=(32, 32))
    # the frame on screen at 1.1 s (shown at 1.0 s) is kept, then every frame before 2.0 s
    np.testing.assert_allclose(wtimes, [1.0, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875])
    assert window.shape == (8, 32, 32, 3)
    if codec == "vp9":  # bit-exact; x264's bytes may differ between encodes (media.py)
        assert encode_video(frames, 8.0, codec) == encode_video(frames, 8.0, codec)


@pytest.mark.parametrize("codec", ["vp9", "h264"])
@pytest.mark.parametrize("start, end", [(0.0, 3.0), (1.1, 2.0), (0.3, 2.9), (2.5, 5.0),
                                        (1.0, 1.05)])
def test_video_frames_at_times_are_those_pick_frames_picks(codec, start, end):
    """decode_video(..., at=times) converts only the frames on screen at those times: the same
    frames and times as picking them from the whole window (the window may pass the clip's end,
    several times may share a frame, a window may hold a single frame)."""
    data = encode_video(moving_square(), fps=8.0, codec=codec, keyframe_interval=4, crf=10)
    window, times = decode_video(data, start, end)
    # at a frame's own time it is that frame (not the one before)
    for at in (*(sample_times(start, end - start, n) for n in (16, 3, 1)), times[times >= start]):
        picked = pick_frames(at, times)
        frames, frame_times = decode_video(data, start, end, at=at)
        np.testing.assert_array_equal(frames, window[picked])
        np.testing.assert_array_equal(frame_times, times[picked])


def test_video_frames_at_times_of_a_truncated_clip():
    """A clip cut short (WebM: MP4 keeps its index at the end) keeps what decoded, and later
    times show its last frame, as picking from the truncated clip's frames does."""
    data = encode_video(moving_square(), fps=8.0, codec="vp9", keyframe_interval=4, crf=10)
    cut = data[:len(data) * 2 // 3]
    window, times = decode_video(cut, 0.0, 3.0)
    assert 0 < len(window) < 24
    at = sample_times(0.0, 3.0, 16)
    frames, frame_times = decode_video(cut, 0.0, 3.0, at=at)
    np.testing.assert_array_equal(frames, window[pick_frames(at, times)])
    assert frame_times[-1] == times[-1]


def decoded_frames(times, damaged):
    """Stand-ins for PyAV's decoded frames at these times, then an error if damaged."""
    yield from (SimpleNamespace(time=t) for t in times)
    if damaged:
        raise EOFError("damaged")


@pytest.mark.parametrize("damaged", [False, True])
def test_window_gives_the_frame_on_screen_at_start_if_none_follows(damaged):
    """The clip ends (or its data breaks) after the last frame before the window: that frame,
    on screen at start, is still given (then the error, so decode_video keeps what decoded
    before the damage)."""
    window = _window(decoded_frames((0.0, 0.5, 1.0), damaged), start=1.2, end=3.0, period=0.5)
    seen = []
    with pytest.raises(EOFError) if damaged else contextlib.nullcontext():
        for _, t in window:
            seen.append(t)
    assert seen == [1.0]


def test_window_orders_frames_in_time():
    """Frames without timestamps come one period apart from 0; a frame whose timestamp goes
    back (damaged data) is dropped, so the window stays in the order pick_frames needs."""
    untimed = _window(decoded_frames((None,) * 4, False), start=0.0, end=None, period=0.5)
    assert [t for _, t in untimed] == [0.0, 0.5, 1.0, 1.5]
    jumpy = _window(decoded_frames((0.0, 0.5, 1.0, 0.75, 1.5, 1.5), False), 0.6, None, 0.5)
    assert [t for _, t in jumpy] == [0.5, 1.0, 1.5, 1.5]


def test_video_frame_that_does_not_convert_is_a_media_error(monkeypatch):
    """A frame the RGB conversion fails on makes the clip unusable (MediaError: the loader
    skips it), with or without `at`; an empty `at` is a ValueError."""
    import av
    data = encode_video(moving_square(), fps=8.0, codec="vp9", keyframe_interval=4, crf=10)
    with pytest.raises(ValueError, match="holds no time"):
        decode_video(data, at=np.array([]))
    convert = av.VideoFrame.to_ndarray

    def broken_after_1s(frame, *args, **kwargs):
        if frame.time >= 1.5:
            raise ValueError("cannot convert")
        return convert(frame, *args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "to_ndarray", broken_after_1s)
    for at in (None, sample_times(1.0, 1.0, 4)):
        with pytest.raises(MediaError, match="does not convert"):
            decode_video(data, 1.0, 2.0, at=at)


def test_video_errors():
    with pytest.raises(ValueError, match="must be even"):
        encode_video(np.zeros((2, 31, 32, 3), np.uint8), 8.0)
    with pytest.raises(ValueError, match="video codec 'av1'"):
        encode_video(np.zeros((2, 32, 32, 3), np.uint8), 8.0, codec="av1")
    with pytest.raises(MediaError, match="does not decode"):
        decode_video(b"not a video" * 50)
    data = encode_video(moving_square(), 8.0)
    with pytest.raises(MediaError, match="no frames in the window"):
        decode_video(data, start=10.0, end=11.0)


def test_flac_round_trip_downmix_and_resample():
    t = np.arange(16000) / 16000
    wave = 0.5 * np.sin(2 * np.pi * 440 * t)
    out, repairs = decode_audio(encode_flac(wave))
    assert repairs == [] and out.dtype == np.float32
    np.testing.assert_allclose(out, wave, atol=1e-4)
    buffer = io.BytesIO()
    t44 = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t44), np.zeros_like(t44)], 1) * 0.5
    soundfile.write(buffer, stereo, 44100, format="WAV")
    out, repairs = decode_audio(buffer.getvalue())
    assert repairs == ["downmixed 2 channels", "resampled 44100 Hz to 16000 Hz"]
    assert abs(len(out) - 16000) <= 32
    # the 440 Hz tone survives resampling at half amplitude (the silent channel averages in)
    spectrum = np.abs(np.fft.rfft(out[:16000]))
    assert abs(np.argmax(spectrum) - 440) <= 1
    assert np.abs(out[1000:15000]).max() == pytest.approx(0.25, abs=0.01)
    assert len(resample(np.zeros(0, np.float32), 44100, 16000)) == 0
