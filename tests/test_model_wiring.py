"""Wiring of the decoders and of MAViL's forward: which tokens, views and weights go where."""
import math

import pytest
import torch

from fastmavil.losses import info_nce
from fastmavil.masking import Masking, gather_tokens, random_masking
from fastmavil.models import build_model

from conftest import tiny_batch, tiny_config

# (variant, video decoder attention, decoder under test): self-attention, cross and window
# decoders, each with [MASK] tokens or diffused inputs where the variant has them.
DECODERS = [("mavil", "self", "video_decoder"), ("diffmavil", "self", "video_decoder"),
            ("diffmavil", "cross", "video_decoder"), ("audiomae", "self", "audio_decoder"),
            ("audiomae_diff", "self", "audio_decoder")]
DECODER_IDS = ["self-mask_token", "self-diffused", "cross-diffused", "window-mask_token",
               "window-diffused"]
TOL = dict(rtol=1e-5, atol=1e-5)


def _decoder_inputs(variant, attention, name, batch=3):
    """A decoder of a tiny model, random visible latents, a masking and diffused inputs (or None)."""
    cfg = tiny_config(variant, attention)
    decoder = getattr(build_model(cfg), name).eval()
    m = cfg.model
    tokens = math.prod(m.video_grid if name == "video_decoder" else m.audio_grid)
    ids = random_masking((batch,), tokens, 0.75)
    latents = torch.randn(batch, ids.keep.shape[1], m.encoder_dim)
    noisy = torch.randn(batch, ids.mask.shape[1], decoder.head.out_features) \
        if m.diffusion else None
    return decoder, latents, ids, noisy


def _masking(keep, mask):
    return Masking(keep, mask, torch.cat([keep, mask], dim=1).argsort(dim=1))


@pytest.mark.parametrize("variant, attention, name", DECODERS, ids=DECODER_IDS)
def test_decoder_predictions_follow_the_order_of_ids_mask(variant, attention, name):
    """Guards against a decoder that predicts the wrong tokens (e.g. the last m of the grid instead
    of those in ids.mask): reordering ids.mask (and the diffused inputs) reorders the predictions."""
    decoder, latents, ids, noisy = _decoder_inputs(variant, attention, name)
    perm = torch.arange(ids.mask.shape[1]).flip(0)
    with torch.no_grad():
        pred = decoder(latents, ids, noisy)
        pred_perm = decoder(latents, _masking(ids.keep, ids.mask[:, perm]),
                            None if noisy is None else noisy[:, perm])
    assert pred.shape == (*ids.mask.shape, decoder.head.out_features)
    torch.testing.assert_close(pred_perm, pred[:, perm], **TOL)


@pytest.mark.parametrize("variant, attention, name", DECODERS, ids=DECODER_IDS)
def test_decoder_assembles_tokens_at_their_grid_positions(variant, attention, name):
    """Guards against visible or masked decoder tokens losing their positional embedding, and
    against reading the predictions off other grid positions than ids.mask's."""
    decoder, latents, ids, noisy = _decoder_inputs(variant, attention, name)
    seen = {}
    first = decoder.blocks[0].register_forward_pre_hook(lambda _, args: seen.update(first=args))
    last = decoder.blocks[-1].register_forward_hook(lambda *a: seen.update(last=a[2]))
    with torch.no_grad():
        pred = decoder(latents, ids, noisy)
        first.remove()
        last.remove()
        visible = decoder.embed(latents) + decoder.pos[ids.keep]
        masked = (decoder.mask_token if noisy is None else decoder.noisy_embed(noisy)) \
            + decoder.pos[ids.mask]
        if attention == "cross" and name == "video_decoder":
            torch.testing.assert_close(seen["first"][0], masked, **TOL)
            torch.testing.assert_close(seen["first"][1], visible, **TOL)
            return
        x = seen["first"][0]  # (B, N, dim) in grid order
        torch.testing.assert_close(gather_tokens(x, ids.keep), visible, **TOL)
        torch.testing.assert_close(gather_tokens(x, ids.mask), masked, **TOL)
        expected = decoder.head(decoder.norm(gather_tokens(seen["last"], ids.mask)))
    torch.testing.assert_close(pred, expected, **TOL)


@pytest.mark.parametrize("variant, attention, name", DECODERS, ids=DECODER_IDS)
def test_visible_latents_carry_their_positions(variant, attention, name):
    """Guards against visible decoder tokens without positional embeddings: moving a latent to
    another visible position must change the predictions, moving it with its ids.keep entry not."""
    decoder, latents, ids, noisy = _decoder_inputs(variant, attention, name)
    swap = torch.tensor([1, 0, *range(2, ids.keep.shape[1])])
    with torch.no_grad():
        pred = decoder(latents, ids, noisy)
        both = decoder(latents[:, swap], _masking(ids.keep[:, swap], ids.mask), noisy)
        latents_only = decoder(latents[:, swap], ids, noisy)
    torch.testing.assert_close(both, pred, **TOL)
    assert (latents_only - pred).abs().amax() > 1e-3


def _views(model, cfg, audio, video, seed):
    """Per-view encoder outputs (views, B, n, D) of both modalities for the masks that
    model(..., generator=Generator().manual_seed(seed)) draws: audio's, then video's."""
    g = torch.Generator().manual_seed(seed)
    views, batch = model.views, audio.shape[0]
    audio_ids = random_masking((views, batch), math.prod(cfg.model.audio_grid), 0.8, generator=g)
    video_ids = random_masking((views, batch), math.prod(cfg.model.video_grid), 0.8, generator=g)
    with torch.no_grad():
        a = torch.stack([model.audio_encoder(audio, audio_ids.keep[v]) for v in range(views)])
        v = torch.stack([model.video_encoder(video, video_ids.keep[v]) for v in range(views)])
    return a, v


@pytest.mark.parametrize("variant, attention", [("mavil", "self"), ("diffmavil", "cross")])
def test_fusion_encodes_the_first_views_latents(variant, attention):
    """Guards against fusing (and so decoding) another view's latents than view 1's, whose masks
    the decoders reconstruct."""
    cfg = tiny_config(variant, attention)
    model = build_model(cfg)
    audio, video = tiny_batch(cfg, batch=4)
    seen = {}
    model.fusion.register_forward_pre_hook(lambda _, args: seen.update(args=args))
    with torch.no_grad():
        model(audio, video, generator=torch.Generator().manual_seed(7))
    a, v = _views(model, cfg, audio, video, seed=7)
    assert model.views == 2
    torch.testing.assert_close(seen["args"][0], a[0], **TOL)
    torch.testing.assert_close(seen["args"][1], v[0], **TOL)


@pytest.mark.parametrize("variant, attention", [("mavil", "self"), ("diffmavil", "cross")])
def test_contrastive_terms_and_weights(variant, attention):
    """Guards against contrasting the wrong pairs (a view with itself, views and samples mixed up
    by the (views, batch) split) and against ignoring loss.inter_weight or loss.intra_weight."""
    cfg = tiny_config(variant, attention)
    cfg.loss.inter_weight, cfg.loss.intra_weight = 0.3, 0.7
    model = build_model(cfg)
    audio, video = tiny_batch(cfg, batch=4)
    with torch.no_grad():
        out = model(audio, video, generator=torch.Generator().manual_seed(7))
    a, v = (x.mean(dim=2) for x in _views(model, cfg, audio, video, seed=7))  # (views, B, D)
    t, terms = cfg.loss.temperature, out.terms
    torch.testing.assert_close(terms["inter"], info_nce(a[0], v[0], t), **TOL)
    intra = 0.5 * (info_nce(a[0], a[1], t) + info_nce(v[0], v[1], t))
    torch.testing.assert_close(terms["intra"], intra, **TOL)
    expected = terms["mse_audio"] + terms["mse_video"] + 0.3 * terms["inter"] + 0.7 * intra
    torch.testing.assert_close(out.loss, expected, **TOL)
