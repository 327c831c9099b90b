"""Captioning datasets in the Karpathy-split JSON layout.

Karpathy's split files (``dataset_flickr8k.json``, ``dataset_flickr30k.json``, ``dataset_coco.json``)
look like::

    {"dataset": "flickr8k",
     "images": [{"filename": "1000268201_693b08cb0e.jpg", "imgid": 0, "split": "train",
                 "sentences": [{"raw": "A child in a pink dress ...", "tokens": [...], "imgid": 0, "sentid": 0}, ...],
                 "sentids": [0, 1, 2, 3, 4]},
                ...]}

COCO entries also carry ``"filepath"`` (``"train2014"`` / ``"val2014"``) and ``"cocoid"``. Our synthetic
``dataset_shapes.json`` (written by ``python -m training.make_world``) uses the same layout with
``"filepath": "images"``, a ground-truth ``"scene"`` dict per image and the extra splits ``"val_corr"`` and
``"test_corr"``. Keys this module does not interpret are kept in :attr:`ImageRecord.extra`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

DATASETS = ("shapes", "flickr8k", "flickr30k", "coco")

# Image folders tried for entries without a "filepath" (Flickr8k / Flickr30k downloads): a dataset's own
# folders first (OWN_IMAGE_FOLDERS), then the rest in this order. Both datasets may share one data dir.
IMAGE_FOLDERS = ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images")
OWN_IMAGE_FOLDERS = {"flickr8k": ("Flicker8k_Dataset", "Flickr8k_Dataset"),
                     "flickr30k": ("flickr30k-images", "flickr30k_images")}

# Entry keys that become ImageRecord fields; every other key goes to ImageRecord.extra.
_CONSUMED_KEYS = ("filename", "split", "sentences", "scene")

_image_folder_cache: dict[tuple[str, str], str] = {}


@dataclass
class ImageRecord:
    """One image and its reference captions.

    ``image_id`` is ``"<dataset>:<imgid>"`` so it stays unique across combined datasets; ``captions`` are
    normalised with :func:`normalize_caption`; ``split`` is the split as loaded (``"restval"`` becomes
    ``"train"`` when loaded with ``restval_as_train``); ``scene`` is the shapes world's ground truth (None
    for real datasets); ``extra`` holds the entry's other keys (``imgid``, ``sentids``, ``filepath``,
    ``cocoid``, ...).
    """

    image_path: str
    captions: list[str]
    split: str
    image_id: str
    dataset: str
    scene: dict | None = None
    extra: dict = field(default_factory=dict, repr=False)


def normalize_caption(raw: str) -> str:
    """Strip and lowercase a raw caption and drop one trailing ``" ."`` or ``"."``."""
    s = raw.strip().lower()
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s


def _how_to_get(name: str) -> str:
    if name == "shapes":
        return "render the shapes world with `python -m training.make_world --out DIR` and pass DIR as the data dir"
    return (f"download Karpathy's caption split file dataset_{name}.json (from caption_datasets.zip) and the "
            f"{name} image folder, and put both in the data dir")


def find_dataset_json(name: str, data_dir: str) -> str:
    """Path of ``data_dir/dataset_{name}.json``; FileNotFoundError saying how to get it if it is missing."""
    path = os.path.join(data_dir, f"dataset_{name}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file {path} not found: {_how_to_get(name)}")
    return path


def resolve_image_path(entry: dict, name: str, data_dir: str, image_dir: str | None = None) -> str:
    """Path of the image of one Karpathy entry.

    ``image_dir/filename`` if ``image_dir`` is given; else ``data_dir/filepath/filename`` if the entry has a
    ``"filepath"`` (COCO, shapes); else ``data_dir/<folder>/filename`` with the first folder under ``data_dir``
    that holds the file, trying the dataset's own folders (:data:`OWN_IMAGE_FOLDERS`) before
    :data:`IMAGE_FOLDERS`; when none holds it, the first of them that exists. The folder found is cached per
    ``data_dir`` and dataset, so Flickr8k and Flickr30k can share one data dir (``Images/`` and
    ``flickr30k-images/``). Raises FileNotFoundError naming the tried folders when none exists.
    """
    filename = entry["filename"]
    if image_dir:
        return os.path.normpath(os.path.join(image_dir, filename))
    if entry.get("filepath"):  # normalised: "kd/../shapes/images/x.png" is the same image (and feature cache entry)
        return os.path.normpath(os.path.join(data_dir, entry["filepath"], filename))
    key = (os.path.abspath(data_dir), name)
    folder = _image_folder_cache.get(key)
    if folder is None:
        own = OWN_IMAGE_FOLDERS.get(name, ())
        existing = [c for c in own + tuple(f for f in IMAGE_FOLDERS if f not in own)
                    if os.path.isdir(os.path.join(data_dir, c))]
        if not existing:
            raise FileNotFoundError(
                f"no image folder for {name} under {data_dir}: tried {', '.join(IMAGE_FOLDERS)}; "
                f"put the images in one of them or pass image_dir")
        holding = [c for c in existing if os.path.isfile(os.path.join(data_dir, c, filename))]
        if not holding:  # this image is missing; the next entry decides the folder
            return os.path.normpath(os.path.join(data_dir, existing[0], filename))
        folder = _image_folder_cache[key] = holding[0]
    return os.path.normpath(os.path.join(data_dir, folder, filename))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON file ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("images"), list):
        raise ValueError(f"{path}: expected a JSON object with an 'images' list (Karpathy split layout)")
    return meta


def _check_entry(path: str, i: int, e) -> None:
    if not isinstance(e, dict):
        raise ValueError(f"{path}: image entry {i} is a {type(e).__name__}, expected an object")
    for k in ("filename", "split", "sentences"):
        if k not in e:
            raise ValueError(f"{path}: image entry {i} has no {k!r} key")
    if not isinstance(e["filename"], str) or not e["filename"]:
        raise ValueError(f"{path}: image entry {i} has an empty or non-string 'filename'")
    if not isinstance(e["split"], str):
        raise ValueError(f"{path}: image entry {i} has a non-string 'split'")
    if not isinstance(e["sentences"], list):
        raise ValueError(f"{path}: image entry {i} ('{e['filename']}'): 'sentences' is not a list")
    for j, s in enumerate(e["sentences"]):
        if not isinstance(s, dict) or not isinstance(s.get("raw"), str):
            raise ValueError(f"{path}: image entry {i} ('{e['filename']}'): sentence {j} has no string 'raw'")


def load_karpathy(name: str, data_dir: str, splits: str | list[str] | tuple = ("train",),
                  image_dir: str | None = None, restval_as_train: bool = True,
                  check_images: bool = False) -> list[ImageRecord]:
    """Load the images of ``splits`` from ``data_dir/dataset_{name}.json``, in file order.

    ``splits`` is one split name or several. With ``restval_as_train`` the ``"restval"`` images count as
    ``"train"`` (and their records say ``"train"``); ``"restval"`` can still be asked for by name.
    Raises FileNotFoundError for a missing JSON (or, with ``check_images``, the first missing image) and
    ValueError for a malformed file or a split the file does not have.
    """
    path = find_dataset_json(name, data_dir)
    meta = _read_json(path)
    entries = meta["images"]
    for i, e in enumerate(entries):
        _check_entry(path, i, e)

    wanted = [splits] if isinstance(splits, str) else list(splits)
    present = {e["split"] for e in entries}
    available = set(present)
    if restval_as_train and "restval" in present:
        available.add("train")
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise ValueError(f"{path}: unknown split(s) {unknown}; the file has splits {sorted(available)}")
    wanted_set = set(wanted)

    out: list[ImageRecord] = []
    seen: dict[str, int] = {}
    for i, e in enumerate(entries):
        raw_split = e["split"]
        split = "train" if restval_as_train and raw_split == "restval" else raw_split
        if raw_split not in wanted_set and split not in wanted_set:
            continue
        image_id = f"{name}:{e.get('imgid', i)}"
        if image_id in seen:
            raise ValueError(f"{path}: image entries {seen[image_id]} and {i} share the imgid of {image_id!r}")
        seen[image_id] = i
        image_path = resolve_image_path(e, name, data_dir, image_dir)
        if check_images and not os.path.isfile(image_path):
            raise FileNotFoundError(f"image of {image_id} (entry {i} of {path}) not found: {image_path}")
        out.append(ImageRecord(
            image_path=image_path,
            captions=[normalize_caption(s["raw"]) for s in e["sentences"]],
            split=split,
            image_id=image_id,
            dataset=name,
            scene=e.get("scene"),
            extra={k: v for k, v in e.items() if k not in _CONSUMED_KEYS},
        ))
    return out


def _dataset_dir(name: str, data_dir: str | dict[str, str]) -> str:
    if isinstance(data_dir, dict):
        if name not in data_dir:
            raise ValueError(f"no data dir given for {name!r}; the data_dir dict has {sorted(data_dir)}")
        return data_dir[name]
    fname = f"dataset_{name}.json"
    for d in (data_dir, os.path.join(data_dir, name)):
        if os.path.isfile(os.path.join(d, fname)):
            return d
    raise FileNotFoundError(f"dataset file {fname} not found in {data_dir} nor in {os.path.join(data_dir, name)}: "
                            f"{_how_to_get(name)}")


def load_datasets(spec: str, data_dir: str | dict[str, str], splits=("train",), **kw) -> list[ImageRecord]:
    """Load and concatenate the datasets of ``spec`` (e.g. ``"flickr8k+flickr30k"``), in spec order.

    ``data_dir`` is either one folder for all datasets (each ``dataset_<name>.json`` is looked up in it,
    then in ``data_dir/<name>/``) or a dict ``name -> folder``. Other keyword arguments go to
    :func:`load_karpathy`; ``image_dir`` may also be a dict ``name -> folder``.
    """
    names = [n.strip().lower() for n in spec.split("+")]
    for n in names:
        if n not in DATASETS:
            raise ValueError(f"unknown dataset {n!r} in {spec!r}; known datasets: {', '.join(DATASETS)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"dataset(s) {dupes} listed more than once in {spec!r}")
    out: list[ImageRecord] = []
    for n in names:
        kw_n = dict(kw)
        if isinstance(kw_n.get("image_dir"), dict):
            kw_n["image_dir"] = kw_n["image_dir"].get(n)
        out += load_karpathy(n, _dataset_dir(n, data_dir), splits, **kw_n)
    return out


def caption_pairs(records: list[ImageRecord]) -> list[tuple[int, str]]:
    """``(record index, caption)`` for every caption of every record, to train on all of them."""
    return [(i, c) for i, r in enumerate(records) for c in r.captions]
