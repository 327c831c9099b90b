"""The denoising trace: one record per sampler step, read by the UI, plots, benchmarks and tests."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DenoisingStep:
    index: int  # 0 for the first (noisiest) step
    t: int  # diffusion timestep of the input x_t
    x_t: torch.Tensor  # [L, d] noisy embeddings fed to the network at this step
    x0_pred: torch.Tensor  # [L, d] the network's prediction of the clean embeddings (after guidance)
    token_ids: list[int]  # [L] nearest token of each position of x0_pred, specials and padding included
    tokens: list[str]  # [L] those tokens as strings
    confidence: list[float]  # [L] rounding confidence of each position, in [0, 1]
    text: str  # the caption these tokens decode to (no special or padding tokens)
    # the last step of a call that chose among roundings (propose="rounding"): every distinct candidate
    # caption, best rounding first, its score against the image, and which one these tokens are
    candidates: list[str] | None = None
    scores: list[float] | None = None
    chosen: int | None = None

    def to_json(self) -> dict:
        """Everything but the tensors, for JSON APIs."""
        out = {"index": self.index, "t": self.t, "text": self.text, "tokens": self.tokens,
               "token_ids": self.token_ids, "confidence": self.confidence}
        if self.candidates is not None:
            out.update(candidates=self.candidates, scores=self.scores, chosen=self.chosen)
        return out


@dataclass
class Trace:
    steps: list[DenoisingStep]
    settings: dict = field(default_factory=dict)  # sampler, steps, guidance, clamp, seed, ...
    seconds: float | None = None  # wall time of the whole denoising, image encoding included
    candidates: list[str] | None = None  # with settings["candidates"] = K > 1: the K sampled captions...
    chosen: int | None = None  # ...and which of them this trace is (kept by settings["select"]: MBR or CLIP score)
    # how unlike the training images the input is, when the checkpoint has the statistics (``ood.py``):
    # {"score", "threshold", "unlike_training"}
    ood: dict | None = None
    # the calibrated probability that each final token is right (``confidence.py``; None without a
    # calibrator), and the caption's: its least confident word's
    token_confidence: list[float] | None = None
    caption_confidence: float | None = None

    @property
    def final(self) -> DenoisingStep:
        return self.steps[-1]

    @property
    def text(self) -> str:
        return self.final.text

    @property
    def tokens(self) -> list[str]:
        return self.final.tokens

    @property
    def confidence(self) -> list[float]:
        return self.final.confidence

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def scores(self) -> list[float] | None:
        """The candidates' scores against the image, when they were chosen among by one (else None)."""
        return self.final.scores

    def to_json(self) -> dict:
        out = {"text": self.text, "settings": self.settings, "seconds": self.seconds,
               "steps": [s.to_json() for s in self.steps]}
        if self.candidates is not None:
            out.update(candidates=self.candidates, chosen=self.chosen)
        if self.ood is not None:
            out["ood"] = self.ood
        if self.token_confidence is not None:
            out.update(token_confidence=self.token_confidence, caption_confidence=self.caption_confidence)
        return out

    def x_t(self) -> torch.Tensor:
        """[steps, L, d] noisy inputs of every step, for trajectory plots."""
        return torch.stack([s.x_t for s in self.steps])

    def x0_preds(self) -> torch.Tensor:
        """[steps, L, d] clean predictions of every step."""
        return torch.stack([s.x0_pred for s in self.steps])
