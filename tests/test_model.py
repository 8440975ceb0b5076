import pytest
import torch

from fastmavil.models import build_model
from fastmavil.models.attention import Block, CrossBlock
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


@pytest.mark.parametrize("variant, attention, block", [("diffmavil", "cross", "swin"),
                                                        ("mavil", "self", "swinv2cr")])
def test_bf16_residual_stream_stays_bf16_and_trains_as_the_fp32_one(variant, attention, block,
                                                                     monkeypatch):
    """train.residual_precision = bf16 under bf16 autocast (here the CPU's): every block of every
    encoder and decoder takes and returns bf16 tokens (the post-norm Swin-V2-CR blocks too), and
    the loss and gradients stay close to the fp32 stream's from the same weights and noise."""
    # CUDA's autocast runs LayerNorm in fp32 and returns fp32; the CPU's keeps the input's dtype:
    # do as CUDA does, so that a LayerNorm output added into the stream would turn it fp32
    layer_norm = torch.nn.functional.layer_norm
    monkeypatch.setattr(torch.nn.functional, "layer_norm",
                        lambda x, *args, **kw: layer_norm(x.float(), *args, **kw))
    cfg = tiny_config(variant, attention, audio_decoder_block=block)
    model = build_model(cfg)
    audio, video = tiny_batch(cfg)
    blocks = (Block, CrossBlock, WindowBlock)
    seen = set()

    def record(module, inputs, output):
        seen.add((type(module).__name__, inputs[0].dtype, output.dtype))

    for module in model.modules():
        if isinstance(module, blocks):
            module.register_forward_hook(record)

    def run(dtype):
        model.zero_grad(set_to_none=True)
        model.set_residual_dtype(dtype)
        seen.clear()
        torch.manual_seed(0)  # the Swin-V2-CR position MLP's dropout
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(audio, video, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        return out.loss.detach(), grads, set(seen)

    loss32, grads32, seen32 = run(None)
    loss16, grads16, seen16 = run(torch.bfloat16)
    kinds = {name for name, _, _ in seen16}
    assert kinds == {"Block", "CrossBlock" if attention == "cross" else "Block",
                     "CosineWindowBlock" if block == "swinv2cr" else "WindowBlock"}
    assert {(i, o) for _, i, o in seen16} == {(torch.bfloat16, torch.bfloat16)}
    assert {(i, o) for _, i, o in seen32} == {(torch.float32, torch.float32)}
    # bf16 rounding of the stream at each add: measured 5e-5 of the loss and 0.4-0.8 % of the
    # gradients' norm here
    assert torch.isfinite(loss16) and abs(loss16 - loss32) <= 2e-3 * abs(loss32)
    error = (grads16 - grads32).norm() / grads32.norm()
    assert error <= 0.03, f"gradients differ by {error:.2%} of their norm"
