"""Reverse-process samplers, apart from the network (as in diffusers).

A sampler knows the schedule and a list of timesteps; ``step(x0_pred, t, x_t)`` maps the network's
prediction of the clean sample at timestep ``t`` to the next, less noisy sample. Sampling with fewer
steps than the schedule's T respaces the process (Nichol & Dhariwal 2021, section 4): between two kept
timesteps t > s the effective beta is ``1 - alpha_bar_t / alpha_bar_s``. After the last kept timestep
comes "s = -1", where alpha_bar is 1 and the sample is the clean prediction itself.

Which timesteps are kept is the *spacing* (diffusers' ``timestep_spacing``):

- ``"linspace"``: evenly from T-1 down to 0, both ends included (improved-diffusion's respacing);
- ``"trailing"``: ``t_i = round(T (1 - i/n)) - 1``, i = 0..n-1, so it starts at T-1 and stops a stride
  short of 0 (Lin et al., "Common diffusion noise schedules and sample steps are flawed", WACV 2024);
- ``"trailing^k"``: ``t_i = round(T (1 - (i/n)^k)) - 1``, the same with the steps packed towards the noisy
  end for k > 1 (k = 1 is ``"trailing"``).

With few steps the spacing matters: the ``sqrt`` schedule of Diffusion-LM destroys most of the signal in
its first few percent of timesteps, so linspace spends most of a small budget where the caption is already
decided; ``training/README.md`` has the measurements.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .schedule import NoiseSchedule

SAMPLERS = ("ddim", "ddpm", "block")


@dataclass
class SamplerOutput:
    prev_sample: torch.Tensor  # x_s, the sample at the next (smaller) timestep
    pred_original_sample: torch.Tensor  # x_0 as predicted at this step


def spacing_power(spacing: str) -> float | None:
    """None for ``"linspace"``, else the exponent k of ``"trailing^k"`` (1 for ``"trailing"``); a ValueError
    naming the accepted forms for anything else."""
    name = str(spacing).strip().lower()
    if name == "linspace":
        return None
    if name == "trailing":
        return 1.0
    if name.startswith("trailing^"):
        try:
            k = float(name[len("trailing^"):])
        except ValueError:
            k = float("nan")
        if math.isfinite(k) and 0 < k <= 10:
            return k
    raise ValueError(f"spacing must be 'linspace', 'trailing' or 'trailing^k' with 0 < k <= 10, got {spacing!r}")


def spaced_timesteps(T: int, n: int, spacing: str = "linspace") -> list[int]:
    """The kept timesteps, largest first (see the module docstring for the spacings).

    Every spacing starts at T-1, so n = 1 is one jump from pure noise, and gives exactly n distinct
    timesteps: where rounding would merge neighbours of ``trailing^k`` (many steps, k > 1), each takes the
    next free timestep below (so ``trailing^3`` with n = T is every timestep, like the others).
    """
    if not 1 <= n <= T:
        raise ValueError(f"steps must be between 1 and the schedule's T={T}, got {n}")
    k = spacing_power(spacing)
    if n == 1:
        return [T - 1]
    if k is None:
        return sorted({round(i * (T - 1) / (n - 1)) for i in range(n)}, reverse=True)
    ts: list[int] = []
    for i in range(n):
        t = round(T * (1 - (i / n) ** k)) - 1
        if ts:  # strictly below the previous one, and high enough to leave room for the n - 1 - i still to come
            t = max(min(t, ts[-1] - 1), n - 1 - i)
        ts.append(t)
    return ts


class Sampler:
    """Common timestep bookkeeping; subclasses implement ``step``."""

    name = "base"

    def __init__(self, schedule: NoiseSchedule, num_steps: int | None = None, spacing: str = "linspace"):
        self.schedule = schedule
        self.set_timesteps(num_steps or schedule.T, spacing)

    def set_timesteps(self, num_steps: int, spacing: str | None = None) -> None:
        if spacing is not None:
            spacing_power(spacing)
            self.spacing = str(spacing).strip().lower()
        self.timesteps = spaced_timesteps(self.schedule.T, int(num_steps), self.spacing)
        self._prev = {t: s for t, s in zip(self.timesteps, self.timesteps[1:] + [-1])}

    def prev_timestep(self, t: int) -> int:
        if t not in self._prev:
            raise ValueError(f"timestep {t} is not one of this sampler's {len(self.timesteps)} timesteps")
        return self._prev[t]

    def _alpha_bars(self, t: int) -> tuple[float, float]:
        """(alpha_bar_t, alpha_bar_s) for t and the timestep s that follows it."""
        s = self.prev_timestep(t)
        a_t = float(self.schedule.alphas_cumprod[t])
        a_s = float(self.schedule.alphas_cumprod[s]) if s >= 0 else 1.0
        return a_t, a_s

    def step(self, x0_pred: torch.Tensor, t: int, x_t: torch.Tensor,
             generator: torch.Generator | None = None) -> SamplerOutput:
        raise NotImplementedError


class DDIMSampler(Sampler):
    """Song et al. (2021), eq. 12. ``eta = 0`` is deterministic; ``eta = 1`` matches DDPM's variance."""

    name = "ddim"

    def __init__(self, schedule: NoiseSchedule, num_steps: int | None = None, spacing: str = "linspace",
                 eta: float = 0.0):
        super().__init__(schedule, num_steps, spacing)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = eta

    def step(self, x0_pred, t, x_t, generator=None) -> SamplerOutput:
        a_t, a_s = self._alpha_bars(t)
        eps = (x_t - math.sqrt(a_t) * x0_pred) / math.sqrt(1.0 - a_t)
        sigma = self.eta * math.sqrt((1 - a_s) / (1 - a_t)) * math.sqrt(1 - a_t / a_s)
        x_s = math.sqrt(a_s) * x0_pred + math.sqrt(max(1.0 - a_s - sigma**2, 0.0)) * eps
        if sigma > 0:
            x_s = x_s + sigma * _noise_like(x_t, generator)
        return SamplerOutput(x_s, x0_pred)


class DDPMSampler(Sampler):
    """Ancestral sampling from the posterior q(x_s | x_t, x_0 = x0_pred) (Ho et al. 2020, eq. 6-7)."""

    name = "ddpm"

    def posterior(self, t: int) -> tuple[float, float, float]:
        """(posterior_mean_coef1, posterior_mean_coef2, posterior_variance) between t and its successor."""
        a_t, a_s = self._alpha_bars(t)
        beta = 1.0 - a_t / a_s
        coef1 = math.sqrt(a_s) * beta / (1.0 - a_t)
        coef2 = math.sqrt(1.0 - beta) * (1.0 - a_s) / (1.0 - a_t)
        return coef1, coef2, beta * (1.0 - a_s) / (1.0 - a_t)

    def step(self, x0_pred, t, x_t, generator=None) -> SamplerOutput:
        coef1, coef2, var = self.posterior(t)
        x_s = coef1 * x0_pred + coef2 * x_t
        if var > 0:
            x_s = x_s + math.sqrt(var) * _noise_like(x_t, generator)
        return SamplerOutput(x_s, x0_pred)


class BlockSampler(Sampler):
    """Block diffusion (Arriola et al. 2025): after the given [CLS], the caption is denoised one block of
    ``block_size`` positions per step, left to right, each block from pure noise (t = T-1) given the clean
    blocks before it, which the network keeps as cached keys and values (``Denoiser.block_step``).
    ``num_steps`` is the most steps a caption may take; a caption is finished at the step whose block holds
    its [SEP], and a batch at the step its last caption is. ``timesteps`` lists T-1 once per step (the
    trace's label). It needs a network trained with ``block_size`` > 0.

    ``commit`` = c > 0 reveals a block only up to its second unsure position (one rounded with probability
    < c): of two positions that depend on each other and are both unsure (an article and its colour), the
    second is predicted again at the next step, given the first; one unsure position after sure ones is
    revealed, as nothing sure that came before it can tell it more. A caption reveals at most ``MAX_SHORT``
    blocks short, and whole ones after that. Each caption then moves at its own pace; it needs a network
    trained on blocks cut short (``ObjectiveConfig.p_block_split``). With ``VERIFY``, the step that decides a
    held-back position also predicts the next block, given that position's guess, and keeps it where the
    guess is confirmed: the captions of one block a step, in fewer steps (where ``num_steps`` is enough for them).
    """

    name = "block"
    # how many blocks a caption may reveal short under commit: each costs a step. On the dev world (3,150 scenes)
    # the third and later ones changed no caption, while taking 1.1% of them past 10 steps (up to 12; 0.9% take 11
    # with the cap); a cap of one keeps every caption within 10 steps but doubles the defects (0.44% to 0.89%)
    MAX_SHORT = 2
    # verify the guess instead of waiting for it: a caption finishing a block cut short also predicts the next block,
    # in a second row of the same call, given the rest of this one as the last step guessed it; where the guess is
    # confirmed that is the next step's prediction exactly, taken a step early (the same captions, unless a step budget
    # too small for them cuts them short: then they get further)
    VERIFY = True

    def __init__(self, schedule: NoiseSchedule, num_steps: int | None = None, spacing: str = "linspace",
                 sep_id: int | None = None, pad_id: int | None = None, cls_id: int | None = None,
                 commit: float = 0.0):
        super().__init__(schedule, num_steps, spacing)
        # where a caption ends, what stands after it, and the [CLS] every caption starts with (given, not sampled)
        self.sep_id, self.pad_id, self.cls_id = sep_id, pad_id, cls_id
        if not 0.0 <= float(commit) < 1.0:
            raise ValueError(f"commit must be in [0, 1) (0: reveal whole blocks), got {commit!r}")
        self.commit = float(commit)

    def set_timesteps(self, num_steps: int, spacing: str | None = None) -> None:
        if spacing is not None:
            spacing_power(spacing)
            self.spacing = str(spacing).strip().lower()
        if int(num_steps) < 1:
            raise ValueError(f"steps must be at least 1, got {num_steps}")
        self.timesteps = [self.schedule.T - 1] * int(num_steps)

    def step(self, x0_pred, t, x_t, generator=None) -> SamplerOutput:
        raise TypeError("the block sampler denoises one block per step: see GaussianDiffusion's block loop")


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def make_sampler(name: str, schedule: NoiseSchedule, num_steps: int | None = None, spacing: str = "linspace",
                 **kw) -> Sampler:
    name = str(name).lower()
    if name == "ddim":
        return DDIMSampler(schedule, num_steps, spacing, **kw)
    if name == "ddpm":
        return DDPMSampler(schedule, num_steps, spacing)
    if name == "block":
        return BlockSampler(schedule, num_steps, spacing, **kw)
    raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")
