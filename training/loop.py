"""The one training loop every trainer runs: shuffled batches by step, the learning-rate schedule, a
gradient step, validation, resumable checkpoints, ``--stop-at`` and a tqdm bar.

A trainer supplies what differs: how a batch's losses are computed (``loss``), what happens after each
optimiser step (``after_step``: an EMA update, a clamp), how it validates and how it saves its state.
The batch order depends only on the seed and the step, so a resumed run sees the batches it would have.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from . import common


def shuffled_batches(n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> Callable[[int], torch.Tensor]:
    """``indices(step)``: the step's batch of ``range(n)``, one fresh permutation per epoch (drawn from the
    seed and the epoch alone), the batch split evenly over ``world`` ranks."""
    per_epoch = max(n // batch_size, 1)
    local = batch_size // world

    def indices(step: int) -> torch.Tensor:
        epoch, j = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        idx = perm[j * batch_size:(j + 1) * batch_size]
        return idx[rank * local:(rank + 1) * local] if world > 1 else idx

    return indices


@dataclass
class Loop:
    """Run ``steps`` optimiser steps from ``step``. ``loss(step)`` returns a dict with ``"loss"`` (the one
    to minimise) and any other scalars to show; ``lr(step)`` the learning rate; ``save(step)`` writes the
    resumable state; ``validate()`` a dict of validation numbers."""
    opt: torch.optim.Optimizer
    params: list
    loss: Callable[[int], dict]
    lr: Callable[[int], float]
    save: Callable[[int], None]
    validate: Callable[[], dict]
    run_dir: str
    steps: int
    val_every: int
    ckpt_every: int
    grad_clip: float = 0.0
    stop_at: int = 0
    after_step: Callable[[], None] | None = None
    is_main: bool = True
    desc: str = "train"
    shown: tuple[str, ...] = ("loss",)  # the losses on the bar

    def run(self, step: int) -> tuple[int, bool]:
        """(the last step, whether the run finished); False: stopped at ``stop_at``, resumable."""
        t0 = time.time()
        bar = tqdm(total=self.steps, initial=step, desc=self.desc, disable=not self.is_main)
        try:
            while step < self.steps:
                for group in self.opt.param_groups:
                    group["lr"] = self.lr(step)
                losses = self.loss(step)
                self.opt.zero_grad(set_to_none=True)
                losses["loss"].backward()
                if self.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
                self.opt.step()
                if self.after_step is not None:
                    with torch.no_grad():
                        self.after_step()
                step += 1
                bar.update(1)
                if step % 20 == 0 or step == self.steps:
                    bar.set_postfix({k: f"{float(losses[k].detach()):.3f}" for k in self.shown if k in losses})
                if self.is_main and (step % self.val_every == 0 or step == self.steps):
                    rec = {"step": step, **{k: float(v.detach()) for k, v in losses.items()}, **self.validate(),
                           "lr": self.opt.param_groups[0]["lr"], "elapsed_s": time.time() - t0}
                    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
                    common.write_log(self.run_dir, rec)
                if self.is_main and (step % self.ckpt_every == 0 or step == self.steps):
                    self.save(step)
                if self.stop_at and step >= self.stop_at and step < self.steps:
                    if self.is_main:
                        self.save(step)
                    print(f"stopped at step {step} (--stop-at); continue with --resume")
                    return step, False
        finally:
            bar.close()
        return step, True
