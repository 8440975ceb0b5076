"""The fine-tuning pieces: stochastic depth, augmentations, metrics, the classifier, its lr
decay groups and the loading of a pre-trained encoder."""
import math

import pytest
import torch

from fastmavil.augment import mix_batch, smooth_labels, spec_augment, spec_noise
from fastmavil.config import Config, ConfigError, ModelConfig, to_toml
from fastmavil.evaluation import average_precision, mean_average_precision, top1_accuracy
from fastmavil.models import build_model
from fastmavil.models.attention import Block, DropPath
from fastmavil.models.classifier import AudioClassifier, load_pretrained_encoder, param_groups
from fastmavil.train.checkpoint import save_checkpoint
from fastmavil.train.resume import FORMAT


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    x = torch.rand(4000, 3, 5) + 0.5
    drop = DropPath(0.25).train()
    out = drop(x)
    kept = (out != 0).all(dim=(1, 2))
    dropped = (out == 0).all(dim=(1, 2))
    assert bool((kept | dropped).all())  # a sample is dropped whole or kept whole
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    assert abs(float(dropped.float().mean()) - 0.25) < 0.03
    assert torch.equal(drop.eval()(x), x)


def test_stochastic_depth_rises_linearly_over_the_encoder_blocks():
    model = AudioClassifier(ModelConfig(size="tiny", encoder_depth=5), 3, drop_path=0.2)
    rates = [getattr(b.drop_path, "rate", 0.0) for b in model.encoder.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert isinstance(Block(8, 2).drop_path, torch.nn.Identity)  # pre-training: no draws


def _bands(kept_rows):
    """Start and length of the one run of False in a bool vector."""
    idx = torch.nonzero(~kept_rows).flatten()
    if len(idx) == 0:
        return None
    assert bool((idx.diff() == 1).all()), "the mask is not one contiguous band"
    return int(idx[0]), len(idx)


def test_spec_augment_masks_one_time_and_one_frequency_band_per_clip():
    x = torch.randn(64, 1, 37, 11)
    out = spec_augment(x, 10, 5, fill=0.75, generator=torch.Generator().manual_seed(1))
    time_widths, freq_widths = set(), set()
    for clip, orig in zip(out[:, 0], x[:, 0]):
        masked = clip != orig
        assert bool((clip[masked] == 0.75).all())
        rows = masked.all(dim=1)  # a time step masked across every frequency
        cols = masked.all(dim=0)
        for band, widths, most in ((_bands(~rows), time_widths, 10),
                                   (_bands(~cols), freq_widths, 5)):
            if band:
                assert band[1] < most
                widths.add(band[1])
        # every masked bin lies in the time band or the frequency band
        assert bool((masked == (rows[:, None] | cols[None, :])).all())
    assert len(time_widths) > 4 and len(freq_widths) > 2  # widths drawn per clip
    again = spec_augment(x, 10, 5, 0.75, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert torch.equal(spec_augment(x, 0, 0, 0.75), x)


def test_spec_noise_adds_a_per_clip_share_of_uniform_noise_and_rolls_in_time():
    x = torch.arange(30.0).repeat_interleave(4).view(1, 1, 30, 4).repeat(200, 1, 1, 1) * 10
    out = spec_noise(x, torch.Generator().manual_seed(0))
    shifts, noise_max = [], []
    for clip, orig in zip(out, x):
        fits = [s for s in range(-10, 10)
                if bool(((clip - orig.roll(s, dims=1)) >= 0).all()
                        & ((clip - orig.roll(s, dims=1)) < 0.1).all())]
        assert len(fits) == 1, "not the clip rolled by one shift plus noise in [0, 0.1)"
        shifts.append(fits[0])
        noise_max.append(float((clip - orig.roll(fits[0], dims=1)).max()))
    assert set(shifts) == set(range(-10, 10))  # every shift of [-10, 10) drawn
    assert min(noise_max) < 0.02 < 0.08 < max(noise_max)  # the share drawn per clip


def test_mixup_mixes_clips_and_targets_with_one_lambda():
    x, y = torch.randn(6, 1, 8, 4), torch.eye(6)
    out, targets, lam = mix_batch(x, y, mixup=0.5, cutmix=0.0,
                                  generator=torch.Generator().manual_seed(3))
    assert 0 < lam < 1
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(targets, lam * y + (1 - lam) * y.flip(0))
    assert torch.equal(mix_batch(x, y, 0.0, 0.0)[0], x)


def test_cutmix_pastes_one_box_and_weighs_targets_by_its_area():
    x, y = torch.randn(6, 1, 40, 16), torch.eye(6)
    seen = 0
    for seed in range(20):
        out, targets, lam = mix_batch(x, y, mixup=0.0, cutmix=1.0,
                                      generator=torch.Generator().manual_seed(seed))
        pasted = (out != x).any(dim=0)[0]  # (T, F): where any clip took its partner's bins
        area = int(pasted.sum())
        if area:
            rows, cols = pasted.any(dim=1), pasted.any(dim=0)
            assert area == int(rows.sum()) * int(cols.sum())  # a box
            seen += 1
        assert lam == pytest.approx(1 - area / (40 * 16))
        torch.testing.assert_close(targets, lam * y + (1 - lam) * y.flip(0))
        torch.testing.assert_close(out[..., pasted], x.flip(0)[..., pasted])
    assert seen > 10


def test_with_both_on_the_batch_takes_cutmix_or_mixup_at_the_switch_rate():
    x, y, g = torch.randn(4, 1, 16, 8), torch.eye(4), torch.Generator().manual_seed(0)
    cut = 0
    for _ in range(400):
        out, _, lam = mix_batch(x, y, 0.5, 1.0, switch_prob=0.3, generator=g)
        mixed = torch.allclose(out, lam * x + (1 - lam) * x.flip(0))
        cut += not mixed
    assert 0.24 < cut / 400 < 0.36


def test_label_smoothing_as_timm():
    y = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(smooth_labels(y, 0.1), torch.tensor([[0.025, 0.925, 0.025, 0.025]]))


def _ap_by_thresholds(scores, positive):
    """The definition, step by step: precision times the recall gained at each distinct
    threshold, highest first."""
    total, ap, last_recall = sum(positive), 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        picked = [p for s, p in zip(scores, positive) if s >= t]
        recall = sum(picked) / total
        ap += (recall - last_recall) * sum(picked) / len(picked)
        last_recall = recall
    return ap


def test_average_precision_by_hand_and_against_its_definition():
    # ranked: +, -, +, -: precision 1 at the first positive, 2/3 at the second
    assert average_precision(torch.tensor([0.9, 0.8, 0.7, 0.1]),
                             torch.tensor([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    assert math.isnan(average_precision(torch.rand(5), torch.zeros(5)))
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        n = int(torch.randint(3, 30, (1,), generator=g))
        scores = (torch.randint(0, 4, (n,), generator=g).float() if trial % 2  # ties
                  else torch.rand(n, generator=g))
        positive = torch.rand(n, generator=g) < 0.4
        positive[0] = True
        assert average_precision(scores, positive) == pytest.approx(
            _ap_by_thresholds(scores.tolist(), positive.tolist()), abs=1e-12)


def test_average_precision_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics",
                                  reason="scikit-learn is not installed (not a dependency)")
    g = torch.Generator().manual_seed(1)
    for trial in range(30):
        scores = torch.randint(0, 5, (25,), generator=g).float() if trial % 2 else \
            torch.rand(25, generator=g)
        positive = torch.rand(25, generator=g) < 0.3
        positive[3] = True
        assert average_precision(scores, positive) == pytest.approx(
            metrics.average_precision_score(positive.numpy(), scores.numpy()), abs=1e-12)


def test_map_leaves_out_classes_without_positives_and_top1_reads_any_label():
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.1], [0.6, 0.7, 0.2]])
    targets = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0]])
    value, classes = mean_average_precision(scores, targets)
    assert classes == 2 and value == pytest.approx((1.0 + 1.0) / 2)
    assert top1_accuracy(scores, targets) == pytest.approx(1.0)
    targets[2] = torch.tensor([1.0, 0, 0])  # clip 2's best class (1) is not its label
    assert top1_accuracy(scores, targets) == pytest.approx(2 / 3)


def test_layer_decay_groups_cover_every_parameter_once():
    model = AudioClassifier(ModelConfig(size="tiny", encoder_depth=3), 5)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    scale = {n: g["lr_scale"] for g in groups for p in g["params"]
             for n, q in model.named_parameters() if q is p}
    decay = {n: g["weight_decay"] for g in groups for p in g["params"]
             for n, q in model.named_parameters() if q is p}
    assert scale["encoder.patch_embed.proj.weight"] == 0.5 ** 4
    assert scale["encoder.blocks.0.mlp.0.weight"] == 0.5 ** 3
    assert scale["encoder.blocks.2.attn.qkv.weight"] == 0.5
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    assert decay["head.weight"] == 0.05 and decay["head.bias"] == 0.0
    assert decay["encoder.blocks.1.norm1.weight"] == 0.0


def test_the_classifier_takes_other_input_lengths_and_names_a_wrong_shape():
    model = AudioClassifier(ModelConfig(size="tiny", audio_frames=64), 7).eval()
    assert model(torch.randn(3, 1, 64, 128)).shape == (3, 7)
    with pytest.raises(ValueError, match=r"expects \(B, 1, 64, 128\)"):
        model(torch.randn(3, 1, 128, 128))
    with pytest.raises(ConfigError, match="names no labels"):
        AudioClassifier(ModelConfig(size="tiny"), 0)


def _pretrained(tmp_path, **model):
    cfg = Config()
    cfg.model = ModelConfig(size="tiny", **model)
    mavil = build_model(cfg.check())
    save_checkpoint(tmp_path / "pre", 7, {"model": mavil.state_dict(), "config": to_toml(cfg),
                                          "step": 7, "format": FORMAT}, keep=2)
    return mavil


def test_the_pretrained_audio_encoder_loads_from_a_run_folder(tmp_path):
    mavil = _pretrained(tmp_path)
    model = AudioClassifier(ModelConfig(size="tiny", audio_frames=256), 4)
    path = load_pretrained_encoder(model, tmp_path / "pre")
    assert path.name == "step-00000007.pt"
    theirs = mavil.audio_encoder.state_dict()
    for name, value in model.encoder.state_dict().items():
        assert torch.equal(value, theirs[name]), name
    assert not any(k.startswith("norm.") for k in model.encoder.state_dict())
    # the same encoder computes the same blocks (the input length differs: fixed positions)
    audio = torch.randn(2, 1, 256, 128)
    x = model.encoder.patch_embed(audio, None, model.encoder.pos)
    y = mavil.audio_encoder.patch_embed(audio, None, model.encoder.pos)
    torch.testing.assert_close(x, y)


def test_a_pretrained_encoder_of_another_size_or_no_checkpoint_is_named(tmp_path):
    _pretrained(tmp_path, encoder_dim=96, encoder_heads=3)
    model = AudioClassifier(ModelConfig(size="tiny"), 4)
    with pytest.raises(ConfigError, match="model.encoder_dim: 96 there, 64 here"):
        load_pretrained_encoder(model, tmp_path / "pre")
    with pytest.raises(ConfigError, match="does not exist"):
        load_pretrained_encoder(model, tmp_path / "nothing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint in"):
        load_pretrained_encoder(model, tmp_path / "empty")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="does not load"):
        load_pretrained_encoder(model, tmp_path / "junk.pt")
