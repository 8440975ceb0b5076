"""Encoding and decoding of the media members of a shard, in memory.

Video: VP9 in WebM (DALI decodes it on a CPU) or H.264 in MP4 (GPU decoding), both through
PyAV, with a short keyframe interval so that a random 4 s window can be reached by seeking.
Audio: 16 kHz mono FLAC through soundfile.
"""
from __future__ import annotations

import io
import math
from fractions import Fraction

import numpy as np

SAMPLE_RATE = 16000
VIDEO_CODECS = {"vp9": ("libvpx-vp9", "webm"), "h264": ("libx264", "mp4")}
VIDEO_EXTENSIONS = tuple(ext for _, ext in VIDEO_CODECS.values())


class MediaError(ValueError):
    """A media member could not be decoded."""


def _av():
    try:
        import av
    except ImportError as err:  # PyAV is a core dependency; the GPU bench image lacks it
        raise ImportError("video encoding and decoding need PyAV: pip install av") from err
    return av


def encode_video(frames: np.ndarray, fps: float, codec: str = "vp9",
                 keyframe_interval: int | None = None, crf: int = 32) -> bytes:
    """frames (T, H, W, 3) uint8 RGB, H and W even -> the bytes of a .webm (vp9) or .mp4 (h264).

    `keyframe_interval` is in frames (default: one second). vp9's bytes are a function of the
    frames. x264's are not always: single-threaded, with the same settings, 5-13 % of encodes of
    the same 64 or 96 px frames gave other bytes (PyAV 18.1, x264 core 165; none of 100 at 32 and
    128 px, nor of 60 at 256 px), and only without its mb-tree lookahead did they not, which
    costs 31-240 % more bytes at the same crf on synthetic clips, so it stays on.
    """
    if codec not in VIDEO_CODECS:
        raise ValueError(f"video codec {codec!r}: choose from {', '.join(VIDEO_CODECS)}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"frame size {width}x{height} must be even (yuv420p)")
    av = _av()
    encoder, container = VIDEO_CODECS[codec]
    gop = str(keyframe_interval or max(1, round(fps)))
    # Single-threaded, fixed settings: the same frames give the same bytes (vp9; see above).
    options = {"vp9": {"deadline": "realtime", "cpu-used": "8", "crf": str(crf), "b:v": "0",
                       "g": gop, "threads": "1", "row-mt": "0"},
               "h264": {"preset": "veryfast", "crf": str(min(crf, 51)), "g": gop,
                        "threads": "1"}}[codec]
    buffer = io.BytesIO()
    # bitexact: no random segment UID or creation time, so the bytes depend on the frames only
    with av.open(buffer, "w", format=container, options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(encoder, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return buffer.getvalue()


def decode_video(data: bytes, start: float = 0.0, end: float | None = None,
                 size: tuple[int, int] | None = None,
                 at: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decodes the frames shown in [start, end) seconds -> (frames (T, H, W, 3) uint8, times (T,)).

    Seeks to the keyframe before `start`, so a window costs about its own length to decode.
    `size` (width, height) rescales while converting to RGB. With `at` (ascending times in the
    window), only the frame on screen at each of those times is converted and returned, with its
    time, as video.pick_frames would pick them from all the window's frames (the first frame for
    a time before it): the conversion to RGB costs about as much as the decoding, and a training
    window of 4 s at 16 fps has 64 frames (plus those since the keyframe) of which 16 are kept.
    A frame whose timestamp goes back (damaged data) is dropped, so the frames stay in time
    order. Raises MediaError when nothing decodes or a frame does not convert.
    """
    if at is not None and len(at) == 0:
        raise ValueError("decode_video: `at` holds no time")
    av = _av()
    frames, times, period = [], [], 0.0
    last_time = None  # of the newest frame decoded
    pending = None  # with `at`: the newest frame, picked once the next one shows until when

    def convert(frame) -> np.ndarray:
        width, height = size or (frame.width, frame.height)
        try:
            return frame.to_ndarray(format="rgb24", width=width, height=height)
        except Exception as err:  # a broken frame: the clip is unusable, not the run
            raise MediaError(f"a frame does not convert to RGB: {err}") from err

    def pick(frame, shown_at: float, until: float) -> None:  # the times it is on screen for
        rgb = None
        while len(frames) < len(at) and at[len(frames)] < until:
            rgb = convert(frame) if rgb is None else rgb
            frames.append(rgb)
            times.append(shown_at)

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            period = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0
            if start > 0 and stream.time_base is not None:
                container.seek(int(start / stream.time_base), stream=stream, backward=True)
            for frame, t in _window(container.decode(stream), start, end, period):
                last_time = t
                if at is None:
                    frames.append(convert(frame))
                    times.append(t)
                else:
                    if pending is not None:
                        pick(*pending, until=t)
                    pending = (frame, t)
    except MediaError:
        raise
    except Exception as err:  # PyAV raises many types (InvalidDataError, EOFError, ...)
        if last_time is None:
            raise MediaError(f"video does not decode: {err}") from err
        # a truncated file: keep what decoded before the damage
    if pending is not None:
        pick(*pending, until=float("inf"))
    if last_time is None or last_time + period <= start:  # the clip ended before the window
        raise MediaError("video has no frames in the window")
    return np.stack(frames), np.asarray(times, dtype=np.float64)


def _window(decoded, start: float, end: float | None, period: float):
    """(frame, time) of the frames shown in [start, end): the last one before start (on screen
    at start, or the clip's last frame if it ends before), then each one up to end, in time
    order (a frame whose timestamp goes back is dropped)."""
    before, latest = None, -math.inf
    try:
        for frame in decoded:
            if frame.time is not None:
                t = frame.time
            else:  # no timestamp: one period after the frame before, the first at 0
                t = 0.0 if latest == -math.inf else latest + (period or 1.0)
            if t < latest:
                continue
            latest = t
            if end is not None and t >= end:
                break
            if t < start:
                before = (frame, t)
                continue
            if before is not None:
                yield before
                before = None
            yield frame, t
    except Exception:  # damaged data: the frame on screen at start still counts, then raise
        if before is not None:
            yield before
        raise
    if before is not None:
        yield before


def encode_flac(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """waveform (samples,) or (samples, channels) float in [-1, 1] -> FLAC bytes (16 bit)."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(waveform, -1.0, 1.0), sample_rate, format="FLAC",
                    subtype="PCM_16")
    return buffer.getvalue()


def decode_audio(data: bytes, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, list[str]]:
    """Any soundfile-readable bytes -> (mono float32 waveform at `sample_rate`, repairs made).

    Repairs: multi-channel audio is averaged to mono, other rates are resampled.
    """
    import soundfile

    try:
        wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as err:
        raise MediaError(f"audio does not decode: {err}") from err
    repairs = []
    if wave.shape[1] > 1:
        repairs.append(f"downmixed {wave.shape[1]} channels")
    wave = wave.mean(axis=1)
    if rate != sample_rate:
        repairs.append(f"resampled {rate} Hz to {sample_rate} Hz")
        wave = resample(wave, rate, sample_rate)
    return wave.astype(np.float32), repairs


def resample(wave: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling of a mono float waveform (libswresample through PyAV)."""
    if rate == new_rate or len(wave) == 0:
        return wave.astype(np.float32)
    av = _av()
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave, np.float32)[None], format="flt",
                                       layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=new_rate)
    out = [f.to_ndarray()[0] for f in resampler.resample(frame)]
    out += [f.to_ndarray()[0] for f in resampler.resample(None)]  # flush
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)
