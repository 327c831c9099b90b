"""Inputs far from the shapes world, to measure an out-of-domain score's detection rate: the shipped
photographs, noise, blank images (odd shapes among them), rendered text, and the test scenes with every hue
rotated. Built here, from a seed; nothing is downloaded."""
from __future__ import annotations

import glob
import os

import numpy as np
from PIL import Image, ImageDraw

from ..world.variants import HUE_ROTATIONS, hue_rotate

WORDS = ("hello world", "diffusion", "a red circle", "STOP", "caption this", "42", "lorem ipsum dolor",
         "the quick brown fox", "CLIP", "ViT-B/32")


def photographs(examples_dir: str) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(glob.glob(os.path.join(examples_dir, "photo_*.jpg")))]


def noise(n: int, rng: np.random.Generator) -> list[Image.Image]:
    """Uniform RGB noise, at sizes from 32 to 512 pixels, half of it blurred into blobs by upscaling."""
    out = []
    for i in range(n):
        size = int(rng.integers(32, 513))
        if i % 2:
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            out.append(Image.fromarray(small).resize((size, size), Image.BILINEAR))
        else:
            out.append(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
    return out


def blank(n: int, rng: np.random.Generator) -> list[Image.Image]:
    """Single-colour images: black, white, grays and random colours, two of them 30000 x 200 strips."""
    colours = [(0, 0, 0), (255, 255, 255), (128, 128, 128), (64, 64, 64)]
    colours += [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(max(n - len(colours), 0))]
    out = [Image.new("RGB", (64, 64), c) for c in colours[:n]]
    out[:2] = [Image.new("RGB", (30000, 200), (0, 0, 0)), Image.new("RGB", (200, 30000), (255, 255, 255))]
    return out


def text(n: int, rng: np.random.Generator) -> list[Image.Image]:
    """Words rendered in PIL's default font on a plain background."""
    out = []
    for i in range(n):
        bg = tuple(int(c) for c in rng.integers(0, 256, 3))
        fg = tuple(255 - c for c in bg)
        img = Image.new("RGB", (128, 64), bg)
        draw = ImageDraw.Draw(img)
        draw.text((4, 8 + (i % 3) * 14), WORDS[i % len(WORDS)], fill=fg)
        out.append(img)
    return out


def hue_shifted(scenes: list[Image.Image]) -> list[Image.Image]:
    return [hue_rotate(img, d) for img in scenes for d in HUE_ROTATIONS]


def ood_families(examples_dir: str, test_scenes: list[Image.Image], n: int = 40, seed: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    return {"photographs": photographs(examples_dir), "noise": noise(n, rng), "blank": blank(n // 2, rng),
            "text": text(n // 2, rng), "hue-shifted scenes": hue_shifted(test_scenes)}
