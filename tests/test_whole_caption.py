"""Whole-caption correctness and caption defects (diffusion_caption/whole_caption.py), on hand-made captions."""
import numpy as np
import pytest

from diffusion_caption.world.whole_caption import (DEFECTS, caption_defects, is_vague, reason_category,
                                             whole_caption_errors, whole_caption_report)
from diffusion_caption.world.scenes import Scene, ShapeObject, caption_candidates, sample_captions, sample_scene


def obj(shape, color, size="small", x=64.0, y=64.0):
    return ShapeObject(shape, color, size, x, y, 12.0 if size == "small" else 23.0)


def scene(*objects, background="gray"):
    return Scene(list(objects), background)


def categories(text, sc):
    return [reason_category(e) for e in whole_caption_errors(text, sc)]


def is_right(text, sc):
    return whole_caption_errors(text, sc) == []


# one of each kind of scene the hand-made captions below describe
RED_CIRCLE = scene(obj("circle", "red"))
# a large red circle above a large purple square
ABOVE = scene(obj("circle", "red", "large", 64, 30), obj("square", "purple", "large", 64, 100), background="beige")
# a red circle to the left of a blue square
PAIR = scene(obj("circle", "red", "small", 30, 64), obj("square", "blue", "large", 100, 70), background="pink")


# ---------------------------------------------------------------------------------------------------
# the world's own captions are all wholly right


def test_every_caption_the_world_writes_is_wholly_right():
    checked = 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        sc = sample_scene(rng)
        caps = set(caption_candidates(sc)) | set(sample_captions(sc, rng, 5))
        for _ in range(3):
            caps |= set(caption_candidates(sc, [int(i) for i in rng.permutation(len(sc.objects))]))
        for c in caps:
            assert caption_defects(c) == [], c
            assert whole_caption_errors(c, sc) == [], (c, sc)
            checked += 1
    assert checked > 2000


@pytest.mark.parametrize("text", [
    "a small orange star",
    "an orange star on a dark blue background",
    "a small orange star on a dark blue background",
    "there is an orange star on a dark blue background",
    "a dark blue background with an orange star",
    "An orange star on a dark blue background.",  # case and a final full stop are not words
])
def test_right_single_object_phrasings(text):
    sc = scene(obj("star", "orange"), background="dark blue")
    assert is_right(text, sc)
    # the same words for a scene that differs in one respect are not right
    assert not is_right(text, scene(obj("star", "yellow"), background="dark blue"))


@pytest.mark.parametrize("text", [
    "two blue squares and a red circle",
    "a red circle and two blue squares on a pink background",
    "there are a red circle and two blue squares on a pink background",
    "there are two blue squares and a red circle on a pink background",
    "a blue square , a red circle and a blue square",
    "a blue square, a red circle and a blue square",  # the comma as decoded, attached to its word
    "three shapes on a pink background",
])
def test_right_plural_and_vague_phrasings(text):
    sc = scene(obj("square", "blue", x=20, y=20), obj("circle", "red", x=64, y=64),
               obj("square", "blue", x=100, y=100), background="pink")
    assert is_right(text, sc), whole_caption_errors(text, sc)


def test_right_relations_and_sizes():
    assert is_right("a large red circle above a large purple square", ABOVE)
    assert is_right("a large purple square below a large red circle on a beige background", ABOVE)
    assert is_right("a red circle to the left of a blue square", PAIR)
    assert is_right("a blue square to the right of a red circle", PAIR)
    assert is_right("a small red circle and a large blue square", PAIR)
    three = scene(*PAIR.objects, obj("star", "green", "small", 64, 120), background="pink")
    assert is_right("a red circle to the left of a blue square and a green star", three)
    assert is_right("a small red circle , a large blue square and a small green star", three)


def test_sizes_pick_out_objects_of_the_same_colour_and_shape():
    sc = scene(obj("circle", "red", "small", x=20), obj("circle", "red", "large", x=100))
    assert is_right("a large red circle and a small red circle", sc)
    assert is_right("a small red circle to the left of a large red circle", sc)
    assert categories("a large red circle and a large red circle", sc) == ["wrong size"]


def test_identical_objects_may_be_related_either_way_round():
    side = scene(obj("circle", "red", x=20, y=64), obj("circle", "red", x=100, y=64))
    assert is_right("a red circle to the left of a red circle", side)
    assert is_right("a red circle to the right of a red circle", side)
    assert "wrong relation" in categories("a red circle above a red circle", side)


# ---------------------------------------------------------------------------------------------------
# wrong captions, and why


def test_repeated_word_is_a_defect_and_not_forgiven():
    sc = scene(obj("circle", "green"))
    text = "there is green circle circle on a gray background"
    assert "repeated token" in caption_defects(text) and "missing article" in caption_defects(text)
    assert not is_right(text, sc)
    assert is_right("there is a green circle on a gray background", sc)
    # one stutter is one defect: the rest of the caption is read with the repeat collapsed
    assert whole_caption_errors("a green green circle", sc) == ["defect: repeated token"]
    assert caption_defects("a green green circle") == ["repeated token"]


def test_dangling_ending_and_wrong_object():
    sc = scene(obj("star", "purple", x=20), obj("square", "blue", x=100))
    cats = categories("a purple star and a blue star on a", sc)
    assert "defect: dangling ending" in cats and "wrong shape" in cats
    assert is_right("a purple star and a blue square on a gray background", sc)
    for text in ("a purple star and a blue square on a gray background and", "a purple star to the left of",
                 "a purple star and a blue square with", "a purple star and the"):
        assert "dangling ending" in caption_defects(text), text


def test_incomplete_noun_phrases():
    assert caption_defects("a red circle on a gray") == ["incomplete noun phrase"]
    assert caption_defects("there is a red diamond on a dark blue") == ["incomplete noun phrase"]
    assert "incomplete noun phrase" in caption_defects("a red on a gray background")
    # a lone final article is a dangling ending, not also an incomplete phrase
    assert caption_defects("a red circle on a") == ["dangling ending"]


def test_swapped_colours_are_wrong():
    assert is_right("a red circle and a blue square", PAIR)
    for text in ("a blue circle and a red square", "a red square and a blue circle"):
        cats = categories(text, PAIR)
        assert cats == ["colour swapped"], (text, whole_caption_errors(text, PAIR))


def test_wrong_shape_size_and_relation():
    cats = categories("a large red circle above a large purple circle", ABOVE)
    assert cats == ["wrong shape"]
    assert categories("a large red circle below a large purple square", ABOVE) == ["wrong relation"]
    assert categories("a small red circle above a large purple square", ABOVE) == ["wrong size"]
    # the relation is the world's: along the axis on which the objects are furthest apart
    assert categories("a red circle to the left of a purple square", ABOVE) == ["wrong relation"]


def test_plural_for_one_object_and_one_object_named_twice():
    one = scene(obj("triangle", "red"))
    assert is_right("a red triangle", one)
    assert set(categories("two red triangles", one)) == {"wrong count", "extra object"}
    assert set(categories("a red triangle and a red triangle", one)) == {"wrong count", "extra object"}
    two = scene(obj("triangle", "red", x=20), obj("triangle", "red", x=100))
    assert is_right("two red triangles", two) and is_right("a red triangle and a red triangle", two)
    assert set(categories("a red triangle", two)) == {"wrong count", "missing object"}
    assert set(categories("three red triangles", two)) == {"wrong count", "extra object"}


def test_hallucinated_object():
    errs = whole_caption_errors("a red circle and a blue square on a gray background", RED_CIRCLE)
    assert "object not in scene: blue square" in errs and caption_defects("a red circle and a blue square") == []
    assert set(categories("a red circle and a blue square", RED_CIRCLE)) == {"wrong count", "object not in scene"}


def test_missing_object_and_vague_count():
    assert set(categories("a red circle", PAIR)) == {"wrong count", "missing object"}
    assert is_right("two shapes on a pink background", PAIR)
    assert set(categories("three shapes on a pink background", PAIR)) == {"wrong count", "extra object"}
    assert categories("two shapes on a gray background", PAIR) == ["wrong background"]


def test_a_shape_without_its_colour_is_not_whole():
    assert categories("a circle on a gray background", RED_CIRCLE) == ["object without colour"]


def test_relation_without_second_object():
    text = "a red circle above on a gray background"
    assert "relation without second object" in caption_defects(text)
    assert not is_right(text, RED_CIRCLE)
    assert "relation without second object" in caption_defects("a red circle to the left of")
    assert "relation without first object" in caption_defects("a red circle and above a blue square")
    assert "broken relation phrase" in caption_defects("a red circle to the left a blue square")


def test_article_before_plural_and_number_before_singular():
    assert "article before plural" in caption_defects("a red circles")
    assert "article before plural" in caption_defects("there is a large red circles on a gray background")
    assert not is_right("a red circles", RED_CIRCLE)
    two = scene(obj("circle", "red", x=20), obj("circle", "red", x=100))
    assert whole_caption_errors("two red circle", two) == ["defect: number before singular"]
    assert is_right("two red circles", two)


def test_wrong_background():
    assert categories("a red circle on a black background", RED_CIRCLE) == ["wrong background"]
    dark = scene(obj("circle", "red"), background="dark blue")
    assert is_right("a red circle on a dark blue background", dark)
    assert categories("a red circle on a blue background", dark) == ["wrong background"]
    assert categories("a blue background with a red circle", dark) == ["wrong background"]
    # "dark" moved onto the object: the object's colour is wrong and so is the background
    assert set(categories("a dark blue circle on a blue background", scene(obj("circle", "blue"),
                                                                          background="dark blue"))) \
        == {"wrong colour", "wrong background"}


@pytest.mark.parametrize("text, defect", [
    ("an yellow star", "article mismatch"),
    ("a orange star", "article mismatch"),
    ("a a red circle", "double article"),
    ("a the red circle", "double article"),
    ("a red square a blue circle", "missing conjunction"),
    ("there is two red circles", "verb agreement"),
    ("there are a red circle", "verb agreement"),
    ("a red circle on a gray background on a gray background", "background named twice"),
    ("a red circle gray background", "misplaced background"),
    ("a pink green background with a red circle", "two colours in one phrase"),
    ("a large small red circle", "two sizes in one phrase"),
    ("a red circle on a blue square", "misplaced word"),
    ("a red circle and on a gray background", "conjunction without object"),
    ("a red circle on a gray backgro", "unknown word"),
    ("", "empty caption"),
])
def test_named_defects(text, defect):
    assert defect in DEFECTS
    assert defect in caption_defects(text), (text, caption_defects(text))


def test_report_by_hand():
    three = scene(obj("circle", "red", x=20), obj("square", "blue", x=64), obj("star", "green", x=100))
    scenes = [RED_CIRCLE, RED_CIRCLE, PAIR, PAIR, three]
    caps = ["a red circle on a gray background",     # right
            "a red red circle",                      # a defect
            "a red circle and a blue square",        # right
            "a blue circle and a red square",        # colours swapped
            "a red circle , a blue square and a"]    # a dangling ending, the star missing
    rep = whole_caption_report(caps, scenes)
    assert rep["n"] == 5 and rep["whole"] == pytest.approx(2 / 5)
    assert rep["n_1obj"] == 2 and rep["whole_1obj"] == pytest.approx(0.5)
    assert rep["n_2obj"] == 2 and rep["whole_2obj"] == pytest.approx(0.5)
    assert rep["n_3obj"] == 1 and rep["whole_3obj"] == 0.0
    assert rep["defect_rate"] == pytest.approx(2 / 5)
    assert rep["defects"] == {"dangling ending": 1, "repeated token": 1}
    assert rep["reasons"]["colour swapped"] == 1 and rep["reasons"]["missing object"] == 1
    assert rep["reasons"]["defect: repeated token"] == 1
    # no scene of three objects: None, not 0
    assert whole_caption_report(caps[:2], scenes[:2])["whole_3obj"] is None
    with pytest.raises(ValueError, match="captions for"):
        whole_caption_report(caps, scenes[:2])


def test_report_counts_the_vague_caption_apart():
    caps = ["two shapes on a pink background", "a red circle and a blue square", "three shapes"]
    assert [is_vague(c) for c in caps] == [True, False, True] and not is_vague("two red shapes")
    rep = whole_caption_report(caps, [PAIR, PAIR, PAIR])
    assert rep["whole"] == pytest.approx(2 / 3) and rep["vague"] == pytest.approx(1 / 3)
    assert rep["vague_2obj"] == pytest.approx(1 / 3) and rep["vague_1obj"] is None


# ---------------------------------------------------------------------------------------------------
# empty scenes

EMPTY = scene(background="beige")


def test_every_caption_of_an_empty_scene_is_wholly_right_and_says_so():
    from diffusion_caption.world.scenes import empty_scene

    for seed in range(20):
        sc = empty_scene(np.random.default_rng(seed))
        caps = caption_candidates(sc)
        assert len(caps) == 5 and sample_captions(sc, np.random.default_rng(seed), 5) == caps
        for c in caps:
            assert caption_defects(c) == [] and whole_caption_errors(c, sc) == [], c
            assert not is_vague(c)


@pytest.mark.parametrize("text", ["an empty beige background", "a beige background with no shapes",
                                  "there are no shapes on a beige background", "no shapes on a beige background",
                                  "an empty background", "no red circles on a beige background"])
def test_right_empty_phrasings(text):
    assert is_right(text, EMPTY)


@pytest.mark.parametrize("text, expected", [
    ("an empty gray background", ["wrong background"]),
    ("a beige background", ["defect: misplaced background"]),  # a background alone says nothing of emptiness
    ("a red circle on a beige background", ["wrong count", "object not in scene"]),
    ("two shapes on a beige background", ["wrong count", "object not in scene", "object not in scene"]),
    ("a empty beige background", ["defect: article mismatch"]),
    ("there is no shapes on a beige background", ["defect: verb agreement"]),
    ("an empty", ["defect: incomplete noun phrase"]),
    ("an empty circle on a beige background", ["defect: misplaced word", "object without colour", "wrong count",
                                               "object not in scene"]),
])
def test_wrong_captions_of_an_empty_scene(text, expected):
    assert categories(text, EMPTY) == expected


def test_saying_empty_of_a_scene_with_objects_is_wrong():
    assert categories("an empty gray background", RED_CIRCLE) == ["wrong count", "missing object"]
    assert categories("there are no shapes on a gray background", RED_CIRCLE) == ["wrong count", "missing object"]
    # naming the object and calling the background empty contradicts itself
    assert whole_caption_errors("a red circle on an empty gray background", RED_CIRCLE) == [
        "wrong count: says there is nothing and names 1"]
    # "no blue squares" is true of the red circle's scene, but the red circle is not named
    assert categories("no blue squares on a gray background", RED_CIRCLE) == ["wrong count", "missing object"]


def test_report_has_a_row_for_empty_scenes():
    rep = whole_caption_report(["an empty beige background", "a red circle", "a red circle"],
                               [EMPTY, EMPTY, RED_CIRCLE])
    assert rep["n_0obj"] == 2 and rep["whole_0obj"] == pytest.approx(0.5) and rep["whole_1obj"] == 1.0
    assert whole_caption_report(["a red circle"], [RED_CIRCLE])["whole_0obj"] is None
