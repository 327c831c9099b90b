"""What a caption claims about a shapes-world scene, and how much of it is true.

``parse_caption`` turns a caption (possibly an ungrammatical model output: repeated words, missing
words, stray tokens) into a ``ParsedCaption``; ``attribute_scores`` checks each claim exactly against a
``world.Scene``; ``single_object_accuracy`` is the headline colour/shape accuracy on single-object scenes.

The parser is a single left-to-right scan over lower-cased word tokens (punctuation is dropped):

* Runs of the same token are collapsed first ("a red red circle" -> "a red circle"), since repeats are
  the commonest diffusion-decoding artefact.
* Background: the token ``background`` preceded by a background name claims that background; "dark
  blue" is recognised as one two-word name. ``"<object colour> background"`` (e.g. "a white background")
  is also taken as a background claim, so a wrong background is scored as wrong rather than read as an
  object. The words of the background phrase are never object attributes, so "a pink background with a
  white star" has background ``pink`` and one object, a white star.
* Objects: a noun phrase is an optional number word ("a", "an", "one", "two", "three", ...), then size
  and colour words in either order, closed by a shape word (singular or plural with a trailing "s").
  A colour with no shape after it ("a red on ...") still yields an object (``shape=None``), and a bare
  shape ("a circle") yields one with ``color=None``; a size word alone yields nothing. A second colour
  or size before the shape starts a new phrase ("a red blue circle" -> a red object and a blue circle).
* Counts: ``"<number> shapes"`` (or "objects") claims that many objects in total. Otherwise the claimed
  total is the sum of the listed objects' counts, where a plural shape takes its number word and a
  plural without one counts as 2 (the least a plural claims); a singular with "two"/"three" in front
  ("two red circle") takes the number.
* Relations: the keywords ``left``, ``right``, ``above`` and ``below`` (so "to the left of" with words
  missing still counts) claim the relation between the object just before and the object just after.
  Only the first relation phrase is kept.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .scenes import BACKGROUNDS, COLORS, RELATIONS, SHAPES, SIZES, Scene, ShapeObject, relation

NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
GENERIC_NOUNS = {"shape", "shapes", "object", "objects"}
RELATION_KEYWORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
assert set(RELATION_KEYWORDS.values()) == set(RELATIONS), "RELATION_KEYWORDS out of sync with world.RELATIONS"
_SHAPE_OF = {**{s: (s, False) for s in SHAPES}, **{s + "s": (s, True) for s in SHAPES}}
_TOKEN = re.compile(r"[a-z]+")


@dataclass
class ParsedObject:
    shape: str | None
    color: str | None
    size: str | None
    count: int = 1


@dataclass
class ParsedCaption:
    objects: list[ParsedObject]
    background: str | None
    relation: str | None
    count: int | None
    # indices into ``objects`` of the two objects the relation links (either may be None when the
    # caption has no object on that side of the relation phrase)
    relation_pair: tuple[int | None, int | None] | None = field(default=None)


def _tokens(text: str) -> list[str]:
    toks = _TOKEN.findall(text.lower())
    return [t for i, t in enumerate(toks) if i == 0 or t != toks[i - 1]]


def _find_background(toks: list[str]) -> tuple[str | None, set[int]]:
    """The first recognisable "<name> background" phrase, and the token positions it uses."""
    for i, t in enumerate(toks):
        if t != "background" or i == 0:
            continue
        if i >= 2 and toks[i - 2] == "dark" and toks[i - 1] == "blue":
            return "dark blue", {i - 2, i - 1, i}
        if toks[i - 1] in BACKGROUNDS or toks[i - 1] in COLORS:
            return toks[i - 1], {i - 1, i}
    return None, set()


def parse_caption(text: str) -> ParsedCaption:
    """What ``text`` claims: its objects, background, relation and total object count (see module doc)."""
    toks = _tokens(text)
    background, used = _find_background(toks)
    objects: list[ParsedObject] = []
    generic_count: int | None = None
    rel: str | None = None
    rel_left: int | None = None
    rel_waiting = False  # a relation was seen and its right-hand object is not yet parsed
    rel_right: int | None = None

    number: int | None = None
    cur: dict = {}

    def flush() -> None:
        nonlocal cur, number, rel_waiting, rel_right
        if cur.get("color") or cur.get("shape"):
            plural = cur.get("plural", False)
            if plural:
                count = number if number and number >= 2 else 2
            else:
                count = number if number and number >= 2 else 1
            objects.append(ParsedObject(cur.get("shape"), cur.get("color"), cur.get("size"), count))
            if rel_waiting:
                rel_right, rel_waiting = len(objects) - 1, False
            number = None
        cur = {}

    for i, t in enumerate(toks):
        if i in used:  # the background phrase separates noun phrases
            flush()
            number = None
            continue
        if t in NUMBER_WORDS:
            flush()
            number = NUMBER_WORDS[t]
        elif t in SIZES:
            if cur.get("size"):
                flush()
            cur["size"] = t
        elif t in COLORS:
            if cur.get("color"):
                flush()
            cur["color"] = t
        elif t in _SHAPE_OF:
            cur["shape"], cur["plural"] = _SHAPE_OF[t]
            flush()
        elif t in GENERIC_NOUNS:
            had_attrs = bool(cur.get("color"))
            flush()
            if not had_attrs and number is not None and generic_count is None:
                generic_count = number if t.endswith("s") or number >= 2 else 1
            number = None
        elif t in RELATION_KEYWORDS:
            flush()
            number = None
            if rel is None:
                rel = RELATION_KEYWORDS[t]
                rel_left = len(objects) - 1 if objects else None
                rel_waiting = True
        else:
            flush()
            number = None
    flush()

    if generic_count is not None:
        count = generic_count
    elif objects:
        count = sum(o.count for o in objects)
    else:
        count = None
    pair = (rel_left, rel_right) if rel is not None else None
    return ParsedCaption(objects, background, rel, count, pair)


# ---------------------------------------------------------------------------------------------------
# scoring against ground truth


def _candidates(scene: Scene, **attrs: str | None) -> list[ShapeObject]:
    """Scene objects matching every given (non-None) attribute."""
    return [o for o in scene.objects if all(v is None or getattr(o, k) == v for k, v in attrs.items())]


def _context(scene: Scene, obj: ParsedObject, keys: tuple[str, ...]) -> list[ShapeObject]:
    """Scene objects agreeing with ``obj`` on ``keys``; all of them if none agrees (or nothing is given).

    Falling back to every object keeps one wrong attribute from being counted against another: a "red
    star" in a scene with a red circle and no star is wrong on shape, but its colour is right.
    """
    cands = _candidates(scene, **{k: getattr(obj, k) for k in keys})
    return cands or list(scene.objects)


def _fraction(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def attribute_scores(parsed: ParsedCaption, scene: Scene) -> dict[str, float | None]:
    """Exact checks of ``parsed`` against ``scene``; each value is 1.0/0.0 (or a fraction), None if unmentioned.

    * ``color`` / ``shape`` / ``size``: in a single-object scene, whether the first mentioned object
      that names that attribute has the scene object's value (1.0 or 0.0). In a multi-object scene, the
      fraction of mentioned objects naming the attribute whose value matches some scene object that
      agrees with the mention on the other attributes (colour is checked among objects of the mentioned
      shape, shape among objects of the mentioned colour, size among objects of the mentioned colour
      and shape), falling back to all scene objects when no object agrees -- so a "red star" in a scene
      with a red circle and no star is right on colour and wrong on shape.
    * ``binding`` (multi-object scenes only): of the mentioned objects naming both a colour and a shape
      that the scene has (on any objects), the fraction whose colour and shape belong to one scene
      object. "a white star and a green circle" for a green star and a white circle scores 0.0: every
      word is in the scene, the pairs are swapped. None in a single-object scene or without such a mention.
    * ``count``: whether the claimed number of objects (``parsed.count``) equals ``len(scene.objects)``.
    * ``relation``: whether some ordered pair of distinct scene objects matching the two related
      mentioned objects (on whatever colour/shape they name) stands in the claimed relation
      (``world.relation``). 0.0 in a single-object scene, or when either side has no object.
    * ``background``: whether the claimed background equals the scene's.
    * ``hallucination``: 1.0 if the caption names a shape or an object colour that no scene object
      has, else 0.0 (never None; a wrong background is scored by ``background``, not here).
    """
    objs = parsed.objects
    out: dict[str, float | None] = {}
    if len(scene.objects) == 1:
        truth = scene.objects[0]
        for key in ("color", "shape", "size"):
            named = [o for o in objs if getattr(o, key) is not None]
            out[key] = None if not named else float(getattr(named[0], key) == getattr(truth, key))
    else:
        out["color"] = _fraction([any(s.color == o.color for s in _context(scene, o, ("shape",)))
                                  for o in objs if o.color is not None])
        out["shape"] = _fraction([any(s.shape == o.shape for s in _context(scene, o, ("color",)))
                                  for o in objs if o.shape is not None])
        out["size"] = _fraction([any(s.size == o.size for s in _context(scene, o, ("color", "shape")))
                                 for o in objs if o.size is not None])
    paired = [o for o in objs if o.color is not None and o.shape is not None
              and _candidates(scene, color=o.color) and _candidates(scene, shape=o.shape)]
    out["binding"] = None if len(scene.objects) == 1 else _fraction(
        [bool(_candidates(scene, color=o.color, shape=o.shape)) for o in paired])
    out["count"] = None if parsed.count is None else float(parsed.count == len(scene.objects))

    if parsed.relation is None:
        out["relation"] = None
    else:
        li, ri = parsed.relation_pair or (None, None)
        ok = False
        if li is not None and ri is not None and len(scene.objects) >= 2:
            left = _candidates(scene, color=objs[li].color, shape=objs[li].shape)
            right = _candidates(scene, color=objs[ri].color, shape=objs[ri].shape)
            ok = any(a is not b and relation(a, b) == parsed.relation for a in left for b in right)
        out["relation"] = float(ok)

    out["background"] = None if parsed.background is None else float(parsed.background == scene.background)
    shapes = {o.shape for o in scene.objects}
    colors = {o.color for o in scene.objects}
    out["hallucination"] = float(any((o.shape is not None and o.shape not in shapes)
                                     or (o.color is not None and o.color not in colors) for o in objs))
    return out


TWO_OBJECT_OUTCOMES = ("right", "swapped", "repeated shape", "repeated colour", "other")


def two_object_outcome(parsed: ParsedCaption, scene: Scene) -> str | None:
    """What a caption made of a two-object scene whose objects differ in colour and in shape.

    The caption's colour-shape pairs (objects naming both) are compared with the scene's two:
    ``right`` (exactly the scene's two pairs), ``swapped`` (the scene's two colours and two shapes,
    wrongly paired), ``repeated shape`` (the scene's two colours, one of its shapes named for both:
    "a purple square and a red square" for a purple star and a red square), ``repeated colour`` (the
    converse), ``other`` (fewer or more than two pairs, or a colour or shape the scene lacks). None for
    other scenes. The repetitions are the parallel decoder's signature: two positions that each pick the
    likelier of two words, without agreeing which of them the other picked.
    """
    if len(scene.objects) != 2:
        return None
    a, b = scene.objects
    if a.color == b.color or a.shape == b.shape:
        return None
    pairs = [(o.color, o.shape) for o in parsed.objects if o.color is not None and o.shape is not None]
    if len(pairs) != 2:
        return "other"
    colors, shapes = {a.color, b.color}, {a.shape, b.shape}
    if not all(c in colors and s in shapes for c, s in pairs):
        return "other"
    named_colors, named_shapes = {c for c, _ in pairs}, {s for _, s in pairs}
    if named_colors == colors and named_shapes == shapes:
        return "right" if set(pairs) == {(a.color, a.shape), (b.color, b.shape)} else "swapped"
    if named_colors == colors:
        return "repeated shape"
    if named_shapes == shapes:
        return "repeated colour"
    return "other"  # one colour and one shape, named twice


def two_object_outcomes(captions: list[str], scenes: list[Scene]) -> dict:
    """``{"n", <outcome>: fraction, ...}`` of ``two_object_outcome`` over the scenes it applies to."""
    if len(captions) != len(scenes):
        raise ValueError(f"got {len(captions)} captions for {len(scenes)} scenes")
    seen = [two_object_outcome(parse_caption(c), s) for c, s in zip(captions, scenes)]
    seen = [o for o in seen if o is not None]
    return {"n": len(seen), **{k: (seen.count(k) / len(seen) if seen else None) for k in TWO_OBJECT_OUTCOMES}}


def single_object_accuracy(captions: list[str], scenes: list[Scene]) -> dict:
    """Colour/shape accuracy of the first mentioned object, over the single-object scenes only.

    Returns ``{"n", "color_acc", "shape_acc", "both_acc"}``; a caption with no parseable object (or whose
    first object lacks the attribute) counts as wrong. The accuracies are NaN when ``n == 0``.
    """
    if len(captions) != len(scenes):
        raise ValueError(f"got {len(captions)} captions for {len(scenes)} scenes")
    n = color_ok = shape_ok = both_ok = 0
    for cap, scene in zip(captions, scenes):
        if len(scene.objects) != 1:
            continue
        n += 1
        objs = parse_caption(cap).objects
        truth = scene.objects[0]
        c = bool(objs) and objs[0].color == truth.color
        s = bool(objs) and objs[0].shape == truth.shape
        color_ok += c
        shape_ok += s
        both_ok += c and s
    div = (lambda k: k / n) if n else (lambda k: math.nan)
    return {"n": n, "color_acc": div(color_ok), "shape_acc": div(shape_ok), "both_acc": div(both_ok)}
