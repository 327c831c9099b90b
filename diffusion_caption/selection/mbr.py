"""Minimum Bayes risk (MBR) selection: caption an image K times, keep the consensus caption.

A diffusion captioner denoises every position at once, so K samples of one image cost one batch of K
rather than K passes, and at small batch sizes (where the network is far from the machine's limit)
barely more time than one. MBR decoding (Kumar & Byrne 2004; used for diffusion language models by
DiffuSeq, Gong et al. 2023, section 4.2) then returns the sample that agrees most with the others:

    y* = argmax_j  U(y_j; {y_k : k != j})

The utility ``U`` here is sentence BLEU (pycocoevalcap's ``BleuScorer``, the other K-1 samples as its
references, the closest reference length for the brevity penalty), averaged over BLEU-1..4 so that
short candidates with no matching 4-gram are still ranked. Ties go to the lowest index, so the
choice is deterministic given the samples.
"""
from __future__ import annotations

import re

_TOKEN = re.compile(r"\w+|[^\w\s]")


def _tokens(text: str) -> str:
    """Lower-cased words and punctuation marks, space-separated (BleuScorer splits on whitespace)."""
    return " ".join(_TOKEN.findall(text.lower()))


def consensus_scores(candidates: list[str]) -> list[float]:
    """``U(y_j; others)`` for every candidate of one image: mean sentence BLEU-1..4 against the rest."""
    if len(candidates) < 2:
        return [1.0] * len(candidates)
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer  # the COCO protocol's BLEU, only when MBR runs

    toks = [_tokens(c) for c in candidates]
    scorer = BleuScorer(n=4)
    for j, hyp in enumerate(toks):
        scorer += (hyp, [r for k, r in enumerate(toks) if k != j])
    _, per_n = scorer.compute_score(option="closest")
    return [sum(per_n[n][j] for n in range(4)) / 4 for j in range(len(toks))]


def mbr_select(candidates: list[str]) -> int:
    """The index of the consensus candidate (the first of equals); a ValueError when there is none."""
    if not candidates:
        raise ValueError("MBR needs at least one candidate caption")
    scores = consensus_scores(candidates)
    return max(range(len(candidates)), key=lambda j: (scores[j], -j))
