"""Caption metrics against reference sets (corpus-level BLEU through pycocoevalcap)."""
from __future__ import annotations

import re

_TOKEN = re.compile(r"\w+|[^\w\s]")


def simple_tokenize(text: str) -> str:
    """Lower-case, split punctuation off as separate tokens, split on whitespace; re-joined by spaces.

    A pure-Python stand-in for the COCO PTB tokenizer (which needs Java and also *drops* punctuation);
    here punctuation such as "," stays as a token of its own.
    """
    return " ".join(_TOKEN.findall(text.lower()))


def bleu(hypotheses: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Corpus-level BLEU-1..4 of ``hypotheses`` (id -> caption) against ``references`` (id -> captions).

    Scored by ``pycocoevalcap.bleu.bleu.Bleu(4)`` (n-gram counts pooled over the corpus, brevity penalty
    from the closest reference length per item), after ``simple_tokenize`` -- a lowercase / split-off-
    punctuation / whitespace tokenisation, NOT the Java PTB tokenizer of the official COCO evaluation,
    so scores are close to, but not identical with, published COCO numbers.

    An empty hypothesis string is allowed (a model may emit nothing) and simply contributes no n-grams.
    Raises ``ValueError`` if the two id sets differ, if there are no ids at all, or if an id has no
    non-empty reference.
    """
    from pycocoevalcap.bleu.bleu import Bleu

    hyp_ids, ref_ids = set(hypotheses), set(references)
    if hyp_ids != ref_ids:
        missing_refs = sorted(map(str, hyp_ids - ref_ids))[:5]
        missing_hyps = sorted(map(str, ref_ids - hyp_ids))[:5]
        raise ValueError("hypothesis and reference ids differ: "
                         f"{len(hyp_ids - ref_ids)} ids without references (e.g. {missing_refs}), "
                         f"{len(ref_ids - hyp_ids)} ids without a hypothesis (e.g. {missing_hyps})")
    if not hyp_ids:
        raise ValueError("no hypotheses to score: the hypothesis/reference sets are empty")
    res, gts = {}, {}
    for i in hypotheses:
        hyp = hypotheses[i]
        if not isinstance(hyp, str):
            raise ValueError(f"hypothesis for id {i!r} must be a string, got {type(hyp).__name__}")
        if isinstance(references[i], str) or not all(isinstance(r, str) for r in references[i]):
            raise ValueError(f"references for id {i!r} must be a list of strings")
        refs = [simple_tokenize(r) for r in references[i]]
        refs = [r for r in refs if r]
        if not refs:
            raise ValueError(f"id {i!r} has no non-empty reference caption")
        res[i] = [simple_tokenize(hyp)]
        gts[i] = refs
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {f"BLEU-{k + 1}": float(s) for k, s in enumerate(scores)}
