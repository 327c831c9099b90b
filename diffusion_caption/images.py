"""Loading images as a person sees them: any mode, orientation or size, with specific errors.

Every entry point (Python API, command line, app) goes through ``load_image``, so an odd file meets the
same rules everywhere:

- only common raster formats are opened (``FORMATS``); PIL's other plugins (EPS runs Ghostscript, and
  many rarely used decoders) are never tried on untrusted input;
- images over ``MAX_PIXELS`` are refused from their header, before any pixel is decoded, whatever
  ``PIL.Image.MAX_IMAGE_PIXELS`` is set to;
- big images are shrunk as they are decoded (JPEG's DCT scaling via ``draft``) or right after, in their
  own mode, before any conversion makes more copies; so memory stays near one decoded frame;
- the first frame of an animation; EXIF orientation applied (the picture as a person sees it);
  transparency composited on white; 16-bit, 32-bit, float, CMYK, palette and 1-bit converted to RGB.

Anything that is not a usable image raises ``ImageLoadError`` saying which input and why.
"""
from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

MAX_PIXELS = 50_000_000  # refuse to decode more than this (about 7000 x 7000, or a 50-megapixel photo)
MAX_SIDE = 1024  # larger images are downscaled on load: every encoder here works at 224 px or less
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PPM")  # JPEG includes MPO (multi-picture phone JPEGs)

# what PIL's decoders raise on malformed data (truncated streams, bad chunk lengths, broken headers ...)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
                  struct.error, zlib.error, Image.DecompressionBombError)

# EXIF orientation -> the transpose that shows the picture upright (as PIL's ImageOps.exif_transpose)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


class ImageLoadError(ValueError):
    """An input that is not a usable image; the message says which input and why."""


def _name(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray)):
        return f"the image data ({len(src):,} bytes)"
    if isinstance(src, Image.Image):
        return "the image"
    name = getattr(src, "name", None)
    return str(name) if isinstance(name, str) else "the image data"


def _from_array(arr: np.ndarray) -> Image.Image:
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))):
        raise ImageLoadError(f"array of shape {arr.shape} is not an image (expected H x W, or H x W x 1/3/4)")
    if arr.shape[0] * arr.shape[1] == 0:
        raise ImageLoadError(f"array of shape {arr.shape} has no pixels")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number):
            raise ImageLoadError(f"array of dtype {arr.dtype} is not an image (expected numbers)")
        a = np.nan_to_num(arr.astype(np.float32))
        a = a * 255.0 if a.max(initial=0.0) <= 1.0 else a / max(float(a.max()), 1.0) * 255.0
        arr = a.clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr.squeeze(2) if arr.ndim == 3 and arr.shape[2] == 1 else arr))


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright); a broken EXIF block counts as upright, not as a bad image."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
        return int(value) if value in _ORIENTATION else 1
    except Exception:  # noqa: BLE001 - malformed EXIF must not make a readable picture unusable
        return 1


def _to_8bit(img: Image.Image) -> Image.Image:
    """Modes without 8-bit channels (16/32-bit integer, float, 1-bit, palette) as L, RGB or RGBA."""
    if img.mode.startswith("I;16"):
        arr = np.asarray(img)  # uint16: a viewer shows v / 257, so does this
        return Image.fromarray((arr >> 8).astype(np.uint8), "L")
    if img.mode in ("I", "F"):
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32))
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode == "I" and lo >= 0 and hi <= 255:
            scaled = arr
        elif img.mode == "I" and lo >= 0 and hi <= 65535:  # 16-bit data held in 32 bits
            scaled = arr / 257.0
        else:
            scaled = (arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        return Image.fromarray(scaled.clip(0, 255).astype(np.uint8), "L")
    if img.mode == "1":
        return img.convert("L")
    if img.mode in ("P", "PA"):
        has_alpha = img.mode == "PA" or "transparency" in img.info
        return img.convert("RGBA" if has_alpha else "RGB")
    if img.mode in ("L", "RGB") and "transparency" in img.info:  # a tRNS colour key
        return img.convert("LA" if img.mode == "L" else "RGBA")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def _prepare(img: Image.Image, name: str, max_side: int) -> Image.Image:
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageLoadError(f"{name} has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ImageLoadError(f"{name} is {w}x{h} = {w * h:,} pixels; images over {MAX_PIXELS:,} pixels "
                             "are refused (downscale it first)")
    try:
        if getattr(img, "n_frames", 1) > 1 and img.tell() != 0:
            img.seek(0)  # the first frame of an animation
        orientation = _orientation(img)
        if img.format in ("JPEG", "MPO") and max(w, h) > max_side:
            s = max_side / max(w, h)  # decode at 1/2, 1/4 or 1/8 scale, never below the size needed
            img.draft(img.mode, (max(1, round(w * s)), max(1, round(h * s))))
        img.load()
        img = _to_8bit(img)
        if max(img.size) > max_side:
            s = max_side / max(img.size)
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS,
                             reducing_gap=3.0)
        img = _to_rgb(img)
        if orientation in _ORIENTATION:
            img = img.transpose(_ORIENTATION[orientation])
        return img
    except ImageLoadError:
        raise
    except MemoryError:
        raise ImageLoadError(f"{name} is too large to decode in the memory available") from None
    except _DECODE_ERRORS as e:
        raise ImageLoadError(f"{name} could not be decoded, the file may be truncated or corrupt "
                             f"({type(e).__name__}: {e})") from None


def load_image(src, max_side: int = MAX_SIDE) -> Image.Image:
    """An RGB PIL image, at most ``max_side`` pixels on its longer side, from a path, bytes, a binary file
    object, a numpy array or a PIL image. Raises ``ImageLoadError`` with the reason for anything else."""
    if isinstance(src, np.ndarray):
        src = _from_array(src)
    if isinstance(src, Image.Image):
        return _prepare(src, _name(src), max_side)
    name = _name(src)
    if isinstance(src, (str, os.PathLike)):
        if not os.path.exists(src):
            raise ImageLoadError(f"image file not found: {src}")
        if os.path.isdir(src):
            raise ImageLoadError(f"{src} is a directory, not an image file")
        if os.path.getsize(src) == 0:
            raise ImageLoadError(f"image file {src} is empty (0 bytes)")
    elif isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageLoadError("the image data is empty (0 bytes)")
        src = io.BytesIO(bytes(src))
    elif not hasattr(src, "read"):
        raise ImageLoadError(f"cannot read an image from a {type(src).__name__}; give a path, bytes, a binary "
                             "file object, a numpy array or a PIL image")
    try:
        opened = Image.open(src, formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name} is not an image file in a supported format ({', '.join(FORMATS)}); "
                             "it may be corrupt, empty or another kind of file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"{name} is refused as a possible decompression bomb: {e}") from None
    except PermissionError:
        raise ImageLoadError(f"image file {name} cannot be read (permission denied)") from None
    except _DECODE_ERRORS as e:  # a header that parses far enough to be identified, then breaks
        raise ImageLoadError(f"{name} could not be read, the file may be truncated or corrupt "
                             f"({type(e).__name__}: {e})") from None
    with opened as img:
        return _prepare(img, name, max_side)
