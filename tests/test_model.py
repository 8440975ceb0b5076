import pytest
import torch

from fastmavil.models import build_model
from fastmavil.models.swin import CosineWindowBlock, WindowBlock

from conftest import tiny_batch, tiny_config

VARIANTS = [("mavil", "self"), ("mavil", "cross"), ("diffmavil", "self"), ("diffmavil", "cross"),
            ("audiomae", "self"), ("audiomae_diff", "self")]


@pytest.mark.parametrize("variant, attention", VARIANTS + [("diffmavil", "swinv2cr")])
def test_every_trainable_parameter_gets_a_gradient(variant, attention):
    """Every variant; the last case runs the audio decoder with AudioMAE's Swin-V2-CR blocks."""
    block = {"audio_decoder_block": attention} if attention == "swinv2cr" else {}
    cfg = tiny_config(variant, "cross" if block else attention, **block)
    model = build_model(cfg)
    audio, video = tiny_batch(cfg)
    out = model(audio, video)
    assert torch.isfinite(out.loss)
    expected_terms = {"mse_audio"} | ({"mse_video", "inter", "intra"} if cfg.model.has_video else set())
    assert set(out.terms) == expected_terms
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    names = dict(model.named_parameters())
    diffusion = variant in ("diffmavil", "audiomae_diff")
    assert ("audio_decoder.noisy_embed.weight" in names) == diffusion
    assert ("audio_decoder.mask_token" in names) == (not diffusion)
    assert ("video_encoder.patch_embed.proj.weight" in names) == cfg.model.has_video


def test_variants_wire_the_paper_components():
    model = build_model(tiny_config("diffmavil", "cross"))
    assert model.audio_encoder.patch_embed.mask_first and model.diffusion is not None
    assert model.video_decoder.attention == "cross" and model.audio_decoder.attention == "window"
    shifts = [b.shift for b in model.audio_decoder.blocks]
    assert shifts == [(0, 0), (2, 0)]  # Swin: plain, then shifted windows
    assert all(type(b) is WindowBlock for b in model.audio_decoder.blocks)
    audiomae_blocks = build_model(tiny_config("diffmavil", "cross",
                                              audio_decoder_block="swinv2cr"))
    assert all(isinstance(b, CosineWindowBlock) for b in audiomae_blocks.audio_decoder.blocks)
    mavil = build_model(tiny_config("mavil", "self"))
    assert not mavil.audio_encoder.patch_embed.mask_first and mavil.diffusion is None
    assert len(mavil.fusion.blocks) == 2


def test_forward_is_deterministic_given_a_generator():
    cfg = tiny_config()
    model = build_model(cfg)
    audio, video = tiny_batch(cfg)
    a = model(audio, video, generator=torch.Generator().manual_seed(3)).loss
    b = model(audio, video, generator=torch.Generator().manual_seed(3)).loss
    c = model(audio, video, generator=torch.Generator().manual_seed(4)).loss
    assert a == b and a != c


def test_single_view_without_intra_modal_term():
    cfg = tiny_config()
    cfg.loss.intra_weight = 0.0
    model = build_model(cfg)
    out = model(*tiny_batch(cfg))
    assert model.views == 1 and "intra" not in out.terms and "inter" in out.terms


def test_bad_input_shapes_are_named():
    cfg = tiny_config()
    model = build_model(cfg)
    audio, video = tiny_batch(cfg)
    with pytest.raises(ValueError, match=r"audio batch has shape \(3, 1, 64, 128\); the model "
                                         r"config expects \(B, 1, 128, 128\)"):
        model(audio[:, :, :64], video)
    with pytest.raises(ValueError, match="needs a video batch"):
        model(audio)
    with pytest.raises(ValueError, match="video batch has shape"):
        model(audio, video[:, :, :2])


def test_encoder_without_masking_returns_every_token():
    cfg = tiny_config()
    model = build_model(cfg)
    audio, _ = tiny_batch(cfg)
    out = model.audio_encoder(audio)
    assert out.shape == (3, 64, cfg.model.encoder_dim)


def test_small_diffmavil_overfits_one_batch():
    torch.manual_seed(0)
    cfg = tiny_config("diffmavil", "cross")
    model = build_model(cfg)
    audio, video = tiny_batch(cfg, batch=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(100):
        # the same masks, timesteps and noise every step: one fixed batch to memorise
        out = model(audio, video, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])
