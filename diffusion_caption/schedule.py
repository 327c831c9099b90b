"""Gaussian noise schedules and the closed-form quantities of the forward process.

Names follow Ho et al. (2020) and improved-diffusion: ``betas`` are beta_t, ``alphas_cumprod`` is
alpha-bar_t, ``posterior_*`` describe q(x_{t-1} | x_t, x_0). Timesteps are 0-based: t = 0 is the first
noising step and t = T - 1 the last.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine", "sqrt")


def _betas_from_alpha_bar(alpha_bar, T: int, max_beta: float = 0.999) -> torch.Tensor:
    """beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T), clipped to ``max_beta`` (Nichol & Dhariwal, eq. 17)."""
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(name: str, T: int) -> torch.Tensor:
    """beta_1..beta_T for a named schedule, as float64."""
    if T < 1:
        raise ValueError(f"the number of diffusion steps T must be >= 1, got {T}")
    if name == "linear":  # Ho et al., rescaled so that any T spans the same noise range as T = 1000
        scale = 1000 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    if name == "cosine":  # Nichol & Dhariwal (2021), s = 0.008
        return _betas_from_alpha_bar(lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2, T)
    if name == "sqrt":  # Li et al. (2022), Diffusion-LM: alpha_bar = 1 - sqrt(u + s), s = 1e-4
        return _betas_from_alpha_bar(lambda u: 1 - math.sqrt(u + 1e-4), T)
    raise ValueError(f"unknown noise schedule {name!r}; expected one of {SCHEDULES}")


def _gather(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] shaped to broadcast against x (batch first), in x's dtype and device."""
    out = a.to(x.device)[t.to(x.device)].to(x.dtype)
    return out.reshape(out.shape + (1,) * (x.dim() - out.dim()))


class NoiseSchedule:
    """Precomputed forward-process quantities for T steps of a named schedule."""

    def __init__(self, name: str = "sqrt", T: int = 1000):
        self.name, self.T = name, T
        self.betas = make_betas(name, T)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, T={self.T})"

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean and variance of q(x_t | x_0)."""
        return (_gather(self.sqrt_alphas_cumprod, t, x_start) * x_start,
                _gather(1.0 - self.alphas_cumprod, t, x_start))

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (_gather(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + _gather(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and variance of q(x_{t-1} | x_t, x_0)."""
        mean = (_gather(self.posterior_mean_coef1, t, x_t) * x_start
                + _gather(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, _gather(self.posterior_variance, t, x_t)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_noise_from_start(self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)."""
        return ((_gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x_start)
                / _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t))
