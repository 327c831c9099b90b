import math

import pytest
import torch

from diffusion_caption.schedule import NoiseSchedule, make_betas


def test_cosine_alpha_bar_matches_closed_form():
    s = NoiseSchedule("cosine", 1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert float(s.alphas_cumprod[t]) == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    assert float(s.betas.max()) <= 0.999


def test_sqrt_alpha_bar_matches_closed_form():
    s = NoiseSchedule("sqrt", 2000)
    f = lambda u: 1 - math.sqrt(u + 1e-4)  # noqa: E731
    for t in (0, 1, 100, 1500):
        assert float(s.alphas_cumprod[t]) == pytest.approx(f((t + 1) / 2000) / f(0), rel=1e-6)
    assert float(s.alphas_cumprod[-1]) < 1e-3  # the last step is (nearly) pure noise


def test_linear_betas_endpoints_and_product():
    s = NoiseSchedule("linear", 1000)
    assert float(s.betas[0]) == pytest.approx(1e-4)
    assert float(s.betas[-1]) == pytest.approx(0.02)
    expected = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    assert torch.allclose(s.alphas_cumprod, expected)


@pytest.mark.parametrize("name", ["linear", "cosine", "sqrt"])
def test_posterior_matches_bayes_rule(name):
    """The posterior q(x_{t-1}|x_t,x_0) mean/variance equal the Gaussian product formula."""
    s = NoiseSchedule(name, 100)
    for t in (1, 50, 99):
        ab, ab_prev, beta = float(s.alphas_cumprod[t]), float(s.alphas_cumprod[t - 1]), float(s.betas[t])
        var = 1 / (1 / (1 - ab_prev) + (1 - beta) / beta)
        assert float(s.posterior_variance[t]) == pytest.approx(var, rel=1e-6)
        assert float(s.posterior_mean_coef1[t]) == pytest.approx(var * math.sqrt(ab_prev) / (1 - ab_prev), rel=1e-6)
        assert float(s.posterior_mean_coef2[t]) == pytest.approx(var * math.sqrt(1 - beta) / beta, rel=1e-6)


def test_q_sample_statistics():
    s = NoiseSchedule("sqrt", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200000, 1), 2.0)
    for t in (10, 400, 999):
        noise = torch.randn(x0.shape, generator=g)
        xt = s.q_sample(x0, torch.full((x0.shape[0],), t), noise)
        assert float(xt.mean()) == pytest.approx(2.0 * math.sqrt(float(s.alphas_cumprod[t])), abs=0.01)
        assert float(xt.var()) == pytest.approx(1 - float(s.alphas_cumprod[t]), rel=0.02, abs=1e-3)


def test_noise_and_start_predictions_invert_each_other():
    s = NoiseSchedule("cosine", 1000)
    x0, eps = torch.randn(4, 5, 3), torch.randn(4, 5, 3)
    t = torch.tensor([0, 10, 500, 900])  # near T-1 the cosine alpha_bar underflows float32
    xt = s.q_sample(x0, t, eps)
    assert torch.allclose(s.predict_start_from_noise(xt, t, eps), x0, atol=1e-3)
    assert torch.allclose(s.predict_noise_from_start(xt, t, x0), eps, atol=1e-3)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="T must be"):
        make_betas("linear", 0)
