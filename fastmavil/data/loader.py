"""The reference loader: a PyTorch IterableDataset over the shards, PyAV for video, soundfile
for audio, Kaldi fbank in torch.

Shards are split across ranks and DataLoader workers (when there are fewer shards than
consumers, every consumer reads every shard and keeps every n-th batch's worth of clips
instead). Training
shuffles the shard order per epoch and the clips through a shuffle buffer, starts the video
window at random and rolls the waveform (Table 4 "R"); evaluation does none of these. The
buffer's draws and each sample's augmentations come from separate streams (the latter keyed by
the sample's place in its consumer's order), so a resumed epoch passes over the samples it had
already trained on without decoding them and goes on with the same samples as an uninterrupted
run.

A clip that cannot be used is repaired (stereo -> mono, other rates -> 16 kHz, short audio
zero-padded, short video frames repeated) or skipped with a warning that names the shard and
the key; skips are counted by reason and reported when a pass ends. One bad clip never ends a
run; a truncated shard yields the clips before the damage.

Batches: audio (B, 1, T, F) float32, video (B, 3, Fr, H, W) uint8 unless audio_only (`to_device`
moves a batch and normalises its video on the device), labels (B, K) multi-hot, keys (list of B
strings).
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import signal
import tarfile
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .fbank import crop_or_pad, kaldi_fbank, normalize
from .media import SAMPLE_RATE, VIDEO_EXTENSIONS, MediaError, decode_audio, decode_video
from .shards import (INDEX, Clip, clip_json, count_clips, read_index, read_shard, shard_clips,
                     shard_metas, shard_paths)
from .video import (normalize_video, pick_frames, resize_crop, sample_times, shown_until,
                    window_start)

log = logging.getLogger("fastmavil.data")

# fbank needs one 25 ms window: shorter audio carries nothing to learn from.
MIN_SAMPLES = 400


class SkipClip(Exception):
    """The clip is unusable; the message is the reason counted in the skip report."""


@dataclass
class LoaderSpec:
    """What one sample looks like; built from a Config by `loader_spec`."""
    audio_frames: int = 1024
    mel_bins: int = 128
    video_frames: int = 16
    video_size: int = 224
    video_seconds: float = 4.0
    audio_mean: float = -4.268
    audio_std: float = 4.569
    video_mean: tuple = (0.45, 0.45, 0.45)
    video_std: tuple = (0.225, 0.225, 0.225)
    audio_only: bool = False
    train: bool = True
    roll: bool = True
    shuffle_buffer: int = 512
    seed: int = 0


def loader_spec(cfg, train: bool = True) -> LoaderSpec:
    m, d = cfg.model, cfg.data
    return LoaderSpec(m.audio_frames, m.mel_bins, m.video_frames, m.video_size, d.video_seconds,
                      d.audio_mean, d.audio_std, d.video_mean, d.video_std,
                      audio_only=not m.has_video, train=train, roll=d.roll,
                      shuffle_buffer=d.shuffle_buffer, seed=d.seed)


class ShardDataset(IterableDataset):
    """`keep`, when given, selects clips by their json (fine-tuning's split and fold filters):
    the others are passed over undecoded, and the counts that deal clips to workers and plan
    resumes are of the kept clips (one pass over the shards' json members finds them)."""

    def __init__(self, source: str | Path, spec: LoaderSpec, rank: int = 0, world_size: int = 1,
                 keep: Callable[[dict], bool] | None = None):
        super().__init__()
        self.shards = shard_paths(source)
        self.keep = keep
        self.kept_clips = ({shard: sum(map(self._selects, shard_metas(shard)))
                            for shard in self.shards} if keep else None)
        self.source = source = Path(source)
        index = read_index(source) if (source / INDEX).is_file() else None
        self.labels = index["labels"] if index else []
        # each shard's clip count as the index lists it: a damaged tar can end early without an
        # error, which only this count shows (a scan of the tar headers would end early with it)
        self.indexed_clips = {source / s["name"]: int(s["clips"])
                              for s in (index["shards"] if index else []) if "clips" in s}
        self.label_index = {name: i for i, name in enumerate(self.labels)}
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.epoch, self.passed_over = 0, [0]
        self.deal = 1  # clips dealt to a consumer at a time where shards are too few to split
        self.skipped = Counter()  # reason -> clips, for this process's passes

    def set_epoch(self, epoch: int, resume_batches: int = 0, batch_size: int = 1,
                  num_workers: int = 0) -> int:
        """Reseeds the shard order, windows and rolls: call before each training epoch, with
        the batch_size and num_workers of the DataLoader that reads it.

        resume_batches > 0 resumes the epoch mid-way, after that many batches of batch_size
        from a training DataLoader with num_workers workers over this dataset. Such a
        DataLoader takes one batch from each worker with data left in turn, starting every pass
        at worker 0. The workers pass over their samples from the whole rounds before the resume
        point without decoding them; the caller takes the returned number of batches (the rest
        of the round it fell in, < num_workers) from its DataLoader and drops them. The plan
        counts every clip the shards' index lists as a sample: with clips skipped as unusable,
        or unreadable shards, before the resume point, the resumed epoch may repeat or leave
        out that many samples per worker. Returns the batches to drop (0 without a resume)."""
        if resume_batches < 0 or batch_size < 1 or num_workers < 0:
            raise ValueError(f"resume_batches = {resume_batches}, batch_size = {batch_size}, "
                             f"num_workers = {num_workers}: expected >= 0, >= 1, >= 0")
        self.epoch, workers = epoch, max(1, num_workers)
        # Shards too few to give each consumer its own are split clip by clip, a batch's worth
        # at a time: each consumer then drops at most the epoch's one partial batch, where
        # dealt one by one each would drop its own (with 16 workers over 1,600 clips in batches
        # of 64, 9 of the epoch's 25 batches)
        self.deal = batch_size
        self.passed_over = [0] * workers  # samples per worker
        if not resume_batches:
            return 0
        taken, passed = [0] * workers, 0
        batches = [clips // batch_size for clips in self._worker_clips(workers)]
        for turn in round_robin(batches):  # training drops each worker's partial batch
            if passed + len(turn) > resume_batches:
                break
            for w in turn:
                taken[w] += 1
            passed += len(turn)
        self.passed_over = [n * batch_size for n in taken]
        return resume_batches - passed if passed < sum(batches) else 0

    def _selects(self, meta: dict | None) -> bool:
        """Whether `keep` selects a clip of json `meta`; one whose json does not read (None) is
        kept, for the decoder to skip and report."""
        return meta is None or bool(self.keep(meta))

    def num_clips(self) -> int:
        """The clips an epoch reads: the kept ones, or all the shards hold."""
        return sum(self.kept_clips.values()) if self.keep else count_clips(self.source)

    def _worker_clips(self, workers: int) -> list[int]:
        """Clips per DataLoader worker of this rank in the current epoch, as _clips deals them."""
        shards = self._epoch_shards()
        counts = self.kept_clips if self.keep else shard_clips(self.source)
        consumers = self.world_size * workers
        mine = [w * self.world_size + self.rank for w in range(workers)]
        if len(shards) >= consumers:
            return [sum(counts[s] for s in shards[c::consumers]) for c in mine]
        blocks, rest = divmod(sum(counts[s] for s in shards), self.deal)
        return [blocks // consumers * self.deal + (self.deal if c < blocks % consumers else 0)
                + (rest if c == blocks % consumers else 0) for c in mine]

    def _consumer(self) -> tuple[int, int, int]:
        """(this consumer's index, the consumer count, the samples it passes over)."""
        worker = get_worker_info()
        wid, nworkers = (worker.id, worker.num_workers) if worker else (0, 1)
        if len(self.passed_over) != nworkers and any(self.passed_over):
            raise ValueError(f"set_epoch planned the resume for {len(self.passed_over)} "
                             f"loader workers; the DataLoader has {nworkers}")
        passed_over = self.passed_over[wid] if len(self.passed_over) == nworkers else 0
        # numbered worker-major, so the shards left over after whole rounds spread over the
        # ranks instead of all going to rank 0 (with several processes, an epoch ends when the
        # smallest share does)
        return wid * self.world_size + self.rank, self.world_size * nworkers, passed_over

    def _epoch_shards(self) -> list[Path]:
        shards = list(self.shards)
        if self.spec.train:
            np.random.default_rng([self.spec.seed, self.epoch]).shuffle(shards)  # same on all
        return shards

    def _clips(self, consumer: int, consumers: int) -> Iterator[Clip]:
        shards = self._epoch_shards()
        split_shards = len(shards) >= consumers
        mine = shards[consumer::consumers] if split_shards else shards
        n, dealt = 0, 0  # clips read, clips kept and dealt
        for shard in mine:
            start, error = n, None
            try:
                for clip in read_shard(shard):
                    n += 1
                    if self.keep and not self._selects(clip_json(clip)):
                        continue
                    dealt += 1
                    if split_shards or (dealt - 1) // self.deal % consumers == consumer:
                        yield clip
            except (tarfile.TarError, OSError, EOFError) as err:
                error = err
            total = self.indexed_clips.get(shard)
            missing = None if total is None else max(0, total - (n - start))
            lost_some = missing or (error and missing is None)  # all read: nothing to say
            if lost_some and (split_shards or consumer == 0):  # said by one reader
                kind = f"unreadable shard ({type(error).__name__})" if error else "damaged shard"
                lost = "its clips after the damage" if total is None else \
                    f"{missing} of its {total} clips"
                self._skip(f"{kind}: {lost} not read", shard.name, "*",
                           clips=1 if missing is None else missing)

    def __iter__(self) -> Iterator[dict]:
        skipped_before, read = Counter(self.skipped), 0
        for clip, rng in self.drawn():
            read += 1
            sample = self._decoded(clip, rng)
            if sample is not None:
                yield sample
        self.log_skips(skipped_before, read)

    def log_skips(self, skipped_before: Counter, read: int) -> None:
        """At a pass's end: the clips it read and, when any were skipped since the counts were
        `skipped_before` (a copy of `skipped` at the pass's start), how many and why: this
        pass's alone, where the counts go on over a process's passes (one line per consumer)."""
        skipped = self.skipped - skipped_before
        if skipped:
            consumer, consumers, _ = self._consumer()
            log.warning("loader consumer %d/%d: %d clips read, %d skipped (%s)", consumer,
                        consumers, read, skipped.total(),
                        ", ".join(f"{r}: {c}" for r, c in skipped.items()))

    def drawn(self) -> Iterator[tuple[Clip, np.random.Generator]]:
        """This consumer's clips for the epoch in the order they are sampled, each with its
        sample's own random stream (window, crop, segment, roll), passing over those trained on
        before a resume; a decoder turns each into a sample (this loader's, or the DALI one's)."""
        consumer, consumers, passed_over = self._consumer()
        seed = [self.spec.seed, self.epoch, consumer]
        draws = np.random.default_rng(seed)  # the buffer's; a sample's own stream is below
        # The shuffle buffer holds encoded clips (~0.1 MB each, against ~10 MB decoded at paper
        # size: 512 decoded clips were 5 GB per worker); a clip is decoded as it leaves.
        buffer, size = [], self.spec.shuffle_buffer if self.spec.train else 1
        clips = iter(self._clips(consumer, consumers))
        for popped in itertools.count():
            for clip in clips:
                buffer.append(clip)
                if len(buffer) >= size:
                    break
            if not buffer:
                break
            clip = buffer.pop(int(draws.integers(len(buffer))))
            if popped < passed_over:  # trained on before the resume
                continue
            yield clip, np.random.default_rng([*seed, popped])

    def _decoded(self, clip: Clip, rng: np.random.Generator) -> dict | None:
        """The clip's sample, or None (counted and warned of) when it must be skipped."""
        try:
            return self.decode(clip, rng)
        except SkipClip as err:
            self._skip(str(err), clip.shard, clip.display_key)
        except Exception as err:  # anything unforeseen in one clip must not end the run
            self._skip(f"decode error: {type(err).__name__}: {err}", clip.shard,
                       clip.display_key)
        return None

    def _skip(self, reason: str, shard: str, key: str, clips: int = 1) -> None:
        self.skipped[reason.split(":")[0]] += clips
        log.warning("skipping %s/%s: %s", shard, key, reason)

    def decode(self, clip: Clip, rng: np.random.Generator) -> dict:
        """One clip's members -> a sample; raises SkipClip with the reason."""
        spec = self.spec
        meta = clip_meta(clip)
        try:
            wave, repairs = decode_audio(clip.members["flac"])
        except MediaError as err:
            raise SkipClip(f"corrupt audio: {err}") from None
        if len(wave) < MIN_SAMPLES:
            raise SkipClip(f"audio too short: {len(wave)} samples, fbank needs {MIN_SAMPLES}")
        for repair in repairs:
            log.info("%s/%s: %s", clip.shard, clip.display_key, repair)
        sample = {"labels": self._labels(meta, clip), "key": clip.display_key}
        if spec.audio_only or len(wave) <= audio_samples(spec.audio_frames):
            sample["audio"] = self._audio(wave, rng)  # the whole clip is heard
            if not spec.audio_only:
                sample["video"], _ = self._video(clip, meta, rng)
        else:  # longer than the audio window: the video window first, the audio around it
            sample["video"], window = self._video(clip, meta, rng)
            sample["audio"] = self._audio(wave, rng, window)
        return sample

    def _audio(self, wave: np.ndarray, rng: np.random.Generator,
               video_window: tuple[float, float] | None = None) -> torch.Tensor:
        spec = self.spec
        wave = wave[audio_segment(len(wave), spec.audio_frames, video_window, spec.train, rng)]
        if spec.train and spec.roll:
            wave = np.roll(wave, int(rng.integers(len(wave))))
        fbank = kaldi_fbank(torch.from_numpy(wave), SAMPLE_RATE, spec.mel_bins)
        fbank = crop_or_pad(fbank, spec.audio_frames)
        return normalize(fbank, spec.audio_mean, spec.audio_std)[None]  # (1, T, F)

    def _video(self, clip: Clip, meta: dict,
               rng: np.random.Generator) -> tuple[torch.Tensor, tuple[float, float] | None]:
        """The clip's frames and the window they were sampled in (start, span in seconds; None
        where the clip's duration was not known and the frames span the whole clip)."""
        spec = self.spec
        ext = next((e for e in VIDEO_EXTENSIONS if e in clip.members), None)
        if ext is None:
            raise SkipClip("missing video")
        data = clip.members[ext]
        duration = float(meta.get("duration") or 0.0)
        try:
            frames, window = None, None
            if duration > 0:
                start = window_start(duration, spec.video_seconds, spec.train, rng)
                span = min(spec.video_seconds, duration)
                try:  # converts only the frames it keeps
                    frames, _ = decode_video(data, start, start + span,
                                             at=sample_times(start, span, spec.video_frames))
                    window = (start, span)
                except MediaError:  # window past the real end (wrong duration): decode it all
                    pass  # (a damaged file fails again there, and is skipped)
            if frames is None:  # no or a wrong duration: sample over the whole clip
                frames, times = decode_video(data)
                frames = frames[pick_frames(sample_times(0.0, shown_until(times),
                                                         spec.video_frames), times)]
        except MediaError as err:
            raise SkipClip(f"corrupt video: {err}") from None
        return resize_crop(torch.from_numpy(frames), spec.video_size, spec.train, rng), window

    def _labels(self, meta: dict, clip: Clip) -> torch.Tensor:
        target = torch.zeros(len(self.labels))
        for label in meta.get("labels", []):
            index = self.label_index.get(label) if isinstance(label, str) else label
            if isinstance(index, int) and 0 <= index < len(self.labels):
                target[index] = 1.0
            elif self.labels:
                log.warning("%s/%s: label %r is not in the dataset index", clip.shard,
                            clip.display_key, label)
        return target


def clip_meta(clip: Clip) -> dict:
    """A clip's json, checked along with its audio member; raises SkipClip."""
    if "json" not in clip.members:
        raise SkipClip("missing json")
    try:
        meta = json.loads(clip.members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SkipClip(f"corrupt json: {err}") from None
    if not isinstance(meta, dict):
        raise SkipClip(f"corrupt json: a {type(meta).__name__}, not an object")
    if "flac" not in clip.members:
        raise SkipClip("missing audio")
    return meta


def audio_samples(frames: int) -> int:
    """The waveform samples fbank turns into `frames` frames (25 ms windows every 10 ms at
    16 kHz): 164,080, 10.255 s, for AudioMAE's 1024."""
    return (frames - 1) * SAMPLE_RATE // 100 + SAMPLE_RATE * 25 // 1000


def audio_segment(samples: int, frames: int, video_window: tuple[float, float] | None,
                  train: bool, rng: np.random.Generator) -> slice:
    """The part of a waveform of `samples` samples that the fbank of `frames` frames is taken
    from: all of it when it is no longer (AudioSet's 10 s clips); else a segment that long
    which holds the video window (start, span in seconds), or lies inside it when the window is
    longer, so audio and video show the same moment; random in training, centred otherwise.
    Cropping first also keeps the fbank of a long recording from running over all of it."""
    need = audio_samples(frames)
    if samples <= need:
        return slice(None)
    lo, hi = 0, samples - need
    if video_window is not None:
        start, span = (round(t * SAMPLE_RATE) for t in video_window)
        ends = sorted((start, start + span - need))  # segment start = window start or end
        lo, hi = (min(max(bound, 0), samples - need) for bound in ends)
    first = int(rng.integers(lo, hi + 1)) if train else (lo + hi) // 2
    return slice(first, first + need)


def round_robin(worker_batches: list[int]) -> Iterator[list[int]]:
    """The turns in which a DataLoader delivers its workers' batches, given each worker's batch
    count: one batch from each worker with data left, in worker order."""
    left = list(worker_batches)
    while any(left):
        turn = [w for w, n in enumerate(left) if n]
        for w in turn:
            left[w] -= 1
        yield turn


def collate(samples: list[dict]) -> dict:
    batch = {"keys": [s["key"] for s in samples],
             "audio": torch.stack([s["audio"] for s in samples]),
             "labels": torch.stack([s["labels"] for s in samples])}
    if "video" in samples[0]:
        batch["video"] = torch.stack([s["video"] for s in samples])
    return batch


def to_device(batch: dict, device: torch.device, spec: LoaderSpec,
              stream: torch.cuda.Stream | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch's (audio, video) on `device`, the video normalised there: it travels as uint8,
    a quarter of float32's bytes through pinned memory and to the GPU.

    With a CUDA `stream` (the trainer's copy stream), the copies and the normalisation run on
    it, and the current stream waits for them: on the GPU they overlap the kernels of the
    pass before, which a copy on the current stream would queue behind."""
    if stream is None or batch["audio"].is_cuda:  # the DALI loader's GPU batches: made on
        return _moved(batch, device, spec)          # the current stream, nothing to copy
    # No wait for the current stream first: the source is host memory, and the copy stream's
    # allocations reuse only blocks whose uses on other streams are recorded and done.
    current = torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        moved = _moved(batch, device, spec)
    current.wait_stream(stream)
    for tensor in moved:
        if tensor is not None:  # made on the copy stream, used and freed on the current one
            tensor.record_stream(current)
    return moved


def _moved(batch: dict, device: torch.device, spec: LoaderSpec):
    video = batch.get("video")
    if video is not None:
        video = normalize_video(video.to(device, non_blocking=True), spec.video_mean,
                                spec.video_std)
    return batch["audio"].to(device, non_blocking=True), video


def _worker_init(_, trainer: int):
    """Each DataLoader worker's set-up; `trainer` is the pid of the process that built the
    loader (the worker's parent, unless a fork server started it)."""
    torch.set_num_threads(1)  # workers decode in parallel; one thread each avoids oversubscription
    # Ctrl-C, or a scheduler's SIGTERM to the job, reaches the whole process group: the trainer
    # stops after its step and shuts the workers down, so a worker leaves both to it (it
    # inherited the trainer's handler, which logged the stop once per worker and kept the worker
    # going; killed by them, it would fail the trainer's step). A SIGTERM from the trainer itself
    # is the DataLoader's terminate() for a worker that did not stop when asked: that one ends
    # the worker, as torch's own worker handler does (ignored, it left the trainer's exit
    # waiting on a worker stuck in a decoder).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # not on macOS: no sender to tell apart there
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # for every thread from here on
    threading.Thread(target=_exit_on_trainers_sigterm, args=(trainer,), daemon=True,
                     name="sigterm").start()


def _exit_on_trainers_sigterm(trainer: int) -> None:
    """Takes each SIGTERM sent to this worker (blocked in every thread); exits when `trainer`
    sent it."""
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == trainer:
            os._exit(0)  # exit code 0: the trainer's DataLoader reports no failed worker


def build_loader(dataset: ShardDataset, batch_size: int, num_workers: int = 2,
                 drop_last: bool | None = None) -> DataLoader:
    """A DataLoader over `dataset`; drops the last partial batch in training by default."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                      drop_last=dataset.spec.train if drop_last is None else drop_last,
                      pin_memory=torch.cuda.is_available(),
                      worker_init_fn=functools.partial(_worker_init, trainer=os.getpid()),
                      persistent_workers=False,
                      prefetch_factor=4 if num_workers else None)
