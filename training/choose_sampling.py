"""Choose a diffusion checkpoint's sampling defaults on a validation split, and optionally store them.

    python -m training.choose_sampling --checkpoint runs/shapes-diffusion-aug/final --split val \\
        --settings ddim:20:5,ddim:20:5:clamp,ddpm:50:5,ddpm:50:5:clamp,ddpm:10:5:clamp:trailing^2 --seeds 0,1,2 --write

Each setting is ``SAMPLER:STEPS:GUIDANCE[:clamp][:SPACING][:kK[:clip|:mbr][:rounding]]``, SPACING one of ``linspace``
(when left out), ``trailing`` or ``trailing^k`` (``diffusion_caption.samplers.spaced_timesteps``); ``kK``
denoises K candidates per image and keeps one by consensus (``mbr``, when left out) or CLIP score (``clip``);
``rounding`` takes the K candidates from the K likeliest roundings of one draw instead of K noise draws.
Every setting captions the split's single-object images once per seed (the whole set as one batch per 250 images, seeded as ``evaluation.generate``
does), and is scored by the exact single-object colour and shape accuracy against the scenes. The
chosen setting has the best mean of the two, averaged over the seeds; among settings within
``--tie`` of the best, the one with the fewest network calls (steps, doubled with guidance) wins.
``--write`` stores it in the checkpoint's ``config.json`` (``sampler``, ``sample_steps``,
``sample_guidance``, ``sample_clamp``, ``sample_spacing``, ``sample_candidates``, ``sample_select``, ``sample_propose``) with the table it was chosen from; the weights are untouched.

Only a split other than the test split should be used to choose: the test numbers are reported after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from tqdm import tqdm

from diffusion_caption import checkpoint as ckpt
from diffusion_caption.world.attributes import single_object_accuracy
from diffusion_caption.data import load_datasets
from diffusion_caption.eval.evaluation import generate, load_model, markdown_table, model_kind
from diffusion_caption.features import image_features
from diffusion_caption.samplers import spacing_power
from diffusion_caption.world.scenes import Scene


def parse_setting(text: str) -> dict:
    parts = text.strip().split(":")
    flags = [p.strip().lower() for p in parts[3:]]
    ks = [f for f in flags if len(f) > 1 and f[0] == "k" and f[1:].isdigit()]
    selects = [f for f in flags if f in ("clip", "mbr")]
    proposes = [f for f in flags if f in ("noise", "rounding")]
    spacings = [f for f in flags if f != "clamp" and f not in ks and f not in selects and f not in proposes]
    if (len(parts) < 3 or flags.count("clamp") > 1 or len(spacings) > 1 or len(ks) > 1 or len(selects) > 1
            or len(proposes) > 1 or ((selects or proposes) and not ks)):
        raise SystemExit(f"--settings: {text!r} is not SAMPLER:STEPS:GUIDANCE[:clamp][:SPACING][:kK[:clip|:mbr][:rounding]] "
                         "(e.g. ddpm:50:5:clamp, ddpm:10:5:clamp:trailing^2, ddpm:2:1:clamp:trailing^2:k8:clip "
                         "or ddim:1:1:k8:clip:rounding)")
    try:
        spacing_power(spacings[0] if spacings else "linspace")
    except ValueError as e:
        raise SystemExit(f"--settings: {text!r}: {e}") from None
    try:
        return {"sampler": parts[0].lower(), "steps": int(parts[1]), "guidance": float(parts[2]),
                "clamp": "clamp" in flags, "spacing": spacings[0] if spacings else "linspace",
                "candidates": int(ks[0][1:]) if ks else 1, "select": selects[0] if selects else "mbr",
                "propose": proposes[0] if proposes else "noise"}
    except ValueError:
        raise SystemExit(f"--settings: {text!r}: steps must be an integer and guidance a number") from None


def name(s: dict) -> str:
    return (f"{s['sampler'].upper()} {s['steps']}, guidance {s['guidance']:g}" + (", clamp" if s["clamp"] else "")
            + (f", {s['spacing']}" if s.get("spacing", "linspace") != "linspace" else "")
            + (f", {s['candidates']} {'roundings' if s.get('propose') == 'rounding' else 'candidates'} by "
               f"{s.get('select', 'mbr').upper()}" if s.get("candidates", 1) > 1 else ""))


def calls(s: dict) -> int:
    return s["steps"] * (1 if s["guidance"] == 1.0 else 2)


def choose(rows: list[dict], tie: float) -> dict:
    """The row with the best ``score``, or among rows within ``tie`` of it the one with the fewest calls."""
    best = max(r["score"] for r in rows)
    near = [r for r in rows if r["score"] >= best - tie]
    return min(near, key=lambda r: (r["calls"], -r["score"]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", default="data/shapes")
    p.add_argument("--split", default="val")
    p.add_argument("--settings", required=True, help="comma-separated SAMPLER:STEPS:GUIDANCE[:clamp]")
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
    settings = [parse_setting(x) for x in args.settings.split(",") if x.strip()]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    model = load_model(args.checkpoint)
    if model_kind(model) != "diffusion":
        raise SystemExit("choose_sampling chooses diffusion sampling settings; give a diffusion checkpoint")
    for s in settings:  # every setting validated before any captioning
        try:
            model.check_settings(s["steps"], s["sampler"], s["guidance"], 0, s["clamp"], spacing=s["spacing"],
                                 candidates=s["candidates"], select=s["select"], propose=s["propose"])
        except ValueError as e:
            raise SystemExit(f"--settings {name(s)}: {e}") from None
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
            st = model.check_settings(s["steps"], s["sampler"], s["guidance"], seed, s["clamp"], spacing=s["spacing"],
                                      candidates=s["candidates"], select=s["select"], propose=s["propose"])
            acc = single_object_accuracy(generate(model, feats, st, args.batch_size), scenes)
            colour.append(acc["color_acc"])
            shape.append(acc["shape_acc"])
        row = {"setting": name(s), **s, "calls": calls(s), "colour": statistics.mean(colour),
               "shape": statistics.mean(shape), "colour per seed": " ".join(f"{c:.3f}" for c in colour),
               "shape per seed": " ".join(f"{c:.3f}" for c in shape)}
        row["score"] = (row["colour"] + row["shape"]) / 2
        rows.append(row)
        tqdm.write(f"{row['setting']}: colour {row['colour']:.3f}, shape {row['shape']:.3f}")
    best = choose(rows, args.tie)
    table = markdown_table([{k: v for k, v in r.items()
                             if k not in ("sampler", "steps", "guidance", "clamp", "spacing", "candidates", "select", "propose")}
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
        c = meta["captioner"]
        c.update(sampler=best["sampler"], sample_steps=best["steps"], sample_guidance=best["guidance"],
                 sample_clamp=best["clamp"], sample_spacing=best["spacing"], sample_candidates=best["candidates"],
                 sample_select=best["select"], sample_propose=best["propose"])
        c.setdefault("extra", {})["sampling_choice"] = {
            "command": "python -m training.choose_sampling " + " ".join(argv if argv is not None else sys.argv[1:]),
            "split": args.split, "n_images": len(records), "seeds": seeds, "chosen": best["setting"],
            "rows": [{k: r[k] for k in ("setting", "colour", "shape", "score")} for r in rows]}
        ckpt.write_json(path, meta)
        print(f"wrote the sampling defaults ({best['setting']}) to {path}")
    return {"rows": rows, "chosen": best}


if __name__ == "__main__":
    main()
