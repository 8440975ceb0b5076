"""Fine-tuning augmentations of an fbank batch (B, 1, T, F) on its device (paper Table 4).

In AudioMAE's order: SpecAugment and the noise per clip, then mixup or cutmix over the batch.
Every draw comes from the caller's generator, so a seeded run repeats its augmentations.
"""
from __future__ import annotations

import torch


def _uniform(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def spec_augment(x: torch.Tensor, max_time: int, max_freq: int, fill: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One time mask and one frequency mask per clip (torchaudio's TimeMasking and
    FrequencyMasking, as AST and AudioMAE apply them): width w ~ U[0, max), start ~ U[0, size - w),
    the masked bins set to `fill`. AudioMAE masks before normalising, so `fill` is what a raw 0
    normalises to, (0 - mean) / (2 std)."""
    b, _, time, freq = x.shape
    keep = torch.ones(b, time, freq, dtype=torch.bool, device=x.device)
    for axis, size, most in ((1, time, max_time), (2, freq, max_freq)):
        if most <= 0:
            continue
        width = (_uniform(b, generator, x.device) * min(most, size)).long()
        start = (_uniform(b, generator, x.device) * (size - width)).long()
        at = torch.arange(size, device=x.device)
        inside = (at >= start[:, None]) & (at < (start + width)[:, None])  # (B, size)
        keep &= ~(inside[:, :, None] if axis == 1 else inside[:, None, :])
    return torch.where(keep[:, None], x, torch.as_tensor(fill, dtype=x.dtype, device=x.device))


def spec_noise(x: torch.Tensor, generator: torch.Generator | None = None,
               max_shift: int = 10) -> torch.Tensor:
    """Table 4's "N" as AudioMAE's noise option: fbank + U(0, 1) * a / 10 per bin, a ~ U(0, 1)
    per clip, then the clip rolled along time by a whole number of frames in
    [-max_shift, max_shift)."""
    b, _, time, _ = x.shape
    scale = _uniform((b, 1, 1, 1), generator, x.device) / 10
    x = x + _uniform(x.shape, generator, x.device) * scale
    shift = (_uniform(b, generator, x.device) * 2 * max_shift).long() - max_shift
    source = (torch.arange(time, device=x.device) - shift[:, None]) % time  # (B, T)
    return x.gather(2, source[:, None, :, None].expand_as(x))


def mix_batch(x: torch.Tensor, targets: torch.Tensor, mixup: float, cutmix: float,
              switch_prob: float = 0.5, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al.) or cutmix (Yun et al.) of each clip with the batch's reverse, one
    lambda per batch (timm's Mixup in batch mode, as AudioMAE fine-tunes). With both on, cutmix
    for `switch_prob` of the batches. lambda ~ Beta(alpha, alpha); cutmix pastes a (T, F) box of
    sides sqrt(1 - lambda) times the fbank's and takes lambda from the box's real area.
    `generator` is a CPU one: the draws are per batch, decided on the host.
    Returns (x, targets, lambda); lambda 1 where both are off."""
    if mixup <= 0 and cutmix <= 0:
        return x, targets, 1.0
    use_cutmix = cutmix > 0 and (mixup <= 0 or float(_uniform((), generator, "cpu"))
                                 < switch_prob)
    alpha = cutmix if use_cutmix else mixup
    gamma = torch._standard_gamma(torch.full((2,), alpha, dtype=torch.float64),
                                  generator=generator)
    lam = float(gamma[0] / gamma.sum())  # Beta(alpha, alpha) from two gamma draws
    flipped = x.flip(0)
    if use_cutmix:
        time, freq = x.shape[-2:]
        cut = (1.0 - lam) ** 0.5
        h, w = int(time * cut), int(freq * cut)
        cy, cx = (int(v) for v in (_uniform((2,), generator, "cpu") * torch.tensor([time, freq])))
        t0, t1 = max(cy - h // 2, 0), min(cy + h // 2, time)
        f0, f1 = max(cx - w // 2, 0), min(cx + w // 2, freq)
        x = x.clone()
        x[..., t0:t1, f0:f1] = flipped[..., t0:t1, f0:f1]
        lam = 1.0 - (t1 - t0) * (f1 - f0) / (time * freq)
    else:
        x = x * lam + flipped * (1.0 - lam)
    return x, targets * lam + targets.flip(0) * (1.0 - lam), lam


def smooth_labels(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """timm's label smoothing of (multi-)hot targets: 1 -> 1 - s + s / K, 0 -> s / K."""
    if smoothing <= 0:
        return targets
    k = targets.shape[-1]
    return targets * (1.0 - smoothing) + smoothing / k
