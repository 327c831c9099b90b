"""Binding hard negatives: captions of a shapes-world scene that are wrong in exactly one way.

A CLIP trained against negatives whose every colour and shape word is replaced (``training.train_clip``)
learns which colours and shapes are present, not which colour belongs to which shape: "a red star and
a blue square" and "a blue star and a red square" differ in no word. The captions a one-step diffusion
captioner gets wrong are exactly of that kind (``attributes.two_object_outcome``): the scene's colours
on the wrong shapes, one shape named for two objects, one colour for two. Yuksekgonul et al. (2023,
NegCLIP) fix the same blindness in real CLIPs by training against such minimally changed captions.

Each negative here is the caption of a *changed scene*, phrased with the same object order and the same
template as the positive it is paired with, so that the change is the only difference (where the
change makes two objects identical, or splits two identical ones, the phrase merges or splits: "two
blue stars"):

* ``swap``: two objects of different colours and shapes exchange colours (binding);
* ``repeat_shape``: one object takes another's shape (what the captioner calls "a purple square and a
  red square" for a purple star and a red square);
* ``repeat_color``: one object takes another's colour;
* ``recolor`` / ``reshape``: one object gets a colour / shape absent from the scene.

A changed scene is dropped when its objects are the same (colour, shape) multiset as the scene's, and a
negative caption is dropped when it is also a correct caption of the original scene.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .scenes import COLORS, SHAPES, Scene, caption_candidates

KINDS = ("swap", "repeat_shape", "repeat_color", "recolor", "reshape")


def _pairs(scene: Scene) -> list[tuple[str, str]]:
    return sorted((o.color, o.shape) for o in scene.objects)


def changed_scene(scene: Scene, kind: str, rng: np.random.Generator) -> Scene | None:
    """``scene`` with one change of ``kind`` (see the module docstring), or None when it has none."""
    objs = scene.objects
    n = len(objs)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    if kind == "swap":
        options = [(i, j) for i, j in pairs if i < j and objs[i].color != objs[j].color and objs[i].shape != objs[j].shape]
    elif kind == "repeat_shape":
        options = [(i, j) for i, j in pairs if objs[i].shape != objs[j].shape]
    elif kind == "repeat_color":
        options = [(i, j) for i, j in pairs if objs[i].color != objs[j].color]
    elif kind in ("recolor", "reshape"):
        options = list(range(n))
    else:
        raise ValueError(f"unknown negative kind {kind!r}; expected one of {KINDS}")
    if not options:
        return None
    pick = options[int(rng.integers(len(options)))]
    new = list(objs)
    if kind == "swap":
        i, j = pick
        new[i], new[j] = replace(objs[i], color=objs[j].color), replace(objs[j], color=objs[i].color)
    elif kind == "repeat_shape":
        i, j = pick
        new[i] = replace(objs[i], shape=objs[j].shape)
    elif kind == "repeat_color":
        i, j = pick
        new[i] = replace(objs[i], color=objs[j].color)
    else:
        i = pick
        attr = "color" if kind == "recolor" else "shape"
        present = {getattr(o, attr) for o in objs} | ({scene.background} if attr == "color" else set())
        choices = [v for v in (COLORS if attr == "color" else SHAPES) if v not in present]
        if not choices:
            return None
        new[i] = replace(objs[i], **{attr: choices[int(rng.integers(len(choices)))]})
    out = Scene(new, scene.background, scene.correlated, list(scene.jitter))
    return None if _pairs(out) == _pairs(scene) else out


def correct_captions(scene: Scene) -> set[str]:
    """Every caption the world would write for ``scene``, over every object order."""
    from itertools import permutations

    return {c for order in permutations(range(len(scene.objects))) for c in caption_candidates(scene, list(order))}


def positive_and_negatives(scene: Scene, rng: np.random.Generator, k: int,
                           kinds: tuple[str, ...] = KINDS) -> tuple[str, list[str]]:
    """A caption of ``scene`` (random object order and template, as ``world.sample_captions`` draws them)
    and up to ``k`` distinct negatives, each the same phrasing of a scene changed one way."""
    order = [int(i) for i in rng.permutation(len(scene.objects))]
    templates = caption_candidates(scene, order)
    # the vague "two shapes on ..." template names no colour or shape: nothing to get wrong
    usable = [j for j, c in enumerate(templates) if " shapes " not in c]
    j = usable[int(rng.integers(len(usable)))]
    positive = templates[j]
    correct = correct_captions(scene)
    negatives: list[str] = []
    tries = 0
    while len(negatives) < k and tries < 4 * k:
        tries += 1
        other = changed_scene(scene, kinds[int(rng.integers(len(kinds)))], rng)
        if other is None:
            continue
        phrased = caption_candidates(other, order)
        if len(phrased) == len(templates):
            text = phrased[j]
        else:  # merging or splitting identical objects changed the templates; the first two are shared
            text = phrased[j] if j < 2 else phrased[1 if " background" in positive else 0]
        if text not in correct and text not in negatives:
            negatives.append(text)
    return positive, negatives
