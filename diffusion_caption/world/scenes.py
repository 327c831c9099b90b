"""The synthetic shapes world: scenes, their rendering and their captions.

A scene is 1 to 3 coloured shapes on a coloured background, or, now and then, the background alone (an
empty scene, captioned "an empty gray background"). Everything about it is known exactly, so
captions can be checked word by word against the ground truth. Every image is deterministic from
``(seed, split, index)``.

In the training split the background is correlated with the shape of the first object
(``SHAPE_BACKGROUND``) with probability ``p_corr``; that spurious correlation is what lets colour bias be
produced and measured later. Splits named ``*_corr`` carry the same correlation, the plain val/test
splits do not.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "white")
SIZES = ("small", "large")
BACKGROUNDS = ("black", "gray", "dark blue", "pink", "beige")
RELATIONS = ("to the left of", "to the right of", "above", "below")
COUNT_WORDS = {2: "two", 3: "three"}

COLOR_RGB = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (45, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (135, 50, 180),
    "orange": (250, 140, 25),
    "pink": (255, 105, 180),
    "white": (245, 245, 245),
}
BACKGROUND_RGB = {
    "black": (18, 18, 18),
    "gray": (125, 125, 125),
    "dark blue": (18, 28, 85),
    "pink": (245, 195, 215),
    "beige": (225, 210, 170),
}
# the spurious correlation of the training split: the first object's shape predicts the background
SHAPE_BACKGROUND = {"circle": "pink", "square": "gray", "triangle": "beige", "diamond": "dark blue", "star": "black"}

IMAGE_SIZE = 128
RADIUS = {"small": (11, 14), "large": (21, 26)}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "val_corr": 3, "test_corr": 4}


@dataclass
class ShapeObject:
    shape: str
    color: str
    size: str
    x: float  # centre, in pixels of the IMAGE_SIZE canvas
    y: float
    r: float  # circumradius in pixels

    @property
    def plural(self) -> str:
        return self.shape + "s"


@dataclass
class Scene:
    objects: list[ShapeObject]
    background: str
    correlated: bool = False  # whether the background was drawn from SHAPE_BACKGROUND
    jitter: list[list[int]] = field(default_factory=list)  # per-object RGB offsets (rendering only)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Scene":
        return cls(objects=[ShapeObject(**o) for o in d["objects"]], background=d["background"],
                   correlated=d.get("correlated", False), jitter=d.get("jitter", []))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where ``a`` is relative to ``b``, along the axis on which they are furthest apart."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _overlaps(o: ShapeObject, others: list[ShapeObject], margin: float = 4.0) -> bool:
    return any(math.hypot(o.x - p.x, o.y - p.y) < o.r + p.r + margin for p in others)


def sample_scene(rng: np.random.Generator, p_corr: float = 0.0, n_objects: int | None = None) -> Scene:
    """Draw a random scene. With probability ``p_corr`` the background follows the first shape."""
    n = n_objects or int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    objects: list[ShapeObject] = []
    for _ in range(n):
        # identical pairs ("two blue squares") happen on purpose now and then
        if objects and rng.random() < 0.15:
            shape, color = objects[-1].shape, objects[-1].color
        else:
            shape, color = str(rng.choice(SHAPES)), str(rng.choice(COLORS))
        size = str(rng.choice(SIZES))
        for _attempt in range(200):
            r = float(rng.uniform(*RADIUS[size]))
            x = float(rng.uniform(r + 3, IMAGE_SIZE - r - 3))
            y = float(rng.uniform(r + 3, IMAGE_SIZE - r - 3))
            o = ShapeObject(shape, color, size, round(x, 1), round(y, 1), round(r, 1))
            if not _overlaps(o, objects):
                break
        else:  # no room left: fall back to a small object somewhere free
            continue
        objects.append(o)
    colors = {o.color for o in objects}
    correlated = bool(rng.random() < p_corr)
    if correlated and SHAPE_BACKGROUND[objects[0].shape] not in colors:
        background = SHAPE_BACKGROUND[objects[0].shape]
    else:
        correlated = False
        allowed = [b for b in BACKGROUNDS if b not in colors]
        background = str(rng.choice(allowed))
    jitter = [[int(v) for v in rng.integers(-14, 15, size=3)] for _ in objects]
    return Scene(objects, background, correlated, jitter)


def empty_scene(rng: np.random.Generator) -> Scene:
    """A scene with no object: a background drawn uniformly from the palette."""
    return Scene([], str(rng.choice(BACKGROUNDS)), correlated=False, jitter=[])


# ---------------------------------------------------------------------------------------------------
# rendering


def _polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r / math.sqrt(2)
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "triangle":
        return [(x + r * math.cos(a), y + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(x, y - r), (x + 0.7 * r, y), (x, y + r), (x - 0.7 * r, y)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((x + rad * math.cos(a), y + rad * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(scene: Scene, size: int = IMAGE_SIZE, supersample: int = 3) -> Image.Image:
    """Draw a scene as an RGB image of ``size`` x ``size`` pixels (anti-aliased by supersampling)."""
    s = supersample * size / IMAGE_SIZE
    bg = BACKGROUND_RGB[scene.background]
    img = Image.new("RGB", (supersample * size,) * 2, bg)
    draw = ImageDraw.Draw(img)
    for i, o in enumerate(scene.objects):
        j = scene.jitter[i] if i < len(scene.jitter) else (0, 0, 0)
        rgb = tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(COLOR_RGB[o.color], j))
        if o.shape == "circle":
            draw.ellipse([(o.x - o.r) * s, (o.y - o.r) * s, (o.x + o.r) * s, (o.y + o.r) * s], fill=rgb)
        else:
            draw.polygon([(px * s, py * s) for px, py in _polygon(o.shape, o.x, o.y, o.r)], fill=rgb)
    return img.resize((size, size), Image.LANCZOS)


# ---------------------------------------------------------------------------------------------------
# captions


def _np(o: ShapeObject, with_size: bool = False) -> str:
    words = ([o.size] if with_size else []) + [o.color, o.shape]
    return f"{article(words[0])} {' '.join(words)}"


def _grouped(objects: list[ShapeObject]) -> list[str]:
    """Noun phrases with identical (colour, shape) objects merged: 'two blue squares'."""
    groups: dict[tuple[str, str], int] = {}
    for o in objects:
        groups[(o.color, o.shape)] = groups.get((o.color, o.shape), 0) + 1
    out = []
    for (color, shape), k in groups.items():
        out.append(f"{article(color)} {color} {shape}" if k == 1 else f"{COUNT_WORDS[k]} {color} {shape}s")
    return out


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        return f"{phrases[0]} and {phrases[1]}"
    return f"{phrases[0]} , {phrases[1]} and {phrases[2]}"


def caption_candidates(scene: Scene, order: list[int] | None = None) -> list[str]:
    """Every phrasing this world uses for a scene (all correct, some more detailed than others)."""
    objs = [scene.objects[i] for i in (order or range(len(scene.objects)))]
    bg = f"on {article(scene.background)} {scene.background} background"
    n = len(objs)
    out: list[str] = []
    if n == 0:
        b = scene.background
        return [f"an empty {b} background", f"{article(b)} {b} background with no shapes",
                f"there are no shapes {bg}", f"no shapes {bg}", "an empty background"]
    if n == 1:
        o = objs[0]
        out += [_np(o), _np(o, True), f"{_np(o, True)} {bg}", f"{_np(o)} {bg}",
                f"there is {_np(o)} {bg}", f"{article(scene.background)} {scene.background} background with {_np(o)}"]
        return out
    grouped = _grouped(objs)
    out += [_join(grouped), f"{_join(grouped)} {bg}"]
    if len(grouped) < n:  # some identical objects: the merged phrase is the natural one
        out += [f"there are {_join(grouped)} {bg}"]
    else:
        a, b = objs[0], objs[1]
        rel = relation(a, b)
        if n == 2:
            out += [f"{_np(a)} {rel} {_np(b)}", f"{_np(a, True)} {rel} {_np(b, True)}",
                    f"{_np(a, True)} and {_np(b, True)}", f"{_np(a)} {rel} {_np(b)} {bg}"]
        else:
            c = objs[2]
            out += [f"{_np(a)} {rel} {_np(b)} and {_np(c)}", f"{_np(a, True)} , {_np(b, True)} and {_np(c, True)}"]
    out += [f"{COUNT_WORDS[n]} shapes {bg}"]
    return out


def sample_captions(scene: Scene, rng: np.random.Generator, k: int = 5) -> list[str]:
    """``k`` distinct captions of a scene, objects listed in a random order, like a human-annotated set."""
    pool: list[str] = []
    for _ in range(3):
        order = [int(i) for i in rng.permutation(len(scene.objects))]
        for c in caption_candidates(scene, order):
            if c not in pool:
                pool.append(c)
    # the vague "two shapes on ..." caption is kept rare, as vague captions are in real datasets
    vague = [c for c in pool if " shapes " in c] if scene.objects else []
    precise = [c for c in pool if c not in vague]
    picked = [precise[i] for i in sorted(rng.permutation(len(precise))[:k])]
    if vague and (len(picked) < k or rng.random() < 0.2):
        picked = picked[: k - 1] + vague[:1]
    return picked


# ---------------------------------------------------------------------------------------------------
# datasets on disk (Karpathy-split layout)


@dataclass
class WorldConfig:
    n_train: int = 8000
    n_val: int = 500
    n_test: int = 1000
    p_corr: float = 0.9  # probability that a training background follows the first shape
    captions_per_image: int = 5
    seed: int = 0
    image_size: int = IMAGE_SIZE
    # the colour-bias remedy: per training image, this many extra copies with the background redrawn
    # uniformly from the other backgrounds (re-rendered, and re-captioned from the changed scene)
    augment_backgrounds: int = 0
    # empty scenes (no object), this fraction of each split's size, appended after its other scenes
    # (named ``<split>_empty_<j>.png``), so the scenes of a world made without them are unchanged
    empty_fraction: float = 0.05


EMPTY_INDEX = 1_000_000  # the random streams of empty scenes: index ``EMPTY_INDEX + j``, apart from the rest


def scene_for(seed: int, split: str, index: int, p_corr: float) -> tuple[Scene, np.random.Generator]:
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    return sample_scene(rng, p_corr=p_corr), rng


def with_background(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same objects on another background, drawn uniformly from the rest of the palette (never the
    colour of one of its objects, as in ``sample_scene``)."""
    colors = {o.color for o in scene.objects}
    others = [b for b in BACKGROUNDS if b != scene.background and b not in colors]
    return Scene(list(scene.objects), others[int(rng.integers(len(others)))], correlated=False,
                 jitter=list(scene.jitter))


def n_empty(n: int, fraction: float) -> int:
    """How many empty scenes a split of ``n`` scenes gets."""
    if not 0 <= fraction < 1:
        raise ValueError(f"empty_fraction must be in [0, 1), got {fraction}")
    return int(round(n * fraction))


def write_dataset(out_dir: str, cfg: WorldConfig = WorldConfig(), progress: bool = True) -> str:
    """Render the world into ``out_dir/images`` and write ``out_dir/dataset_shapes.json``.

    Splits: train (correlated with ``p_corr``), val and test (uncorrelated), val_corr and test_corr
    (correlated like train). Each image entry carries its exact ``scene`` as ground truth.
    """
    from tqdm import tqdm

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    plan = [("train", cfg.n_train, cfg.p_corr), ("val", cfg.n_val, 0.0), ("test", cfg.n_test, 0.0),
            ("val_corr", cfg.n_val, cfg.p_corr), ("test_corr", cfg.n_test, cfg.p_corr)]
    images, sentid = [], 0
    n_aug = cfg.augment_backgrounds
    total = sum(n + n_empty(n, cfg.empty_fraction) for _, n, _ in plan)
    total += n_aug * (cfg.n_train + n_empty(cfg.n_train, cfg.empty_fraction))
    bar = tqdm(total=total, desc="rendering shapes world",
               disable=not progress)

    def add(scene: Scene, rng: np.random.Generator, split: str, fname: str) -> None:
        nonlocal sentid
        render_scene(scene, cfg.image_size).save(os.path.join(out_dir, "images", fname))
        sents = []
        for c in sample_captions(scene, rng, cfg.captions_per_image):
            sents.append({"raw": c, "tokens": c.split(), "imgid": len(images), "sentid": sentid})
            sentid += 1
        images.append({"filename": fname, "filepath": "images", "imgid": len(images), "split": split,
                       "sentences": sents, "sentids": [s["sentid"] for s in sents], "scene": scene.to_json()})
        bar.update(1)

    for split, n, p in plan:
        draws = [(i, *scene_for(cfg.seed, split, i, p), f"{split}_{i:06d}.png") for i in range(n)]
        for j in range(n_empty(n, cfg.empty_fraction)):
            rng = np.random.default_rng([cfg.seed, SPLIT_IDS[split], EMPTY_INDEX + j])
            draws.append((EMPTY_INDEX + j, empty_scene(rng), rng, f"{split}_empty_{j:06d}.png"))
        for i, scene, rng, fname in draws:
            add(scene, rng, split, fname)
            if split == "train":
                stem = fname[len("train_"):]
                for k in range(n_aug):
                    arng = np.random.default_rng([cfg.seed, SPLIT_IDS[split], i, 1000 + k])
                    add(with_background(scene, arng), arng, split, f"train_bg{k}_{stem}")
    bar.close()
    meta = {"dataset": "shapes", "world": asdict(cfg), "shape_background": SHAPE_BACKGROUND, "images": images}
    path = os.path.join(out_dir, "dataset_shapes.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, path)
    return path
