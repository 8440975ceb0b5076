"""The DALI loader: the reference loader's samples, with NVIDIA DALI decoding the media.

    fastmavil-train configs/r4.toml --data.loader dali

The samples of the reference loader in one process (`data.num_workers = 0`; with workers it
deals the clips among them, each with an order and streams of its own): the same clips, order,
random draws and batches (`loader.collate`'s keys and shapes).
- Python reads the shards in ShardDataset's order through its shuffle buffer
  (`ShardDataset.drawn`, resumes included), checks each clip's json, reads the media's headers
  and the video's packet times without decoding (PyAV; soundfile for the audio's length), and
  draws the sample's video window, crop, audio segment and roll from the sample's own random
  stream in the reference's order (`plan`): a clip's frames, crop and roll are the ones the
  reference loader would pick. This runs in `threads` threads (`data.num_workers`) of the
  trainer's process, a few batches ahead (a 10 s 256² VP9 clip: 2.6 ms in one thread,
  `python -m bench.dataload --plan`).
- DALI decodes the 16 frames picked (`fn.decoders.video` with their indices: NVDEC on the GPU
  with `data.dali_device = "gpu"`, for H.264 and HEVC too; libavcodec on the CPU, which decodes
  VP8, VP9 and MJPEG) and resizes and crops them on the same device, and decodes the FLAC (on
  the CPU: DALI's audio decoder has no GPU backend), in its own threads. VP8 and VP9 clips are
  handed over from the window's keyframe on (`from_keyframe`), as DALI does not seek.
- The segment, roll and Kaldi fbank run batched in torch on the batch's device
  (`fbank.padded_fbank`), the same computation as the reference's per clip.

Where its samples differ from the reference's (`tests/data/test_dali_loader.py` bounds them):
- frame pixels by a few levels: DALI converts YUV to RGB and resizes (antialiased linear) with
  its own kernels (about 1 level on average in the tests, under 3 in every frame);
- audio in other rates or channels: DALI resamples and downmixes with its own filter (and the
  length it gives may differ by a sample from the header's count the draws were made with).

A batch DALI cannot decode (a clip damaged past its headers) is decoded again by the reference
decoder, which skips the bad clip, names it and counts it; the batch is topped up with the next
clips not yet given to DALI, decoded there too (so the order differs from the reference's by
the batches DALI had queued). Clips whose json or headers do not read are skipped while planning,
with the reference's reasons.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import logging
import math
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .fbank import normalize, padded_fbank
from .loader import (MIN_SAMPLES, ShardDataset, SkipClip, audio_samples, audio_segment,
                     clip_meta, collate)
from .media import SAMPLE_RATE, VIDEO_EXTENSIONS, _av
from .shards import Clip, read_shard
from .video import pick_frames, sample_times, shown_until, window_start

log = logging.getLogger("fastmavil.data")

DEVICES = ("auto", "cpu", "gpu")
CPU_CODECS = ("vp8", "vp9", "mjpeg")  # what DALI decodes on the CPU; H.264/HEVC need NVDEC
# Handed to DALI from the window's keyframe on (`from_keyframe`): those whose frames DALI's CPU
# decoder can check against the whole clip's; H.264 and HEVC go whole.
TRIMMED_CODECS = ("vp8", "vp9")


class UnsupportedCodec(ValueError):
    """The shards' video needs another DALI device: ends the pass, not one clip."""


def dali_available() -> bool:
    try:
        importlib.import_module("nvidia.dali")
    except ImportError:
        return False
    return True


def _dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError as err:
        raise ImportError("data.loader = 'dali' needs NVIDIA DALI (Linux x86_64): pip install "
                          "nvidia-dali-cuda120") from err
    return dali, fn, types, feed_ndarray


def dali_device(device: str) -> str:
    """'cpu' or 'gpu' for data.dali_device ('auto': the GPU when CUDA is available)."""
    if device not in DEVICES:
        raise ValueError(f"data.dali_device = {device!r}: choose from {', '.join(DEVICES)}")
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise ValueError("data.dali_device = 'gpu' needs CUDA; use 'cpu' (VP8, VP9 or MJPEG "
                         "video)")
    return device


def check_codec(dataset: ShardDataset, device: str) -> None:
    """Raises UnsupportedCodec when the first clip's video cannot be decoded by DALI on `device`
    ('cpu' or 'gpu'): a run learns it at the start, not at its first batch."""
    clip = next(read_shard(dataset.shards[0]), None) if dataset.shards else None
    ext = next((e for e in VIDEO_EXTENSIONS if e in clip.members), None) if clip else None
    if ext is None or dataset.spec.audio_only:
        return
    try:
        with open_video(clip.members[ext]) as video:
            codec = video.codec
    except SkipClip:
        return  # a bad clip: the loader skips it
    _check_codec(codec, device, clip)


def _check_codec(codec: str, device: str, clip: Clip) -> None:
    if device == "cpu" and codec not in CPU_CODECS:
        raise UnsupportedCodec(
            f"{clip.shard}/{clip.display_key}: {codec} video; DALI on the CPU decodes "
            f"{', '.join(CPU_CODECS)} only: use data.dali_device = 'gpu' (NVDEC) or "
            "data.loader = 'reference'")


@dataclass
class ClipPlan:
    """What DALI is to make of one clip: everything random is drawn here."""
    clip: Clip
    seed: list            # the sample's random stream, for the reference decoder's fallback
    labels: torch.Tensor
    audio: np.ndarray     # the encoded members, as DALI takes them
    segment: int          # first sample of the decoded waveform heard
    samples: int          # samples heard (the segment's length)
    roll: int
    number: int = 0       # its place in the epoch's order, checked against DALI's output
    video: np.ndarray | None = None
    frames: np.ndarray | None = None    # (video_frames,) int32 frame indices
    resized: np.ndarray | None = None   # (2,) float32: the height and width before the crop
    corner: np.ndarray | None = None    # (2,) int32: the crop's top and left


@dataclass
class VideoHeaders:
    codec: str
    width: int
    height: int
    times: np.ndarray  # each frame's presentation time in s, ascending (from its packet)
    period: float      # 1 / the stream's average frame rate (0 when not known)
    keyframes: np.ndarray  # the keyframes' times, ascending
    keyframe_pts: np.ndarray  # and their exact timestamps, in the stream's time base
    stream: object = None  # open_video's: the stream and its packets, in demux order, for
    packets: list = None   # from_keyframe (inside open_video's block only; None after it)


@contextlib.contextmanager
def open_video(data: bytes) -> Iterator[VideoHeaders]:
    """The video's codec, size and frame times, from its headers and packets: demuxed, not
    decoded (a 10 s clip at 16 fps: 160 packets). The times are the decoder's frame times, so
    `video.pick_frames` picks the frames the reference's decoder would. A file damaged part-way
    keeps the packets before the damage, as the reference keeps the frames. Raises SkipClip.
    The container stays open in the block, so that `from_keyframe` remuxes the packets demuxed
    here: opening a clip costs as much as demuxing it (FFmpeg probes the stream), and one open
    took a 10 s 256² VP9 clip's plan from 4.1-4.6 to 2.6-2.7 ms (BENCHMARKS.md)."""
    av = _av()
    try:
        container = av.open(io.BytesIO(data))
    except Exception as err:  # PyAV raises many types
        raise SkipClip(f"corrupt video: {err}") from None
    with container:
        try:
            video = _headers(container)
        except SkipClip:
            raise
        except Exception as err:  # e.g. a codec ID no decoder knows: no codec context
            raise SkipClip(f"corrupt video: {err}") from None
        try:
            yield video
        finally:  # the packets' memory goes with the container
            video.stream = video.packets = None


def _headers(container) -> VideoHeaders:
    if not container.streams.video:
        raise SkipClip("corrupt video: no video stream")
    stream = container.streams.video[0]
    codec, tb = stream.codec_context.name, stream.time_base
    width, height = stream.codec_context.width, stream.codec_context.height
    period = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0
    packets = []
    try:
        for packet in container.demux(stream):
            if packet.pts is not None and packet.size:
                packets.append(packet)
    except Exception as err:  # damaged data: the packets before it count
        if not packets:
            raise SkipClip(f"corrupt video: {err}") from None
    if width < 1 or height < 1 or not packets:
        raise SkipClip(f"corrupt video: {width}x{height}, {len(packets)} frames in its packets")
    times = np.asarray([float(p.pts * tb) for p in packets])
    keys = sorted((t, p.pts) for t, p in zip(times, packets) if p.is_keyframe)
    return VideoHeaders(codec, width, height, np.sort(times), period,
                        np.asarray([t for t, _ in keys]), np.asarray([pts for _, pts in keys],
                                                                     np.int64),
                        stream, packets)


def from_keyframe(video: VideoHeaders, key_pts: int) -> bytes:
    """The video's packets from the keyframe with timestamp `key_pts` on (compared exactly, in
    the stream's time base), remuxed (not decoded) into a WebM of their own: DALI 2.4's decoder
    decodes a clip from its first frame up to the frames asked for, even with a keyframe every
    second (a 10 s clip's last 16 frames took it 44 ms, its first 16 10 ms, in one CPU thread),
    where the reference seeks. Inside `open_video`'s block, once: muxing rebases the packets'
    timestamps."""
    buffer = io.BytesIO()
    with _av().open(buffer, "w", format="webm", options={"fflags": "+bitexact"}) as out:
        copy, first = out.add_stream_from_template(video.stream), True
        for packet in video.packets:
            if packet.pts >= key_pts:
                if first and not packet.is_keyframe:
                    raise ValueError(f"the packet at {packet.pts} is not a keyframe")
                packet.stream, first = copy, False
                out.mux(packet)
    return buffer.getvalue()


def probe_audio(data: bytes) -> int:
    """The samples the audio has at 16 kHz, from its headers. Raises SkipClip."""
    import soundfile

    try:
        info = soundfile.info(io.BytesIO(data))
    except Exception as err:
        raise SkipClip(f"corrupt audio: {err}") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise SkipClip(f"corrupt audio: {info.frames} samples at {info.samplerate} Hz")
    return info.frames if info.samplerate == SAMPLE_RATE else \
        math.ceil(info.frames * SAMPLE_RATE / info.samplerate)


def plan(dataset: ShardDataset, clip: Clip, rng: np.random.Generator, seed: list,
         device: str) -> ClipPlan:
    """One clip's plan, with the reference decoder's draws in its order (ShardDataset.decode:
    a clip heard whole draws its roll first, then its window and crop; a longer one its window
    and crop, then its segment and roll). Raises SkipClip with the reference's reasons, and
    UnsupportedCodec for video DALI cannot decode on `device`."""
    spec = dataset.spec
    meta = clip_meta(clip)
    samples = probe_audio(clip.members["flac"])
    if samples < MIN_SAMPLES:
        raise SkipClip(f"audio too short: {samples} samples, fbank needs {MIN_SAMPLES}")
    labels = dataset._labels(meta, clip)
    audio = np.frombuffer(clip.members["flac"], np.uint8)
    if spec.audio_only or samples <= audio_samples(spec.audio_frames):
        first, heard, roll = _audio_draws(spec, samples, rng, None)
        p = ClipPlan(clip, seed, labels, audio, first, heard, roll)
        if not spec.audio_only:
            _video_draws(p, spec, meta, rng, device)
        return p
    p = ClipPlan(clip, seed, labels, audio, 0, 0, 0)
    window = _video_draws(p, spec, meta, rng, device)
    p.segment, p.samples, p.roll = _audio_draws(spec, samples, rng, window)
    return p


def _audio_draws(spec, samples: int, rng, window) -> tuple[int, int, int]:
    """(first sample, samples heard, roll): ShardDataset._audio's draws."""
    heard = audio_segment(samples, spec.audio_frames, window, spec.train, rng)
    first, stop = heard.start or 0, samples if heard.stop is None else heard.stop
    roll = int(rng.integers(stop - first)) if spec.train and spec.roll else 0
    return first, stop - first, roll


def _video_draws(p: ClipPlan, spec, meta: dict, rng, device: str
                 ) -> tuple[float, float] | None:
    """Fills in p's frames, size and crop with ShardDataset._video's and resize_crop's draws;
    returns the window (start, span in seconds), None where the frames span the whole clip (no
    duration in the json, or a window past the video's end: a wrong duration)."""
    ext = next((e for e in VIDEO_EXTENSIONS if e in p.clip.members), None)
    if ext is None:
        raise SkipClip("missing video")
    data = p.clip.members[ext]
    with open_video(data) as video:
        _check_codec(video.codec, device, p.clip)
        duration, window = float(meta.get("duration") or 0.0), None
        if duration > 0:
            start = window_start(duration, spec.video_seconds, spec.train, rng)
            span = min(spec.video_seconds, duration)
            if video.times[-1] + video.period > start:  # as media.decode_video finds frames
                times, window = sample_times(start, span, spec.video_frames), (start, span)
        if window is None:
            times = sample_times(0.0, shown_until(video.times), spec.video_frames)
        p.frames = pick_frames(times, video.times).astype(np.int32)
        key = np.searchsorted(video.keyframes, video.times[p.frames.min()], side="right") - 1
        if video.codec in TRIMMED_CODECS and key >= 0 and video.keyframes[key] > video.times[0]:
            before = np.searchsorted(video.times, video.keyframes[key])  # frames shown before
            try:
                data = from_keyframe(video, int(video.keyframe_pts[key]))
                p.frames -= before
            except Exception as err:  # an optimisation only: DALI takes the whole clip
                _warn_once("trim", f"{p.clip.shard}/{p.clip.display_key}: handed to DALI "
                           f"whole, not from its window's keyframe ({type(err).__name__}: "
                           f"{err})")
    scale = spec.video_size / min(video.height, video.width)
    new_h = max(spec.video_size, round(video.height * scale))
    new_w = max(spec.video_size, round(video.width * scale))
    top = int(rng.integers(new_h - spec.video_size + 1)) if spec.train else \
        (new_h - spec.video_size) // 2
    left = int(rng.integers(new_w - spec.video_size + 1)) if spec.train else \
        (new_w - spec.video_size) // 2
    p.video = np.frombuffer(data, np.uint8)
    p.resized = np.array([new_h, new_w], np.float32)
    p.corner = np.array([top, left], np.int32)
    return window


class DaliLoader:
    """Batches of `batch_size` from `dataset` (one pass: build one per epoch, after
    dataset.set_epoch, as build_loader's DataLoader), decoded by DALI with `threads` threads on
    `device` ('cpu' or 'gpu'); the batches' tensors are on that device. Drops the last partial
    batch in training unless drop_last says otherwise."""

    def __init__(self, dataset: ShardDataset, batch_size: int, device: str = "auto",
                 threads: int = 2, drop_last: bool | None = None, prefetch: int = 2):
        if batch_size < 1 or threads < 1:
            raise ValueError(f"batch_size = {batch_size} and threads = {threads} must be >= 1")
        self.dataset, self.spec, self.batch_size = dataset, dataset.spec, batch_size
        self.device = dali_device(device)
        self.drop_last = dataset.spec.train if drop_last is None else drop_last
        self.threads, self.prefetch = threads, prefetch
        self.torch_device = (torch.device("cuda", torch.cuda.current_device())
                             if self.device == "gpu" else torch.device("cpu"))
        self.copy_stream = torch.cuda.Stream(self.torch_device) if self.device == "gpu" else None

    def __iter__(self) -> Iterator[dict]:
        dali, fn, types, feed_ndarray = _dali()
        skipped_before, read = Counter(self.dataset.skipped), [0]  # read: _plans counts
        spec, plans, lock = self.spec, self._plans(read), threading.Lock()
        queued: deque[list[ClipPlan]] = deque()  # the batches fed to DALI, not yet returned
        unsupported = []

        def next_batch(_info=None):
            try:
                with lock:
                    batch = list(_take(plans, self.batch_size))
            except UnsupportedCodec as err:  # ends the pass; raised below, not inside DALI
                unsupported.append(err)
                raise StopIteration from None
            if not batch or (self.drop_last and len(batch) < self.batch_size):
                raise StopIteration
            queued.append(batch)
            columns = [[np.array([p.number]) for p in batch], [p.audio for p in batch]]
            if not spec.audio_only:
                columns += [[p.video for p in batch], [p.frames for p in batch],
                            [p.resized for p in batch], [p.corner for p in batch]]
            return tuple(columns)

        outputs = 2 if spec.audio_only else 6

        @dali.pipeline_def(batch_size=self.batch_size, num_threads=self.threads,
                           device_id=self.torch_device.index if self.device == "gpu" else None,
                           prefetch_queue_depth=self.prefetch, exec_dynamic=True)
        def pipeline():
            numbers, *columns = fn.external_source(source=next_batch, num_outputs=outputs,
                                                   batch=True, batch_info=True)
            audio, _ = fn.decoders.audio(columns[0], downmix=True, sample_rate=SAMPLE_RATE,
                                         dtype=types.FLOAT)
            lengths = audio.shape()
            audio = fn.pad(audio, fill_value=0.0)  # to the batch's longest
            if self.device == "gpu":
                audio, lengths = audio.gpu(), lengths.gpu()
            if spec.audio_only:
                return numbers, audio, lengths
            encoded, frames, resized, corner = columns[1:]
            video = fn.decoders.video(encoded, device="mixed" if self.device == "gpu" else "cpu",
                                      frames=frames, pad_mode="edge")
            video = fn.resize(video, size=resized, antialias=True,
                              interp_type=types.INTERP_LINEAR)
            video = fn.slice(video, start=corner, shape=[spec.video_size] * 2, axes=[1, 2])
            return numbers, audio, lengths, fn.transpose(video, perm=[3, 0, 1, 2])  # 3, Fr, H, W

        pipe = pipeline()
        pipe.build()
        try:
            while True:
                try:
                    out = pipe.run()
                except StopIteration:
                    if unsupported:
                        raise unsupported[0] from None
                    self.dataset.log_skips(skipped_before, read[0])  # the fallbacks' too
                    return
                except RuntimeError as err:  # a clip damaged past its headers
                    if not queued:  # not a batch's decoding: DALI itself
                        raise
                    batch = self._fallback(queued.popleft(), plans, lock, err)
                    if batch is not None:  # None: too few clips left; DALI may hold more
                        yield batch
                    continue
                batch = queued.popleft()
                numbers = [int(n[0]) for n in out[0].as_array()]
                if numbers != [p.number for p in batch]:  # the draws must meet their clips
                    raise RuntimeError(f"DALI returned clips {numbers} where "
                                       f"{[p.number for p in batch]} were due")
                yield self._batch(batch, out[1:], feed_ndarray)
        finally:  # stopped early too (a run's last step): the planner threads stop now
            with lock:
                plans.close()

    def _plans(self, read: list[int]) -> Iterator[ClipPlan]:
        """The dataset's clips, planned in order by `threads` threads (PyAV lets go of the GIL;
        a 10 s 256² VP9 clip's plan: 2.6 ms in one), a few batches ahead;
        those that cannot be planned are skipped as the reference skips them, here, in order.
        read[0] counts the clips read."""
        dataset, ahead = self.dataset, self.batch_size * (self.prefetch + 1)

        def planned(number: int, clip: Clip, rng: np.random.Generator):
            try:
                p = plan(dataset, clip, rng, rng.bit_generator.seed_seq.entropy, self.device)
                p.number = number
                return p
            except Exception as err:  # raised or counted in order, below
                return err

        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dali-plan")
        pending, drawn = deque(), dataset.drawn()
        try:
            while True:
                for clip, rng in drawn:
                    pending.append((clip, pool.submit(planned, read[0], clip, rng)))
                    read[0] += 1
                    if len(pending) >= ahead:
                        break
                if not pending:
                    return
                clip, future = pending.popleft()
                result = future.result()
                if isinstance(result, ClipPlan):
                    yield result
                elif isinstance(result, UnsupportedCodec):
                    raise result
                elif isinstance(result, SkipClip):
                    dataset._skip(str(result), clip.shard, clip.display_key)
                else:  # anything unforeseen in one clip must not end the run
                    dataset._skip(f"decode error: {type(result).__name__}: {result}",
                                  clip.shard, clip.display_key)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _batch(self, batch: list[ClipPlan], out, feed_ndarray) -> dict:
        dtypes = (torch.float32, torch.int64, torch.uint8)
        if self.device == "gpu":
            # Made and filled on a stream of their own, which the host waits for: DALI reuses
            # its output buffers once run() is called again, which may come before the current
            # stream has got through the training kernels queued ahead of a copy there.
            copies = self.copy_stream
            with torch.cuda.stream(copies):
                tensors = [torch.empty(o.as_tensor().shape(), dtype=d, device=self.torch_device)
                           for o, d in zip(out, dtypes)]
                for o, t in zip(out, tensors):
                    feed_ndarray(o.as_tensor(), t, cuda_stream=copies)
            copies.synchronize()
            for t in tensors:  # used and freed on the current stream
                t.record_stream(torch.cuda.current_stream())
        else:  # pinned under CUDA: the video goes to the GPU as it is, asynchronously
            tensors = [torch.empty(o.as_tensor().shape(), dtype=d,
                                   pin_memory=torch.cuda.is_available())
                       for o, d in zip(out, dtypes)]
            for o, t in zip(out, tensors):
                feed_ndarray(o.as_tensor(), t)
        waves, lengths = tensors[0], tensors[1][:, 0]
        # only the samples a segment can hold: up to the fbank's window (AudioSet: all of them)
        need = audio_samples(self.spec.audio_frames)
        index = torch.arange(min(waves.shape[-1], need), device=waves.device)
        segment = torch.tensor([[p.segment, p.samples, p.roll] for p in batch])
        first, heard, roll = segment.to(waves.device, non_blocking=True).unbind(-1)
        heard = torch.minimum(heard, (lengths - first).clamp(min=0))  # a resampled estimate
        # np.roll of the heard segment: sample i is the segment's sample (i - roll) mod heard
        source = first[:, None] + (index - roll[:, None]).remainder(heard.clamp(min=1)[:, None])
        waves = waves.gather(1, source.clamp(max=waves.shape[-1] - 1))
        fbank = padded_fbank(waves, heard, self.spec.audio_frames, SAMPLE_RATE,
                             self.spec.mel_bins)
        result = {"keys": [p.clip.display_key for p in batch],
                  "audio": normalize(fbank, self.spec.audio_mean, self.spec.audio_std)[:, None],
                  "labels": torch.stack([p.labels for p in batch])}
        if not self.spec.audio_only:
            result["video"] = tensors[2]
        return result

    def _fallback(self, batch: list[ClipPlan], plans: Iterator[ClipPlan], lock: threading.Lock,
                  err: Exception) -> dict | None:
        """The batch DALI failed on, decoded by the reference decoder (which skips and names
        the bad clips), topped up with the next clips decoded there too; None when the data
        ends before a batch (a whole one, where the last partial batch is dropped)."""
        log.warning("DALI failed on a batch (%s); the reference decoder decodes it",
                    _reason(err))
        def top_up() -> Iterator[ClipPlan]:  # the next clips not yet given to DALI
            while (p := _locked_next(plans, lock)) is not None:
                yield p

        samples = []
        for p in itertools.chain(batch, top_up()):
            sample = self.dataset._decoded(p.clip, np.random.default_rng(p.seed))
            if sample is not None:
                samples.append(sample)
                if len(samples) == self.batch_size:
                    break
        if not samples or (self.drop_last and len(samples) < self.batch_size):
            return None
        batch = collate(samples)
        batch["audio"] = batch["audio"].to(self.torch_device)
        if "video" in batch:
            batch["video"] = batch["video"].to(self.torch_device)
        return batch


def _locked_next(plans: Iterator[ClipPlan], lock: threading.Lock) -> ClipPlan | None:
    with lock:
        return next(plans, None)


def _reason(err: Exception) -> str:
    """The line of a DALI pipeline error that says what went wrong (after 'encountered:',
    before the C++ context and the pipeline's own lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "encountered:" in lines[:-1]:
        return lines[lines.index("encountered:") + 1]
    return lines[-1] if lines else type(err).__name__


_WARNED: set[str] = set()


def _warn_once(kind: str, message: str) -> None:
    if kind not in _WARNED:
        _WARNED.add(kind)
        log.warning("%s (said once a process)", message)


def _take(iterator: Iterator, n: int) -> Iterator:
    for _, item in zip(range(n), iterator):
        yield item
