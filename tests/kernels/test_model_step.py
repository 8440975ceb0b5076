"""A whole training step of a small DiffMAViL with the kernels on equals the reference step."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

import kernels  # noqa: E402
import kernels.diffuse_embed as diffuse_embed  # noqa: E402
from fastmavil.config import Config, ModelConfig  # noqa: E402
from fastmavil.diffusion import DiffusionSchedule  # noqa: E402
from fastmavil.models import MAViL, build_model  # noqa: E402


def small_config(variant):
    return Config(model=ModelConfig(variant=variant, size="tiny", encoder_dim=32, encoder_heads=2,
                                    encoder_depth=1, decoder_dim=32, decoder_depth=2,
                                    decoder_heads=2, audio_frames=64, mel_bins=64,
                                    video_frames=4, video_size=32,
                                    audio_decoder_window=(2, 2), audio_decoder_shift=(1, 0))
                  ).check()


@pytest.mark.parametrize("variant", ["diffmavil", "mavil"])
def test_fast_step_equals_reference_step(variant, monkeypatch):
    if not torch.cuda.is_available():
        assert kernels.can_launch("check", torch.zeros(1))  # really through the interpreter
    torch.manual_seed(0)
    cfg = small_config(variant)
    reference = build_model(cfg)
    fast = build_model(cfg)
    fast.load_state_dict(reference.state_dict())
    fast.use_kernels(True)
    audio = torch.randn(2, 1, 64, 64)
    video = torch.randn(2, 3, 4, 32, 32)

    # identical randomness on both paths: fixed timesteps, explicit noise instead of the seed
    timesteps = iter([torch.tensor([1, 1000]), torch.tensor([500, 7])] * 2)
    monkeypatch.setattr(DiffusionSchedule, "sample_timesteps", lambda *a, **k: next(timesteps))
    noises = {}

    def noise_for(shape):
        return noises.setdefault(tuple(shape), torch.randn(shape))

    real, calls = diffuse_embed.diffuse_embed_masked, []

    def with_noise(x, ids, t, alpha_bar, weight, bias, pos, patch, norm_pix, seed=None):
        calls.append(seed)
        return real(x, ids, t, alpha_bar, weight, bias, pos, patch, norm_pix,
                    noise=noise_for((ids.shape[0], ids.shape[1], weight[0].numel())))
    monkeypatch.setattr(diffuse_embed, "diffuse_embed_masked", with_noise)
    monkeypatch.setattr(MAViL, "_noise", staticmethod(lambda like, g: noise_for(like.shape)))

    outs = []
    for model in (reference, fast):
        out = model(audio, video, 0.75, generator=torch.Generator().manual_seed(3))
        out.loss.backward()
        outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_out, ref_grads), (fast_out, fast_grads) = outs
    assert len(calls) == (2 if variant == "diffmavil" else 0)  # the fused path really ran
    for key in ref_out.terms:
        torch.testing.assert_close(fast_out.terms[key], ref_out.terms[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_out.loss, ref_out.loss, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        scale = grad.abs().max().item() + 1e-12
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m: f"{name}: {m}")
