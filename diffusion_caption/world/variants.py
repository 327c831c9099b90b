"""Variants of one image for error analysis: change one thing, caption again, see which words move.

Two kinds, chosen by what is known about the image:

* A shapes-world scene with its ground truth (``world.Scene``): background recoloured and object
  colours swapped are **re-rendered exactly** by ``world.render_scene`` from an edited scene, so each
  such variant carries its own ground truth and a caption can be checked word by word. These are the
  counterfactuals that expose a colour bias: the same shapes on another background, or with their
  colours exchanged.
* Any other image: **pixel-level** edits. Hue rotations (in HSV), grayscale, background recoloured
  (pixels close to the colour of the image border replaced by another colour: exact on flat
  backgrounds such as the shapes world, a rough cut on photographs) and red/blue channels exchanged
  (which swaps red and blue objects, the pixel-level stand-in for exchanging object colours).

Hue rotations and grayscale are pixel-level for scenes too; their colours then have no ground truth.
``known_scenes`` / ``scene_key`` recognise an image as one of the scenes shipped with the examples by
its exact pixels, so an example picked in a UI gets the exact variants.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from .scenes import BACKGROUND_RGB, BACKGROUNDS, COLORS, Scene, render_scene

HUE_ROTATIONS = (90, 180, 270)


@dataclass
class Variant:
    name: str  # short label, e.g. "background: gray"
    image: Image.Image
    scene: Scene | None = None  # ground truth, when the variant was rendered from a known scene
    note: str = ""  # how it was made


# ---------------------------------------------------------------------------------------------- pixel edits
def _rgb(img: Image.Image) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}")
    return img if img.mode == "RGB" else img.convert("RGB")


def hue_rotate(img: Image.Image, degrees: float) -> Image.Image:
    """Rotate every pixel's hue by ``degrees`` (saturation and value kept)."""
    hsv = np.asarray(_rgb(img).convert("HSV")).copy()
    shift = int(round((degrees % 360) / 360.0 * 256)) % 256
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 256).astype(np.uint8)
    return Image.fromarray(hsv, "HSV").convert("RGB")


def grayscale(img: Image.Image) -> Image.Image:
    """Luminance only, as an RGB image (so every model sees the usual three channels)."""
    return _rgb(img).convert("L").convert("RGB")


def swap_red_blue(img: Image.Image) -> Image.Image:
    """Exchange the red and blue channels: red objects turn blue and blue ones red."""
    a = np.asarray(_rgb(img))
    return Image.fromarray(np.ascontiguousarray(a[..., ::-1]), "RGB")


def border_color(img: Image.Image) -> tuple[int, int, int]:
    """The median colour of the image's outermost pixels: its background colour when it has a flat one."""
    a = np.asarray(_rgb(img)).astype(np.int32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


def recolor_background(img: Image.Image, rgb: tuple[int, int, int], tolerance: float = 40.0) -> Image.Image:
    """Replace the pixels within ``tolerance`` (RGB distance) of the border colour by ``rgb``.

    Anti-aliased edges are blended in proportion to their distance, so shapes keep smooth outlines.
    """
    a = np.asarray(_rgb(img)).astype(np.float32)
    bg = np.array(border_color(img), dtype=np.float32)
    dist = np.linalg.norm(a - bg, axis=-1)
    # weight 1 on the background, falling to 0 at ``tolerance``: edge pixels are part background
    w = np.clip(1.0 - dist / tolerance, 0.0, 1.0)[..., None]
    out = a + w * (np.array(rgb, dtype=np.float32) - bg)
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8), "RGB")


def _nearest_background_name(rgb) -> str:
    return min(BACKGROUNDS, key=lambda b: sum((x - y) ** 2 for x, y in zip(BACKGROUND_RGB[b], rgb)))


def image_variants(img: Image.Image) -> list[Variant]:
    """Pixel-level variants of any image, the original first."""
    img = _rgb(img)
    out = [Variant("original", img, note="as given")]
    out += [Variant(f"hue +{d}°", hue_rotate(img, d), note=f"every hue rotated by {d} degrees") for d in HUE_ROTATIONS]
    out.append(Variant("grayscale", grayscale(img), note="luminance only"))
    current = _nearest_background_name(border_color(img))
    for name in [b for b in ("gray", "beige", "dark blue") if b != current][:2]:
        out.append(Variant(f"background: {name}", recolor_background(img, BACKGROUND_RGB[name]),
                           note="pixels near the border colour replaced (exact on flat backgrounds)"))
    out.append(Variant("red ↔ blue", swap_red_blue(img), note="red and blue channels exchanged"))
    return out


# ---------------------------------------------------------------------------------------------- exact scene edits
def with_background(scene: Scene, background: str) -> Scene:
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {BACKGROUNDS}")
    return replace(scene, background=background, correlated=False)


def swap_colors(scene: Scene) -> Scene | None:
    """Object colours passed round (object i takes object i+1's colour); None if that changes nothing.

    A single object takes the next colour of ``world.COLORS`` that is not the background's name.
    """
    objs = scene.objects
    if not objs:
        return None
    if len(objs) == 1:
        i = COLORS.index(objs[0].color)
        new = next(c for c in COLORS[i + 1:] + COLORS[:i] if c != scene.background)
        colors = [new]
    else:
        colors = [objs[(i + 1) % len(objs)].color for i in range(len(objs))]
        if colors == [o.color for o in objs]:
            return None
    if scene.background in colors:
        return None  # an object would vanish into the background
    return replace(scene, objects=[replace(o, color=c) for o, c in zip(objs, colors)], correlated=False)


def scene_variants(scene: Scene, size: int | None = None) -> list[Variant]:
    """Variants of a known scene, the original first; re-rendered ones carry their exact scene."""
    kw = {} if size is None else {"size": size}
    base = render_scene(scene, **kw)
    out = [Variant("original", base, scene, "the scene as rendered")]
    out += [Variant(f"hue +{d}°", hue_rotate(base, d), None, f"pixel-level hue rotation by {d} degrees (no ground truth)")
            for d in HUE_ROTATIONS]
    out.append(Variant("grayscale", grayscale(base), None, "luminance only (no ground truth for colours)"))
    used = {o.color for o in scene.objects}
    for bg in BACKGROUNDS:
        if bg != scene.background and bg not in used:
            s = with_background(scene, bg)
            out.append(Variant(f"background: {bg}", render_scene(s, **kw), s, "re-rendered on another background"))
    swapped = swap_colors(scene)
    if swapped is not None:
        what = "colours swapped" if len(scene.objects) > 1 else f"recoloured {swapped.objects[0].color}"
        out.append(Variant(what, render_scene(swapped, **kw), swapped,
                           "re-rendered with the object colours exchanged" if len(scene.objects) > 1
                           else "re-rendered with another object colour"))
    return out


def variants_for(img: Image.Image, scene: Scene | None = None) -> list[Variant]:
    """Exact scene variants when the ground truth is known, pixel-level ones otherwise."""
    if scene is not None:
        return scene_variants(scene, size=_rgb(img).size[0] if img is not None else None)
    return image_variants(img)


# ---------------------------------------------------------------------------------------------- known scenes
def scene_key(img: Image.Image) -> str:
    """A digest of the image's exact RGB pixels (and size)."""
    a = np.ascontiguousarray(np.asarray(_rgb(img)))
    return hashlib.sha256(f"{a.shape}".encode() + a.tobytes()).hexdigest()


def known_scenes(directory: str) -> dict[str, Scene]:
    """``{scene_key(image): scene}`` for every ``NAME.png`` in ``directory`` with a ``NAME.json`` scene beside it."""
    out: dict[str, Scene] = {}
    if not os.path.isdir(directory):
        return out
    for name in sorted(os.listdir(directory)):
        stem, ext = os.path.splitext(name)
        js = os.path.join(directory, stem + ".json")
        if ext.lower() != ".png" or not os.path.isfile(js):
            continue
        try:
            with open(js, encoding="utf-8") as f:
                scene = Scene.from_json(json.load(f))
            with Image.open(os.path.join(directory, name)) as im:
                out[scene_key(im)] = scene
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a scene file: skip it, the image still works as a plain example
    return out
