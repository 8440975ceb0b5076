"""Random clips held in memory, standing in for a dataset when only speed is measured.

    fastmavil-train configs/r4.toml --data.random_clips 4096 --train.max_steps 50

trains on batches shaped as the loader's (audio fbank (B, 1, T, F) float32, video (B, 3, Fr,
H, W) uint8) without shards or a decoder: the trainer's throughput, MFU and memory on a machine
that has no dataset, or no PyAV (as the GPU image bench/gpu_check.sh runs on). The losses
mean nothing. Two batches' worth of samples are drawn once (in pinned memory where CUDA is
available, so the trainer's non-blocking copy to the GPU is as asynchronous as the loader's),
and each batch is a slice of them: the host spends nothing per step, so the step time is the
model's and the trainer's own.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .loader import LoaderSpec


class RandomClips:
    """`clips` random samples per epoch, in batches of up to `max_batch`: the trainer's
    dataset interface (spec, set_epoch, batches) without any I/O."""

    def __init__(self, clips: int, spec: LoaderSpec, max_batch: int, seed: int = 0):
        if clips < 1 or max_batch < 1:
            raise ValueError(f"clips = {clips} and max_batch = {max_batch} must be >= 1")
        self.clips, self.spec, self.max_batch = clips, spec, max_batch
        self.start = 0  # the first batch of the epoch (> 0 when resumed mid-epoch)
        gen = torch.Generator().manual_seed(seed)
        pool = 2 * max_batch
        # Normalised fbank values are about N(0, 0.5) (mean removed, divided by 2 std).
        audio = 0.5 * torch.randn(pool, 1, spec.audio_frames, spec.mel_bins, generator=gen)
        self.pool = {"audio": audio}
        if not spec.audio_only:
            self.pool["video"] = torch.randint(
                0, 256, (pool, 3, spec.video_frames, spec.video_size, spec.video_size),
                generator=gen, dtype=torch.uint8)
        if torch.cuda.is_available():
            self.pool = {k: v.pin_memory() for k, v in self.pool.items()}

    def set_epoch(self, epoch: int, resume_batches: int = 0, batch_size: int = 1,
                  num_workers: int = 0) -> int:
        """As ShardDataset.set_epoch: resumed mid-epoch, the batches go on from
        `resume_batches`; nothing is ever dropped (returns 0)."""
        if resume_batches < 0 or batch_size < 1:
            raise ValueError(f"resume_batches = {resume_batches}, batch_size = {batch_size}: "
                             "expected >= 0, >= 1")
        self.start = resume_batches
        return 0

    def batches(self, batch_size: int) -> Iterator[dict]:
        """This epoch's full batches of `batch_size` (the last partial one dropped, as the
        training loader does), alternating between the two halves of the pool."""
        if not 1 <= batch_size <= self.max_batch:
            raise ValueError(f"batch_size = {batch_size} must be in [1, {self.max_batch}]")
        for i in range(self.start, self.clips // batch_size):
            first = (i % 2) * self.max_batch
            yield {k: v[first:first + batch_size] for k, v in self.pool.items()}
