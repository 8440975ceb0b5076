import math

import pytest

from fastmavil.config import ConfigError, load_config
from fastmavil.masking import num_visible
from fastmavil.schedule import epoch_at, first_step, learning_rate, plan_epochs

CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"


def test_r4_plan_keeps_the_visible_token_budget_with_few_shapes():
    cfg = load_config(CONFIGS / "r4.toml")
    plans = plan_epochs(cfg, 1_900_000)
    assert len(plans) == 60 and plans[0].mask_ratio == 0.9 and plans[-1].mask_ratio == 0.8
    shapes = {(p.mask_ratio, p.batch_size) for p in plans}
    assert len(shapes) <= cfg.train.max_shapes == 11
    assert all(p.batch_size % 8 == 0 for p in plans)
    assert plans[0].batch_size == 4096 and plans[-1].batch_size == 2048
    budget = 2048 * (num_visible(512, 0.8) + num_visible(1568, 0.8))
    for p in plans:
        tokens = p.batch_size * (num_visible(512, p.mask_ratio) + num_visible(1568, p.mask_ratio))
        assert tokens == pytest.approx(budget, rel=0.02), p
        assert p.steps == 1_900_000 // p.batch_size
    # fewer steps than R3 (fixed batch): where the wall-clock saving comes from
    r3 = plan_epochs(load_config(CONFIGS / "r3.toml"), 1_900_000)
    ratio = sum(p.steps for p in plans) / sum(p.steps for p in r3)
    assert 0.6 < ratio < 0.8


def test_quantised_ratio_levels():
    cfg = load_config(CONFIGS / "r3.toml", {"train.max_shapes": "3"})
    assert sorted({p.mask_ratio for p in plan_epochs(cfg, 10_000)}) == [0.8, 0.85, 0.9]
    assert {p.batch_size for p in plan_epochs(cfg, 10_000)} == {2048}


def test_a_linear_schedule_needs_two_shapes():
    with pytest.raises(ConfigError, match="train.max_shapes = 1 cannot follow"):
        load_config(CONFIGS / "r3.toml", {"train.max_shapes": "1"})


def test_plan_errors_before_training():
    cfg = load_config(CONFIGS / "r4.toml", {"train.max_batch_size": "3000",
                                            "train.micro_batch_size": "0"})
    with pytest.raises(ConfigError, match=r"epoch 0 runs 4096 samples per forward pass \(mask "
                                          r"ratio 0.900\) but train.max_batch_size = 3000"):
        plan_epochs(cfg, 1_000_000)
    cfg = load_config(CONFIGS / "r4.toml", {"train.max_batch_size": "8"})
    assert {p.micro_batch for p in plan_epochs(cfg, 1_000_000)} == {8}  # accumulation fits
    with pytest.raises(ConfigError, match="the dataset has 100 clips, fewer than one batch"):
        plan_epochs(load_config(CONFIGS / "r2.toml"), 100)


def test_learning_rate_warmup_then_cosine():
    cfg = load_config(CONFIGS / "r4.toml")
    plans = plan_epochs(cfg, 204_800)
    total, warmup = sum(p.steps for p in plans), sum(p.steps for p in plans[:8])
    lrs = [learning_rate(cfg, s, plans) for s in range(total)]
    assert lrs[0] == pytest.approx(4e-4 / warmup)
    assert lrs[warmup - 1] == pytest.approx(4e-4)
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert lrs[-1] == pytest.approx(1e-6, rel=1e-9)  # min_lr exactly at the last step
    mid = warmup + (total - warmup) // 2
    assert lrs[mid] == pytest.approx(1e-6 + (4e-4 - 1e-6) * 0.5 * (1 + math.cos(
        math.pi * (mid - warmup) / (total - 1 - warmup))))
    linear = load_config(CONFIGS / "r4.toml", {"optim.lr_batch_scaling": "linear"})
    assert learning_rate(linear, 0, plans) == pytest.approx(2 * lrs[0])  # B = 2 B0 at rho 0.9


def test_epoch_lookup():
    cfg = load_config(CONFIGS / "r4.toml")
    plans = plan_epochs(cfg, 40_960)
    assert epoch_at(0, plans).epoch == 0
    assert epoch_at(first_step(5, plans), plans).epoch == 5
    assert epoch_at(10 ** 9, plans).epoch == 59


def test_flops_rule_keeps_the_model_flops_per_step():
    """train.adaptive_batch_rule = "flops": B_e * F(rho_e) stays at B0 * F(min rho), so the batch
    grows less than the token rule's (the decoders' work follows the masked tokens)."""
    from fastmavil.flops import forward_flops_per_sample
    overrides = {"model.size": "tiny"}
    tokens = plan_epochs(load_config(CONFIGS / "r4.toml", overrides), 1_900_000)
    cfg = load_config(CONFIGS / "r4.toml", {**overrides, "train.adaptive_batch_rule": "flops"})
    plans = plan_epochs(cfg, 1_900_000)
    flops = forward_flops_per_sample(cfg, {p.mask_ratio for p in plans})
    budget = 2048 * flops[0.8]
    for p in plans:
        assert p.batch_size % 8 == 0 and p.steps == 1_900_000 // p.batch_size
        assert p.batch_size * flops[p.mask_ratio] == pytest.approx(budget, rel=0.01), p
    assert plans[-1].batch_size == 2048 < plans[0].batch_size < tokens[0].batch_size == 4096
    r3 = plan_epochs(load_config(CONFIGS / "r3.toml", overrides), 1_900_000)
    token_steps, flops_steps, fixed_steps = (sum(p.steps for p in plan)
                                             for plan in (tokens, plans, r3))
    assert token_steps < flops_steps < fixed_steps


def test_unknown_batch_rule_is_refused():
    with pytest.raises(ConfigError, match="adaptive_batch_rule"):
        load_config(CONFIGS / "r4.toml", {"train.adaptive_batch_rule": "memory"})
