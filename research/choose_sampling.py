"""Choose a diffusion checkpoint's sampling defaults on a validation split, and optionally store them.

    python -m research.choose_sampling --checkpoint runs/shapes-diffusion-aug/final --split val \\
        --settings ddim:20:5,ddim:20:5:clamp,ddpm:50:5,ddpm:50:5:clamp,ddpm:10:5:clamp:trailing^2 --seeds 0,1,2 --write

Each setting is ``SamplingConfig.parse``'s form, ``SAMPLER:STEPS:GUIDANCE[:clamp][:SPACING][:kK[:clip|:mbr][:rounding]]``:
SPACING one of ``linspace`` (when left out), ``trailing`` or ``trailing^k``; ``kK`` denoises K candidates per
image and keeps one by consensus (``mbr``, when left out) or CLIP score (``clip``); ``rounding`` takes the K
candidates from the K likeliest roundings of one draw instead of K noise draws.
Every setting captions the split's single-object images once per seed (the whole set as one batch per 250 images, seeded as ``evaluation.generate``
does), and is scored by the exact single-object colour and shape accuracy against the scenes. The
chosen setting has the best mean of the two, averaged over the seeds; among settings within
``--tie`` of the best, the one with the fewest network calls (steps, doubled with guidance) wins.
``--write`` stores it as the checkpoint's ``config.json`` ``sampling`` section, with the table it was chosen
from (``captioner.extra.sampling_choice``); the weights are untouched.

Only a split other than the test split should be used to choose: the test numbers are reported after.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

import torch
from tqdm import tqdm

from diffusion_caption import checkpoint as ckpt
from training import common
from diffusion_caption.world.attributes import single_object_accuracy
from diffusion_caption.data import load_datasets
from diffusion_caption.eval.evaluation import generate, load_model, markdown_table, model_kind
from diffusion_caption.features import image_features
from diffusion_caption.sampling import SPEC_FORM, SamplingConfig, split_legacy
from diffusion_caption.world.scenes import Scene


def parse_settings(text: str, flag: str = "--settings") -> list[SamplingConfig]:
    """Comma-separated ``SamplingConfig.parse`` forms; a bad one exits naming it."""
    out = []
    for x in text.split(","):
        if x.strip():
            try:
                out.append(SamplingConfig.parse(x))
            except ValueError as e:
                raise SystemExit(f"{flag}: {e}") from None
    return out


choose = common.cheapest_near_best  # best score, else the fewest network calls among near ties


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", default="data/shapes")
    p.add_argument("--split", default="val")
    p.add_argument("--settings", required=True, help=f"comma-separated {SPEC_FORM}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tie", type=float, default=0.0,
                   help="settings within this much of the best score count as equal; the cheapest wins")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--write", action="store_true", help="store the chosen defaults in the checkpoint's config.json")
    p.add_argument("--out", default="", help="also write the table (markdown) here")
    args = p.parse_args(argv)
    if args.split.startswith("test"):
        print("warning: choosing on a test split; its numbers then stop being held-out", file=sys.stderr)
    settings = parse_settings(args.settings)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    model = load_model(args.checkpoint)
    if model_kind(model) != "diffusion":
        raise SystemExit("choose_sampling chooses diffusion sampling settings; give a diffusion checkpoint")
    for s in settings:  # every setting validated before any captioning
        try:
            model.resolve(s)
        except ValueError as e:
            raise SystemExit(f"--settings {s.spec}: {e}") from None
    records = [r for r in load_datasets("shapes", args.data_dir, splits=[args.split])
               if r.scene and len(r.scene["objects"]) == 1]
    if not records:
        raise SystemExit(f"no single-object shapes images in split {args.split!r} at {args.data_dir}")
    scenes = [Scene.from_json(r.scene) for r in records]
    feats = image_features(model.image_encoder, [r.image_path for r in records], args.cache_dir)
    rows = []
    for s in tqdm(settings, desc="settings"):
        colour, shape = [], []
        for seed in seeds:
            torch.manual_seed(seed)
            st = model.settings(seed, s)
            acc = single_object_accuracy(generate(model, feats, st, args.batch_size), scenes)
            colour.append(acc["color_acc"])
            shape.append(acc["shape_acc"])
        row = {"setting": s.describe(), "spec": s.spec, "calls": s.calls, "colour": statistics.mean(colour),
               "shape": statistics.mean(shape), "colour per seed": " ".join(f"{c:.3f}" for c in colour),
               "shape per seed": " ".join(f"{c:.3f}" for c in shape)}
        row["score"] = (row["colour"] + row["shape"]) / 2
        rows.append(row)
        tqdm.write(f"{row['setting']}: colour {row['colour']:.3f}, shape {row['shape']:.3f}")
    best = choose(rows, args.tie)
    table = markdown_table([{k: v for k, v in r.items()
                             if k != "spec"}
                            for r in rows], first="setting")
    head = (f"{len(records)} single-object images of {args.data_dir} ({args.split}), seeds {args.seeds}; "
            f"score = mean of colour and shape accuracy; chosen: {best['setting']}\n\n")
    print(head + table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(head + table)
    if args.write:
        path = os.path.join(ckpt.resolve(args.checkpoint), ckpt.CONFIG_NAME)
        meta = ckpt.read_json(path)
        c, legacy = split_legacy(meta["captioner"])
        kept = SamplingConfig.from_dict({**legacy, **meta.get("sampling", {})})  # its scorer and early stop stay
        chosen = SamplingConfig.parse(best["spec"], base=kept)
        meta["captioner"] = c
        meta["sampling"] = dataclasses.replace(chosen, scorer=kept.scorer, early_stop=kept.early_stop).to_dict()
        c.setdefault("extra", {})["sampling_choice"] = {
            "command": "python -m research.choose_sampling " + " ".join(argv if argv is not None else sys.argv[1:]),
            "split": args.split, "n_images": len(records), "seeds": seeds, "chosen": best["setting"],
            "rows": [{k: r[k] for k in ("setting", "colour", "shape", "score")} for r in rows]}
        ckpt.write_json(path, meta)
        print(f"wrote the sampling defaults ({best['setting']}) to {path}")
    return {"rows": rows, "chosen": best}


if __name__ == "__main__":
    main()
