"""kaldi_fbank against kaldi-native-fbank, an independent C++ port of Kaldi's fbank.

kaldi-native-fbank does not subtract the waveform mean (AudioMAE does, inside kaldi_fbank), so it
is always given the mean-subtracted waveform here.

Both sides compute in float32 with different FFTs, so a bin whose power is ~1e-9 of its frame's
strongest bin is rounding noise in both; its log is compared loosely (NOISE_TOL) and only bins
within DYNAMIC_RANGE nats of the frame maximum are held to TOL. Bins at the log floor are
compared exactly.
"""

import math

import numpy as np
import pytest
import torch

from fastmavil.data.fbank import (AUDIOSET_MEAN, AUDIOSET_STD, crop_or_pad, kaldi_fbank,
                                  mel_banks, normalize, padded_fbank)

try:
    import kaldi_native_fbank as knf
except ImportError:  # the tests that need no reference still run (the CUDA one, say)
    knf = None
needs_knf = pytest.mark.skipif(knf is None, reason="kaldi-native-fbank (the dev extra) is the "
                               "reference Kaldi implementation and is not installed")

SR = 16000
TOL = 5e-3
NOISE_TOL = 0.05
DYNAMIC_RANGE = 20.0  # nats below the frame's maximum log-energy (~87 dB)
LOG_FLOOR = math.log(torch.finfo(torch.float32).eps)


def knf_fbank(wave: np.ndarray, num_bins: int) -> np.ndarray:
    """Kaldi fbank with the AudioMAE settings, every option set explicitly."""
    opts = knf.FbankOptions()
    frame = opts.frame_opts
    frame.samp_freq = SR
    frame.frame_length_ms = 25.0
    frame.frame_shift_ms = 10.0
    frame.dither = 0.0  # the default is 3e-5
    frame.preemph_coeff = 0.97
    frame.remove_dc_offset = True
    frame.window_type = "hanning"  # the default is "povey"
    frame.round_to_power_of_two = True
    frame.snip_edges = True
    mel = opts.mel_opts
    mel.num_bins = num_bins
    mel.low_freq = 20.0
    mel.high_freq = 0.0  # 0: Nyquist
    mel.htk_mode = False  # True would floor mel energies at 1
    mel.is_librosa = False
    opts.use_energy = False
    opts.htk_compat = True  # only moves the energy term, which is off
    opts.use_log_fbank = True
    opts.use_power = True
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(SR, wave.astype(np.float32))
    fb.input_finished()
    frames = [fb.get_frame(i) for i in range(fb.num_frames_ready)]
    return np.array(frames, dtype=np.float32).reshape(-1, num_bins)


def make_signal(name: str, length: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(length) / SR
    if name == "speech":  # 19 harmonics of a wobbling f0 under a 4 Hz syllable envelope
        f0 = 140 + 30 * np.sin(2 * np.pi * 3 * t)
        phase = 2 * np.pi * np.cumsum(f0) / SR
        voiced = sum(np.sin(k * phase) / k for k in range(1, 20))
        wave = 0.3 * voiced * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2
    elif name == "tone":
        wave = 0.5 * np.sin(2 * np.pi * 1000 * t + 0.3)
    elif name == "chirp":  # 50 Hz -> ~7.5 kHz over a second
        wave = 0.5 * np.sin(2 * np.pi * (50 * t + 3700 * t**2))
    elif name == "noise":
        wave = 0.1 * rng.standard_normal(length)
    elif name == "silence":
        wave = np.zeros(length)
    elif name == "mix":
        wave = (make_signal("speech", length, rng) + 0.2 * np.sin(2 * np.pi * 440 * t)
                + 0.01 * rng.standard_normal(length) + 0.05)  # and a DC offset
    else:
        raise ValueError(name)
    return wave.astype(np.float32)


def compare(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    err = np.abs(ours - ref)
    near_max = ref >= ref.max(axis=-1, keepdims=True) - DYNAMIC_RANGE
    assert err[near_max].max(initial=0.0) <= TOL
    assert err.max(initial=0.0) <= NOISE_TOL
    at_floor = (ours <= LOG_FLOOR + 1e-5) | (ref <= LOG_FLOOR + 1e-5)
    assert err[at_floor & near_max].max(initial=0.0) <= 1e-5


SIGNALS = ["speech", "tone", "chirp", "noise", "silence", "mix"]
# Lengths are not multiples of the 160-sample shift: the trailing partial frame must be dropped.
LENGTHS = dict(zip(SIGNALS, [16000, 12345, 16001, 9999, 4567, 20000 + 77]))


@needs_knf
@pytest.mark.parametrize("num_bins", [23, 40, 80, 120, 126])
@pytest.mark.parametrize("name", SIGNALS)
def test_matches_kaldi_native_fbank(name: str, num_bins: int) -> None:
    wave = make_signal(name, LENGTHS[name], np.random.default_rng(SIGNALS.index(name)))
    ours = kaldi_fbank(torch.from_numpy(wave), SR, num_bins).numpy()
    assert ours.shape == (1 + (len(wave) - 400) // 160, num_bins)
    compare(ours, knf_fbank(wave - wave.mean(), num_bins))


def test_silence_and_constants_sit_at_the_floor() -> None:
    for value in (0.0, 0.25, 0.3):  # the mean and DC removal leave (almost) nothing
        out = kaldi_fbank(torch.full((2000,), value))
        assert out.shape == (11, 128)
        assert torch.all(out == torch.tensor(torch.finfo(torch.float32).eps).log())


@pytest.mark.parametrize("length, frames", [(0, 0), (399, 0), (400, 1), (559, 1), (560, 2)])
def test_frame_count_snip_edges(length: int, frames: int) -> None:
    wave = make_signal("noise", length, np.random.default_rng(1))
    ours = kaldi_fbank(torch.from_numpy(wave), num_mel_bins=40)
    assert ours.shape == (frames, 40)
    if length and knf is not None:  # the values too, where the Kaldi reference is installed
        compare(ours.numpy(), knf_fbank(wave - wave.mean(), 40))


def kaldi_mel_banks(num_bins: int, sample_rate: int, n_fft: int) -> np.ndarray:
    """Kaldi's MelBanks constructor, transcribed loop by loop from mel-computations.cc."""
    def mel(freq: float) -> float:
        return 1127.0 * math.log(1.0 + freq / 700.0)

    mel_low, mel_high = mel(20.0), mel(sample_rate / 2)
    delta = (mel_high - mel_low) / (num_bins + 1)
    banks = np.zeros((num_bins, n_fft // 2))
    for m in range(num_bins):
        left, center, right = (mel_low + i * delta for i in (m, m + 1, m + 2))
        for k in range(n_fft // 2):
            x = mel(k * sample_rate / n_fft)
            if left < x < right:
                if x <= center:
                    banks[m, k] = (x - left) / (center - left)
                else:
                    banks[m, k] = (right - x) / (right - center)
    return banks


@pytest.mark.parametrize("num_bins, sample_rate, n_fft", [(128, 16000, 512), (40, 8000, 256)])
def test_mel_banks_match_kaldi_formula(num_bins: int, sample_rate: int, n_fft: int) -> None:
    expected = kaldi_mel_banks(num_bins, sample_rate, n_fft)
    np.testing.assert_allclose(mel_banks(sample_rate, n_fft, num_bins).numpy(), expected,
                               rtol=0, atol=1e-12)


@needs_knf
def test_128_bins_empty_filter_sits_at_the_floor() -> None:
    # Kaldi refuses 128 bins at 16 kHz (a filter covers no FFT bin); torchaudio, and so AudioMAE,
    # accepts it and that bin is log(eps) in every frame.
    with pytest.raises(Exception, match="num_mel_bins too large"):
        knf_fbank(np.zeros(400, np.float32), 128)
    empty = kaldi_mel_banks(128, SR, 512).sum(axis=1) == 0
    assert empty.any()
    wave = make_signal("noise", 16000, np.random.default_rng(2))
    out = kaldi_fbank(torch.from_numpy(wave))
    assert out.shape == (98, 128)
    floor = torch.tensor(torch.finfo(torch.float32).eps).log()
    assert torch.all(out[:, empty] == floor)
    assert torch.isfinite(out).all()
    # Pre-emphasis nearly removes the lowest bins, so "above the floor" is all one can ask there.
    assert torch.all(out[:, ~empty] > floor)


def test_batched_equals_per_item() -> None:
    gen = torch.Generator().manual_seed(3)
    waves = 0.1 * torch.randn(2, 3, 5000, generator=gen) + torch.rand(2, 3, 1, generator=gen)
    batched = kaldi_fbank(waves, num_mel_bins=64)
    assert batched.shape == (2, 3, 29, 64)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(batched[i, j], kaldi_fbank(waves[i, j], num_mel_bins=64))


def test_float64_input_gives_float32() -> None:
    wave = torch.from_numpy(make_signal("mix", 8000, np.random.default_rng(4)))
    out = kaldi_fbank(wave.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, kaldi_fbank(wave))


def test_crop_or_pad() -> None:
    fbank = torch.randn(2, 10, 4)
    torch.testing.assert_close(crop_or_pad(fbank, 6), fbank[:, :6])
    torch.testing.assert_close(crop_or_pad(fbank, 10), fbank)
    padded = crop_or_pad(fbank, 13)
    assert padded.shape == (2, 13, 4)
    torch.testing.assert_close(padded[:, :10], fbank)
    assert torch.all(padded[:, 10:] == 0)
    with pytest.raises(ValueError, match="target_frames=-1"):
        crop_or_pad(fbank, -1)


def test_normalize() -> None:
    fbank = torch.randn(5, 8)
    torch.testing.assert_close(normalize(fbank, 1.5, 2.0), (fbank - 1.5) / 4.0)
    torch.testing.assert_close(normalize(fbank),
                               (fbank - AUDIOSET_MEAN) / (2 * AUDIOSET_STD))
    assert (AUDIOSET_MEAN, AUDIOSET_STD) == (-4.268, 4.569)


def test_bad_inputs_name_the_value() -> None:
    wave = torch.zeros(1600)
    with pytest.raises(TypeError, match="torch.int16"):
        kaldi_fbank(torch.zeros(1600, dtype=torch.int16))
    with pytest.raises(ValueError, match="scalar"):
        kaldi_fbank(torch.tensor(0.0))
    with pytest.raises(ValueError, match="sample_rate=40"):
        kaldi_fbank(wave, sample_rate=40)
    with pytest.raises(ValueError, match="num_mel_bins=0"):
        kaldi_fbank(wave, num_mel_bins=0)
    with pytest.raises(ValueError, match="frame_length_ms=0.1 .* 1-sample window"):
        kaldi_fbank(wave, frame_length_ms=0.1)
    with pytest.raises(ValueError, match="frame_shift_ms=0.05 .* 0-sample shift"):
        kaldi_fbank(wave, frame_shift_ms=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: compares the CUDA fbank with the CPU one")
def test_cuda_matches_cpu() -> None:
    rng = np.random.default_rng(5)
    waves = torch.from_numpy(np.stack([make_signal(n, 16000, rng) for n in ("mix", "noise")]))
    cpu = kaldi_fbank(waves)
    gpu = kaldi_fbank(waves.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-3)


def test_padded_fbank_is_each_rows_own_fbank_cropped_or_padded():
    """The DALI loader's batched fbank: row by row, its own mean, its own whole windows, zeros
    after them; lengths under one window (none), at one window, and longer than the target."""
    gen = torch.Generator().manual_seed(3)
    lengths = [16000, 0, 399, 400, 5123, 9001]
    waves = torch.zeros(len(lengths), 16100)
    for row, n in enumerate(lengths):
        waves[row, :n] = 0.3 + torch.rand(n, generator=gen) * 2 - 1  # off-centre: a mean to remove
    out = padded_fbank(waves, torch.tensor(lengths), 60, num_mel_bins=64)
    assert out.shape == (6, 60, 64)
    for row, n in enumerate(lengths):
        expected = crop_or_pad(kaldi_fbank(waves[row, :n], num_mel_bins=64), 60)
        torch.testing.assert_close(out[row], expected, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"waves \(B, N\) and lengths \(B,\)"):
        padded_fbank(waves, torch.tensor(lengths[:2]), 60)
