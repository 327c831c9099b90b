"""How a caption forms: quality and change at every denoising step, over a split.

A model worth watching step by step changes its caption between steps and gets better as it goes.
``step_report`` captions every image once with the full trace (``record="all"``) and scores the caption
each step holds, as a person scrubbing the app would read it: wholly right against the scene, colour and
shape over all objects, and how many caption positions changed token since the step before.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from ..world.attributes import attribute_scores, parse_caption
from ..world.scenes import Scene


def changed_positions(prev: list[int], cur: list[int], pad_id: int) -> int:
    """Positions whose token differs between two steps' roundings, padding on both sides not counted."""
    return sum(1 for a, b in zip(prev, cur) if a != b and not (a == pad_id and b == pad_id))


def step_report(model, records, settings: dict, batch_size: int = 128, features: torch.Tensor | None = None) -> list[dict]:
    """One row per step index: ``step``, ``t``, ``whole`` (and by object count), ``color``, ``shape`` (over
    all objects), ``changed`` (mean positions changed since the previous step) and ``any_changed``
    (share of captions that changed at all) and ``running`` (share of captions not yet ended: a block
    captioner ends each at its [SEP]). The last row is the caption the call returns (after any candidate
    choice)."""
    from ..world.whole_caption import whole_caption_report

    if features is None:
        features = model.encode_images([r.image_path for r in records])
    scenes = [Scene.from_json(r.scene) for r in records]
    traces = []
    for i in tqdm(range(0, features.shape[0], batch_size), desc="captioning (full trace)", leave=False):
        kw = dict(settings, seed=int(settings.get("seed", 0)) + i, record="all")
        traces += model.caption_batch(features=features[i:i + batch_size], **kw)
    pad = model.tokenizer.pad_id
    # a caption that ended early (the block sampler's, at its [SEP]) holds its last step from then on
    n_steps = max(len(tr.steps) for tr in traces)
    at = lambda tr, k: tr.steps[min(k, len(tr.steps) - 1)]  # noqa: E731
    rows = []
    for k in range(n_steps):
        texts = [at(tr, k).text for tr in traces]
        whole = whole_caption_report(texts, scenes)
        scores = [attribute_scores(parse_caption(t), s) for t, s in zip(texts, scenes)]
        row = {"step": k + 1, "t": at(traces[0], k).t,
               **{key: whole[key] for key in ("whole", "whole_0obj", "whole_1obj", "whole_2obj", "whole_3obj",
                                                       "defect_rate")}}
        for a in ("color", "shape"):
            vals = [s[a] for s in scores if s.get(a) is not None]
            row[a] = sum(vals) / len(vals) if vals else None
        if k:
            ch = [changed_positions(at(tr, k - 1).token_ids, at(tr, k).token_ids, pad) for tr in traces]
            row["changed"] = sum(ch) / len(ch)
            row["any_changed"] = sum(c > 0 for c in ch) / len(ch)
        row["running"] = sum(len(tr.steps) > k for tr in traces) / len(traces)
        rows.append(row)
    return rows
