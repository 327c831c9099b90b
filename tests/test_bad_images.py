"""Odd and hostile images, and out-of-range settings, through the Python API and the command line.

The collection of odd files is generated here, once per session, by ``image_zoo``: every one of them
must either caption fine (and look as a person sees it) or raise ``ImageLoadError`` with a message that
names the file and says what is wrong. Nothing else may escape.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from diffusion_caption import ImageLoadError, load_image
from diffusion_caption.images import MAX_PIXELS, MAX_SIDE

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)

# file -> what its error message must say (each is also checked to name the file)
BAD = {
    "empty.png": r"is empty \(0 bytes\)",
    "text-named.png": r"not an image file in a supported format",
    "random-bytes.jpg": r"not an image file in a supported format",
    "corrupt-data.png": r"could not be decoded, the file may be truncated or corrupt",
    "truncated.jpg": r"could not be decoded, the file may be truncated or corrupt",
    "postscript.eps": r"not an image file in a supported format",  # PIL would run Ghostscript on it
    "bomb-20000x20000.png": r"decompression bomb|pixels are refused",
    "bomb-header-20000x20000.jpg": r"decompression bomb|pixels are refused",
    "over-limit-9000x6000.png": r"9000x6000 = 54,000,000 pixels; images over 50,000,000 pixels are refused",
}
GOOD = ["rgba.png", "palette-transparent.png", "cmyk.jpg", "gray16.png", "gray.png", "bilevel.png",
        "one-pixel.png", "animated.gif", "exif-rotated.jpg", "big-8000x6000.jpg"]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_bilevel_png(path, width: int, height: int) -> None:
    """A 1-bit all-black PNG written row by row: a 20000x20000 one is 50 KB on disk and 400 MB decoded."""
    comp = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def _jpeg_with_header_size(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) claims another size."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), RED).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _exif_with_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


@pytest.fixture(scope="session")
def image_zoo(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("image-zoo")
    files: dict[str, str] = {}

    def save(name, img, **kw):
        files[name] = str(d / name)
        img.save(files[name], **kw)

    def write(name, data: bytes):
        files[name] = str(d / name)
        with open(files[name], "wb") as f:
            f.write(data)

    # --- images that must caption fine
    rgba = Image.new("RGBA", (32, 16), (0, 0, 0, 0))  # left half fully transparent, right half opaque red
    rgba.paste(Image.new("RGBA", (16, 16), (*RED, 255)), (16, 0))
    save("rgba.png", rgba)
    pal = Image.new("P", (32, 16), 0)
    pal.putpalette([0, 255, 0] + list(RED) + [0] * 762)  # index 0 green but transparent, index 1 red
    pal.paste(1, (16, 0, 32, 16))
    save("palette-transparent.png", pal, transparency=0)
    save("cmyk.jpg", Image.new("CMYK", (24, 24), (0, 255, 255, 0)), quality=95)  # red in ink terms
    save("gray16.png", Image.fromarray(np.tile(np.array([0, 257 * 100, 65535], dtype=np.uint16), (4, 1))))
    save("gray.png", Image.new("L", (20, 20), 128))
    save("bilevel.png", Image.new("1", (20, 20), 1))
    save("one-pixel.png", Image.new("RGB", (1, 1), BLUE))
    frames = [Image.new("RGB", (20, 20), c) for c in (RED, BLUE, GREEN)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    # stored wide (left red, right blue) with orientation 6: shown turned 90 degrees clockwise, so tall
    # with red on top; this is what a camera held upright writes
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(Image.new("RGB", (20, 20), BLUE), (20, 0))
    save("exif-rotated.jpg", stored, exif=_exif_with_orientation(6), quality=95)
    save("big-8000x6000.jpg", Image.new("RGB", (8000, 6000), (200, 30, 40)), quality=80)

    # --- files that must be refused with a specific message
    write("empty.png", b"")
    write("text-named.png", b"this is a text file, not a picture\n")
    write("random-bytes.jpg", random.Random(0).randbytes(4096))
    # well-formed chunks (lengths, CRCs), but the compressed pixel stream stops half-way
    noise = np.random.RandomState(0).randint(0, 255, (64, 64 * 3), dtype=np.uint8)
    stream = zlib.compress(b"".join(b"\0" + row.tobytes() for row in noise))
    write("corrupt-data.png", b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))
          + _png_chunk(b"IDAT", stream[:len(stream) // 2]) + _png_chunk(b"IEND", b""))
    jpg = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpg, "JPEG")
    write("truncated.jpg", jpg.getvalue()[:len(jpg.getvalue()) // 2])
    write("postscript.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n")
    files["bomb-20000x20000.png"] = str(d / "bomb-20000x20000.png")
    write_bilevel_png(files["bomb-20000x20000.png"], 20000, 20000)
    write("bomb-header-20000x20000.jpg", _jpeg_with_header_size(20000, 20000))
    files["over-limit-9000x6000.png"] = str(d / "over-limit-9000x6000.png")
    write_bilevel_png(files["over-limit-9000x6000.png"], 9000, 6000)
    files["big-7000x7000.png"] = str(d / "big-7000x7000.png")  # just under MAX_PIXELS: loads, in bounded memory
    write_bilevel_png(files["big-7000x7000.png"], 7000, 7000)
    assert set(GOOD) | set(BAD) <= set(files)
    return files


# ------------------------------------------------------------------------------------------------ API
def test_every_odd_image_loads_as_rgb_or_fails_specifically(image_zoo):
    for name in GOOD:
        path = image_zoo[name]
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "rb") as f:
            kinds = [path, data, f]  # a path, bytes and an open file all take the same road
            for src in kinds:
                img = load_image(src)
                assert img.mode == "RGB" and 1 <= max(img.size) <= MAX_SIDE, (name, img.mode, img.size)
    for name, why in BAD.items():
        with pytest.raises(ImageLoadError, match=why) as e:
            load_image(image_zoo[name])
        assert image_zoo[name] in str(e.value)  # names the file
        if os.path.getsize(image_zoo[name]):
            with pytest.raises(ImageLoadError, match=why):
                load_image(open(image_zoo[name], "rb").read())


def test_odd_images_come_out_as_a_person_sees_them(image_zoo):
    rgba = load_image(image_zoo["rgba.png"])
    assert rgba.getpixel((2, 8)) == WHITE and rgba.getpixel((30, 8)) == RED  # transparency on white
    pal = load_image(image_zoo["palette-transparent.png"])
    assert pal.getpixel((2, 8)) == WHITE and pal.getpixel((30, 8)) == RED  # the transparent index is not green
    r, g, b = load_image(image_zoo["cmyk.jpg"]).getpixel((12, 12))
    assert r > 230 and g < 30 and b < 30
    g16 = load_image(image_zoo["gray16.png"])
    assert [g16.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), WHITE]  # v / 257, as a viewer
    assert load_image(image_zoo["gray.png"]).getpixel((5, 5)) == (128, 128, 128)
    assert load_image(image_zoo["bilevel.png"]).getpixel((5, 5)) == WHITE
    one = load_image(image_zoo["one-pixel.png"])
    assert one.size == (1, 1) and one.getpixel((0, 0)) == BLUE
    gif = load_image(image_zoo["animated.gif"])
    assert gif.getpixel((10, 10)) == RED  # the first frame
    with Image.open(image_zoo["animated.gif"]) as anim:  # also when the caller left it on a later frame
        anim.seek(2)
        assert load_image(anim).getpixel((10, 10)) == RED
    rot = load_image(image_zoo["exif-rotated.jpg"])
    assert rot.size == (20, 40)  # stored 40x20, shown upright as 20x40
    top, bottom = rot.getpixel((10, 5)), rot.getpixel((10, 34))
    assert top[0] > 200 and top[2] < 60, top  # red on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom  # blue below
    big = load_image(image_zoo["big-8000x6000.jpg"])
    assert big.size == (1024, 768)
    assert abs(big.getpixel((500, 400))[0] - 200) < 8


def test_arrays_and_pil_images_take_the_same_rules():
    assert load_image(np.zeros((5, 7), dtype=np.uint16)).size == (7, 5)
    assert load_image(np.ones((4, 4, 3), dtype=np.float32)).getpixel((0, 0)) == WHITE
    assert load_image(np.zeros((3, 3, 1), dtype=bool)).getpixel((1, 1)) == (0, 0, 0)
    for bad, why in [(np.zeros((2, 2, 2, 2)), "shape"), (np.zeros((0, 5)), "no pixels"),
                     (np.array([["a"]]), "dtype")]:
        with pytest.raises(ImageLoadError, match=why):
            load_image(bad)
    with pytest.raises(ImageLoadError, match="pixels are refused"):
        load_image(Image.new("1", (MAX_PIXELS // 1000 + 1, 1000)))  # a caller's huge image is refused too
    with pytest.raises(ImageLoadError, match="cannot read an image from a int"):
        load_image(42)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on the damage it finds
def test_damaged_files_never_raise_anything_but_image_load_error():
    """Seeded byte flips, truncations and splices of small files in every accepted format."""
    rng = random.Random(1234)
    base = Image.fromarray(np.random.RandomState(0).randint(0, 255, (24, 32, 3), dtype=np.uint8))
    originals = []
    for fmt, kw in [("PNG", {}), ("JPEG", {}), ("GIF", {}), ("WEBP", {}), ("BMP", {}), ("TIFF", {}), ("PPM", {}),
                    ("TIFF", {"compression": "tiff_deflate"})]:
        buf = io.BytesIO()
        base.save(buf, fmt, **kw)
        originals.append(buf.getvalue())
    outcomes = {"ok": 0, "refused": 0}
    for data in originals:
        assert load_image(data).size == (32, 24)
        for _ in range(40):
            d = bytearray(data)
            how = rng.choice(["flip", "truncate", "splice"])
            if how == "flip":
                for _ in range(rng.randint(1, 8)):
                    d[rng.randrange(len(d))] = rng.randrange(256)
            elif how == "truncate":
                d = d[:rng.randrange(1, len(d))]
            else:
                at = rng.randrange(len(d))
                d[at:at + rng.randint(1, 40)] = rng.randbytes(rng.randint(0, 40))
            try:
                assert load_image(bytes(d)).mode == "RGB"
                outcomes["ok"] += 1
            except ImageLoadError:
                outcomes["refused"] += 1
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0


MEASURE = r"""
import importlib.util, json, resource, sys
from PIL import Image
spec = importlib.util.spec_from_file_location("images_under_test", sys.argv[1])
images = importlib.util.module_from_spec(spec)
spec.loader.exec_module(images)  # images.py alone: no torch, so the baseline is small and steady
if sys.argv[2] == "no-pil-limit":
    Image.MAX_IMAGE_PIXELS = None  # as some libraries set it: our own limit must still hold
unit = 1 if sys.platform == "darwin" else 1024
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
try:
    out = list(images.load_image(sys.argv[3]).size)
except images.ImageLoadError as e:
    out = str(e)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
print(json.dumps({"result": out, "grew_mib": (after - before) / 2**20}))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="peak memory is read with the resource module")
def test_bombs_and_huge_images_stay_within_a_memory_bound(image_zoo):
    """Peak memory of a fresh process while loading: refusals cost next to nothing, the biggest accepted
    image costs a few bytes per pixel of its smallest decodable size, never the full decoded bitmap."""
    import diffusion_caption.images as images_module

    def measure(name, pil_limit="pil-limit"):
        out = subprocess.run([sys.executable, "-c", MEASURE, images_module.__file__, pil_limit, image_zoo[name]],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout)

    for pil_limit in ("pil-limit", "no-pil-limit"):
        r = measure("bomb-20000x20000.png", pil_limit)  # 400 MB if decoded
        assert "refused" in r["result"] and r["grew_mib"] < 30, r
    r = measure("bomb-header-20000x20000.jpg", "no-pil-limit")
    assert "pixels are refused" in r["result"] and r["grew_mib"] < 30, r
    r = measure("big-8000x6000.jpg")  # 144 MB decoded in full; JPEG draft decodes it at 1/4 scale
    assert r["result"] == [1024, 768] and r["grew_mib"] < 60, r
    r = measure("big-7000x7000.png")  # 49 megapixels, just under the limit: PNG has no draft mode
    assert r["result"] == [1024, 1024] and r["grew_mib"] < 5 * MAX_PIXELS / 2**20, r


def test_the_captioner_captions_every_good_image_and_refuses_the_rest(make_captioner, image_zoo):
    cap = make_captioner()
    traces = cap.caption_batch([image_zoo[n] for n in GOOD], steps=2)
    assert len(traces) == len(GOOD) and all(len(t.steps) == 2 and isinstance(t.text, str) for t in traces)
    for name, why in BAD.items():
        with pytest.raises(ImageLoadError, match=why):
            cap.caption(image_zoo[name], steps=2)


# ------------------------------------------------------------------------------------------------ settings
SETTINGS = [  # keyword arguments -> the message (parameter name and its range)
    (dict(steps=0), r"steps must be an integer from 1 to 100, got 0"),
    (dict(steps=10**9), r"steps must be an integer from 1 to 100, got 1000000000"),
    (dict(steps=2.5), r"steps must be an integer from 1 to 100"),
    (dict(steps="5"), r"steps must be an integer from 1 to 100"),
    (dict(guidance=-1.0), r"guidance must be a number from 0 to 20"),
    (dict(guidance=math.nan), r"guidance must be a number from 0 to 20.*nan"),
    (dict(guidance=math.inf), r"guidance must be a number from 0 to 20"),
    (dict(guidance="strong"), r"guidance must be a number"),
    (dict(seed=1.5), r"seed must be a non-negative integer, got 1.5"),
    (dict(seed=-1), r"seed must be a non-negative integer"),
    (dict(seed="0"), r"seed must be a non-negative integer"),
    (dict(seed=2**70), r"seed must be a non-negative integer"),
    (dict(sampler="euler"), r"sampler must be one of \('ddpm', 'ddim'\)|sampler must be one of .*ddim.*euler"),
]


def test_out_of_range_settings_name_the_parameter_and_its_range(make_captioner, scene_image):
    cap = make_captioner()
    assert cap.config.T == 100  # the ranges in SETTINGS are the tiny preset's
    for kw, why in SETTINGS:
        for call in (lambda: cap.caption(scene_image, **kw), lambda: list(cap.iter_caption(scene_image, **kw))):
            with pytest.raises(ValueError, match=why):
                call()


@pytest.fixture(scope="module")
def saved_captioner(tokenizer, clip_encoder, tmp_path_factory):
    from diffusion_caption import Captioner
    from diffusion_caption.config import preset
    from diffusion_caption.denoiser import Denoiser

    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, cond_dim=clip_encoder.feature_dim)
    path = str(tmp_path_factory.mktemp("cli") / "ckpt")
    Captioner(cfg, Denoiser(cfg), clip_encoder, tokenizer).save_pretrained(path)
    return path


def test_cli_refuses_bad_settings_with_one_clear_line(saved_captioner, scene_image, capsys):
    from diffusion_caption.__main__ import main

    for args, why in [(["--steps", "0"], "steps must be an integer from 1 to 100, got 0"),
                      (["--steps", "100000"], "steps must be an integer from 1 to 100"),
                      (["--guidance", "-2"], "guidance must be a number from 0 to 20"),
                      (["--guidance", "nan"], "guidance must be a number from 0 to 20")]:
        assert main(["--checkpoint", saved_captioner, scene_image, *args]) == 2
        err = capsys.readouterr().err
        assert err.strip() == f"error: {why}" or err.startswith(f"error: {why}"), err
    for args, why in [(["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
                      (["--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
                      (["--steps", "many"], "argument --steps: invalid int value: 'many'")]:
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", saved_captioner, scene_image, *args])
        assert e.value.code == 2 and why in capsys.readouterr().err


def test_cli_on_the_whole_collection(saved_captioner, image_zoo, capsys):
    """Every odd file in one command: good ones captioned, each bad one a single line naming the file and
    the reason, exit status 1, nothing raised (``python -m`` runs this same ``main``; test_cli.py runs it
    as a process)."""
    import re

    from diffusion_caption.__main__ import main

    paths = [image_zoo[n] for n in GOOD] + [image_zoo[n] for n in BAD]
    assert main(["--checkpoint", saved_captioner, "--steps", "2", *paths]) == 1
    out = capsys.readouterr()
    captioned = [line.split(": ", 1)[0] for line in out.out.splitlines()]
    assert captioned == [image_zoo[n] for n in GOOD]
    errors = out.err.strip().splitlines()
    assert len(errors) == len(BAD), out.err
    for line, (name, why) in zip(errors, BAD.items()):
        assert line.startswith(f"error: {image_zoo[name]}: ") and re.search(why, line), line
