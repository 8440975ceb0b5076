"""Video sampling: 16 frames evenly over a 4 s window, resized, cropped and normalised.

The window starts at random in training and is centred for evaluation. Frame i is the frame on
screen at time start + (i + 1/2) * window / 16. A clip shorter than the window is sampled over
its whole length instead, so its frames repeat (a clip with a single frame repeats it 16 times);
nothing is padded with blank frames.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def window_start(duration: float, window: float, train: bool, rng: np.random.Generator) -> float:
    """Start of the sampled window: uniform over the clip in training, centred otherwise."""
    slack = max(duration - window, 0.0)
    return float(rng.uniform(0.0, slack)) if train else slack / 2


def sample_times(start: float, span: float, num_frames: int) -> np.ndarray:
    """num_frames times evenly over [start, start + span), at the centres of equal intervals."""
    return start + (np.arange(num_frames) + 0.5) * span / num_frames


def shown_until(frame_times: np.ndarray) -> float:
    """When the last frame stops being shown: its start plus one frame period (the median gap;
    1 s for a single frame), so that sampling over [0, shown_until) reaches the last frame."""
    period = float(np.median(np.diff(frame_times))) if len(frame_times) > 1 else 1.0
    return float(frame_times[-1]) + period


def pick_frames(times: np.ndarray, frame_times: np.ndarray) -> np.ndarray:
    """Index of the frame on screen at each time (the last one shown at or before it)."""
    return np.clip(np.searchsorted(frame_times, times, side="right") - 1, 0, len(frame_times) - 1)


def resize_crop(frames: torch.Tensor, size: int, train: bool,
                rng: np.random.Generator) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, size, size) uint8: the short side resized to `size`, then a
    random (training) or centred (evaluation) square crop.

    The resize (bilinear, antialiased) runs on the uint8 frames, as torchvision resizes uint8
    images: within one level of resizing in float, and on a CPU about 10x faster (0.2 instead of
    2 ms for a 256x256 frame to 224x224)."""
    x = frames.permute(0, 3, 1, 2)                              # (T, 3, H, W), channels last
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False,
                          antialias=True)
    top = int(rng.integers(new_h - size + 1)) if train else (new_h - size) // 2
    left = int(rng.integers(new_w - size + 1)) if train else (new_w - size) // 2
    return x[..., top:top + size, left:left + size].permute(1, 0, 2, 3).contiguous()


def normalize_video(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(..., 3, T, H, W) uint8 -> float32 per-channel (x / 255 - mean) / std, on x's device (the
    loader hands over uint8 video: a quarter of float32's bytes between processes and to the
    GPU, where this runs). Channel by channel with Python numbers: a mean or std tensor made
    from the host each step would be a copy that waits for the GPU."""
    if x.dtype != torch.uint8:  # float input would be changed in place
        raise TypeError(f"normalize_video takes uint8 video, got {x.dtype}")
    x = x.float().div_(255.0)
    for c, (m, s) in enumerate(zip(mean, std)):
        x.select(-4, c).sub_(m).div_(s)
    return x
