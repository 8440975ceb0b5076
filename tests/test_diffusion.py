import math

import pytest
import torch

from fastmavil.diffusion import DiffusionSchedule


def alpha_bar_by_hand(t, steps=1000, beta_start=1e-4, beta_end=0.02, phi=0.8):
    betas = [beta_start + (beta_end - beta_start) * i / (steps - 1) for i in range(steps)]
    return math.prod(1 - b ** phi for b in betas[:t])


def test_alpha_bar_matches_formula_and_decreases():
    sched = DiffusionSchedule()
    ab = sched.alpha_bar.double()
    assert ab.shape == (1001,) and ab[0] == 1.0
    assert (ab[1:] < ab[:-1]).all()
    for t in (1, 2, 10, 250, 500, 1000):
        assert ab[t].item() == pytest.approx(alpha_bar_by_hand(t), rel=1e-5, abs=1e-9)
    # phi < 1 amplifies the noise: more than the plain DDPM schedule at every t
    plain = DiffusionSchedule(phi=1.0).alpha_bar
    assert (sched.alpha_bar[1:] < plain[1:]).all()


@pytest.mark.parametrize("t", [1, 1000])
def test_q_sample_statistics(t):
    sched = DiffusionSchedule()
    x0 = torch.full((4000, 64), 0.7)
    noise = torch.randn_like(x0)
    xt = sched.q_sample(x0, torch.full((4000,), t), noise)
    ab = alpha_bar_by_hand(t)
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.01)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.02, abs=1e-4)


def test_timesteps_cover_one_to_T_per_sample():
    t = DiffusionSchedule(steps=10).sample_timesteps(5000)
    assert t.shape == (5000,) and t.min() == 1 and t.max() == 10
    assert len(t.unique()) == 10


def test_q_sample_uses_each_samples_own_timestep():
    sched = DiffusionSchedule()
    x0, noise = torch.ones(2, 3), torch.zeros(2, 3)
    xt = sched.q_sample(x0, torch.tensor([1, 1000]), noise)
    assert torch.allclose(xt[0], sched.alpha_bar[1].sqrt().expand(3))
    assert torch.allclose(xt[1], sched.alpha_bar[1000].sqrt().expand(3))


def test_q_sample_in_bf16_scales_in_fp32_and_rounds_once():
    """bf16 inputs: x_t is computed in fp32 and rounded once. Scaled in bf16, the noise scale
    sqrt(1 - alpha_bar[t]) = 0.025 at t = 1 and 0.037 at t = 2 rounded to 0, and x0's scale
    lost its last bits."""
    sched = DiffusionSchedule()
    t = torch.tensor([1, 2, 7, 500])
    x0, noise = torch.randn(4, 33).bfloat16(), torch.randn(4, 33).bfloat16()
    a = sched.alpha_bar[t].double()[:, None]
    expected = (a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()).bfloat16()
    out = sched.q_sample(x0, t, noise)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=8e-3, atol=1e-6)
    only_noise = sched.q_sample(torch.zeros(2, 1).bfloat16(), t[:2], torch.ones(2, 1).bfloat16())
    sigma = (1 - sched.alpha_bar[t[:2]]).sqrt()  # 0.0251, 0.0369
    torch.testing.assert_close(only_noise.flatten().float(), sigma, rtol=8e-3, atol=0)


def test_alpha_bar_stays_fp32_when_the_module_is_cast():
    """A cast model keeps its noise schedule: in bf16 alpha_bar_1 would round to 1, and t = 1, 2
    would add no noise at all. Moves still move it."""
    schedule = DiffusionSchedule()
    exact = schedule.alpha_bar.clone()
    assert float(exact[1].bfloat16()) == 1.0  # what a cast would make of it
    schedule.to(torch.bfloat16)
    assert schedule.alpha_bar.dtype == torch.float32 and torch.equal(schedule.alpha_bar, exact)
    schedule.half().float()
    assert torch.equal(schedule.alpha_bar, exact)
    assert schedule.to("meta").alpha_bar.device.type == "meta"
