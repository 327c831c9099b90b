import io

import numpy as np
import pytest
from PIL import Image

from diffusion_caption.images import ImageLoadError, load_image


def _save(img, tmp_path, name, **kw):
    p = tmp_path / name
    img.save(p, **kw)
    return str(p)


def test_odd_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))  # fully transparent red: composited on white
    assert load_image(_save(rgba, tmp_path, "a.png")).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    assert load_image(_save(cmyk, tmp_path, "c.jpg")).mode == "RGB"
    g16 = Image.fromarray(np.full((6, 6), 65535, dtype=np.uint16))
    assert load_image(_save(g16, tmp_path, "g16.png")).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("L", (1, 1), 7)).size == (1, 1)


def test_big_images_are_downscaled_and_huge_refused(tmp_path):
    assert max(load_image(Image.new("RGB", (3000, 1500))).size) == 1024
    with pytest.raises(ImageLoadError, match="pixels"):
        load_image(Image.new("1", (20000, 20000)))


def test_bad_inputs_have_specific_messages(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(str(tmp_path / "nope.png"))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(str(empty))
    text = tmp_path / "text.png"
    text.write_text("hello")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(str(text))
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    with pytest.raises(ImageLoadError):
        load_image(buf.getvalue()[:60])  # truncated
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((2, 2, 2, 2)))
