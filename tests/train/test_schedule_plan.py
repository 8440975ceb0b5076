import math

import pytest

from fastmavil.config import ConfigError, load_config
from fastmavil.masking import num_visible
from fastmavil.schedule import epoch_at, first_step, learning_rate, plan_epochs

CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"


def _visible(ratio: float) -> int:
    return num_visible(512, ratio) + num_visible(1568, ratio)  # audio + video tokens per clip


def test_r4_plan_keeps_the_visible_token_budget_per_pass_with_few_shapes():
    """r4.toml: B0 = 2048 in passes of 8, so 256 passes per step in every epoch, each of
    8 B_e / B0 samples (16 at rho = 0.9): every pass carries B0's visible tokens per pass, to
    the nearest sample (within 1 / 16 of the budget)."""
    cfg = load_config(CONFIGS / "r4.toml")
    plans = plan_epochs(cfg, 1_900_000)
    assert len(plans) == 60 and plans[0].mask_ratio == 0.9 and plans[-1].mask_ratio == 0.8
    shapes = {(p.mask_ratio, p.batch_size, p.micro_batch) for p in plans}
    assert len(shapes) <= cfg.train.max_shapes == 11
    assert {p.batch_size // p.micro_batch for p in plans} == {256}
    assert all(p.batch_size == 256 * p.micro_batch for p in plans)
    assert (plans[0].batch_size, plans[0].micro_batch) == (4096, 16)
    assert (plans[-1].batch_size, plans[-1].micro_batch) == (2048, 8)
    for p in plans:
        exact = 8 * _visible(0.8) / _visible(p.mask_ratio)  # samples per pass at this ratio
        assert abs(p.micro_batch - exact) <= 0.5, p
        assert p.steps == 1_900_000 // p.batch_size
    # fewer steps than R3 (fixed batch) and, as the passes grow, fewer passes: the saving
    r3 = plan_epochs(load_config(CONFIGS / "r3.toml"), 1_900_000)
    ratio = sum(p.steps for p in plans) / sum(p.steps for p in r3)
    assert 0.6 < ratio < 0.8


def test_without_micro_batches_the_batch_rounds_to_the_multiple():
    cfg = load_config(CONFIGS / "r4.toml", {"train.micro_batch_size": "0"})
    plans = plan_epochs(cfg, 1_900_000)
    budget = 2048 * _visible(0.8)
    for p in plans:
        assert p.batch_size % 8 == 0 and p.micro_batch == p.batch_size, p
        assert p.batch_size * _visible(p.mask_ratio) == pytest.approx(budget, rel=0.02), p
    assert plans[0].batch_size == 4096 and plans[-1].batch_size == 2048


def test_micro_batch_and_multiple_must_fit_b0():
    with pytest.raises(ConfigError, match="train.micro_batch_size = 48 must divide "
                                          "train.batch_size = 2048"):
        load_config(CONFIGS / "r4.toml", {"train.micro_batch_size": "48"})
    with pytest.raises(ConfigError, match="train.batch_size = 2040 must be a multiple of "
                                          "train.batch_multiple = 16 with the adaptive batch"):
        load_config(CONFIGS / "r4.toml", {"train.batch_size": "2040", "train.batch_multiple": "16",
                                          "train.micro_batch_size": "0"})
    # passes (2048 / 32 = 64) coarser than the multiple: B_e rounds to multiples of 64
    cfg = load_config(CONFIGS / "r4.toml", {"train.micro_batch_size": "32"})
    assert all(p.batch_size % 64 == 0 and p.batch_size // p.micro_batch == 64
               for p in plan_epochs(cfg, 100_000))
    # neither divides the other: 3 passes of B0 = 48 and a multiple of 8 round to 24
    cfg = load_config(CONFIGS / "r4.toml", {"train.batch_size": "48",
                                            "train.micro_batch_size": "16"})
    plans = plan_epochs(cfg, 100_000)
    assert {p.batch_size for p in plans} == {96, 72, 48}  # 0.2 / (1 - rho) * 48 to 24s
    assert all(p.batch_size == 3 * p.micro_batch for p in plans)


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
    # the pass grows with B_e: 8 samples at rho = 0.8 are 16 at 0.9
    with pytest.raises(ConfigError, match=r"epoch 0 runs 16 samples per forward pass .* lower "
                                          r"train.micro_batch_size"):
        plan_epochs(load_config(CONFIGS / "r4.toml", {"train.max_batch_size": "8"}), 1_000_000)
    cfg = load_config(CONFIGS / "r4.toml", {"train.max_batch_size": "8",
                                            "train.micro_batch_size": "4"})
    assert max(p.micro_batch for p in plan_epochs(cfg, 1_000_000)) == 8  # accumulation fits
    with pytest.raises(ConfigError, match="the dataset has 100 clips, fewer than one batch"):
        plan_epochs(load_config(CONFIGS / "r2.toml"), 100)


def test_learning_rate_warmup_then_cosine():
    cfg = load_config(CONFIGS / "r4.toml", {"optim.lr_schedule": "steps"})
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
    linear = load_config(CONFIGS / "r4.toml", {"optim.lr_batch_scaling": "linear",
                                               "optim.lr_schedule": "steps"})
    assert learning_rate(linear, 0, plans) == pytest.approx(2 * lrs[0])  # B = 2 B0 at rho 0.9
    sqrt = load_config(CONFIGS / "r4.toml", {"optim.lr_batch_scaling": "sqrt",
                                             "optim.lr_schedule": "steps"})
    assert learning_rate(sqrt, 0, plans) == pytest.approx(math.sqrt(2) * lrs[0])


def test_learning_rate_over_fractional_epochs_as_mae():
    """The default: warm-up and cosine over epoch + i / S_e, MAE's lr_sched. R4's epochs at
    rho = 0.9 hold half the steps of those at 0.8, so by steps the decay would run late."""
    cfg = load_config(CONFIGS / "r4.toml")
    assert cfg.optim.lr_schedule == "epochs"
    plans = plan_epochs(cfg, 204_800)
    lr = lambda step: learning_rate(cfg, step, plans)  # noqa: E731
    assert lr(0) == 0.0
    half = first_step(4, plans) + plans[4].steps // 2  # epoch 4.5 of 8 warm-up epochs
    assert lr(half) == pytest.approx(4e-4 * (4 + (plans[4].steps // 2) / plans[4].steps) / 8)
    for epoch in (8, 20, 34, 59):
        assert lr(first_step(epoch, plans)) == pytest.approx(
            1e-6 + (4e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (epoch - 8) / 52)))
    total = sum(p.steps for p in plans)
    lrs = [lr(s) for s in range(first_step(8, plans), total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 1e-6 + 1e-8
    steps = load_config(CONFIGS / "r4.toml", {"optim.lr_schedule": "steps"})
    at = first_step(30, plans)
    assert lr(at) < learning_rate(steps, at, plans) - 2e-5  # epoch 30: behind by steps
    # a fixed batch: the two trace one curve, a step apart
    for path in ("r3.toml", "r1.toml"):
        by_epoch, by_step = (load_config(CONFIGS / path, {"optim.lr_schedule": unit})
                             for unit in ("epochs", "steps"))
        plans = plan_epochs(by_epoch, 204_800)
        warmup = first_step(8, plans)
        gap = max(abs(learning_rate(by_epoch, s, plans) - learning_rate(by_step, s, plans))
                  for s in range(sum(p.steps for p in plans)))
        assert gap <= 4e-4 / warmup * 1.01


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
    for p in plans:  # passes of 8 at B0: each within half a sample of the FLOPs budget
        assert p.batch_size == 256 * p.micro_batch and p.steps == 1_900_000 // p.batch_size
        assert abs(p.micro_batch - budget / 256 / flops[p.mask_ratio]) <= 0.5, p
    assert plans[-1].batch_size == 2048 < plans[0].batch_size < tokens[0].batch_size == 4096
    r3 = plan_epochs(load_config(CONFIGS / "r3.toml", overrides), 1_900_000)
    token_steps, flops_steps, fixed_steps = (sum(p.steps for p in plan)
                                             for plan in (tokens, plans, r3))
    assert token_steps < flops_steps < fixed_steps


def test_unknown_batch_rule_is_refused():
    with pytest.raises(ConfigError, match="adaptive_batch_rule"):
        load_config(CONFIGS / "r4.toml", {"train.adaptive_batch_rule": "memory"})


@pytest.mark.parametrize("rule", ["tokens", "flops"])
def test_fitted_passes_keep_every_step_at_its_budget(rule):
    """train.passes_per_step = "fit": each pass is micro_batch_size * B_e / B0 to the nearest
    sample, and the step takes as many passes as come nearest B_e, so it misses B_e by at most
    half a pass (r4.toml: 0.2 % under the FLOPs rule), where 256 passes in every epoch round
    B_e to multiples of 256 (up to 5 % off)."""
    from fastmavil.schedule import _flops_budget_batches, _token_budget_batch
    overrides = {"model.size": "tiny", "train.adaptive_batch_rule": rule}
    cfg = load_config(CONFIGS / "r4.toml", {**overrides, "train.passes_per_step": "fit"})
    plans = plan_epochs(cfg, 1_900_000)
    ratios = {p.mask_ratio for p in plans}
    exact = (_flops_budget_batches(cfg, ratios) if rule == "flops" else
             {r: _token_budget_batch(cfg.mask, r, 2048) for r in ratios})
    assert {(p.passes, p.micro_batch) for p in plans if p.mask_ratio == 0.8} == {(256, 8)}
    assert len({p.passes for p in plans}) > 2  # the pass count follows the budget
    assert len({(p.mask_ratio, p.micro_batch) for p in plans}) <= cfg.train.max_shapes
    for p in plans:
        assert p.batch_size == p.passes * p.micro_batch and p.steps == 1_900_000 // p.batch_size
        assert abs(p.micro_batch - exact[p.mask_ratio] / 256) <= 0.5, p
        assert abs(p.batch_size - exact[p.mask_ratio]) <= p.micro_batch / 2, p
    fixed = plan_epochs(load_config(CONFIGS / "r4.toml", overrides), 1_900_000)
    miss = [max(abs(p.batch_size / exact[p.mask_ratio] - 1) for p in plan)
            for plan in (plans, fixed)]
    assert miss[0] < 0.005 and miss[1] > 0.04, miss


def test_fitted_passes_need_micro_batches():
    """Without micro-batches a step is one pass: "fit" plans as "fixed" does."""
    plans = [plan_epochs(load_config(CONFIGS / "r4.toml", {"train.micro_batch_size": "0",
                                                           "train.passes_per_step": passes}),
                         1_900_000) for passes in ("fixed", "fit")]
    assert plans[0] == plans[1]
    with pytest.raises(ConfigError, match="train.passes_per_step = 'some'"):
        load_config(CONFIGS / "r4.toml", {"train.passes_per_step": "some"})
