"""Evaluate a diffusion captioning checkpoint on a split.

    python -m training.evaluate --checkpoint assets/checkpoints/shapes-diffusion --data shapes --split test

Captions every image of the split in batches, then reports corpus BLEU-1..4 against all references
of each image and, on the shapes world, exact colour/shape accuracy on single-object images from the
ground truth. Writes JSON (``--out``) with the sampler settings used.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tqdm import tqdm

from diffusion_caption import Captioner
from diffusion_caption.attributes import single_object_accuracy
from diffusion_caption.data import load_datasets
from diffusion_caption.features import image_features
from diffusion_caption.metrics import bleu
from diffusion_caption.world import Scene


def evaluate(cap: Captioner, records, steps=None, sampler=None, guidance=None, seed=0, clamp=False,
             batch_size=128, cache_dir=None) -> dict:
    t0 = time.time()
    feats = image_features(cap.image_encoder, [r.image_path for r in records], cache_dir, desc="encoding images")
    hyps: dict[str, str] = {}
    for i in tqdm(range(0, len(records), batch_size), desc="captioning", leave=False):
        traces = cap.caption_batch(features=feats[i:i + batch_size], steps=steps, sampler=sampler,
                                   guidance=guidance, seed=seed + i, clamp=clamp)
        for r, tr in zip(records[i:i + batch_size], traces):
            hyps[r.image_id] = tr.text
    refs = {r.image_id: r.captions for r in records}
    result = {"n_images": len(records), **bleu(hyps, refs)}
    scenes = [Scene.from_json(r.scene) for r in records if r.scene]
    if len(scenes) == len(records):
        result["single_object"] = single_object_accuracy([hyps[r.image_id] for r in records], scenes)
    s = cap.check_settings(steps, sampler, guidance, seed, clamp)
    result["settings"] = s
    result["seconds"] = round(time.time() - t0, 1)
    result["examples"] = [{"image": r.image_path, "caption": hyps[r.image_id], "references": r.captions[:2]}
                          for r in records[:8]]
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default="shapes")
    p.add_argument("--data-dir", default="data/shapes")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N images only")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sampler", default=None, choices=["ddim", "ddpm"])
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--clamp", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    cap = Captioner.from_pretrained(args.checkpoint, device=args.device)
    records = load_datasets(args.data, args.data_dir, splits=[args.split])
    if args.limit:
        records = records[: args.limit]
    res = evaluate(cap, records, args.steps, args.sampler, args.guidance, args.seed, args.clamp,
                   args.batch_size, args.cache_dir)
    res.update(checkpoint=args.checkpoint, data=args.data, split=args.split)
    print(json.dumps({k: v for k, v in res.items() if k != "examples"}, indent=2))
    for ex in res["examples"][:4]:
        print(f"  {os.path.basename(ex['image'])}: {ex['caption']!r}  (ref: {ex['references'][0]!r})")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
