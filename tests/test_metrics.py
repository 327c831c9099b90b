import math

import pytest

from diffusion_caption.eval.metrics import bleu, caption_metrics, java_available, simple_tokenize, tokenize

needs_java = pytest.mark.skipif(not java_available(), reason="the PTB tokenizer and METEOR need Java")


def test_simple_tokenize_lowercases_and_splits_punctuation():
    assert simple_tokenize("A Red circle, a blue star.") == "a red circle , a blue star ."


def test_identical_hypotheses_score_one():
    refs = {"1": ["a small red circle on a gray background", "a red circle on a gray background"],
            "2": ["a blue star to the left of a green square ."]}
    # case and glued punctuation differ from the references; the tokenisation makes them identical
    hyps = {"1": "A small red circle on a gray background", "2": "a blue star to the left of a green square."}
    out = bleu(hyps, refs)
    assert set(out) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"}
    for v in out.values():
        assert v == pytest.approx(1.0, abs=1e-6)


def test_bleu_by_hand():
    hyps = {"a": "a red red square", "b": "a blue star"}
    refs = {"a": ["a red circle", "a red circle on a gray background"],
            "b": ["a blue star on a black background"]}
    # unigrams, clipped by the max count in any one reference: "a" 1, "red" 1 (of 2), "square" 0 -> 2/4;
    # "a blue star" -> 3/3. Corpus precision 5/7. Hypothesis length c = 7; closest reference lengths
    # 3 (to 4) and 7 (to 3) give r = 10, so the brevity penalty is exp(1 - 10/7).
    bp = math.exp(1 - 10 / 7)
    out = bleu(hyps, refs)
    assert out["BLEU-1"] == pytest.approx(5 / 7 * bp, abs=1e-6)
    # bigrams: "a red" only of 3 in a, both of 2 in b -> 3/5; BLEU-2 is the geometric mean
    assert out["BLEU-2"] == pytest.approx(math.sqrt(5 / 7 * 3 / 5) * bp, abs=1e-6)
    assert out["BLEU-1"] > out["BLEU-2"] > out["BLEU-3"] > out["BLEU-4"] >= 0.0


def test_empty_hypothesis_scores_zero_without_crashing():
    out = bleu({"1": ""}, {"1": ["a red circle"]})
    assert out["BLEU-1"] == pytest.approx(0.0, abs=1e-9)


def test_mismatched_or_empty_ids_raise():
    with pytest.raises(ValueError, match="ids differ"):
        bleu({"1": "a red circle", "2": "a blue star"}, {"1": ["a red circle"]})
    with pytest.raises(ValueError, match="ids differ"):
        bleu({"1": "a red circle"}, {"1": ["a red circle"], "3": ["a blue star"]})
    with pytest.raises(ValueError, match="empty"):
        bleu({}, {})
    with pytest.raises(ValueError, match="reference"):
        bleu({"1": "a red circle"}, {"1": []})
    with pytest.raises(ValueError, match="list of strings"):
        bleu({"1": "a red circle"}, {"1": "a red circle"})


def _rouge_l_by_hand(hyp: list[str], refs: list[list[str]], beta: float = 1.2) -> float:
    def lcs(a, b):
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
        return table[-1][-1]
    p = max(lcs(hyp, r) / len(hyp) for r in refs)
    r = max(lcs(hyp, r) / len(r) for r in refs)
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p and r else 0.0


@needs_java
def test_coco_protocol_metrics():
    refs = {"1": ["A small red circle, on a gray background.", "a red circle on a gray background"],
            "2": ["a blue star to the left of a green square"],
            "3": ["a white triangle on a black background"]}
    hyps = {"1": "A small red circle on a gray background", "2": "a green square to the left of a blue star",
            "3": ""}
    out = caption_metrics(hyps, refs)
    assert out["tokenizer"] == "ptb"
    assert set(out) >= {"BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    # ROUGE-L is the mean over images of the LCS F-measure (beta 1.2); "" scores 0. The PTB tokenizer
    # lower-cases and drops the comma and full stop, so image 1 matches its first reference exactly.
    expected = (1.0 + _rouge_l_by_hand("a green square to the left of a blue star".split(),
                                       ["a blue star to the left of a green square".split()]) + 0.0) / 3
    assert out["ROUGE-L"] == pytest.approx(expected, abs=1e-9)
    assert 0.0 < out["METEOR"] < 1.0 and out["CIDEr"] > 0.0
    # identical hypotheses score 1 on BLEU, METEOR and ROUGE-L, and CIDEr rises
    perfect = caption_metrics({k: v[0] for k, v in refs.items()}, refs)
    for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L"):
        assert perfect[k] == pytest.approx(1.0, abs=1e-6), k
    assert perfect["CIDEr"] > out["CIDEr"]


@needs_java
def test_ptb_tokenizer_drops_punctuation_and_keeps_caption_count():
    out = tokenize({"a": ["A Red circle, on a\ngray background.", "two stars!"], "b": [""]})
    assert out["a"] == ["a red circle on a gray background", "two stars"]
    assert out["b"] == [""]


def test_simple_tokenizer_runs_without_java():
    out = caption_metrics({"1": "a red circle"}, {"1": ["a red circle"]}, tokenizer="simple", meteor=False)
    assert out["ROUGE-L"] == pytest.approx(1.0) and out["tokenizer"] == "simple" and "METEOR" not in out
