"""Evaluating a captioner on a split: caption every image, then score the captions.

The protocol is the standard one: image-level Karpathy splits, every reference of an image, PTB
tokenisation, corpus-level BLEU-1..4 / METEOR / ROUGE-L / CIDEr (``metrics.caption_metrics``). On the
shapes world each caption is also checked exactly against its scene (``attributes``): per-attribute
accuracy, a hallucination rate, and a colour-bias score.

Both model kinds are evaluated by the same code: anything with ``caption_batch(features=..., **settings)``
returning objects with ``.text`` -- the diffusion ``Captioner`` and the autoregressive baseline.
"""
from __future__ import annotations

import math
import os
import time

import torch
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..world import counterfactuals as cf
from ..world.attributes import (TWO_OBJECT_OUTCOMES, attribute_scores, parse_caption, single_object_accuracy,
                         two_object_outcomes)
from ..data import ImageRecord
from ..features import image_features
from ..images import load_image
from .metrics import caption_metrics
from ..world.whole_caption import whole_caption_errors, whole_caption_report
from ..world.scenes import SHAPE_BACKGROUND, Scene

ATTRIBUTES = ("color", "shape", "binding", "size", "count", "relation", "background")
DIFFUSION_FORMAT = "diffusion-caption/1"
BASELINE_FORMAT = "diffusion-caption-baseline/1"


def load_model(path_or_hub_id: str, device: str = "cpu", clip: str | None = None):
    """The diffusion ``Captioner`` or the ``BaselineCaptioner`` a checkpoint holds (by its config's format);
    ``clip``: another copy of its CLIP (a folder or open_clip:MODEL:TAG_OR_FILE)."""
    path = ckpt.resolve(path_or_hub_id)
    fmt = ckpt.read_json(os.path.join(path, ckpt.CONFIG_NAME)).get("format")
    if fmt == DIFFUSION_FORMAT:
        from ..captioner import Captioner

        return Captioner.from_pretrained(path, device=device, clip=clip)
    if fmt == BASELINE_FORMAT:
        from ..baseline.captioner import BaselineCaptioner

        return BaselineCaptioner.from_pretrained(path, device=device, clip=clip)
    raise ckpt.CheckpointError(f"{os.path.join(path, ckpt.CONFIG_NAME)}: unknown checkpoint format {fmt!r}; "
                               f"expected {DIFFUSION_FORMAT!r} or {BASELINE_FORMAT!r}")


def model_kind(model) -> str:
    from ..captioner import Captioner

    return "diffusion" if isinstance(model, Captioner) else "baseline"


def generate(model, features: torch.Tensor, settings: dict, batch_size: int = 128,
             desc: str = "captioning") -> list[str]:
    """Captions of every feature row, in batches. Diffusion batches get seeds ``seed + first row``,
    so a caption depends only on the settings, its row and the batch size."""
    texts: list[str] = []
    diffusion = model_kind(model) == "diffusion"
    for i in tqdm(range(0, features.shape[0], batch_size), desc=desc, leave=False):
        kw = dict(settings)
        if diffusion:
            kw["seed"] = int(kw.get("seed", 0)) + i
        texts += [o.text for o in model.caption_batch(features=features[i:i + batch_size], **kw)]
    return texts


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def attribute_report(captions: list[str], scenes: list[Scene]) -> dict:
    """Exact checks of every caption against its scene.

    For each attribute: ``acc`` (mean over the captions that mention it), ``mentioned`` (fraction of
    captions that do); ``hallucination`` is the fraction of captions naming a shape or object colour
    absent from the image; ``single_object`` the headline colour/shape accuracy on one-object scenes;
    ``two_objects`` what the captions of two-object scenes (distinct colours and shapes) made of them
    (``attributes.two_object_outcome``: right, swapped, repeated shape, repeated colour, other);
    ``whole`` the share of wholly right captions, by number of objects, and the defect rate
    (``whole_caption.whole_caption_report``).
    """
    if len(captions) != len(scenes):
        raise ValueError(f"got {len(captions)} captions for {len(scenes)} scenes")
    per = [attribute_scores(parse_caption(c), s) for c, s in zip(captions, scenes)]
    out: dict = {"n": len(per)}
    for a in ATTRIBUTES:
        vals = [p[a] for p in per if p[a] is not None]
        out[a] = {"acc": _mean(vals), "mentioned": len(vals) / len(per) if per else None}
    out["hallucination"] = _mean([p["hallucination"] for p in per])
    out["single_object"] = single_object_accuracy(captions, scenes)
    out["two_objects"] = two_object_outcomes(captions, scenes)
    out["whole"] = whole_caption_report(captions, scenes)
    return out


def two_object_table(rows: list[tuple[str, dict]]) -> str:
    """A markdown table of ``attribute_report(...)["two_objects"]`` per named model."""
    return markdown_table([{"model": name, "two-object scenes": t["n"], **{k: t[k] for k in TWO_OBJECT_OUTCOMES}}
                           for name, t in rows])


WHOLE_COLUMNS = (("whole empty", "whole_0obj"), ("whole 1-obj", "whole_1obj"), ("whole 2-obj", "whole_2obj"), ("whole 3-obj", "whole_3obj"),
                 ("whole", "whole"), ("whole vague", "vague"), ("defect rate", "defect_rate"))


def whole_caption_table(rows: list[tuple[str, dict]], top: int = 8) -> str:
    """A markdown table of ``attribute_report(...)["whole"]`` per named model: the shares of wholly right
    captions (and of those only the vague "<n> shapes" caption), the defect rate, then the ``top``
    commonest reasons (shares of captions)."""
    reasons: dict[str, int] = {}
    for _, w in rows:
        for k, v in w["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    keep = sorted(reasons, key=lambda k: (-reasons[k], k))[:top]
    return markdown_table([{"model": name, **{col: w[key] for col, key in WHOLE_COLUMNS},
                            **{k: w["reasons"].get(k, 0) / w["n"] if w["n"] else None for k in keep}}
                           for name, w in rows])


def typical_background(scene: Scene) -> bool:
    """Whether the scene follows the training split's spurious shape -> background pairing."""
    return bool(scene.objects) and SHAPE_BACKGROUND[scene.objects[0].shape] == scene.background


def bias_report(captions: list[str], scenes: list[Scene]) -> dict:
    """Colour-bias score: attribute accuracy on scenes with the typical shape/background pairing minus on
    the counterfactual ones (a shape on a background it was rarely paired with in training).

    A model that reads the shape off the background, or the background off the shape, scores well on
    typical scenes and badly on the others: a positive ``bias`` is the size of that shortcut.
    """
    groups = {"typical": [], "counterfactual": []}
    for c, s in zip(captions, scenes):
        groups["typical" if typical_background(s) else "counterfactual"].append((c, s))
    out: dict = {k: {"n": len(v)} for k, v in groups.items()}
    for name, pairs in groups.items():
        if pairs:
            rep = attribute_report([c for c, _ in pairs], [s for _, s in pairs])
            for a in ("shape", "color", "background"):
                out[name][a] = rep[a]["acc"]
            out[name]["hallucination"] = rep["hallucination"]
    out["bias"] = {}
    for a in ("shape", "color", "background"):
        t, c = out["typical"].get(a), out["counterfactual"].get(a)
        out["bias"][a] = None if t is None or c is None else t - c
    return out


def caption_images(model, images: list, settings: dict, batch_size: int = 128, desc: str = "captioning") -> list[str]:
    """Captions of in-memory images (encoded without a cache), seeded exactly as ``generate``."""
    feats = model.image_encoder.encode(images, batch_size=batch_size).cpu()
    return generate(model, feats, settings, batch_size, desc=desc)


def _headline(rep: dict) -> dict:
    so = rep["single_object"]
    row = {"n": rep["n"], "1-obj colour": so["color_acc"], "1-obj shape": so["shape_acc"]}
    row.update({a: rep[a]["acc"] for a in ATTRIBUTES})
    row["hallucination"] = rep["hallucination"]
    return row


def counterfactual_report(model, records: list[ImageRecord], settings: dict | None = None, batch_size: int = 128,
                          sets: tuple[str, ...] = cf.SETS, seed: int = 0) -> dict:
    """Caption the counterfactual sets of ``records`` (see ``counterfactuals``) and score them.

    Returns ``{"background": {...}, "hue": {...}, "grayscale": {...}}`` (the sets asked for), each with
    the scores of its parts and a ``bias`` dict (accuracy on the unedited/typical images minus on the
    edited/counterfactual ones). Every set is captioned with the same settings and seeds, so image i of
    one set starts from the same noise as image i of another.
    """
    unknown = sorted(set(sets) - set(cf.SETS))
    if unknown:
        raise ValueError(f"unknown counterfactual sets {unknown}; expected some of {cf.SETS}")
    if not records or not all(r.scene for r in records):
        raise ValueError("counterfactual sets need shapes-world records (with their scenes)")
    settings = dict(settings or {})
    scenes = [Scene.from_json(r.scene) for r in records]
    originals = [load_image(r.image_path) for r in records]
    size = originals[0].size[0]
    out: dict = {}
    if "background" in sets:
        pairs = cf.background_pairs(scenes, seed)
        typ_scenes, cf_scenes = [p[1] for p in pairs], [p[2] for p in pairs]
        typ = caption_images(model, cf.render_all(typ_scenes, size), settings, batch_size, "typical backgrounds")
        cou = caption_images(model, cf.render_all(cf_scenes, size), settings, batch_size, "counterfactual backgrounds")
        t, c = _headline(attribute_report(typ, typ_scenes)), _headline(attribute_report(cou, cf_scenes))
        keys = ("1-obj colour", "1-obj shape", "color", "shape", "background", "hallucination")
        out["background"] = {"n_pairs": len(pairs), "typical": t, "counterfactual": c,
                             "bias": cf.difference(t, c, keys),
                             "examples": [{"typical": a, "counterfactual": b, "truth": s.to_json()}
                                          for a, b, s in list(zip(typ, cou, typ_scenes))[:20]]}
    if "hue" in sets or "grayscale" in sets:
        base = cf.blind_report(caption_images(model, originals, settings, batch_size, "original images"), scenes)
        keys = ("1-obj shape",) + cf.BLIND_ATTRIBUTES
        if "hue" in sets:
            parts = {}
            for d in cf.HUE_ROTATIONS:
                texts = caption_images(model, cf.hue_images(originals, d), settings, batch_size, f"hue +{d}")
                parts[f"hue +{d}"] = cf.blind_report(texts, scenes)
            mean = {k: _mean([p[k] for p in parts.values() if p[k] is not None]) for k in keys}
            out["hue"] = {"original": base, **parts, "mean": mean, "bias": cf.difference(base, mean, keys)}
        if "grayscale" in sets:
            texts = caption_images(model, cf.gray_images(originals), settings, batch_size, "grayscale")
            g = cf.blind_report(texts, scenes)
            out["grayscale"] = {"original": base, "grayscale": g, "bias": cf.difference(base, g, keys),
                                "examples": [{"caption": t, "truth": s.to_json()} for t, s in
                                             list(zip(texts, scenes))[:20]]}
    return out


def counterfactual_tables(report: dict, model: str = "") -> str:
    """Markdown tables of a ``counterfactual_report``: the background pairs, then hue and grayscale."""
    parts = []
    bg = report.get("background")
    if bg:
        rows = [{"model": model, "set": f"{p} backgrounds", **bg[p]} for p in ("typical", "counterfactual")]
        rows.append({"model": model, "set": "bias (typical - counterfactual)", **bg["bias"]})
        parts.append(f"Same scenes ({bg['n_pairs']}) rendered on their typical and on a counterfactual background:\n\n"
                     + markdown_table(rows))
    rows = []
    for name in ("hue", "grayscale"):
        rep = report.get(name)
        if not rep:
            continue
        if not rows:
            rows.append({"model": model, "set": "original images", **rep["original"]})
        for part, vals in rep.items():
            if part not in ("original", "bias", "examples", "mean"):
                rows.append({"model": model, "set": part, **vals})
        if "mean" in rep:
            rows.append({"model": model, "set": "hue: mean of the rotations", **rep["mean"]})
        rows.append({"model": model, "set": f"{name}: bias (original - edited)", **rep["bias"]})
    if rows:
        parts.append("Edited pixels, scored colour-blind (colour words ignored):\n\n" + markdown_table(rows))
    return "\n".join(parts)


def evaluate(model, records: list[ImageRecord], settings: dict | None = None, batch_size: int = 128,
             cache_dir: str | None = None, metrics: bool = True, tokenizer: str = "ptb", meteor: bool = True) -> dict:
    """Caption ``records`` with ``model`` and score them; returns a JSON-ready dict (``meteor=False``: the
    COCO metrics without METEOR, which starts a Java process per call)."""
    settings = dict(settings or {})
    t0 = time.time()
    feats = image_features(model.image_encoder, [r.image_path for r in records], cache_dir, desc="encoding images")
    t1 = time.time()
    texts = generate(model, feats, settings, batch_size)
    t2 = time.time()
    result: dict = {"kind": model_kind(model), "n_images": len(records), "settings": settings}
    if metrics:
        result["metrics"] = caption_metrics({r.image_id: t for r, t in zip(records, texts)},
                                            {r.image_id: r.captions for r in records}, tokenizer=tokenizer,
                                            meteor=meteor)
    if records and all(r.scene for r in records):
        scenes = [Scene.from_json(r.scene) for r in records]
        result["attributes"] = attribute_report(texts, scenes)
        result["bias"] = bias_report(texts, scenes)
        errors = [whole_caption_errors(t, s) for t, s in zip(texts, scenes)]
    result["seconds"] = {"encode": round(t1 - t0, 2), "caption": round(t2 - t1, 2),
                         "per_image_ms": round(1000 * (t2 - t1) / max(len(records), 1), 2)}
    result["captions"] = [{"image_id": r.image_id, "image": r.image_path, "caption": t, "references": r.captions}
                          for r, t in zip(records, texts)]
    if "attributes" in result:  # why each caption is not wholly right ([] when it is)
        for c, e in zip(result["captions"], errors):
            c["whole_errors"] = e
    return result


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def summary_row(result: dict) -> dict:
    """The headline numbers of one ``evaluate`` result, flat, for tables."""
    row = {}
    for k, v in result.get("metrics", {}).items():
        if isinstance(v, float):
            row[k] = v
    att = result.get("attributes")
    if att:
        so = att["single_object"]
        row.update({"1-obj colour": so["color_acc"], "1-obj shape": so["shape_acc"]})
        for a in ATTRIBUTES:
            row[a] = att[a]["acc"]
        row["hallucination"] = att["hallucination"]
        if "whole" in att:  # results written before the whole-caption report have none
            row.update({col: att["whole"][key] for col, key in WHOLE_COLUMNS})
    bias = result.get("bias")
    if bias:
        for a, v in bias["bias"].items():
            row[f"bias {a}"] = v
    return row


def markdown_table(rows: list[dict], first: str = "model") -> str:
    """A GitHub markdown table of dicts (columns in first-seen order; missing cells shown as "-")."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    if first in cols:
        cols.remove(first)
        cols.insert(0, first)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"
