"""Karpathy-split dataset loading (diffusion_caption.data) on tiny datasets built in tmp_path."""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from diffusion_caption import data
from diffusion_caption.data import (DATASETS, ImageRecord, caption_pairs, find_dataset_json, load_datasets,
                                    load_karpathy, resolve_image_path)


def _png(path, color=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)


def _sent(raw, imgid, sentid):
    return {"raw": raw, "tokens": raw.lower().strip(" .").split(), "imgid": imgid, "sentid": sentid}


def _write(path, meta):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(meta, f)


FLICKR_IMAGES = [  # (filename, split, raw captions)
    ("100_a.jpg", "train", ["A dog runs on the grass .", "  Two DOGS play.  "]),
    ("101_b.jpg", "val", ["A man rides a bike ."]),
    ("102_c.jpg", "test", ["Children are playing soccer ."]),
    ("103_d.jpg", "restval", ["A woman holds an umbrella .", "rain falls on a street"]),
]


@pytest.fixture
def flickr_dir(tmp_path):
    """Flickr8k-style: no 'filepath'; images in an ``Images/`` folder."""
    d = tmp_path / "flickr8k"
    images, sid = [], 0
    for imgid, (fn, split, raws) in enumerate(FLICKR_IMAGES):
        _png(str(d / "Images" / fn), (imgid * 60, 10, 10))
        sents = []
        for r in raws:
            sents.append(_sent(r, imgid, sid))
            sid += 1
        images.append({"filename": fn, "imgid": imgid, "split": split, "sentences": sents,
                       "sentids": [s["sentid"] for s in sents]})
    _write(str(d / "dataset_flickr8k.json"), {"dataset": "flickr8k", "images": images})
    return str(d)


@pytest.fixture
def coco_dir(tmp_path):
    """COCO-style: 'filepath' subfolders (train2014 / val2014) and 'cocoid'."""
    d = tmp_path / "coco"
    rows = [("COCO_train2014_000000000009.jpg", "train2014", "train", 9, ["A plate of FOOD ."]),
            ("COCO_val2014_000000000042.jpg", "val2014", "restval", 42, ["A cat on a sofa."]),
            ("COCO_val2014_000000000073.jpg", "val2014", "val", 73, ["A red bus ."]),
            ("COCO_val2014_000000000074.jpg", "val2014", "test", 74, ["A kite in the sky ."])]
    images = []
    for imgid, (fn, fp, split, cocoid, raws) in enumerate(rows):
        _png(str(d / fp / fn))
        images.append({"filepath": fp, "filename": fn, "imgid": imgid, "split": split, "cocoid": cocoid,
                       "sentences": [_sent(r, imgid, imgid * 10 + k) for k, r in enumerate(raws)],
                       "sentids": [imgid * 10 + k for k in range(len(raws))]})
    _write(str(d / "dataset_coco.json"), {"dataset": "coco", "images": images})
    return str(d)


# ---------------------------------------------------------------- splits and captions

def test_split_filtering_file_order_and_restval_as_train(flickr_dir):
    recs = load_karpathy("flickr8k", flickr_dir)  # default: train (+ restval)
    assert [os.path.basename(r.image_path) for r in recs] == ["100_a.jpg", "103_d.jpg"]
    assert [r.split for r in recs] == ["train", "train"]
    assert [r.image_id for r in recs] == ["flickr8k:0", "flickr8k:3"]
    assert all(isinstance(r, ImageRecord) and r.dataset == "flickr8k" and r.scene is None for r in recs)

    assert [r.image_id for r in load_karpathy("flickr8k", flickr_dir, splits="val")] == ["flickr8k:1"]
    both = load_karpathy("flickr8k", flickr_dir, splits=("test", "val"))
    assert [r.image_id for r in both] == ["flickr8k:1", "flickr8k:2"]  # file order, not request order


def test_restval_kept_separate_when_not_train(flickr_dir):
    recs = load_karpathy("flickr8k", flickr_dir, splits=["train"], restval_as_train=False)
    assert [r.image_id for r in recs] == ["flickr8k:0"]
    rv = load_karpathy("flickr8k", flickr_dir, splits=["restval"], restval_as_train=False)
    assert [(r.image_id, r.split) for r in rv] == [("flickr8k:3", "restval")]
    # asking for restval by name still works when it is folded into train
    rv2 = load_karpathy("flickr8k", flickr_dir, splits=["restval"])
    assert [r.image_id for r in rv2] == ["flickr8k:3"]


def test_caption_normalisation(flickr_dir):
    recs = load_karpathy("flickr8k", flickr_dir, splits=["train"])
    assert recs[0].captions == ["a dog runs on the grass", "two dogs play"]
    assert recs[1].captions == ["a woman holds an umbrella", "rain falls on a street"]
    assert data.normalize_caption("A man . ") == "a man"
    assert data.normalize_caption("a.b.c.") == "a.b.c"  # only the trailing period goes


def test_caption_pairs_cover_every_caption(flickr_dir):
    recs = load_karpathy("flickr8k", flickr_dir, splits=["train", "val"])
    pairs = caption_pairs(recs)
    assert pairs == [(0, "a dog runs on the grass"), (0, "two dogs play"), (1, "a man rides a bike"),
                     (2, "a woman holds an umbrella"), (2, "rain falls on a street")]
    assert all(c in recs[i].captions for i, c in pairs)
    assert caption_pairs([]) == []


# ---------------------------------------------------------------- image paths

def test_image_paths_exist_for_flickr_and_coco(flickr_dir, coco_dir):
    recs = load_karpathy("flickr8k", flickr_dir, splits=["train", "val", "test"], check_images=True)
    assert len(recs) == 4
    for r in recs:
        assert r.image_path.startswith(os.path.join(flickr_dir, "Images") + os.sep)
        assert os.path.isfile(r.image_path)
    coco = load_karpathy("coco", coco_dir, splits=["train", "val", "test"], check_images=True)
    assert [os.path.relpath(r.image_path, coco_dir) for r in coco] == [
        os.path.join("train2014", "COCO_train2014_000000000009.jpg"),
        os.path.join("val2014", "COCO_val2014_000000000042.jpg"),
        os.path.join("val2014", "COCO_val2014_000000000073.jpg"),
        os.path.join("val2014", "COCO_val2014_000000000074.jpg")]
    assert all(os.path.isfile(r.image_path) for r in coco)
    # unknown keys are kept
    assert [r.extra["cocoid"] for r in coco] == [9, 42, 73, 74]
    assert coco[0].extra["filepath"] == "train2014" and coco[0].extra["sentids"] == [0]


def test_resolve_image_path_rules(tmp_path):
    d = str(tmp_path)
    assert resolve_image_path({"filename": "x.jpg", "filepath": "val2014"}, "coco", d, image_dir="/imgs") \
        == os.path.join("/imgs", "x.jpg")
    assert resolve_image_path({"filename": "x.jpg", "filepath": "val2014"}, "coco", d) \
        == os.path.join(d, "val2014", "x.jpg")
    with pytest.raises(FileNotFoundError) as ei:
        resolve_image_path({"filename": "x.jpg"}, "flickr30k", d)
    for folder in data.IMAGE_FOLDERS:
        assert folder in str(ei.value)
    # an image in no folder: the dataset's own folder first, then the documented order
    os.makedirs(os.path.join(d, "flickr30k_images"))
    os.makedirs(os.path.join(d, "Flickr8k_Dataset"))
    assert resolve_image_path({"filename": "x.jpg"}, "flickr30k", d) == os.path.join(d, "flickr30k_images", "x.jpg")
    assert resolve_image_path({"filename": "x.jpg"}, "flickr8k", d) == os.path.join(d, "Flickr8k_Dataset", "x.jpg")
    # the folder that holds the image wins, even a generic one
    _png(os.path.join(d, "images", "y.jpg"))
    assert resolve_image_path({"filename": "y.jpg"}, "flickr30k", d) == os.path.join(d, "images", "y.jpg")


def test_flickr8k_and_flickr30k_share_one_data_dir(tmp_path):
    """Both Karpathy JSONs in one folder, each dataset's images in its own download folder."""
    d = tmp_path / "both"
    for name, folder, n in (("flickr8k", "Images", 2), ("flickr30k", "flickr30k-images", 3)):
        images = []
        for i in range(n):
            fn = f"{name}_{i}.jpg"
            _png(str(d / folder / fn))
            images.append({"filename": fn, "imgid": i, "split": "train", "sentences": [{"raw": f"{name} {i}"}]})
        (d / f"dataset_{name}.json").write_text(json.dumps({"dataset": name, "images": images}))
    recs = data.load_datasets("flickr8k+flickr30k", str(d), splits=["train"], check_images=True)
    assert [os.path.relpath(r.image_path, d) for r in recs] == [
        os.path.join("Images", "flickr8k_0.jpg"), os.path.join("Images", "flickr8k_1.jpg"),
        os.path.join("flickr30k-images", "flickr30k_0.jpg"), os.path.join("flickr30k-images", "flickr30k_1.jpg"),
        os.path.join("flickr30k-images", "flickr30k_2.jpg")]


def test_image_dir_override_and_check_images_names_missing_file(flickr_dir, tmp_path):
    other = str(tmp_path / "elsewhere")
    _png(os.path.join(other, "100_a.jpg"))
    recs = load_karpathy("flickr8k", flickr_dir, image_dir=other)
    assert recs[0].image_path == os.path.join(other, "100_a.jpg")
    with pytest.raises(FileNotFoundError, match="103_d.jpg"):  # 100_a.jpg exists there, 103_d.jpg does not
        load_karpathy("flickr8k", flickr_dir, image_dir=other, check_images=True)
    os.remove(os.path.join(flickr_dir, "Images", "102_c.jpg"))
    assert len(load_karpathy("flickr8k", flickr_dir, splits="test")) == 1  # not checked by default
    with pytest.raises(FileNotFoundError, match="102_c.jpg"):
        load_karpathy("flickr8k", flickr_dir, splits="test", check_images=True)


def test_shapes_layout_scene_and_extra_splits(tmp_path):
    d = str(tmp_path / "shapes")
    scene = {"objects": [{"shape": "circle", "color": "red"}], "background": "beige", "correlated": False}
    images = [{"filename": f"{s}_000000.png", "filepath": "images", "imgid": i, "split": s,
               "sentences": [_sent("a red circle", i, i)], "sentids": [i], "scene": scene}
              for i, s in enumerate(["train", "val", "val_corr", "test", "test_corr"])]
    _write(os.path.join(d, "dataset_shapes.json"), {"dataset": "shapes", "world": {"size": 128}, "images": images})
    recs = load_karpathy("shapes", d, splits=["val_corr", "test_corr"])
    assert [(r.split, r.image_id) for r in recs] == [("val_corr", "shapes:2"), ("test_corr", "shapes:4")]
    assert recs[0].scene == scene and recs[0].captions == ["a red circle"]
    assert recs[0].image_path == os.path.join(d, "images", "val_corr_000000.png")


# ---------------------------------------------------------------- combining datasets

def test_combine_flickr8k_and_coco_unique_ids(flickr_dir, coco_dir):
    recs = load_datasets("flickr8k+coco", {"flickr8k": flickr_dir, "coco": coco_dir}, splits=["train"])
    assert [r.dataset for r in recs] == ["flickr8k", "flickr8k", "coco", "coco"]
    ids = [r.image_id for r in recs]
    assert ids == ["flickr8k:0", "flickr8k:3", "coco:0", "coco:1"]  # same imgids, distinct ids
    assert len(set(ids)) == len(ids)
    assert all(os.path.isfile(r.image_path) for r in recs)
    pairs = caption_pairs(recs)
    assert len(pairs) == sum(len(r.captions) for r in recs) == 6
    assert pairs[-1] == (3, "a cat on a sofa")


def test_combine_with_one_parent_dir_uses_subfolders(flickr_dir, coco_dir, tmp_path):
    # fixtures live in tmp_path/flickr8k and tmp_path/coco: found as data_dir/<name>/
    recs = load_datasets("coco+flickr8k", str(tmp_path), splits="val")
    assert [r.image_id for r in recs] == ["coco:2", "flickr8k:1"]
    # a json directly in data_dir is used before the subfolder
    assert [r.image_id for r in load_datasets("flickr8k", flickr_dir, splits="val")] == ["flickr8k:1"]


# ---------------------------------------------------------------- errors

def test_missing_json_names_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        find_dataset_json("flickr30k", str(tmp_path))
    msg = str(ei.value)
    assert os.path.join(str(tmp_path), "dataset_flickr30k.json") in msg and "Karpathy" in msg
    with pytest.raises(FileNotFoundError, match="training.make_world"):
        load_karpathy("shapes", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset_coco.json"):
        load_datasets("coco", str(tmp_path))


def test_malformed_files_and_entries(tmp_path):
    d = str(tmp_path)
    path = os.path.join(d, "dataset_flickr8k.json")
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="dataset_flickr8k.json"):
        load_karpathy("flickr8k", d)
    _write(path, [{"filename": "a.jpg"}])
    with pytest.raises(ValueError, match="'images' list"):
        load_karpathy("flickr8k", d)
    good = {"filename": "a.jpg", "imgid": 0, "split": "train", "sentences": [_sent("a dog .", 0, 0)]}
    _write(path, {"images": [good, {"filename": "b.jpg", "imgid": 1, "split": "train"}]})
    with pytest.raises(ValueError, match=r"dataset_flickr8k\.json.*entry 1.*'sentences'"):
        load_karpathy("flickr8k", d)
    _write(path, {"images": [good, {"filename": "b.jpg", "imgid": 1, "split": "train", "sentences": [{}]}]})
    with pytest.raises(ValueError, match=r"entry 1.*sentence 0.*'raw'"):
        load_karpathy("flickr8k", d)


def test_unknown_split_lists_available(flickr_dir):
    with pytest.raises(ValueError) as ei:
        load_karpathy("flickr8k", flickr_dir, splits=["train", "validation"])
    msg = str(ei.value)
    assert "validation" in msg
    for s in ("train", "val", "test", "restval"):
        assert f"'{s}'" in msg


def test_unknown_dataset_lists_known(flickr_dir):
    with pytest.raises(ValueError) as ei:
        load_datasets("flickr8k+imagenet", flickr_dir)
    assert "imagenet" in str(ei.value)
    assert all(n in str(ei.value) for n in DATASETS)
    with pytest.raises(ValueError, match="more than once"):
        load_datasets("flickr8k+flickr8k", flickr_dir)
