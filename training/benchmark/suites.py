"""What a benchmark times: each model's default caption call on the same images, two ways.

From images (decoded PIL images in memory: preprocessing and the CLIP image tower included) and from
precomputed image features (encoding excluded). Every model captions with its own checkpoint's defaults
(what a user gets), keeping only the final caption (``record="final"``, the same caption as the trace's).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from PIL import Image

from diffusion_caption.data import load_datasets
from diffusion_caption.eval.evaluation import load_model, model_kind


@dataclass
class Suite:
    models: dict  # name -> captioner
    images: list  # PIL images, decoded
    features: dict = field(default_factory=dict)  # name -> [N, D] features of ``images`` by that model's CLIP
    baseline: str = ""  # the name every ratio is against

    def calls(self, name: str, batch: int, n1: int) -> dict:
        """The two calls to time for one model at one batch size: from images, from features. Batch 1 is
        ``n1`` images captioned one at a time (the baseline's time depends on each caption's length)."""
        model, feats, images = self.models[name], self.features[name], self.images
        kw = {"record": "final"} if model_kind(model) == "diffusion" else {}
        if batch == 1:
            return {"images": lambda: [model.caption_batch([im], **kw) for im in images[:n1]],
                    "features": lambda: [model.caption_batch(features=feats[i:i + 1], **kw) for i in range(n1)]}
        return {"images": lambda: model.caption_batch(images[:batch], **kw),
                "features": lambda: model.caption_batch(features=feats[:batch], **kw)}

    def describe(self, name: str) -> dict:
        """What the model is and how it samples by default, for the report."""
        model = self.models[name]
        info = {"kind": model_kind(model), "parameters": sum(p.numel() for p in model.network.parameters())}
        if info["kind"] == "diffusion":
            info["sampling"] = model.sampling.spec
        else:
            info["decoding"] = f"beam {model.config.beam}" if model.config.beam > 1 else "greedy"
        return info


def build(diffusion: list[str], baseline: str, data_dir: str, split: str, n_images: int, device: str = "cpu") -> Suite:
    records = load_datasets("shapes", data_dir, splits=[split])[:n_images]
    if len(records) < n_images:
        raise SystemExit(f"{data_dir} ({split}) has {len(records)} images; the benchmark needs {n_images}")
    images = []
    for r in records:
        with Image.open(r.image_path) as im:
            images.append(im.convert("RGB"))
    models = {}
    for path in diffusion + [baseline]:
        name = os.path.basename(os.path.normpath(path))
        if name in models:
            raise SystemExit(f"two models named {name!r}: give checkpoints in folders of different names")
        models[name] = load_model(path, device=device)
    suite = Suite(models, images, baseline=os.path.basename(os.path.normpath(baseline)))
    with torch.no_grad():
        suite.features = {name: m.image_encoder.encode(images).to(m.device) for name, m in models.items()}
    return suite
