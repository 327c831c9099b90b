"""Time each model's default caption call side by side: batch-1 latency and batch-32 throughput.

    python -m training.speed --diffusion assets/checkpoints/shapes-diffusion-sc \\
        --baseline assets/checkpoints/shapes-baseline --out docs/speed.json

Every model captions with its own checkpoint defaults (what a user gets). Two ways each: from images
(decoded PIL images in memory: preprocessing and the CLIP image tower included) and from precomputed
image features (encoding excluded). Calls are interleaved round-robin over the models, repeats times
each, so that a change in the machine's load falls on all of them alike; each figure is the median of
the repeats with their min-max. Batch 1 is the mean latency over ``--n1`` test images captioned one at a
time (the baseline's time depends on each caption's length). The quality of the same captions is
``training.evaluate``'s job; this command only times.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from PIL import Image
from tqdm import tqdm

from diffusion_caption.data import load_datasets
from diffusion_caption.eval.evaluation import load_model


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def calls(model, images: list, feats: torch.Tensor, batch: int, n1: int) -> dict:
    """The two calls to time for one model at one batch size: from images, from features."""
    kw = {"record": "final"} if hasattr(model, "iter_caption_batch") else {}
    if batch == 1:
        return {"images": lambda: [model.caption_batch([im], **kw) for im in images[:n1]],
                "features": lambda: [model.caption_batch(features=feats[i:i + 1], **kw) for i in range(n1)]}
    return {"images": lambda: model.caption_batch(images[:batch], **kw),
            "features": lambda: model.caption_batch(features=feats[:batch], **kw)}


def measure(models: dict, images: list, feats: dict, batches: list[int], n1: int, warmup: int, repeats: int) -> list[dict]:
    rows = []
    for B in batches:
        plan = {(name, way): fn for name, m in models.items() for way, fn in calls(m, images, feats[name], B, n1).items()}
        for fn in plan.values():
            for _ in range(warmup):
                fn()
        times = {k: [] for k in plan}
        for _ in tqdm(range(repeats), desc=f"timing batch {B}", leave=False):
            for k, fn in plan.items():  # round-robin: every model once per repeat
                times[k].append(timed(fn))
        for (name, way), ts in times.items():
            n = n1 if B == 1 else B
            per = [t / n for t in ts]
            rows.append({"model": name, "batch": B, "encoding": way == "images",
                         "ms_per_image": 1000 * statistics.median(per), "ms_min": 1000 * min(per), "ms_max": 1000 * max(per),
                         "images_per_s": 1 / statistics.median(per)})
    return rows


def markdown(rows: list[dict], baseline: str, info: dict) -> str:
    ref = {(r["batch"], r["encoding"]): r for r in rows if r["model"] == baseline}
    lines = [f"Machine: {info['machine']}, torch {info['torch']} with {info['threads']} threads; "
             f"{info['when']}; {info['repeats']} interleaved repeats after {info['warmup']} warm-up calls, "
             "median (min-max).", "",
             "| model | batch | image encoding | ms per image | images/s | vs baseline (speed) |", "|---|---|---|---|---|---|"]
    for r in rows:
        b = ref[(r["batch"], r["encoding"])]
        lines.append(f"| {r['model']} | {r['batch']} | {'included' if r['encoding'] else 'excluded'} | "
                     f"{r['ms_per_image']:.2f} ({r['ms_min']:.2f}-{r['ms_max']:.2f}) | {r['images_per_s']:.0f} | "
                     f"{b['ms_per_image'] / r['ms_per_image']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusion", action="append", required=True, help="a diffusion checkpoint (repeatable)")
    p.add_argument("--baseline", default="assets/checkpoints/shapes-baseline")
    p.add_argument("--data-dir", default="data/shapes")
    p.add_argument("--split", default="test")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--n1", type=int, default=16, help="images captioned one at a time for the batch-1 figure")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="", help="write the rows as JSON here, and the table beside it as .md")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    batches = [int(b) for b in a.batches.split(",")]
    records = load_datasets("shapes", a.data_dir, splits=[a.split])[:max(max(batches), a.n1)]
    images = [Image.open(r.image_path).convert("RGB") for r in records]
    for im in images:
        im.load()
    models = {os.path.basename(os.path.normpath(c)): load_model(c) for c in a.diffusion}
    base = os.path.basename(os.path.normpath(a.baseline))
    models[base] = load_model(a.baseline)
    with torch.no_grad():
        feats = {name: m.image_encoder.encode(images) for name, m in models.items()}
    rows = measure(models, images, feats, batches, a.n1, a.warmup, a.repeats)
    info = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "repeats": a.repeats, "warmup": a.warmup, "load_average": os.getloadavg()}
    table = markdown(rows, base, info)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"info": info, "rows": rows, "command": "python -m training.speed " + " ".join(sys.argv[1:] if argv is None else argv)}, f, indent=1)
        with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
