"""Token confidence (diffusion_caption/confidence.py) and word truth (world/token_truth.py): hand-made cases."""
import os

import pytest
import torch

from diffusion_caption.confidence import (Calibrator, auroc, decision_confidence, decision_step,
                                          expected_calibration_error, reliability)
from diffusion_caption.trace import DenoisingStep, Trace
from diffusion_caption.world.scenes import Scene, ShapeObject
from diffusion_caption.world.token_truth import word_truth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scene():
    return Scene([ShapeObject("star", "purple", "large", 20, 20, 8), ShapeObject("square", "red", "small", 40, 40, 5)],
                 "dark blue")


def test_word_truth_judges_shapes_bound_colours_backgrounds_sizes_and_counts():
    sc = _scene()
    w = "a purple star and a red square on a dark blue background".split()
    assert word_truth(w, sc) == [None, True, True, None, None, True, True, None, None, True, True, None]
    # colours swapped between the objects: both colours wrong, both shapes right
    w = "a red star and a purple square".split()
    assert word_truth(w, sc) == [None, False, True, None, None, False, True]
    # a shape not in the scene, a wrong background, a colour naming nothing, a size, counts
    assert word_truth("a purple circle on a pink background".split(), sc) == [None, False, False, None, None, False,
                                                                              None]
    assert word_truth("a small red square".split(), sc) == [None, True, True, True]
    assert word_truth("a large red square".split(), sc) == [None, False, True, True]
    assert word_truth("two shapes on a gray".split(), sc) == [True, None, None, None, False]
    assert word_truth("three shapes".split(), sc)[0] is False
    assert word_truth("two red squares".split(), sc) == [False, True, True]
    # emptiness: "empty" and "no shapes" are right of an empty scene only; "no" of whatever is not there
    empty = Scene([], "beige")
    assert word_truth("an empty beige background".split(), empty) == [None, True, True, None]
    assert word_truth("an empty beige background".split(), sc) == [None, False, False, None]
    assert word_truth("no shapes on a beige background".split(), empty)[0] is True
    assert word_truth("no shapes on a beige background".split(), sc)[0] is False
    assert word_truth("no green stars".split(), sc)[0] is True and word_truth("no purple stars".split(), sc)[0] is False


def _step(i, ids, conf):
    return DenoisingStep(index=i, t=999 - i, x_t=torch.zeros(len(ids), 2), x0_pred=torch.zeros(len(ids), 2),
                         token_ids=ids, tokens=[str(x) for x in ids], confidence=conf, text="")


def test_the_decision_step_is_where_a_position_took_its_final_token_for_good():
    steps = [_step(0, [1, 5, 7], [0.9, 0.4, 0.3]), _step(1, [1, 6, 7], [0.95, 0.5, 0.6]),
             _step(2, [1, 6, 7], [1.0, 0.99, 0.99])]
    ids = [s.token_ids for s in steps]
    assert [decision_step(ids, p) for p in range(3)] == [0, 1, 0]
    assert decision_confidence(Trace(steps)) == [0.9, 0.5, 0.3]  # not the last step's near-1 values


def test_platt_scaling_recovers_the_law_that_made_the_labels():
    g = torch.Generator().manual_seed(0)
    signal = torch.rand(20000, generator=g).clamp(0.01, 0.99)
    logit = torch.log(signal) - torch.log1p(-signal)
    p_right = torch.sigmoid(0.5 * logit + 1.0)
    right = (torch.rand(20000, generator=g) < p_right).tolist()
    cal = Calibrator.fit(signal.tolist(), right)
    assert cal.a == pytest.approx(0.5, abs=0.05) and cal.b == pytest.approx(1.0, abs=0.05)
    calibrated = cal(signal.tolist())
    assert expected_calibration_error(calibrated, right) < 0.02 < expected_calibration_error(signal.tolist(), right)
    with pytest.raises(ValueError):
        Calibrator.fit([], [])


def test_reliability_ece_and_auroc_on_hand_made_cases():
    conf = [0.95, 0.95, 0.15, 0.15, 0.15, 0.55]
    right = [True, False, False, False, True, True]
    bins = reliability(conf, right)
    assert [(b["n"], round(b["confidence"], 2), round(b["accuracy"], 3)) for b in bins] == [
        (3, 0.15, 0.333), (1, 0.55, 1.0), (2, 0.95, 0.5)]
    want = (3 * abs(1 / 3 - 0.15) + 1 * abs(1.0 - 0.55) + 2 * abs(0.5 - 0.95)) / 6
    assert expected_calibration_error(conf, right) == pytest.approx(want)
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0  # 1.0 falls in the last bin
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5  # a tie counts half
    with pytest.raises(ValueError):
        auroc([0.5], [True])


def test_the_default_carries_calibrated_token_and_caption_confidence(tmp_path):
    """The shipped default's confidence.json: every trace that kept its steps carries calibrated token and
    caption confidences; record="final" keeps no decision step, so none."""
    from diffusion_caption import Captioner

    cap = Captioner.from_pretrained(os.path.join(ROOT, "assets", "checkpoints", "shapes-diffusion-block"))
    assert cap.calibrator is not None and cap.calibrator.signal == "decision"
    img = os.path.join(ROOT, "assets", "examples", "shapes_03.png")
    tr = cap.caption(img, seed=0)
    assert len(tr.token_confidence) == len(tr.final.tokens) and 0 < tr.caption_confidence <= 1
    words = [c for t, c in zip(tr.final.tokens, tr.token_confidence) if t not in ("[CLS]", "[SEP]", "[PAD]")]
    assert tr.caption_confidence == min(words) and tr.to_json()["caption_confidence"] == tr.caption_confidence
    assert cap.caption(img, seed=0, record="final").token_confidence is None
    # saved and loaded unchanged; a broken file is named
    cap.calibrator.save(str(tmp_path))
    assert Calibrator.load(str(tmp_path)) == cap.calibrator
    (tmp_path / "confidence.json").write_text('{"format": "diffusion-caption-confidence/1", "kind": "platt", "a": "x"}')
    from diffusion_caption.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="numeric"):
        Calibrator.load(str(tmp_path))


def test_the_baseline_carries_its_calibrated_confidence_too():
    from diffusion_caption import BaselineCaptioner

    base = BaselineCaptioner.from_pretrained(os.path.join(ROOT, "assets", "checkpoints", "shapes-baseline"))
    assert base.calibrator is not None and base.calibrator.signal == "token"
    c = base.caption(os.path.join(ROOT, "assets", "examples", "shapes_03.png"))
    assert len(c.token_confidence) == len(c.tokens) and c.to_json()["caption_confidence"] == c.caption_confidence
    raw = [r for t, r in zip(c.tokens, c.confidence) if t != "[SEP]"]
    assert [k for t, k in zip(c.tokens, c.token_confidence) if t != "[SEP]"] == base.calibrator(raw)


def test_fit_confidence_calibrates_on_val_and_reports_test(world_dir, tmp_path):
    """The command end to end on a small world with the shipped models (written nowhere but its report): both
    models calibrated on val and reported on test, their reliability bins holding every judged word, the
    calibrator the one fitted on val's words, the plot and table written."""
    import json

    from training import fit_confidence

    ck = os.path.join(ROOT, "assets", "checkpoints")
    out = tmp_path / "conf.json"
    res = fit_confidence.main(["--diffusion", os.path.join(ck, "shapes-diffusion-block"), "--baseline",
                               os.path.join(ck, "shapes-baseline"), "--data-dir", world_dir, "--threads", "1",
                               "--no-write", "--out", str(out)])
    assert set(res) == {"shapes-diffusion-block", "shapes-baseline"}
    r = res["shapes-diffusion-block"]
    assert r["signal"] == "decision" and r["n_words"] > 20 and 0 < r["words_right"] <= 1
    assert all(0 <= r[k] <= 1 for k in ("ece_last_step", "ece_raw", "ece_calibrated"))
    assert r["calibrator"]["n"] > 20 and res["shapes-baseline"]["signal"] == "token"
    # the calibrated bins are the fitted law applied to the test words: recompute one bin's mean confidence
    cal = Calibrator(r["calibrator"]["a"], r["calibrator"]["b"])
    assert 0.0 < cal([0.5])[0] < 1.0 and r["reliability_calibrated"][-1]["confidence"] <= cal([0.999999])[0] + 1e-6
    assert sum(b["n"] for b in r["reliability_calibrated"]) == r["n_words"]
    assert json.loads(out.read_text())["results"].keys() == res.keys()
    assert (tmp_path / "conf.png").stat().st_size > 10_000 and "shapes-baseline" in (tmp_path / "conf.md").read_text()
