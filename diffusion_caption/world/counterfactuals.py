"""Counterfactual test sets from the shapes world, and the colour-bias scores measured on them.

Three sets, each built from the scenes of a split, so that one changed factor is all that differs:

* ``background``: every scene rendered twice, **exactly** (``world.render_scene``), with the same
  objects at the same places: once on the background its first shape was paired with in training
  (``world.SHAPE_BACKGROUND``, the *typical* pairing) and once on another background drawn from the
  rest of the palette (the *counterfactual* one). A model that reads the shape off the background
  is right on the first and wrong on the second; ``bias`` = accuracy(typical) - accuracy(counterfactual)
  per attribute. Scenes with an object in the typical background's colour are skipped (the object
  would vanish).
* ``hue``: the split's images with every hue rotated by 90, 180 and 270 degrees (pixel-level, as
  ``variants.hue_rotate``). Shapes, sizes, counts and relations are unchanged, colours are not known
  exactly any more, so captions are scored **colour-blind** (colour words ignored).
* ``grayscale``: the split's images in luminance only, scored colour-blind too, plus how often a
  caption still names a chromatic colour (anything but white): a colour the pixels cannot show.

For ``hue`` and ``grayscale`` the bias is colour-blind accuracy on the original images minus on the
edited ones: a model that recognises shapes by colour loses accuracy when colours move.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image

from .attributes import ParsedCaption, attribute_scores, parse_caption, single_object_accuracy
from .variants import HUE_ROTATIONS, grayscale, hue_rotate  # noqa: F401 - re-exported for the evaluation
from .scenes import BACKGROUNDS, SHAPE_BACKGROUND, Scene, render_scene

SETS = ("background", "hue", "grayscale")
BLIND_ATTRIBUTES = ("shape", "size", "count", "relation")
CHROMATIC = ("red", "green", "blue", "yellow", "purple", "orange", "pink")


# ---------------------------------------------------------------------------------------------- building
def background_pair(scene: Scene, rng: np.random.Generator) -> tuple[Scene, Scene] | None:
    """(typical, counterfactual) versions of ``scene``: same objects, backgrounds as described above."""
    if not scene.objects:
        return None
    colors = {o.color for o in scene.objects}
    typical_bg = SHAPE_BACKGROUND[scene.objects[0].shape]
    if typical_bg in colors:
        return None
    others = [b for b in BACKGROUNDS if b != typical_bg and b not in colors]
    if not others:
        return None
    counter_bg = others[int(rng.integers(len(others)))]
    return (replace(scene, background=typical_bg, correlated=True),
            replace(scene, background=counter_bg, correlated=False))


def background_pairs(scenes: list[Scene], seed: int = 0) -> list[tuple[int, Scene, Scene]]:
    """``(index into scenes, typical, counterfactual)`` for every scene that has a pair; deterministic."""
    out = []
    for i, s in enumerate(scenes):
        pair = background_pair(s, np.random.default_rng([seed, i]))
        if pair is not None:
            out.append((i, *pair))
    return out


def render_all(scenes: list[Scene], size: int) -> list[Image.Image]:
    return [render_scene(s, size) for s in scenes]


def hue_images(images: list[Image.Image], degrees: float) -> list[Image.Image]:
    return [hue_rotate(im, degrees) for im in images]


def gray_images(images: list[Image.Image]) -> list[Image.Image]:
    return [grayscale(im) for im in images]


# ---------------------------------------------------------------------------------------------- scoring
def colour_blind(parsed: ParsedCaption) -> ParsedCaption:
    """The same claims with every colour (object and background) dropped."""
    return replace(parsed, objects=[replace(o, color=None) for o in parsed.objects], background=None)


def names_chromatic_colour(caption: str) -> bool:
    """Whether the caption names an object or background colour other than white, gray or black."""
    p = parse_caption(caption)
    return any(o.color in CHROMATIC for o in p.objects) or p.background in {"pink", "beige", "dark blue"}


def blind_report(captions: list[str], scenes: list[Scene]) -> dict:
    """Colour-blind accuracy per attribute (mean over captions that mention it), single-object shape
    accuracy, and the fraction of captions naming a chromatic colour."""
    if len(captions) != len(scenes):
        raise ValueError(f"got {len(captions)} captions for {len(scenes)} scenes")
    per = [attribute_scores(colour_blind(parse_caption(c)), s) for c, s in zip(captions, scenes)]
    out: dict = {"n": len(per)}
    for a in BLIND_ATTRIBUTES:
        vals = [p[a] for p in per if p[a] is not None]
        out[a] = sum(vals) / len(vals) if vals else None
    so = single_object_accuracy(captions, scenes)  # its shape check reads no colour words
    out["1-obj shape"] = so["shape_acc"] if so["n"] else None
    out["names chromatic colour"] = (sum(names_chromatic_colour(c) for c in captions) / len(captions)
                                     if captions else None)
    return out


def difference(a: dict, b: dict, keys) -> dict:
    """``a[k] - b[k]`` for each key (None where either is missing)."""
    return {k: (None if a.get(k) is None or b.get(k) is None else a[k] - b[k]) for k in keys}
