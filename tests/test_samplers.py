import math

import pytest
import torch

import numpy as np

from diffusion_caption.samplers import DDIMSampler, DDPMSampler, make_sampler, spaced_timesteps, spacing_power
from diffusion_caption.schedule import NoiseSchedule


def test_spaced_timesteps():
    assert spaced_timesteps(1000, 1) == [999]
    assert spaced_timesteps(1000, 2) == [999, 0]
    ts = spaced_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    assert spaced_timesteps(10, 10) == list(range(9, -1, -1))
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="steps must be between 1"):
            spaced_timesteps(1000, bad)


def test_trailing_spacing_is_diffusers_trailing():
    """diffusers' ``timestep_spacing="trailing"``: round(arange(T, 0, -T/n)) - 1."""
    for T, n in ((1000, 1), (1000, 3), (1000, 5), (1000, 10), (1000, 50), (100, 7), (10, 10)):
        expected = (np.round(np.arange(T, 0, -T / n)).astype(int) - 1).tolist()
        assert spaced_timesteps(T, n, "trailing") == expected
    assert spaced_timesteps(1000, 5, "trailing") == [999, 799, 599, 399, 199]


def test_trailing_power_spacing():
    # t_i = round(T (1 - (i/n)^k)) - 1: k = 2 packs the steps towards the noisy end
    assert spaced_timesteps(1000, 5, "trailing^2") == [999, 959, 839, 639, 359]
    assert spaced_timesteps(1000, 3, "trailing^3") == [999, 962, 703]
    assert spaced_timesteps(1000, 5, "trailing^1") == spaced_timesteps(1000, 5, "trailing")
    assert spaced_timesteps(1000, 1, "trailing^2") == [999]
    # where rounding would merge neighbours (many steps, k > 1) each takes the next free timestep below:
    # always exactly n distinct timesteps from T-1 down
    for T, n, k in ((1000, 1000, 3), (1000, 50, 3), (1000, 200, 5), (20, 19, 2.5), (7, 7, 10)):
        ts = spaced_timesteps(T, n, f"trailing^{k}")
        assert len(ts) == n and ts == sorted(set(ts), reverse=True) and ts[0] == T - 1 and ts[-1] >= 0
    assert spaced_timesteps(1000, 1000, "trailing^3") == list(range(999, -1, -1))
    assert spaced_timesteps(1000, 50, "trailing^3")[:3] == [999, 998, 997]
    assert spacing_power("linspace") is None and spacing_power("Trailing^2.5") == 2.5
    for bad in ("leading", "trailing^0", "trailing^-1", "trailing^x", "trailing^11", ""):
        with pytest.raises(ValueError, match="spacing must be"):
            spaced_timesteps(1000, 5, bad)


def test_ddim_step_closed_form():
    s = NoiseSchedule("cosine", 1000)
    smp = DDIMSampler(s, 10)
    t = smp.timesteps[3]
    prev = smp.prev_timestep(t)
    x0, xt = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    a_t, a_s = float(s.alphas_cumprod[t]), float(s.alphas_cumprod[prev])
    eps = (xt - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    expected = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
    assert torch.allclose(smp.step(x0, t, xt).prev_sample, expected, atol=1e-6)


def test_ddim_with_an_oracle_recovers_x0_exactly():
    """With the true x0 at every step, deterministic DDIM walks the forward trajectory back to x0."""
    s = NoiseSchedule("sqrt", 1000)
    x0 = torch.randn(3, 7, 5)
    for n in (1, 2, 5, 50):
        for spacing in ("linspace", "trailing", "trailing^2"):
            smp = DDIMSampler(s, n, spacing)
            x = torch.randn(3, 7, 5)
            for t in smp.timesteps:
                x = smp.step(x0, t, x).prev_sample
            assert torch.allclose(x, x0, atol=1e-5)


def test_ddpm_full_steps_uses_the_schedule_posterior():
    s = NoiseSchedule("linear", 100)
    smp = DDPMSampler(s)  # all 100 steps: the respaced posterior is the schedule's own
    for t in (99, 50, 1):
        c1, c2, var = smp.posterior(t)
        assert c1 == pytest.approx(float(s.posterior_mean_coef1[t]), rel=1e-6)
        assert c2 == pytest.approx(float(s.posterior_mean_coef2[t]), rel=1e-6)
        assert var == pytest.approx(float(s.posterior_variance[t]), rel=1e-6)
    # the last step returns x0 itself, with no noise
    x0 = torch.randn(2, 3)
    assert torch.allclose(smp.step(x0, 0, torch.randn(2, 3)).prev_sample, x0, atol=1e-6)


def test_ddpm_noise_is_seeded():
    s = NoiseSchedule("cosine", 1000)
    smp = make_sampler("ddpm", s, 20, "trailing^2")
    assert smp.timesteps == spaced_timesteps(1000, 20, "trailing^2")
    x0, xt = torch.zeros(4, 8), torch.randn(4, 8)
    a = smp.step(x0, smp.timesteps[0], xt, torch.Generator().manual_seed(1)).prev_sample
    b = smp.step(x0, smp.timesteps[0], xt, torch.Generator().manual_seed(1)).prev_sample
    c = smp.step(x0, smp.timesteps[0], xt, torch.Generator().manual_seed(2)).prev_sample
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_sampler_and_timestep():
    s = NoiseSchedule("cosine", 100)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("euler", s)
    with pytest.raises(ValueError, match="not one of"):
        DDIMSampler(s, 5).prev_timestep(3)
