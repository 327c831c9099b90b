"""Fit a checkpoint's out-of-domain score and measure it (``diffusion_caption/ood.py``).

    python -m training.fit_ood --checkpoint assets/checkpoints/shapes-diffusion-block --train-data-dir data/shapes-aug \\
        --data-dir data/shapes --out docs/results/ood.json

Fits a Gaussian to the raw CLIP image embeddings of the training split (``--train-data-dir``, the images the model was
trained on), calibrates the threshold on the val split so that ``--pass-rate`` of it passes, writes
``ood.safetensors`` and ``ood.json`` into the checkpoint folder, then reports the false-alarm rate on the
test split and the detection rate on inputs far from the world (``eval/ood_set.py``: the shipped
photographs, noise, blank images, rendered text, hue-rotated test scenes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from PIL import Image

from diffusion_caption.data import load_datasets
from diffusion_caption.eval.evaluation import load_model
from diffusion_caption.eval.ood_set import ood_families
from tqdm import tqdm
from diffusion_caption.ood import NOTICE, FeatureDensity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def report(density: FeatureDensity, test_feats: torch.Tensor, families: dict[str, torch.Tensor]) -> dict:
    test_scores = density.scores(test_feats)
    rows = [{"set": "test split (in domain)", "n": len(test_scores),
             "flagged": float((test_scores > density.threshold).float().mean()),
             "median score": float(test_scores.median())}]
    for name, feats in families.items():
        s = density.scores(feats)
        rows.append({"set": name, "n": len(s), "flagged": float((s > density.threshold).float().mean()),
                     "median score": float(s.median())})
    return {"threshold": density.threshold, "pass_rate": density.pass_rate, "rows": rows}


def markdown(rep: dict) -> str:
    lines = [f"threshold {rep['threshold']:.3f} (val pass rate {rep['pass_rate']:.2f})", "",
             "| inputs | n | flagged as unlike the training images | median score |", "|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['n']} | {r['flagged']:.3f} | {r['median score']:.2f} |" for r in rep["rows"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a diffusion or baseline checkpoint folder (written into)")
    p.add_argument("--data", default="shapes")
    p.add_argument("--train-data-dir", default="data/shapes-aug", help="the images the model was trained on")
    p.add_argument("--data-dir", default="data/shapes", help="its val and test splits")
    p.add_argument("--pass-rate", type=float, default=0.95, help="the share of val images that must pass")
    p.add_argument("--shrinkage", type=float, default=0.1)
    p.add_argument("--examples", default=os.path.join(ROOT, "assets", "examples"), help="where photo_*.jpg are")
    p.add_argument("--hue-scenes", type=int, default=100, help="test scenes hue-rotated for the out-of-domain set")
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--out", default="", help="also write the report here (.json, and .md beside it)")
    a = p.parse_args(argv)
    model = load_model(a.checkpoint)
    enc = model.image_encoder
    train = load_datasets(a.data, a.train_data_dir, splits=["train"])
    val = load_datasets(a.data, a.data_dir, splits=["val"])
    test = load_datasets(a.data, a.data_dir, splits=["test"])
    if not train or not val or not test:
        raise SystemExit(f"need train images in {a.train_data_dir} and val and test images in {a.data_dir}")
    feats = {}
    for name, recs in (("train", train), ("val", val), ("test", test)):
        paths = [r.image_path for r in recs]
        with torch.no_grad():
            feats[name] = torch.cat([enc.encode(paths[i:i + 512], batch_size=256, normalize=False)
                                     for i in tqdm(range(0, len(paths), 512), desc=f"encoding {name}", leave=False)])
    density = FeatureDensity.fit(feats["train"], feats["val"], a.pass_rate, a.shrinkage,
                                 info={"train": f"{a.train_data_dir} (train)", "val": f"{a.data_dir} (val)",
                                       "command": "python -m training.fit_ood " + " ".join(sys.argv[1:] if argv is None else argv)})
    density.save(model.__class__.read_checkpoint(a.checkpoint)[0])
    scenes = [Image.open(r.image_path).convert("RGB") for r in test[:a.hue_scenes]]
    with torch.no_grad():
        families = {name: enc.encode(images, normalize=False) for name, images in ood_families(a.examples, scenes).items()}
    rep = report(density, feats["test"], families)
    print(markdown(rep))
    print(f"notice shown above the threshold: {NOTICE!r}")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(rep, f, indent=1)
        with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
            f.write(markdown(rep))
    return rep


if __name__ == "__main__":
    main()
