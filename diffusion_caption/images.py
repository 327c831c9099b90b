"""Loading images as a person sees them: any mode, orientation or size, with specific errors.

Every entry point (Python API, command line, app) goes through ``load_image``, so an odd file meets the
same rules everywhere: EXIF rotation applied, the first frame of an animation, transparency composited
on white, 16-bit and CMYK converted, and images too large to decode safely refused before decoding.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 50_000_000  # refuse to decode more than this (about 7000 x 7000); PIL's bomb check is 2x this
MAX_SIDE = 1024  # larger images are downscaled on load: every encoder here works at 224 px or less


class ImageLoadError(ValueError):
    """An input that is not a usable image; the message says which input and why."""


def _name(src) -> str:
    return repr(src) if isinstance(src, (str, os.PathLike)) else type(src).__name__


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: rescale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = arr / (hi if hi > 0 else 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = arr.min(), arr.max()
        arr = (arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def load_image(src, max_side: int = MAX_SIDE) -> Image.Image:
    """An RGB PIL image from a path, bytes, a file object, a numpy array or a PIL image."""
    if isinstance(src, np.ndarray):
        arr = src
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4)):
            if arr.dtype != np.uint8:
                a = arr.astype(np.float64)
                a = a * 255.0 if a.max() <= 1.0 else a / max(a.max(), 1.0) * 255.0
                arr = a.clip(0, 255).astype(np.uint8)
            src = Image.fromarray(arr.squeeze(2) if arr.ndim == 3 and arr.shape[2] == 1 else arr)
        else:
            raise ImageLoadError(f"array of shape {arr.shape} is not an image (expected H x W, or H x W x 1/3/4)")
    if isinstance(src, Image.Image):
        img = src
    else:
        if isinstance(src, (str, os.PathLike)):
            if not os.path.exists(src):
                raise ImageLoadError(f"image file not found: {src}")
            if os.path.isdir(src):
                raise ImageLoadError(f"{src} is a directory, not an image file")
            if os.path.getsize(src) == 0:
                raise ImageLoadError(f"image file {src} is empty")
        elif isinstance(src, (bytes, bytearray)):
            if len(src) == 0:
                raise ImageLoadError("empty image data")
            src = io.BytesIO(src)
        try:
            img = Image.open(src)
        except UnidentifiedImageError:
            raise ImageLoadError(f"{_name(src)} is not an image file PIL can read (corrupt, or another format)") from None
        except Image.DecompressionBombError as e:
            raise ImageLoadError(f"{_name(src)} is refused as a possible decompression bomb: {e}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageLoadError(f"{_name(src)} has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ImageLoadError(f"{_name(src)} is {w}x{h} = {w * h:,} pixels; images over {MAX_PIXELS:,} pixels "
                             "are refused (downscale it first)")
    try:
        img.seek(0)  # the first frame of an animation
    except (EOFError, AttributeError, ValueError):
        pass
    try:
        if img.format == "JPEG" and max(w, h) > 2 * max_side:
            img.draft("RGB", (max_side, max_side))  # decode big JPEGs at reduced scale
        img = ImageOps.exif_transpose(img)
        img.load()
        img = _to_rgb(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{_name(src)} could not be decoded: {e}") from None
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.LANCZOS)
    return img
