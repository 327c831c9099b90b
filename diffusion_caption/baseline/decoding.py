"""Autoregressive decoding for the prefix captioner: greedy and beam search, with or without the KV cache.

Both work on a batch of images at once and return, per image, the generated token ids (the end token
included when one was produced), the probability the model gave each chosen token, and the summed log
probability. The model only has to provide three methods:

* ``prefix(features) -> [B, k, d]``: the mapped image prefix,
* ``embed(ids) -> [B, t, d]``: token embeddings,
* ``next_logits(embeds, cache) -> (logits [B, V] at the last position, cache)``: with ``cache`` None and
  ``use_cache=True`` a fresh cache is started; with ``use_cache=False`` the whole sequence is fed again.

The two paths compute the same thing, which the tests check; the cache only saves recomputing the
prefix and the tokens already generated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Hypothesis:
    token_ids: list[int]  # generated tokens, the end token included if it was produced
    probs: list[float]  # the model's probability of each of them, given everything before it
    log_prob: float  # sum of their log probabilities


class _Context:
    """Feeds new tokens to the model and returns the next-token logits, keeping the KV cache (or not)."""

    def __init__(self, model, prefix: torch.Tensor, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        self.seq = prefix  # without a cache: everything fed so far
        self.cache = None
        self.started = False

    def logits(self, new_ids: torch.Tensor) -> torch.Tensor:
        new = self.model.embed(new_ids)
        if not self.use_cache:
            self.seq = torch.cat([self.seq, new.to(self.seq.dtype)], dim=1)
            return self.model.next_logits(self.seq, None, use_cache=False)[0]
        inp = new if self.started else torch.cat([self.seq, new.to(self.seq.dtype)], dim=1)
        logits, self.cache = self.model.next_logits(inp, self.cache, use_cache=True)
        self.started = True
        return logits

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and duplicate) these batch rows, for beam bookkeeping."""
        if self.use_cache and self.cache is not None:
            self.cache.reorder_cache(rows)
        else:
            self.seq = self.seq[rows]


def _check(max_new: int, prefix: torch.Tensor) -> None:
    if prefix.ndim != 3:
        raise ValueError(f"the prefix must be [B, k, d], got shape {tuple(prefix.shape)}")
    if max_new < 1:
        raise ValueError(f"max_new must be >= 1, got {max_new}")


@torch.no_grad()
def greedy(model, prefix: torch.Tensor, bos_id: int, eos_id: int, max_new: int,
           use_cache: bool = True) -> list[Hypothesis]:
    """The most probable next token at every step, until the end token or ``max_new`` tokens."""
    _check(max_new, prefix)
    B = prefix.shape[0]
    ctx = _Context(model, prefix, use_cache)
    cur = torch.full((B, 1), bos_id, dtype=torch.long, device=prefix.device)
    done = torch.zeros(B, dtype=torch.bool, device=prefix.device)
    ids, probs, logps = [], [], []
    for _ in range(max_new):
        logp = torch.log_softmax(ctx.logits(cur).float(), dim=-1)
        best, tok = logp.max(dim=-1)
        tok = torch.where(done, torch.full_like(tok, eos_id), tok)
        ids.append(tok)
        logps.append(best)
        probs.append(best.exp())
        done |= tok == eos_id
        if bool(done.all()):
            break
        cur = tok[:, None]
    ids_t, probs_t, logps_t = (torch.stack(x, dim=1).cpu() for x in (ids, probs, logps))
    out = []
    for b in range(B):
        row = ids_t[b].tolist()
        n = row.index(eos_id) + 1 if eos_id in row else len(row)
        out.append(Hypothesis(row[:n], probs_t[b, :n].tolist(), float(logps_t[b, :n].sum())))
    return out


@torch.no_grad()
def beam_search(model, prefix: torch.Tensor, bos_id: int, eos_id: int, max_new: int, beam: int,
                length_penalty: float = 1.0, use_cache: bool = True) -> list[Hypothesis]:
    """Beam search: ``beam`` hypotheses per image, ranked by log probability / length ** ``length_penalty``.

    An image stops as soon as ``beam`` hypotheses have ended (early stopping); beams still open at
    ``max_new`` tokens compete as they are. With ``beam=1`` this is greedy decoding.
    """
    return [ranked[0][1] for ranked in beam_search_n_best(model, prefix, bos_id, eos_id, max_new, beam,
                                                          length_penalty, use_cache)]


@torch.no_grad()
def beam_search_n_best(model, prefix: torch.Tensor, bos_id: int, eos_id: int, max_new: int, beam: int,
                       length_penalty: float = 1.0, use_cache: bool = True) -> list[list[tuple[float, Hypothesis]]]:
    """``beam_search``, keeping every finished hypothesis: per image, ``(ranking score, hypothesis)`` pairs,
    best first (the ranking score is log probability / length ** ``length_penalty``; ties keep the order
    in which the hypotheses ended). The first of each list is what ``beam_search`` returns."""
    _check(max_new, prefix)
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    B, K, dev = prefix.shape[0], beam, prefix.device
    ctx = _Context(model, prefix, use_cache)
    logits = ctx.logits(torch.full((B, 1), bos_id, dtype=torch.long, device=dev))
    rows = torch.arange(B, device=dev).repeat_interleave(K)
    ctx.select(rows)
    logits = logits[rows]
    # only the first copy of each image is live at the start, so the first step picks K different tokens
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0
    scores = scores.view(-1)
    seqs = torch.zeros(B * K, 0, dtype=torch.long, device=dev)
    probs = torch.zeros(B * K, 0, device=dev)
    finished: list[list[tuple[float, Hypothesis]]] = [[] for _ in range(B)]
    done = [False] * B

    def add(b: int, ids: list[int], p: list[float], score: float) -> None:
        finished[b].append((score / max(len(ids), 1) ** length_penalty, Hypothesis(ids, p, score)))

    for t in range(max_new):
        logp = torch.log_softmax(logits.float(), dim=-1)
        V = logp.shape[-1]
        cand = (scores[:, None] + logp).view(B, K * V)
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)
        top_s, top_i = top_s.tolist(), top_i.tolist()
        src, tok, new_scores = [], [], []
        for b in range(B):
            if done[b]:  # keep the rows in place; nothing they compute is used
                src += [b * K] * K
                tok += [eos_id] * K
                new_scores += [float("-inf")] * K
                continue
            alive = 0
            for rank, (s, i) in enumerate(zip(top_s[b], top_i[b])):
                r, tk = b * K + i // V, i % V
                if tk == eos_id:
                    if rank < K:
                        add(b, seqs[r].tolist() + [tk], probs[r].tolist() + [float(logp[r, tk].exp())], s)
                    continue
                src.append(r)
                tok.append(tk)
                new_scores.append(s)
                alive += 1
                if alive == K:
                    break
            while alive < K:  # a vocabulary smaller than 2K can leave too few candidates
                src.append(b * K)
                tok.append(eos_id)
                new_scores.append(float("-inf"))
                alive += 1
            if len(finished[b]) >= K:
                done[b] = True
        if all(done):
            break
        src_t = torch.tensor(src, device=dev)
        tok_t = torch.tensor(tok, device=dev)
        seqs = torch.cat([seqs[src_t], tok_t[:, None]], dim=1)
        probs = torch.cat([probs[src_t], logp[src_t, tok_t].exp()[:, None]], dim=1)
        scores = torch.tensor(new_scores, device=dev)
        if t == max_new - 1:
            break
        ctx.select(src_t)
        logits = ctx.logits(tok_t[:, None])
    for b in range(B):
        if not done[b]:
            for k in range(K):
                r = b * K + k
                if scores[r] > float("-inf"):
                    add(b, seqs[r].tolist(), probs[r].tolist(), float(scores[r]))
    # sorted() is stable, so among equal scores the first to end stays first, as max() would pick it
    return [sorted(f, key=lambda x: -x[0]) for f in finished]
