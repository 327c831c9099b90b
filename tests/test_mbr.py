"""MBR selection: the consensus rule on hand-made candidates, and the captioner's candidates setting."""
import pytest
import torch

from diffusion_caption.selection.mbr import consensus_scores, mbr_select


def test_the_caption_most_like_the_others_is_chosen():
    c = ["a red star on a black background",
         "a red circle on a pink background",
         "a red circle on a pink background .",
         "a red circle on a gray background",
         "two green squares"]
    scores = consensus_scores(c)
    assert len(scores) == 5 and all(0.0 <= x <= 1.0 for x in scores)
    # the two agreeing captions (punctuation is a token of its own, case is ignored) score highest;
    # the outlier lowest
    assert mbr_select(c) in (1, 2)
    assert min(range(5), key=scores.__getitem__) == 4
    # the first of equals wins, so the choice is deterministic
    assert mbr_select(["A pink square", "a pink square", "a blue star"]) == 0
    assert mbr_select(["only one"]) == 0 and consensus_scores(["only one"]) == [1.0]
    with pytest.raises(ValueError, match="at least one candidate"):
        mbr_select([])


def test_consensus_is_sentence_bleu_against_the_others():
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    c = ["a small red circle", "a red circle", "a large blue square on a pink background"]
    scores = consensus_scores(c)
    for j in range(3):
        s = BleuScorer(n=4)
        s += (c[j], [x for k, x in enumerate(c) if k != j])
        _, per_n = s.compute_score(option="closest")
        assert scores[j] == pytest.approx(sum(per_n[n][0] for n in range(4)) / 4)


def test_captioner_candidates_pick_one_of_the_samples(make_captioner, scene_image):
    cap = make_captioner(sampling=dict(steps=3))
    tr = cap.caption(scene_image, candidates=4, seed=5, sampler="ddpm")
    assert tr.settings["candidates"] == 4 and len(tr.candidates) == 4 and 0 <= tr.chosen < 4
    assert tr.text == tr.candidates[tr.chosen] == tr.candidates[mbr_select(tr.candidates)]
    assert len(tr.steps) == 3  # the chosen sample's whole trace
    # the candidates are the K samples of the image denoised as one batch
    feats = cap.encode_images([scene_image])
    plain = cap.caption_batch(features=feats.repeat_interleave(4, 0), seed=5, sampler="ddpm", steps=3)
    assert [p.text for p in plain] == tr.candidates
    assert torch.equal(plain[tr.chosen].final.x0_pred, tr.final.x0_pred)
    # a batch of images: each gets its own K samples, in order
    two = cap.caption_batch([scene_image, scene_image], candidates=3, seed=1, record="final")
    assert [len(t.candidates) for t in two] == [3, 3] and all(len(t.steps) == 1 for t in two)
    assert tr.to_json()["candidates"] == tr.candidates and "candidates" not in cap.caption(scene_image).to_json()
    for bad in (0, 65, 2.5, True):
        with pytest.raises(ValueError, match="candidates must be"):
            cap.caption(scene_image, candidates=bad)
    with pytest.raises(ValueError, match="cannot stream"):
        next(cap.iter_caption(scene_image, candidates=2))
