"""Image variants for error analysis, known-scene lookup and the scene composer."""
import json

import numpy as np
import pytest
from PIL import Image

from diffusion_caption.world import variants as V
from diffusion_caption.world.composer import ObjectSpec, compose_scene
from diffusion_caption.world.scenes import BACKGROUND_RGB, COLOR_RGB, Scene, ShapeObject, render_scene


def scene2():
    return Scene(objects=[ShapeObject("circle", "red", "large", 40, 64, 23), ShapeObject("square", "blue", "small", 95, 64, 12)],
                 background="gray", jitter=[[0, 0, 0], [0, 0, 0]])


def px(img, x, y):
    return img.getpixel((x, y))


def test_pixel_edits():
    img = render_scene(scene2())
    same = V.hue_rotate(img, 360)
    assert np.abs(np.asarray(same, dtype=int) - np.asarray(img, dtype=int)).max() <= 6  # HSV is 8-bit in PIL
    red = Image.new("RGB", (4, 4), (220, 20, 20))
    r, g, b = px(V.hue_rotate(red, 120), 1, 1)
    assert g > r and g > b  # red turned green
    gray = np.asarray(V.grayscale(img))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    swapped = V.swap_red_blue(img)
    assert px(swapped, 40, 64)[2] > 150 and px(swapped, 40, 64)[0] < 80  # the red circle is blue now


def test_background_recolour_keeps_the_objects():
    img = render_scene(scene2())
    assert V.border_color(img) == BACKGROUND_RGB["gray"]
    out = V.recolor_background(img, BACKGROUND_RGB["beige"])
    assert px(out, 2, 2) == BACKGROUND_RGB["beige"]
    assert px(out, 40, 64) == px(img, 40, 64)  # the circle's centre is untouched
    assert px(out, 95, 64) == px(img, 95, 64)


def test_scene_variants_are_exact_rerenders():
    scene = scene2()
    vs = V.scene_variants(scene)
    names = [v.name for v in vs]
    assert names[0] == "original" and "grayscale" in names and "colours swapped" in names
    assert {"background: black", "background: dark blue", "background: pink", "background: beige"} <= set(names)
    for v in vs:
        if v.scene is not None:  # re-rendered: the picture is exactly its ground truth's rendering
            assert np.array_equal(np.asarray(v.image), np.asarray(render_scene(v.scene)))
        else:
            assert "no ground truth" in v.note
    bg = next(v for v in vs if v.name == "background: beige")
    assert bg.scene.background == "beige" and [o.color for o in bg.scene.objects] == ["red", "blue"]
    sw = next(v for v in vs if v.name == "colours swapped")
    assert [o.color for o in sw.scene.objects] == ["blue", "red"]
    assert [o.shape for o in sw.scene.objects] == ["circle", "square"]


def test_single_object_is_recoloured_and_background_clashes_are_skipped():
    s = Scene(objects=[ShapeObject("star", "pink", "large", 64, 64, 23)], background="gray")
    vs = V.scene_variants(s)
    names = [v.name for v in vs]
    assert "background: pink" not in names  # the star would vanish into it
    recol = [v for v in vs if v.name.startswith("recoloured")]
    assert len(recol) == 1 and recol[0].scene.objects[0].color != "pink"
    same = Scene(objects=[ShapeObject("star", "red", "large", 30, 64, 23), ShapeObject("star", "red", "small", 90, 64, 12)],
                 background="gray")
    assert V.swap_colors(same) is None  # nothing to exchange


def test_image_variants_of_any_picture():
    img = Image.new("RGB", (60, 40), (240, 240, 240))
    img.paste((200, 30, 30), (20, 10, 40, 30))
    vs = V.image_variants(img)
    assert [v.name for v in vs][:5] == ["original", "hue +90°", "hue +180°", "hue +270°", "grayscale"]
    assert all(v.scene is None and v.image.size == (60, 40) for v in vs)
    assert any(v.name.startswith("background:") for v in vs) and vs[-1].name == "red ↔ blue"
    with pytest.raises(TypeError, match="PIL image"):
        V.image_variants(np.zeros((4, 4, 3)))


def test_known_scenes_are_recognised_by_their_pixels(tmp_path):
    scene = scene2()
    render_scene(scene).save(tmp_path / "shapes_a.png")
    (tmp_path / "shapes_a.json").write_text(json.dumps(scene.to_json()))
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")  # no scene beside it: not a known scene
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.json").write_text("{}")
    known = V.known_scenes(str(tmp_path))
    assert len(known) == 1
    key = V.scene_key(Image.open(tmp_path / "shapes_a.png"))
    assert known[key].background == "gray"
    assert V.variants_for(Image.open(tmp_path / "shapes_a.png"), known[key])[1].name == "hue +90°"
    assert V.known_scenes(str(tmp_path / "missing")) == {}


def test_composer_builds_world_scenes_and_explains_mistakes():
    scene, warnings = compose_scene([ObjectSpec("circle", "blue", "large", 40, 64),
                                     ObjectSpec("star", "yellow", "small", 100, 64)], "pink")
    assert warnings == []
    assert [o.color for o in scene.objects] == ["blue", "yellow"] and scene.background == "pink"
    img = render_scene(scene)
    assert px(img, 40, 64)[2] > 180 and px(img, 2, 2) == BACKGROUND_RGB["pink"]
    _, warnings = compose_scene([ObjectSpec("circle", "pink", "large", 64, 64),
                                 ObjectSpec("square", "red", "large", 70, 64)], "pink")
    assert any("nearly invisible" in w for w in warnings) and any("overlap" in w for w in warnings)
    _, warnings = compose_scene([ObjectSpec("circle", "red", "large", 2, 64)], "gray")
    assert any("cut by the image border" in w for w in warnings)
    for bad, msg in [(([ObjectSpec("hexagon", "red", "small", 5, 5)], "gray"), "shape must be one of"),
                     (([ObjectSpec("circle", "teal", "small", 5, 5)], "gray"), "colour must be one of"),
                     (([ObjectSpec("circle", "red", "huge", 5, 5)], "gray"), "size must be one of"),
                     (([ObjectSpec("circle", "red", "small", 500, 5)], "gray"), "x must be a number"),
                     (([ObjectSpec("circle", "red", "small", 5, 5)], "green"), "background must be one of"),
                     (([], "gray"), "1 to 3 objects")]:
        with pytest.raises(ValueError, match=msg):
            compose_scene(*bad)
    assert COLOR_RGB["blue"]  # the world's palette is what the composer offers
