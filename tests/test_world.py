import json
import os

import numpy as np
import pytest

from diffusion_caption.world import scenes as world
from diffusion_caption.data import load_karpathy


def test_scene_and_render_are_deterministic():
    a, _ = world.scene_for(7, "train", 12, 0.9)
    b, _ = world.scene_for(7, "train", 12, 0.9)
    assert a == b
    assert np.array_equal(np.asarray(world.render_scene(a)), np.asarray(world.render_scene(b)))
    c, _ = world.scene_for(7, "train", 13, 0.9)
    assert c != a


def test_scenes_respect_the_world_rules():
    rng = np.random.default_rng(0)
    for _ in range(300):
        s = world.sample_scene(rng, p_corr=0.5)
        assert 1 <= len(s.objects) <= 3
        assert s.background in world.BACKGROUNDS
        for o in s.objects:
            assert o.shape in world.SHAPES and o.color in world.COLORS and o.size in world.SIZES
            assert o.r <= o.x <= world.IMAGE_SIZE - o.r and o.r <= o.y <= world.IMAGE_SIZE - o.r
            assert o.color != s.background  # never a pink shape on a pink background


def test_captions_name_exactly_the_world_words():
    rng = np.random.default_rng(1)
    vocab = set(" ".join(world.COLORS + world.SHAPES + world.SIZES + world.BACKGROUNDS + world.RELATIONS).split())
    vocab |= {s + "s" for s in world.SHAPES} | {"a", "an", "and", "on", "background", "there", "is", "are",
                                                 "with", "two", "three", "shapes", ","}
    for _ in range(200):
        s = world.sample_scene(rng)
        caps = world.sample_captions(s, rng)
        assert 1 <= len(caps) <= 5 and len(set(caps)) == len(caps)
        for c in caps:
            assert set(c.split()) <= vocab, c
            # every colour named for an object is in the scene
            shapes_named = {w.rstrip("s") for w in c.split() if w.rstrip("s") in world.SHAPES}
            assert shapes_named <= {o.shape for o in s.objects}


def test_single_object_caption_examples():
    o = world.ShapeObject("circle", "red", "small", 40, 40, 12)
    s = world.Scene([o], "gray")
    cands = world.caption_candidates(s)
    assert "a red circle" in cands and "a small red circle on a gray background" in cands
    two = world.Scene([world.ShapeObject("square", "blue", "large", 30, 60, 22),
                       world.ShapeObject("square", "blue", "small", 100, 60, 12)], "black")
    assert "two blue squares" in world.caption_candidates(two)
    pair = world.Scene([o, world.ShapeObject("triangle", "green", "large", 100, 45, 22)], "beige")
    assert "a red circle to the left of a green triangle" in world.caption_candidates(pair)
    assert world.caption_candidates(world.Scene([world.ShapeObject("star", "orange", "large", 60, 60, 22)], "black"))[0] \
        == "an orange star"


def test_spurious_correlation_rate():
    rng = np.random.default_rng(2)
    hits = sum(s.background == world.SHAPE_BACKGROUND[s.objects[0].shape]
               for s in (world.sample_scene(rng, p_corr=0.9) for _ in range(1000)))
    assert 0.85 < hits / 1000 < 0.96  # 0.9 plus chance agreement, minus colour clashes
    rng = np.random.default_rng(2)
    hits0 = sum(s.background == world.SHAPE_BACKGROUND[s.objects[0].shape]
                for s in (world.sample_scene(rng, p_corr=0.0) for _ in range(1000)))
    assert hits0 / 1000 < 0.3


def test_dataset_on_disk_in_karpathy_layout(world_dir):
    with open(os.path.join(world_dir, "dataset_shapes.json")) as f:
        meta = json.load(f)
    assert meta["dataset"] == "shapes"
    splits = {e["split"] for e in meta["images"]}
    assert splits == {"train", "val", "test", "val_corr", "test_corr"}
    e = meta["images"][0]
    assert {"filename", "imgid", "split", "sentences", "sentids", "scene"} <= set(e)
    assert {"raw", "tokens", "imgid", "sentid"} <= set(e["sentences"][0])
    recs = load_karpathy("shapes", world_dir, splits=["test"])
    # 12 scenes and, at the default 5%, one empty scene after them
    assert len(recs) == 13 and all(os.path.isfile(r.image_path) for r in recs)
    assert all(r.scene and r.scene["objects"] for r in recs[:12])
    assert recs[12].scene["objects"] == [] and recs[12].image_path.endswith("test_empty_000000.png")
    assert "an empty" in " ".join(recs[12].captions)
    assert not any(r.scene["correlated"] for r in recs)  # the plain test split is uncorrelated


def test_background_augmentation_relabels_captions(tmp_path):
    import json

    from diffusion_caption.world.scenes import WorldConfig, write_dataset

    write_dataset(str(tmp_path), WorldConfig(n_train=6, n_val=1, n_test=1, augment_backgrounds=2), progress=False)
    data = json.load(open(tmp_path / "dataset_shapes.json"))
    train = [im for im in data["images"] if im["split"] == "train"]
    assert len(train) == 6 * 3
    originals = {im["filename"]: im for im in train if "_bg" not in im["filename"]}
    for im in train:
        if "_bg" not in im["filename"]:
            continue
        src = originals["train_" + im["filename"].split("_")[-1]]
        assert im["scene"]["objects"] == src["scene"]["objects"]
        bg = im["scene"]["background"]
        assert bg != src["scene"]["background"] and not im["scene"]["correlated"]
        assert bg not in {o["color"] for o in im["scene"]["objects"]}
        # every caption that names a background names the new one
        for s in im["sentences"]:
            if "background" in s["raw"]:
                assert f"{bg} background" in s["raw"], s["raw"]
        assert (tmp_path / "images" / im["filename"]).is_file()


def test_empty_scenes_are_appended_and_leave_the_other_scenes_as_they_were(tmp_path):
    import numpy as np
    from PIL import Image

    from diffusion_caption.world.scenes import WorldConfig, n_empty, write_dataset

    def images(folder, fraction):
        write_dataset(str(folder), WorldConfig(n_train=40, n_val=10, n_test=20, empty_fraction=fraction,
                                               augment_backgrounds=1), progress=False)
        return json.load(open(folder / "dataset_shapes.json"))["images"]

    plain, with_empty = images(tmp_path / "a", 0.0), images(tmp_path / "b", 0.1)
    assert n_empty(20, 0.1) == 2 and len(with_empty) == len(plain) + 4 * 2 + 1 + 2 + 1 + 2  # train's x2: augmented
    by_name = {im["filename"]: im for im in with_empty}
    for im in plain:  # every scene of the world without empty scenes is there, unchanged
        assert by_name[im["filename"]]["scene"] == im["scene"]
        assert [s["raw"] for s in by_name[im["filename"]]["sentences"]] == [s["raw"] for s in im["sentences"]]
    empty = [im for im in with_empty if not im["scene"]["objects"]]
    assert len(empty) == 14 and all("empty" in im["filename"] for im in empty)
    assert len({im["scene"]["background"] for im in empty}) > 1
    pixels = np.asarray(Image.open(tmp_path / "b" / "images" / empty[0]["filename"]).convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) <= 2  # the background alone (noise-free)
    with pytest.raises(ValueError, match="empty_fraction"):
        n_empty(10, 1.5)
