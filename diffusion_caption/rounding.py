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


def likeliest_roundings(x: torch.Tensor, embeddings: torch.Tensor, k: int,
                        positions: int | None = None, max_delta: float = float("inf")) -> list[tuple[list[int], float]]:
    """The ``k`` likeliest token sequences for one prediction ``x`` [L, d], best first, with their log
    probabilities, positions independent (the rounding softmax at each) and each position keeping its
    nearest or its second-nearest token.

    The first is ``round_to_tokens``'s rounding. Moving position q to its second token costs
    delta_q = log p_q(1st) - log p_q(2nd) >= 0, so the k best sequences are the k subsets of positions
    with the smallest summed delta (``k_best_roundings``). Only the first ``positions`` positions may move
    (default: all), so that padding after the caption's end need not be spent on, and only those whose
    delta is at most ``max_delta`` (a position whose second token is e^-max_delta times less likely than
    its first keeps its first).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be one prediction [L, d], got shape {tuple(x.shape)}")
    top = top2_log_probs(x, embeddings)
    return k_best_roundings(top.values.tolist(), top.indices.tolist(), k, positions, max_delta)


def top2_log_probs(x: torch.Tensor, embeddings: torch.Tensor):
    """The two likeliest tokens of every position of x [..., L, d] and their rounding log probabilities
    (``torch.topk``'s values and indices, [..., L, 2]): all a batch of ``k_best_roundings`` needs, in one
    matrix product."""
    return token_logits(x.float(), embeddings.float()).log_softmax(-1).topk(2, -1)


def k_best_roundings(values: list[list[float]], indices: list[list[int]], k: int, positions: int | None = None,
                     max_delta: float = float("inf")) -> list[tuple[list[int], float]]:
    """``likeliest_roundings`` from one prediction's top-2 log probabilities and token ids ([L][2] lists).

    The subsets are enumerated exactly, in order, with a heap over the deltas sorted ascending (from a
    subset whose largest index is i: add i+1, or move i to i+1; every subset is reached once).
    """
    import heapq

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    best = [ids[0] for ids in indices]
    second = [ids[1] for ids in indices]
    base = sum(v[0] for v in values)
    n = len(values) if positions is None else max(0, min(int(positions), len(values)))
    delta = [values[q][0] - values[q][1] for q in range(n)]
    order = sorted((q for q in range(n) if delta[q] <= max_delta), key=lambda q: delta[q])
    n = len(order)
    d = [delta[q] for q in order]
    out = [(best, base)]
    heap = [(d[0], (0,))] if n else []
    while heap and len(out) < k:
        cost, subset = heapq.heappop(heap)
        ids = list(best)
        for i in subset:
            ids[order[i]] = second[order[i]]
        out.append((ids, base - cost))
        i = subset[-1]
        if i + 1 < n:
            heapq.heappush(heap, (cost + d[i + 1], subset + (i + 1,)))
            heapq.heappush(heap, (cost - d[i] + d[i + 1], subset[:-1] + (i + 1,)))
    return out
