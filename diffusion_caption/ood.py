"""How unlike the training images an input is, so that a caption of something far off is flagged as a guess.

The score is the Mahalanobis distance of the image's raw CLIP embedding (the image tower's output before
its normalisation to unit length) from the training images' embeddings (Lee et al. 2018): a Gaussian
fitted to the training split, its covariance shrunk towards a multiple of the identity so that directions
the training images never varied in still count, but not infinitely. The raw embedding, not the unit
feature the captioner reads: measured on the shapes CLIP, noise, photographs and rendered text have unit
features *nearer* the training mean than the held-out scenes (the small tower maps what it cannot read
to a generic direction), while their embeddings are two to four times longer. The threshold is calibrated on the validation split: the
``pass_rate`` quantile of its scores, so that in-domain images pass at that rate. A checkpoint folder holds
it as ``ood.safetensors`` (mean, precision) and ``ood.json`` (threshold, pass rate, what it was fitted on);
``Captioner.from_pretrained`` loads it when present and every ``Trace`` then carries the verdict.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from . import checkpoint as ckpt

TENSORS, CONFIG = "ood.safetensors", "ood.json"
FORMAT = "diffusion-caption-ood/1"
NOTICE = ("This image looks unlike anything this model was trained on: the caption is a guess.")


@dataclass
class FeatureDensity:
    mean: torch.Tensor  # [D]
    precision: torch.Tensor  # [D, D], the inverse of the shrunk covariance
    threshold: float  # scores above it are out of domain
    pass_rate: float  # the share of validation images at or below the threshold
    info: dict = field(default_factory=dict)  # what it was fitted on

    @classmethod
    def fit(cls, train: torch.Tensor, val: torch.Tensor, pass_rate: float = 0.95, shrinkage: float = 0.1,
            info: dict | None = None) -> "FeatureDensity":
        """Fit on ``train`` raw embeddings [N, D], calibrate the threshold on ``val`` [M, D]."""
        if not 0.5 <= pass_rate < 1.0:
            raise ValueError(f"pass_rate must be in [0.5, 1), got {pass_rate}")
        if not 0.0 < shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage}")
        if train.ndim != 2 or val.ndim != 2 or train.shape[1] != val.shape[1] or len(train) < 2 or len(val) < 1:
            raise ValueError(f"features must be [N, D] and [M, D] with N >= 2, got {tuple(train.shape)} and {tuple(val.shape)}")
        x = train.double()
        mean = x.mean(0)
        cov = torch.cov((x - mean).T)
        D = cov.shape[0]
        cov = (1 - shrinkage) * cov + shrinkage * (torch.trace(cov) / D) * torch.eye(D, dtype=cov.dtype)
        density = cls(mean.float(), torch.linalg.inv(cov).float(), math.inf, pass_rate,
                      {**(info or {}), "n_train": len(train), "n_val": len(val), "shrinkage": shrinkage})
        scores = density.scores(val).double()
        density.threshold = float(torch.quantile(scores, pass_rate))
        density.info["val_score_median"] = float(scores.median())
        return density

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[N] Mahalanobis distances of raw image embeddings [N, D] (``ImageEncoder.encode(..., normalize=False)``)."""
        d = embeddings.float().to(self.mean.device) - self.mean
        return ((d @ self.precision) * d).sum(-1).clamp_min(0).sqrt()

    def assess(self, embeddings: torch.Tensor) -> list[dict]:
        """For each image: its score, the threshold, and whether it is out of domain."""
        return [{"score": round(s, 4), "threshold": round(self.threshold, 4), "unlike_training": s > self.threshold}
                for s in self.scores(embeddings).tolist()]

    # ---------------------------------------------------------------------------------------- files
    def save(self, folder: str) -> None:
        """Write ``ood.safetensors`` and ``ood.json`` into an existing checkpoint folder."""
        ckpt.save_tensors({"mean": self.mean.contiguous(), "precision": self.precision.contiguous()},
                          os.path.join(folder, TENSORS))
        ckpt.write_json(os.path.join(folder, CONFIG), {"format": FORMAT, "threshold": self.threshold,
                                                       "pass_rate": self.pass_rate, "info": self.info})

    @classmethod
    def is_in(cls, folder: str) -> bool:
        return os.path.isfile(os.path.join(folder, CONFIG))

    @classmethod
    def load(cls, folder: str, feature_dim: int | None = None) -> "FeatureDensity":
        cfg_file = os.path.join(folder, CONFIG)
        meta = ckpt.read_json(cfg_file)
        if meta.get("format") != FORMAT:
            raise ckpt.CheckpointError(f"{cfg_file}: format {meta.get('format')!r} is not {FORMAT!r}")
        t = ckpt.load_tensors(os.path.join(folder, TENSORS))
        if "mean" not in t or "precision" not in t:
            raise ckpt.CheckpointError(f"{os.path.join(folder, TENSORS)}: needs 'mean' and 'precision'")
        D = t["mean"].shape[0]
        if t["precision"].shape != (D, D) or (feature_dim is not None and D != feature_dim):
            raise ckpt.CheckpointError(f"{folder}: the out-of-domain statistics are {D}-d with a "
                                       f"{tuple(t['precision'].shape)} precision; the image features are "
                                       f"{feature_dim}-d")
        try:
            threshold, pass_rate = float(meta["threshold"]), float(meta["pass_rate"])
        except (KeyError, TypeError, ValueError):
            raise ckpt.CheckpointError(f"{cfg_file}: needs a numeric 'threshold' and 'pass_rate'") from None
        return cls(t["mean"].float(), t["precision"].float(), threshold, pass_rate, meta.get("info", {}))
