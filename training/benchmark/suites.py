"""What a benchmark times: each model's default caption call on the same images, two ways.

From images (decoded PIL images in memory: preprocessing and the CLIP image tower included) and from
precomputed image features (encoding excluded). Every model captions with its own checkpoint's defaults
(what a user gets), keeping only the final caption (``record="final"``, the same caption as the trace's).
"""
from __future__ import annotations

import contextlib
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
    # name -> "float32" or "bfloat16" for a model timed in a precision other than its default (its name then
    # ends in "+fp32" / "+bf16"): the diffusion captioner by its ``precision`` setting, the baseline under autocast
    precision: dict = field(default_factory=dict)

    def calls(self, name: str, batch: int, n1: int) -> dict:
        """The two calls to time for one model at one batch size: from images, from features. Batch 1 is
        ``n1`` images captioned one at a time (the baseline's time depends on each caption's length)."""
        model, feats, images = self.models[name], self.features[name], self.images
        diffusion = model_kind(model) == "diffusion"
        kw = {"record": "final"} if diffusion else {}
        precision = self.precision.get(name)
        autocast = contextlib.nullcontext
        if precision and diffusion:
            kw["precision"] = precision
        elif precision == "bfloat16":
            autocast = lambda: torch.autocast(model.device.type, dtype=torch.bfloat16)  # noqa: E731
        if batch == 1:
            calls = {"images": lambda: [model.caption_batch([im], **kw) for im in images[:n1]],
                     "features": lambda: [model.caption_batch(features=feats[i:i + 1], **kw) for i in range(n1)]}
        else:
            calls = {"images": lambda: model.caption_batch(images[:batch], **kw),
                     "features": lambda: model.caption_batch(features=feats[:batch], **kw)}
        return {how: _under(autocast, f) for how, f in calls.items()}

    def describe(self, name: str) -> dict:
        """What the model is and how it samples by default, for the report."""
        model = self.models[name]
        info = {"kind": model_kind(model), "parameters": sum(p.numel() for p in model.network.parameters())}
        if name in self.precision:
            info["precision"] = self.precision[name]
        if info["kind"] == "diffusion":
            info["sampling"] = model.sampling.replace(precision=self.precision.get(name)).spec
        else:
            info["decoding"] = f"beam {model.config.beam}" if model.config.beam > 1 else "greedy"
        return info


def _under(context, f):
    def call():
        with context():
            return f()
    return call


def build(diffusion: list[str], baseline: str, data_dir: str, split: str, n_images: int, device: str = "cpu",
          other_precision: bool = False) -> Suite:
    """The suite of ``diffusion`` and ``baseline`` on the first ``n_images`` of a split; ``other_precision``
    adds each model again in the other precision: a diffusion checkpoint that samples in bfloat16 (or "auto")
    again in float32, one in float32 and the baseline again in bfloat16, so each is also timed as the other is."""
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
    if other_precision:
        for name, model in list(models.items()):
            if model_kind(model) == "diffusion" and model.sampling.precision != "float32":
                other, tag = "float32", "+fp32"
            else:
                other, tag = "bfloat16", "+bf16"
            models[name + tag] = model
            suite.precision[name + tag] = other
    with torch.no_grad():
        suite.features = {name: m.image_encoder.encode(images).to(m.device) for name, m in models.items()
                          if name not in suite.precision}
        suite.features.update({name: suite.features[name.rsplit("+", 1)[0]] for name in suite.precision})
    return suite
