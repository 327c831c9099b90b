"""Caption metrics against reference sets: the COCO caption evaluation protocol via pycocoevalcap.

``caption_metrics`` is the standard protocol: every caption (hypothesis and references) goes through
the Stanford PTB tokenizer (lower-cased, punctuation removed), then corpus-level BLEU-1..4, METEOR 1.5,
ROUGE-L and CIDEr-D are computed over all references of each image, exactly as the COCO server and
published captioning papers do. The PTB tokenizer and METEOR are Java programs shipped inside
pycocoevalcap; they need a ``java`` on the PATH (OpenJDK 17 works). SPICE is optional: on first use it
downloads Stanford CoreNLP, so offline it fails and is reported as unavailable rather than guessed.

``simple_tokenize`` is a pure-Python tokenisation for use without Java (``tokenizer="simple"``); its
scores are close to but not identical with the official ones, and results say which one was used.
"""
from __future__ import annotations

import re
import shutil

_TOKEN = re.compile(r"\w+|[^\w\s]")
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def simple_tokenize(text: str) -> str:
    """Lower-case, split punctuation off as separate tokens, split on whitespace; re-joined by spaces.

    A pure-Python stand-in for the COCO PTB tokenizer (which needs Java and also *drops* punctuation);
    here punctuation such as "," stays as a token of its own.
    """
    return " ".join(_TOKEN.findall(text.lower()))


def java_available() -> bool:
    return shutil.which("java") is not None


def _check(hypotheses: dict, references: dict) -> None:
    hyp_ids, ref_ids = set(hypotheses), set(references)
    if hyp_ids != ref_ids:
        missing_refs = sorted(map(str, hyp_ids - ref_ids))[:5]
        missing_hyps = sorted(map(str, ref_ids - hyp_ids))[:5]
        raise ValueError("hypothesis and reference ids differ: "
                         f"{len(hyp_ids - ref_ids)} ids without references (e.g. {missing_refs}), "
                         f"{len(ref_ids - hyp_ids)} ids without a hypothesis (e.g. {missing_hyps})")
    if not hyp_ids:
        raise ValueError("no hypotheses to score: the hypothesis/reference sets are empty")
    for i in hypotheses:
        if not isinstance(hypotheses[i], str):
            raise ValueError(f"hypothesis for id {i!r} must be a string, got {type(hypotheses[i]).__name__}")
        if isinstance(references[i], str) or not all(isinstance(r, str) for r in references[i]):
            raise ValueError(f"references for id {i!r} must be a list of strings")
        if not any(r.strip() for r in references[i]):
            raise ValueError(f"id {i!r} has no non-empty reference caption")


def tokenize(captions: dict[str, list[str]], method: str = "ptb") -> dict[str, list[str]]:
    """Tokenise id -> captions with the PTB tokenizer (``"ptb"``, needs Java) or ``simple_tokenize``."""
    if method == "simple":
        return {i: [simple_tokenize(c) for c in cs] for i, cs in captions.items()}
    if method != "ptb":
        raise ValueError(f"tokenizer must be 'ptb' or 'simple', got {method!r}")
    if not java_available():
        raise RuntimeError("the PTB tokenizer of the COCO evaluation needs Java: install a JRE "
                           "(e.g. `apt-get install openjdk-17-jre-headless`) or use tokenizer='simple'")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # the tokenizer works line by line: newlines inside a caption would shift every later caption
    flat = {i: [{"caption": " ".join(c.split())} for c in cs] for i, cs in captions.items()}
    out = PTBTokenizer().tokenize(flat)
    if set(out) != set(captions) or any(len(out[i]) != len(captions[i]) for i in captions):
        raise RuntimeError("the PTB tokenizer returned a different number of captions than it was given")
    return out


def bleu(hypotheses: dict[str, str], references: dict[str, list[str]], tokenizer: str = "simple") -> dict[str, float]:
    """Corpus-level BLEU-1..4 (``pycocoevalcap.bleu.Bleu(4)``) of id -> caption against id -> captions.

    N-gram counts are pooled over the corpus; the brevity penalty uses the closest reference length per
    item. An empty hypothesis is allowed and contributes no n-grams. Raises ``ValueError`` when the id
    sets differ, are empty, or an id has no non-empty reference.
    """
    from pycocoevalcap.bleu.bleu import Bleu

    _check(hypotheses, references)
    gts, res = _tokenized(hypotheses, references, tokenizer)
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {f"BLEU-{k + 1}": float(s) for k, s in enumerate(scores)}


def _tokenized(hypotheses, references, tokenizer):
    # one tokenizer call (one JVM start) for references and hypotheses together
    both = tokenize({**{("ref", i): list(references[i]) for i in references},
                     **{("hyp", i): [hypotheses[i]] for i in hypotheses}}, tokenizer)
    refs = {i: both[("ref", i)] for i in references}
    hyps = {i: both[("hyp", i)] for i in hypotheses}
    gts = {i: [r for r in refs[i] if r] for i in refs}
    for i, rs in gts.items():
        if not rs:
            raise ValueError(f"id {i!r} has no reference caption left after tokenisation")
    return gts, {i: hyps[i] for i in hyps}


def caption_metrics(hypotheses: dict[str, str], references: dict[str, list[str]], tokenizer: str = "ptb",
                    meteor: bool = True, spice: bool = False) -> dict:
    """The COCO caption metrics of id -> caption against id -> reference captions, corpus level.

    Returns ``{"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr", ["SPICE"], "tokenizer": ...}``, and
    ``"notes"`` listing metrics that could not run (METEOR without Java, SPICE offline) and why.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check(hypotheses, references)
    gts, res = _tokenized(hypotheses, references, tokenizer)
    out: dict = {}
    b, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"BLEU-{k + 1}": float(s) for k, s in enumerate(b)})
    notes = []
    if meteor:
        if java_available():
            from pycocoevalcap.meteor.meteor import Meteor

            # METEOR reads "|||"-separated lines; an empty hypothesis is scored as a lone "." (no match)
            scorer = Meteor()  # a Java subprocess, stopped when the scorer is garbage-collected
            out["METEOR"] = float(scorer.compute_score(gts, {i: [h[0] or "."] for i, h in res.items()})[0])
            del scorer
        else:
            notes.append("METEOR skipped: it needs Java")
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        try:
            from pycocoevalcap.spice.spice import Spice

            out["SPICE"] = float(Spice().compute_score(gts, res)[0])
        except Exception as e:  # SPICE downloads Stanford CoreNLP on first use
            notes.append(f"SPICE unavailable ({type(e).__name__}: {str(e)[:200]}); it needs Stanford CoreNLP, "
                         "which it downloads on first use")
    out["tokenizer"] = tokenizer
    if notes:
        out["notes"] = notes
    return out
