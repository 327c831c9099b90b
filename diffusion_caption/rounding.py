"""Rounding continuous embeddings to tokens (Diffusion-LM, section 4.2).

The rounding head is tied to the token embedding table E: the logit of token v at a position is
``-||x - E_v||^2``, so the most likely token is the nearest embedding, and the softmax gives a
distribution whose maximum is the rounding confidence. Clamping replaces a predicted x0 by the nearest
embedding (the "clamping trick"), which a sampler can apply at every step.
"""
from __future__ import annotations

import torch


def token_logits(x: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Logits ``-||x - E_v||^2`` of shape [..., V] for x of shape [..., d] and E of shape [V, d]."""
    e = embeddings.to(x.dtype)
    # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2, without materialising [..., V, d]
    return -(x.pow(2).sum(-1, keepdim=True) - 2 * x @ e.T + e.pow(2).sum(-1))


def round_to_tokens(x: torch.Tensor, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest token ids and their softmax probability (the rounding confidence), both of shape [...]."""
    probs = token_logits(x.float(), embeddings.float()).softmax(-1)
    conf, ids = probs.max(-1)
    return ids, conf


def clamp_to_embeddings(x: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Replace every position of x by its nearest token embedding."""
    ids = token_logits(x, embeddings).argmax(-1)
    return embeddings.to(x.dtype)[ids]
