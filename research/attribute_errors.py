"""Count single-object colour and shape misses on a large held-out set, with confidence intervals.

    python -m training.make_world --out data/shapes-fresh2 --seed 2 --n-train 0 --n-val 0 --n-test 10000
    python -m research.attribute_errors --data-dir data/shapes-fresh2 --split test --seeds 0,1,2 \\
        --checkpoints assets/checkpoints/shapes-baseline,assets/checkpoints/shapes-diffusion-fast-small \\
        --out docs/results/attribute_errors_fresh2.md

A 418-image test split cannot tell a miss rate of 0.1% from one of 0.5%: both give zero to two misses.
This command captions every single-object image of a split (a fresh world of 10,000 images has about
4,000) with each checkpoint: a baseline once (its decoding is deterministic), a diffusion checkpoint
once per seed (its caption depends on the noise draw) at its own sampling defaults or at each
``--settings`` entry. It reports, per model and setting, the colour and shape misses against the
scenes, the miss rate with its exact (Clopper-Pearson) 95% interval over all captions, the misses per
draw, how many distinct images were missed and how many in every draw, and the first misses with
their scene. Counting, not choosing: nothing is written to a checkpoint.

The interval treats captions as independent. A diffusion model's misses cluster on a few images (the
same image missed in every draw), so its interval over n images x k draws is narrower than it should
be; the per-draw counts and the distinct-image count show how much the draws agree.
"""
from __future__ import annotations

import argparse
import collections
import json
import os

import torch
from scipy.stats import beta
from tqdm import tqdm

from diffusion_caption.world.attributes import parse_caption
from diffusion_caption.data import load_datasets
from diffusion_caption.eval.evaluation import generate, load_model, markdown_table, model_kind
from diffusion_caption.features import image_features
from diffusion_caption.world.scenes import Scene
from research.choose_sampling import parse_settings


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact binomial interval for a rate of k successes in n trials."""
    if n <= 0:
        raise ValueError("no trials")
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def misses(captions: list[str], scenes: list[Scene]) -> tuple[list[int], list[int]]:
    """Indices of the captions whose first object has the wrong colour, and the wrong shape."""
    colour, shape = [], []
    for i, (cap, scene) in enumerate(zip(captions, scenes)):
        objs = parse_caption(cap).objects
        truth = scene.objects[0]
        if not (objs and objs[0].color == truth.color):
            colour.append(i)
        if not (objs and objs[0].shape == truth.shape):
            shape.append(i)
    return colour, shape


def _pct(x: float) -> str:
    return f"{100 * x:.3f}%"


def count(captions_per_draw: list[list[str]], scenes: list[Scene], examples: int) -> dict:
    """Miss counts over several draws of captions of the same images."""
    n_img, n_draws = len(scenes), len(captions_per_draw)
    row: dict = {"images": n_img, "draws": n_draws, "captions": n_img * n_draws}
    ex = []
    for attr in ("colour", "shape"):
        per_draw, hit = [], collections.Counter()
        for d, caps in enumerate(captions_per_draw):
            bad = misses(caps, scenes)[0 if attr == "colour" else 1]
            per_draw.append(len(bad))
            hit.update(bad)
            if attr == "colour":
                ex += [(i, d) for i in bad]
        k = sum(per_draw)
        lo, hi = clopper_pearson(k, row["captions"])
        row[attr] = {"misses": k, "rate": k / row["captions"], "ci95": [lo, hi], "per_draw": per_draw,
                     "distinct_images": len(hit), "every_draw": sum(v == n_draws for v in hit.values())}
    seen, row["colour_examples"] = set(), []
    for i, d in ex:
        if i in seen or len(row["colour_examples"]) >= examples:
            continue
        seen.add(i)
        s = scenes[i]
        o = s.objects[0]
        row["colour_examples"].append({"image": i, "draw": d, "caption": captions_per_draw[d][i],
                                       "truth": f"{o.size} {o.color} {o.shape} on {s.background}"})
    return row


def table_rows(results: list[dict]) -> list[dict]:
    out = []
    for r in results:
        row = {"model": r["model"], "setting": r["setting"], "captions": f"{r['images']} x {r['draws']}"}
        for attr in ("colour", "shape"):
            a = r[attr]
            row[f"{attr} misses"] = a["misses"]
            row[f"{attr} miss rate (95% CI)"] = f"{_pct(a['rate'])} ({_pct(a['ci95'][0])}-{_pct(a['ci95'][1])})"
        row["colour misses per draw"] = " ".join(map(str, r["colour"]["per_draw"]))
        row["images with a colour miss (in every draw)"] = (f"{r['colour']['distinct_images']} "
                                                             f"({r['colour']['every_draw']})")
        out.append(row)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", required=True, help="comma-separated baseline and diffusion checkpoints")
    p.add_argument("--data-dir", default="data/shapes")
    p.add_argument("--split", default="test")
    p.add_argument("--seeds", default="0,1,2", help="noise draws for diffusion checkpoints")
    p.add_argument("--settings", default="",
                   help="diffusion settings SAMPLER:STEPS:GUIDANCE[:clamp][:SPACING], comma-separated "
                        "(default: each checkpoint's own)")
    p.add_argument("--beam", type=int, default=1, help="baseline beam size (1 = greedy)")
    p.add_argument("--examples", type=int, default=10, help="colour misses listed per row")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--out", default="", help="write the table here (markdown) and the full result next to it (.json)")
    args = p.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if not seeds:
        raise SystemExit("--seeds: give at least one seed")
    settings = parse_settings(args.settings)
    records = [r for r in load_datasets("shapes", args.data_dir, splits=[args.split])
               if r.scene and len(r.scene["objects"]) == 1]
    if not records:
        raise SystemExit(f"no single-object shapes images in split {args.split!r} at {args.data_dir}")
    scenes = [Scene.from_json(r.scene) for r in records]
    results = []
    for path in [c.strip() for c in args.checkpoints.split(",") if c.strip()]:
        model = load_model(path)
        feats = image_features(model.image_encoder, [r.image_path for r in records], args.cache_dir)
        label = os.path.normpath(path)
        if model_kind(model) != "diffusion":
            st = {"beam": args.beam}
            caps = [generate(model, feats, st, args.batch_size)]
            results.append({"model": label, "setting": "greedy" if args.beam == 1 else f"beam {args.beam}",
                            **count(caps, scenes, args.examples)})
            continue
        for s in settings or [None]:
            draws = []
            for seed in tqdm(seeds, desc=f"{label} draws", leave=False):
                try:
                    st = model.settings(seed, s)
                except ValueError as e:
                    raise SystemExit(f"--settings {s.spec}: {e}") from None
                draws.append(generate(model, feats, dict(st, record="final"), args.batch_size))
            results.append({"model": label, "setting": (s or model.sampling).describe() + ("" if s else " (its default)"),
                            **count(draws, scenes, args.examples)})
        del model
    head = (f"{len(records)} single-object images of {args.data_dir} ({args.split}); diffusion seeds {args.seeds}; "
            "95% intervals exact (Clopper-Pearson), over all captions\n\n")
    text = head + markdown_table(table_rows(results), first="model")
    for r in results:
        if r["colour_examples"]:
            text += f"\n\nColour misses of {r['model']}, {r['setting']} (first {len(r['colour_examples'])}):\n"
            text += "".join(f"\n- image {e['image']}, draw {e['draw']}: \"{e['caption']}\" ({e['truth']})"
                            for e in r["colour_examples"])
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"data_dir": args.data_dir, "split": args.split, "seeds": seeds, "results": results}, f, indent=1)
    return {"results": results}


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
