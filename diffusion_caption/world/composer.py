"""Build a shapes-world scene by hand (for counterfactuals), checked against the world's own rules.

``compose_scene`` takes plain values, as a form gives them (shape, colour, size, centre per object, and a
background), and returns a ``world.Scene`` that ``world.render_scene`` draws exactly like the training
images, or a ``ValueError`` saying what is wrong. Sizes map to the middle of the world's radius range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .scenes import BACKGROUNDS, COLORS, IMAGE_SIZE, RADIUS, SHAPES, SIZES, Scene, ShapeObject

MAX_OBJECTS = 3


@dataclass
class ObjectSpec:
    shape: str
    color: str
    size: str
    x: float  # centre in pixels of the IMAGE_SIZE canvas, 0 = left
    y: float  # 0 = top


def radius(size: str) -> float:
    lo, hi = RADIUS[size]
    return (lo + hi) / 2.0


def compose_scene(objects: list[ObjectSpec], background: str) -> tuple[Scene, list[str]]:
    """The scene, and warnings that do not stop it from rendering (overlaps, objects cut by the border)."""
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}; got {background!r}")
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects; got {len(objects)}")
    out: list[ShapeObject] = []
    warnings: list[str] = []
    for i, o in enumerate(objects, 1):
        if o.shape not in SHAPES:
            raise ValueError(f"object {i}: shape must be one of {', '.join(SHAPES)}; got {o.shape!r}")
        if o.color not in COLORS:
            raise ValueError(f"object {i}: colour must be one of {', '.join(COLORS)}; got {o.color!r}")
        if o.size not in SIZES:
            raise ValueError(f"object {i}: size must be one of {', '.join(SIZES)}; got {o.size!r}")
        for name, v in (("x", o.x), ("y", o.y)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= IMAGE_SIZE):
                raise ValueError(f"object {i}: {name} must be a number from 0 to {IMAGE_SIZE}; got {v!r}")
        if o.color == background:
            warnings.append(f"object {i} is {o.color} on a {background} background: the world never draws that, "
                            "and the object is nearly invisible")
        r = radius(o.size)
        obj = ShapeObject(o.shape, o.color, o.size, round(float(o.x), 1), round(float(o.y), 1), r)
        if min(obj.x, obj.y, IMAGE_SIZE - obj.x, IMAGE_SIZE - obj.y) < r:
            warnings.append(f"object {i} is cut by the image border")
        for j, p in enumerate(out, 1):
            if math.hypot(obj.x - p.x, obj.y - p.y) < obj.r + p.r:
                warnings.append(f"objects {j} and {i} overlap (the world's own scenes never do)")
        out.append(obj)
    return Scene(objects=out, background=background, correlated=False, jitter=[[0, 0, 0] for _ in out]), warnings
