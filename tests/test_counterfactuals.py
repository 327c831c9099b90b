"""Counterfactual test sets (background pairs, hue, grayscale) and their colour-blind scoring."""
import json

import numpy as np
import pytest

from diffusion_caption.world import counterfactuals as cf
from diffusion_caption.world.scenes import BACKGROUND_RGB, SHAPE_BACKGROUND, Scene, ShapeObject, render_scene


def scene(objs, background):
    return Scene([ShapeObject(s, c, "large", x, 64.0, 22.0) for s, c, x in objs], background)


def test_background_pair_keeps_objects_and_moves_only_the_background():
    s = scene([("circle", "red", 40.0), ("star", "green", 90.0)], "black")
    typical, counter = cf.background_pair(s, np.random.default_rng(0))
    assert typical.background == SHAPE_BACKGROUND["circle"] == "pink"
    assert counter.background not in {"pink", "red", "green"}
    assert typical.objects == s.objects == counter.objects
    a, b = np.asarray(render_scene(typical)), np.asarray(render_scene(counter))
    assert tuple(a[0, 0]) == BACKGROUND_RGB["pink"] and tuple(b[0, 0]) == BACKGROUND_RGB[counter.background]
    # the object's pixels are the same colour in both renders (its centre is at x=40, y=64)
    assert np.abs(a[64, 40].astype(int) - b[64, 40].astype(int)).max() <= 12
    assert np.abs(a[64, 40].astype(int) - np.array([220, 40, 40])).max() <= 60  # red


def test_background_pair_skips_scenes_whose_object_has_the_typical_colour_and_is_deterministic():
    assert cf.background_pair(scene([("circle", "pink", 64.0)], "black"), np.random.default_rng(0)) is None
    scenes = [scene([("star", "red", 64.0)], "gray"), scene([("circle", "pink", 64.0)], "gray"),
              scene([("square", "blue", 64.0)], "gray")]
    pairs = cf.background_pairs(scenes, seed=5)
    assert [i for i, _, _ in pairs] == [0, 2]
    assert [p[2].background for p in pairs] == [p[2].background for p in cf.background_pairs(scenes, seed=5)]


def test_colour_blind_scoring_ignores_colour_words():
    truth = [scene([("circle", "red", 64.0)], "pink"), scene([("circle", "red", 40.0), ("star", "blue", 90.0)], "gray")]
    caps = ["a blue circle on a gray background",   # colours wrong, shape right
            "a green square and a red star"]         # one of the two shapes right, count right
    rep = cf.blind_report(caps, truth)
    assert rep["n"] == 2
    assert rep["1-obj shape"] == 1.0
    assert rep["shape"] == pytest.approx((1.0 + 0.5) / 2)
    assert rep["count"] == 1.0
    assert rep["names chromatic colour"] == 1.0


def test_names_chromatic_colour():
    assert not cf.names_chromatic_colour("a white circle on a black background")
    assert not cf.names_chromatic_colour("a large white star on a gray background")
    assert cf.names_chromatic_colour("a white circle on a pink background")
    assert cf.names_chromatic_colour("two red squares")


def test_hue_and_gray_images_keep_size_and_change_colours():
    img = render_scene(scene([("circle", "red", 64.0)], "pink"))
    g = cf.gray_images([img])[0]
    a = np.asarray(g)
    assert g.size == img.size and g.mode == "RGB" and np.array_equal(a[..., 0], a[..., 1])
    h = cf.hue_images([img], 180)[0]
    assert h.size == img.size and not np.array_equal(np.asarray(h), np.asarray(img))


def test_counterfactual_report_and_command(make_captioner, world_dir, tmp_path):
    from diffusion_caption.data import load_datasets
    from diffusion_caption.eval.evaluation import counterfactual_report, counterfactual_tables
    from training import evaluate

    model = make_captioner()
    records = load_datasets("shapes", world_dir, splits=["test"])[:6]
    settings = model.settings(0, steps=2, sampler="ddim", guidance=1.0, clamp=False)
    rep = counterfactual_report(model, records, settings, batch_size=4)
    bg = rep["background"]
    assert 1 <= bg["n_pairs"] <= 6 and bg["typical"]["n"] == bg["counterfactual"]["n"] == bg["n_pairs"]
    for k, v in bg["bias"].items():
        t, c = bg["typical"][k], bg["counterfactual"][k]
        assert v == (None if t is None or c is None else pytest.approx(t - c))
    assert set(rep["hue"]) == {"original", "hue +90", "hue +180", "hue +270", "mean", "bias"}
    assert rep["hue"]["original"]["n"] == 6 and rep["grayscale"]["grayscale"]["n"] == 6
    assert rep["grayscale"]["bias"]["shape"] == (
        None if rep["grayscale"]["original"]["shape"] is None or rep["grayscale"]["grayscale"]["shape"] is None
        else pytest.approx(rep["grayscale"]["original"]["shape"] - rep["grayscale"]["grayscale"]["shape"]))
    md = counterfactual_tables(rep, "tiny")
    assert "typical backgrounds" in md and "grayscale: bias" in md and "hue: mean of the rotations" in md
    with pytest.raises(ValueError, match="unknown counterfactual sets"):
        counterfactual_report(model, records, settings, sets=("sepia",))

    ckpt_dir = str(tmp_path / "ckpt")
    model.save_pretrained(ckpt_dir)
    out = str(tmp_path / "cf.json")
    evaluate.main(["--checkpoint", ckpt_dir, "--data-dir", world_dir, "--split", "test", "--limit", "4",
                   "--steps", "2", "--tokenizer", "simple", "--counterfactuals", "background,grayscale",
                   "--out", out, "--cache-dir", str(tmp_path / "cache")])
    res = json.load(open(out))
    assert set(res["counterfactuals"]) == {"background", "grayscale"}
    assert "counterfactual backgrounds" in open(out[:-5] + ".md").read()
    with pytest.raises(SystemExit, match="unknown set"):
        evaluate.main(["--checkpoint", ckpt_dir, "--data-dir", world_dir, "--counterfactuals", "sepia"])
