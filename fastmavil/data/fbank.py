"""Kaldi-compatible log-mel filterbank in plain torch (CPU or CUDA, batched).

``kaldi_fbank`` reproduces the features AudioMAE, AST and CAV-MAE compute with::

    waveform = waveform - waveform.mean()
    torchaudio.compliance.kaldi.fbank(waveform, htk_compat=True, sample_frequency=16000,
                                      use_energy=False, window_type="hanning",
                                      num_mel_bins=128, dither=0.0, frame_shift=10)

i.e. the Kaldi settings:

- 25 ms frames every 10 ms, ``snip_edges=True``: only whole frames, ``1 + (samples - window) //
  shift`` of them, none if the waveform is shorter than one window;
- per frame: remove the DC offset, pre-emphasis 0.97, symmetric Hann window ("hanning"), zero-pad
  to the next power of two (400 -> 512 samples at 16 kHz), power spectrum;
- triangular filters equally spaced on Kaldi's mel scale ``1127 ln(1 + f / 700)`` from 20 Hz to
  Nyquist; log with the energies floored at ``float32`` epsilon;
- no dither, no energy term (so ``htk_compat`` changes nothing).

AudioMAE conventions: the waveform is the float signal in [-1, 1] as loaded (no 32768 scaling)
with its mean removed first (done here, per waveform; the per-frame DC removal makes this nearly a
no-op, it is kept for fidelity); the features are then cropped or zero-padded to a fixed number of
frames (``crop_or_pad``) and only after that normalised with the AudioSet statistics
(``normalize``).

Unlike torchaudio, which takes ``(channels, samples)`` and silently uses channel 0 only, every
leading index here is a separate waveform: pick or mix channels before calling.
"""

import math
from functools import lru_cache

import torch

AUDIOSET_MEAN = -4.268
AUDIOSET_STD = 4.569

LOW_FREQ = 20.0  # Hz, Kaldi's default lower edge of the first mel filter
PREEMPHASIS = 0.97
ENERGY_FLOOR = torch.finfo(torch.float32).eps  # Kaldi: std::numeric_limits<float>::epsilon()


def _mel(freq: torch.Tensor) -> torch.Tensor:
    """Kaldi's mel scale, ``1127 ln(1 + f / 700)``."""
    return 1127.0 * torch.log1p(freq / 700.0)


def mel_banks(sample_rate: int, n_fft: int, num_mel_bins: int) -> torch.Tensor:
    """Kaldi's triangular mel filters, ``(num_mel_bins, n_fft // 2)`` float64 weights.

    Filter ``m`` rises from mel point ``m`` to ``m + 1`` and falls to ``m + 2`` of ``num_mel_bins
    + 2`` points equally spaced in mel between ``LOW_FREQ`` and Nyquist. The triangles are linear
    in mel (not in Hz). Kaldi only uses FFT bins ``0 .. n_fft / 2 - 1``: the Nyquist bin gets no
    weight. With many bins a low filter can fall between two FFT bins and be all zero; its
    log-energy is then the floor (torchaudio allows that, Kaldi refuses it).
    """
    mel_low, mel_high = _mel(torch.tensor([LOW_FREQ, sample_rate / 2], dtype=torch.float64))
    step = (mel_high - mel_low) / (num_mel_bins + 1)
    points = mel_low + step * torch.arange(num_mel_bins + 2, dtype=torch.float64)
    left, center, right = points[:-2, None], points[1:-1, None], points[2:, None]
    mel = _mel(torch.arange(n_fft // 2, dtype=torch.float64) * (sample_rate / n_fft))
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    return torch.minimum(up, down).clamp(min=0.0)


@lru_cache(maxsize=16)
def _constants(device: torch.device, sample_rate: int, window: int, n_fft: int,
               num_mel_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hann window, transposed mel banks) as float32 on ``device``; built once per setting."""
    # Kaldi's "hanning" is the symmetric Hann window: 0.5 - 0.5 cos(2 pi n / (N - 1)).
    n = torch.arange(window, dtype=torch.float64)
    hann = 0.5 - 0.5 * torch.cos(2 * math.pi * n / (window - 1))
    banks = mel_banks(sample_rate, n_fft, num_mel_bins).T.contiguous()
    return hann.to(device, torch.float32), banks.to(device, torch.float32)


def kaldi_fbank(waveform: torch.Tensor, sample_rate: int = 16000, num_mel_bins: int = 128,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0) -> torch.Tensor:
    """Log-mel filterbank of ``(..., samples)`` -> ``(..., frames, num_mel_bins)`` float32.

    Leading dims are a batch; each waveform has its own mean removed first (AudioMAE). Computed
    in float32 whatever the floating input dtype, on the waveform's device.
    """
    if not waveform.is_floating_point():
        raise TypeError(f"kaldi_fbank needs a floating-point waveform, got {waveform.dtype}")
    if waveform.dim() == 0:
        raise ValueError("kaldi_fbank needs a waveform of shape (..., samples), got a scalar")
    if sample_rate <= 2 * LOW_FREQ:
        raise ValueError(f"sample_rate={sample_rate} must exceed {2 * LOW_FREQ:g} Hz: the mel "
                         f"filters start at {LOW_FREQ:g} Hz and end at Nyquist")
    if num_mel_bins < 1:
        raise ValueError(f"num_mel_bins={num_mel_bins} must be >= 1")
    # Same rounding as Kaldi and torchaudio: truncate to whole samples.
    window = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    if window < 2:
        raise ValueError(f"frame_length_ms={frame_length_ms} at sample_rate={sample_rate} gives "
                         f"a {window}-sample window; need >= 2")
    if shift < 1:
        raise ValueError(f"frame_shift_ms={frame_shift_ms} at sample_rate={sample_rate} gives "
                         f"a {shift}-sample shift; need >= 1")
    n_fft = 1 << (window - 1).bit_length()  # round_to_power_of_two
    hann, banks = _constants(waveform.device, sample_rate, window, n_fft, num_mel_bins)

    if waveform.shape[-1] < window:  # snip_edges: no partial frames
        return waveform.new_zeros(*waveform.shape[:-1], 0, num_mel_bins, dtype=torch.float32)
    x = waveform.to(torch.float32)
    x = x - x.mean(dim=-1, keepdim=True)
    frames = x.unfold(-1, window, shift)  # (..., frames, window), a view
    frames = frames - frames.mean(dim=-1, keepdim=True)  # remove_dc_offset
    # Kaldi's pre-emphasis: x[i] -= 0.97 * x[i - 1], and the first sample uses itself.
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = (frames - PREEMPHASIS * previous) * hann
    power = torch.fft.rfft(frames, n=n_fft).abs().square()  # zero-padded to n_fft
    mel = power[..., : n_fft // 2] @ banks  # the Nyquist bin has no weight in Kaldi
    return mel.clamp(min=ENERGY_FLOOR).log()


def crop_or_pad(fbank: torch.Tensor, target_frames: int) -> torch.Tensor:
    """Crop the frames axis (-2) to ``target_frames``, or zero-pad it at the end.

    AudioMAE pads with zeros (``ZeroPad2d``) on the log-mel *before* ``normalize``, so padded
    frames become ``-mean / (2 * std)`` after normalisation, not zero; keep that order.
    """
    if target_frames < 0:
        raise ValueError(f"target_frames={target_frames} must be >= 0")
    missing = target_frames - fbank.shape[-2]
    if missing <= 0:
        return fbank[..., :target_frames, :]
    return torch.nn.functional.pad(fbank, (0, 0, 0, missing))


def normalize(fbank: torch.Tensor, mean: float = AUDIOSET_MEAN,
              std: float = AUDIOSET_STD) -> torch.Tensor:
    """AST/AudioMAE normalisation ``(fbank - mean) / (2 * std)`` (AudioSet stats by default)."""
    return (fbank - mean) / (2 * std)


def padded_fbank(waves: torch.Tensor, lengths: torch.Tensor, target_frames: int,
                 sample_rate: int = 16000, num_mel_bins: int = 128) -> torch.Tensor:
    """``crop_or_pad(kaldi_fbank(w[:n]), target_frames)`` for each row w and length n of a
    zero-padded batch ``waves (B, N)``, ``lengths (B,)``, in one call on the batch's device
    (the DALI loader's audio, decoded to one padded batch): each row's mean is taken over its
    own samples, and its frames past the last whole window of them are zeros, as the padding.
    No host sync: the lengths stay on the device."""
    if waves.dim() != 2 or lengths.shape != waves.shape[:1]:
        raise ValueError(f"padded_fbank takes waves (B, N) and lengths (B,), got "
                         f"{tuple(waves.shape)} and {tuple(lengths.shape)}")
    window, shift = int(sample_rate * 0.025), int(sample_rate * 0.010)  # kaldi_fbank's defaults
    lengths = lengths.to(waves.device)
    valid = torch.arange(waves.shape[-1], device=waves.device) < lengths[:, None]
    x = waves.to(torch.float32) * valid
    x = (x - x.sum(-1, keepdim=True) / lengths.clamp(min=1)[:, None]) * valid  # its own mean
    # kaldi_fbank removes the (now zero) mean again, which the padding's zeros leave at zero
    fbank = kaldi_fbank(x, sample_rate, num_mel_bins)
    whole = 1 + (lengths - window).div(shift, rounding_mode="floor")  # windows in each row
    frames = torch.where(lengths >= window, whole, 0)
    kept = torch.arange(fbank.shape[-2], device=waves.device) < frames[:, None]
    return crop_or_pad(fbank * kept[..., None], target_frames)
