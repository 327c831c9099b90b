import math

import numpy as np
import pytest

from diffusion_caption.world import scenes as world
from diffusion_caption.world.attributes import (TWO_OBJECT_OUTCOMES, ParsedObject, attribute_scores, parse_caption,
                                          single_object_accuracy, two_object_outcome, two_object_outcomes)
from diffusion_caption.world.scenes import Scene, ShapeObject


def obj(shape, color, size="small", x=64.0, y=64.0):
    return ShapeObject(shape, color, size, x, y, 12.0)


def scene(*objects, background="gray"):
    return Scene(list(objects), background)


def shapes_colors(parsed):
    return [(o.color, o.shape) for o in parsed.objects]


def test_single_object_with_size_and_background():
    p = parse_caption("a small red circle on a gray background")
    assert p.objects == [ParsedObject("circle", "red", "small", 1)]
    assert p.background == "gray" and p.relation is None and p.count == 1


def test_plurals_and_counts():
    p = parse_caption("two blue squares")
    assert p.objects == [ParsedObject("square", "blue", None, 2)] and p.count == 2
    p = parse_caption("there are two red circles and a blue star on a black background")
    assert shapes_colors(p) == [("red", "circle"), ("blue", "star")]
    assert [o.count for o in p.objects] == [2, 1] and p.count == 3 and p.background == "black"
    p = parse_caption("three shapes on a beige background")
    assert p.objects == [] and p.count == 3 and p.background == "beige"
    p = parse_caption("a red circle , a blue star and an orange square on a dark blue background")
    assert shapes_colors(p) == [("red", "circle"), ("blue", "star"), ("orange", "square")]
    assert p.count == 3 and p.background == "dark blue"
    # a plural without a number word claims at least two
    assert parse_caption("red circles").count == 2


def test_relations_parse_and_score():
    p = parse_caption("a red circle to the left of a green triangle and a blue star")
    assert p.relation == "to the left of" and p.relation_pair == (0, 1) and p.count == 3
    assert parse_caption("a small red circle below a large blue star").relation == "below"
    assert parse_caption("a red circle above a blue star").relation == "above"
    s = scene(obj("circle", "red", x=20), obj("triangle", "green", x=100))
    assert attribute_scores(parse_caption("a red circle to the left of a green triangle"), s)["relation"] == 1.0
    assert attribute_scores(parse_caption("a red circle to the right of a green triangle"), s)["relation"] == 0.0
    assert attribute_scores(parse_caption("a green triangle to the right of a red circle"), s)["relation"] == 1.0
    assert attribute_scores(parse_caption("a red circle above a green triangle"), s)["relation"] == 0.0
    assert attribute_scores(parse_caption("a red circle and a green triangle"), s)["relation"] is None
    # the relation links the objects on either side of it, not simply the first two
    p = parse_caption("a blue star and a red circle to the left of a green triangle")
    assert p.relation_pair == (1, 2)
    s3 = scene(obj("star", "blue", x=110, y=20), obj("circle", "red", x=20), obj("triangle", "green", x=100))
    assert attribute_scores(p, s3)["relation"] == 1.0
    assert attribute_scores(parse_caption("a blue star to the left of a green triangle"), s3)["relation"] == 0.0
    # a relation in a single-object scene cannot hold
    assert attribute_scores(parse_caption("a red circle to the left of a red circle"),
                            scene(obj("circle", "red")))["relation"] == 0.0


def test_white_and_pink_as_object_versus_background():
    p = parse_caption("a pink background with a white star")
    assert p.background == "pink" and shapes_colors(p) == [("white", "star")]
    p = parse_caption("a white star on a pink background")
    assert p.background == "pink" and shapes_colors(p) == [("white", "star")]
    p = parse_caption("a pink circle on a black background")
    assert p.background == "black" and shapes_colors(p) == [("pink", "circle")]
    # "white" is never a background of this world: claiming one is a wrong background, not an object
    p = parse_caption("a white circle on a white background")
    assert p.background == "white" and shapes_colors(p) == [("white", "circle")]
    sc = attribute_scores(p, scene(obj("circle", "white"), background="black"))
    assert sc["background"] == 0.0 and sc["color"] == 1.0 and sc["hallucination"] == 0.0


def test_dark_blue_versus_blue():
    p = parse_caption("a blue square on a dark blue background")
    assert p.background == "dark blue" and shapes_colors(p) == [("blue", "square")]
    p = parse_caption("a blue square on a blue background")
    assert p.background == "blue"
    p = parse_caption("a dark blue square")
    assert p.background is None and shapes_colors(p) == [("blue", "square")]
    s = scene(obj("square", "blue"), background="dark blue")
    assert attribute_scores(parse_caption("a blue square on a dark blue background"), s)["background"] == 1.0
    assert attribute_scores(parse_caption("a blue square on a black background"), s)["background"] == 0.0


def test_garbage_and_repeated_words():
    p = parse_caption("a a red red circle circle on on a gray gray background background")
    assert p.objects == [ParsedObject("circle", "red", None, 1)] and p.background == "gray" and p.count == 1
    p = parse_caption("xyz qqq the of")
    assert p.objects == [] and p.count is None and p.background is None and p.relation is None
    sc = attribute_scores(p, scene(obj("circle", "red")))
    assert all(sc[k] is None for k in ("color", "shape", "binding", "size", "count", "relation", "background"))
    assert sc["hallucination"] == 0.0
    # missing words: a colour without a shape, a shape without a colour
    p = parse_caption("a red on a gray background")
    assert p.objects == [ParsedObject(None, "red", None, 1)]
    p = parse_caption("a small circle")
    assert p.objects == [ParsedObject("circle", None, "small", 1)]
    assert parse_caption("").count is None


def test_single_object_scores():
    s = scene(obj("circle", "red", "large"), background="beige")
    sc = attribute_scores(parse_caption("a large red circle on a beige background"), s)
    assert sc == {"color": 1.0, "shape": 1.0, "binding": None, "size": 1.0, "count": 1.0, "relation": None,
                  "background": 1.0, "hallucination": 0.0}
    sc = attribute_scores(parse_caption("a small blue circle"), s)
    assert sc["color"] == 0.0 and sc["shape"] == 1.0 and sc["size"] == 0.0 and sc["hallucination"] == 1.0
    assert sc["background"] is None
    sc = attribute_scores(parse_caption("two red circles"), s)
    assert sc["count"] == 0.0 and sc["color"] == 1.0


def test_multi_object_scores_are_fractions():
    s = scene(obj("circle", "red", "small", x=20), obj("star", "blue", "large", x=100))
    # the red "star" is wrong on shape (no red star) and on colour (the star is blue); the blue star is right
    sc = attribute_scores(parse_caption("a red star and a blue star"), s)
    assert sc["color"] == 0.5 and sc["shape"] == 0.5 and sc["count"] == 1.0 and sc["hallucination"] == 0.0
    # a hallucinated shape only costs shape: its colour is judged against all objects
    sc = attribute_scores(parse_caption("a red square and a blue star"), s)
    assert sc["color"] == 1.0 and sc["shape"] == 0.5 and sc["hallucination"] == 1.0
    sc = attribute_scores(parse_caption("a small red circle and a small blue star"), s)
    assert sc["size"] == 0.5
    sc = attribute_scores(parse_caption("a green circle"), s)
    assert sc["color"] == 0.0 and sc["count"] == 0.0 and sc["hallucination"] == 1.0


def test_binding_scores_whether_named_pairs_are_one_object():
    s = scene(obj("star", "green", x=20), obj("circle", "white", x=100))
    assert attribute_scores(parse_caption("a green star and a white circle"), s)["binding"] == 1.0
    # every word is in the scene, the colours are on the other shapes
    sc = attribute_scores(parse_caption("a white star and a green circle"), s)
    assert sc["binding"] == 0.0 and sc["hallucination"] == 0.0 and sc["color"] == 0.0
    assert attribute_scores(parse_caption("a green star and a green circle"), s)["binding"] == 0.5
    # a hallucinated colour or shape is not a binding error, and a mention naming one attribute is not a pair
    assert attribute_scores(parse_caption("a red star and a white circle"), s)["binding"] == 1.0
    assert attribute_scores(parse_caption("a red square and a star"), s)["binding"] is None
    assert attribute_scores(parse_caption("two shapes on a gray background"), s)["binding"] is None
    assert attribute_scores(parse_caption("a green star"), scene(obj("star", "green")))["binding"] is None


def test_two_object_outcomes_name_what_went_wrong():
    s = scene(obj("star", "purple", x=30.0), obj("square", "red", x=90.0))
    cases = {"a purple star and a red square": "right",
             "a red square to the right of a purple star": "right",
             "a red star and a purple square": "swapped",
             "a purple square and a red square": "repeated shape",   # the parallel decoder's signature
             "a purple star and a purple square": "repeated colour",
             "a purple star and a red circle": "other",              # a shape the scene lacks
             "a purple star": "other",                               # one pair
             "two shapes on a gray background": "other",
             "a purple star , a red square and a red star": "other"}
    for caption, outcome in cases.items():
        assert two_object_outcome(parse_caption(caption), s) == outcome, caption
    # only two objects of different colours and different shapes are scored
    assert two_object_outcome(parse_caption("a red circle"), scene(obj("circle", "red"))) is None
    assert two_object_outcome(parse_caption("two red shapes"), scene(obj("star", "red"), obj("square", "red"))) is None
    assert two_object_outcome(parse_caption("two stars"), scene(obj("star", "red"), obj("star", "blue"))) is None
    rep = two_object_outcomes(list(cases) + ["a red circle"], [s] * len(cases) + [scene(obj("circle", "red"))])
    assert rep["n"] == len(cases) and set(rep) == {"n", *TWO_OBJECT_OUTCOMES}
    assert rep["right"] == pytest.approx(2 / 9) and rep["other"] == pytest.approx(4 / 9)
    assert sum(rep[k] for k in TWO_OBJECT_OUTCOMES) == pytest.approx(1.0)
    assert two_object_outcomes(["a red circle"], [scene(obj("circle", "red"))]) == {
        "n": 0, **{k: None for k in TWO_OBJECT_OUTCOMES}}


def test_round_trip_on_world_captions():
    rng = np.random.default_rng(0)
    n_caps = 0
    seen_relation = seen_size = False
    for _ in range(300):
        s = world.sample_scene(rng)
        for cap in world.sample_captions(s, rng):
            p = parse_caption(cap)
            sc = attribute_scores(p, s)
            bad = {k: v for k, v in sc.items() if k != "hallucination" and v == 0.0}
            assert not bad, (cap, s, p, bad)
            assert sc["hallucination"] == 0.0, (cap, s, p)
            assert p.count == len(s.objects), (cap, p)  # every world caption states the object count
            if " background" in cap:
                assert p.background == s.background, (cap, p)
            seen_relation |= sc["relation"] is not None
            seen_size |= sc["size"] is not None
            n_caps += 1
    assert n_caps > 1000 and seen_relation and seen_size


def test_single_object_accuracy():
    scenes = [scene(obj("circle", "red")), scene(obj("star", "blue")), scene(obj("square", "pink")),
              scene(obj("circle", "red"), obj("star", "blue")), scene(obj("diamond", "white"))]
    caps = ["a red circle", "a blue circle", "garbage", "a red circle and a blue star",
            "a pink background with a white diamond"]
    acc = single_object_accuracy(caps, scenes)
    assert acc["n"] == 4
    assert acc["color_acc"] == pytest.approx(3 / 4)
    assert acc["shape_acc"] == pytest.approx(2 / 4)
    assert acc["both_acc"] == pytest.approx(2 / 4)
    assert math.isnan(single_object_accuracy([], [])["color_acc"])
    with pytest.raises(ValueError):
        single_object_accuracy(["a red circle"], [])
