import math

import pytest

from diffusion_caption.metrics import bleu, simple_tokenize


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
