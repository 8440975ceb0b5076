import math

import pytest
import torch

from fastmavil.losses import info_nce, masked_mse, normalize_patches
from fastmavil.masking import gather_tokens
from fastmavil.models import build_model
from fastmavil.models.patch import patchify, unpatchify

from conftest import tiny_batch, tiny_config


def info_nce_loop(x, y, tau):
    """InfoNCE written pair by pair."""
    n = x.shape[0]
    cos = [[float(torch.dot(x[i], y[j]) / (x[i].norm() * y[j].norm())) / tau for j in range(n)]
           for i in range(n)]
    x_to_y = sum(-cos[i][i] + math.log(sum(math.exp(cos[i][j]) for j in range(n)))
                 for i in range(n)) / n
    y_to_x = sum(-cos[i][i] + math.log(sum(math.exp(cos[j][i]) for j in range(n)))
                 for i in range(n)) / n
    return (x_to_y + y_to_x) / 2


@pytest.mark.parametrize("n, tau", [(1, 0.1), (5, 0.07), (8, 1.0)])
def test_info_nce_matches_pairwise_loop(n, tau):
    x, y = torch.randn(n, 12), torch.randn(n, 12)
    assert info_nce(x, y, tau).item() == pytest.approx(info_nce_loop(x, y, tau), rel=1e-5)


def test_info_nce_is_fp32_under_autocast():
    x, y = torch.randn(16, 768), torch.randn(16, 768)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(x, y, 0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(info_nce(x, y, 0.1).item(), rel=1e-6)


def test_info_nce_prefers_aligned_pairs():
    x = torch.randn(6, 16)
    assert info_nce(x, x, 0.1) < info_nce(x, torch.randn(6, 16), 0.1)


def test_normalize_patches():
    p = normalize_patches(torch.randn(2, 5, 48) * 3 + 1)
    torch.testing.assert_close(p.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.var(-1, unbiased=True), torch.ones(2, 5), atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["diffmavil", "mavil"])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_mse_counts_masked_patches_only(monkeypatch, variant, norm_pix):
    cfg = tiny_config(variant)
    cfg.loss.norm_pix = norm_pix
    model = build_model(cfg)
    audio, video = tiny_batch(cfg)
    seen = {}

    def zero_decoder(self, latents, ids, noisy=None):  # predicts 0 for every masked patch
        seen[id(self)] = ids
        return torch.zeros(latents.shape[0], ids.mask.shape[1], self.head.out_features)

    monkeypatch.setattr(type(model.audio_decoder), "forward", zero_decoder)
    out = model(audio, video, generator=torch.Generator().manual_seed(0))
    for name, x, patch, dec in (("mse_audio", audio, model.audio_patch, model.audio_decoder),
                                ("mse_video", video, model.video_patch, model.video_decoder)):
        target = gather_tokens(patchify(x, patch), seen[id(dec)].mask)
        target = normalize_patches(target) if norm_pix else target
        assert out.terms[name].item() == pytest.approx(target.square().mean().item(), rel=1e-5)
    # changing the visible patches leaves the (zero-prediction) reconstruction loss unchanged
    ids = seen[id(model.audio_decoder)]
    patches = patchify(audio, model.audio_patch)
    for b in range(audio.shape[0]):
        patches[b, ids.keep[b]] += 5.0
    audio2 = unpatchify(patches, model.audio_patch, cfg.model.audio_grid, 1)
    out2 = model(audio2, video, generator=torch.Generator().manual_seed(0))
    assert out2.terms["mse_audio"].item() == pytest.approx(out.terms["mse_audio"].item(), rel=1e-6)


def test_masked_mse():
    pred, target = torch.zeros(2, 3, 4), torch.ones(2, 3, 4) * 2
    assert masked_mse(pred, target).item() == 4.0
