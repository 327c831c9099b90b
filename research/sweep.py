"""Caption quality against sampling steps, sampler and guidance scale, as a table and a plot.

    python -m research.sweep --checkpoint assets/checkpoints/shapes-diffusion --split test --out docs/sweep

Runs the evaluation of ``training.evaluate`` (same protocol, same seeds) once per setting: every
``--steps`` value with every ``--samplers`` entry and every ``--spacings`` entry (at ``--steps-guidance``,
by default the checkpoint's own guidance scale and spacing), then every ``--guidance`` value with
DDIM at ``--guidance-steps`` steps. Writes ``OUT.json`` (all results), ``OUT.md`` (the table) and
``OUT.png`` (the plot); with more than one spacing also ``OUT_spacing.png``, one line per sampler and
spacing for each of BLEU-4 and the single-object colour and shape accuracies.

    python -m research.sweep --split val --steps 1,2,3,5,10,20 --spacings linspace,trailing,trailing^2,trailing^3 \
        --guidance "" --out docs/results/spacing_val
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from diffusion_caption.eval.evaluation import evaluate, load_model, markdown_table, model_kind, summary_row  # noqa: E402
from diffusion_caption.features import image_features  # noqa: E402
from training.evaluate import load_records  # noqa: E402


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def plot(rows: list[dict], path: str, title: str) -> None:
    has_steps = any(r["sweep"] == "steps" for r in rows)
    has_guidance = any(r["sweep"] == "guidance" for r in rows)
    panels = int(has_steps) + int(has_guidance)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(5.5 * max(panels, 1), 4.2), squeeze=False)
    axes = list(axes[0])
    metric_keys = [("BLEU-4", "-"), ("METEOR", "--"), ("ROUGE-L", ":"), ("1-obj colour", "-"), ("1-obj shape", "-")]
    if not has_steps:
        axes.insert(0, None)
    ax = axes[0] if has_steps else fig.add_subplot(1, 1, 1, frameon=False)
    for sampler, marker in (("ddim", "o"), ("ddpm", "s")):
        pts = sorted((r for r in rows if r["sweep"] == "steps" and r["sampler"] == sampler), key=lambda r: r["steps"])
        if not pts:
            continue
        for k, ls in metric_keys:
            if k in pts[0]:
                ax.plot([r["steps"] for r in pts], [r[k] for r in pts], ls, marker=marker, ms=4,
                        label=f"{k} ({sampler.upper()})")
    if has_steps:
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps (log scale)")
        ax.set_ylabel("score")
        ax.set_ylim(0, 1.02)
        g = pts[0]["guidance"] if (pts := [r for r in rows if r["sweep"] == "steps"]) else 1.0
        ax.set_title("quality against steps" + (f" (guidance {g:g})" if g != 1.0 else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    else:
        ax.remove()
    if not has_guidance:
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    ax = axes[1]
    pts = sorted((r for r in rows if r["sweep"] == "guidance"), key=lambda r: r["guidance"])
    for k, ls in metric_keys:
        if pts and k in pts[0]:
            ax.plot([r["guidance"] for r in pts], [r[k] for r in pts], ls, marker="o", ms=4, label=k)
    if pts:
        ax2 = ax.twinx()
        ax2.plot([r["guidance"] for r in pts], [r.get("CIDEr", float("nan")) for r in pts], color="black",
                 marker="^", ms=4, lw=1, label="CIDEr (right axis)")
        ax2.set_ylabel("CIDEr")
        ax2.legend(fontsize=7, loc="lower left")
        ax.set_title(f"quality against guidance scale (DDIM, {pts[0]['steps']} steps)")
    ax.set_xlabel("classifier-free guidance scale (1 = none)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SPACING_METRICS = ("BLEU-4", "1-obj colour", "1-obj shape")


def plot_spacing(rows: list[dict], path: str, title: str) -> None:
    """One panel per metric of ``SPACING_METRICS`` against steps, one line per (sampler, spacing)."""
    steps_rows = [r for r in rows if r["sweep"] == "steps"]
    series = sorted({(r["sampler"], r["spacing"]) for r in steps_rows})
    spacings = sorted({sp for _, sp in series})
    colours = {sp: plt.get_cmap("tab10")(i) for i, sp in enumerate(spacings)}
    fig, axes = plt.subplots(1, len(SPACING_METRICS), figsize=(5 * len(SPACING_METRICS), 4.2), squeeze=False)
    for ax, k in zip(axes[0], SPACING_METRICS):
        for sampler, sp in series:
            pts = sorted((r for r in steps_rows if r["sampler"] == sampler and r["spacing"] == sp),
                         key=lambda r: r["steps"])
            ax.plot([r["steps"] for r in pts], [r.get(k, float("nan")) for r in pts],
                    "-" if sampler == "ddpm" else "--", marker="s" if sampler == "ddpm" else "o", ms=4,
                    color=colours[sp], label=f"{sampler.upper()}, {sp}")
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps (log scale)")
        ax.set_title(k)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    g = steps_rows[0]["guidance"] if steps_rows else 1.0
    fig.suptitle(f"{title}; guidance {g:g}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="assets/checkpoints/shapes-diffusion")
    p.add_argument("--data", default="shapes")
    p.add_argument("--data-dir", default="data/shapes")
    p.add_argument("--image-dir", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--steps", type=ints, default=ints("1,2,5,10,20,50,100"))
    p.add_argument("--samplers", default="ddim,ddpm")
    p.add_argument("--spacings", default=None,
                   help="comma-separated timestep spacings of the steps sweep: linspace, trailing, trailing^k "
                        "(default: the checkpoint's own)")
    p.add_argument("--steps-guidance", type=float, default=None,
                   help="guidance scale of the steps sweep (default: the checkpoint's own)")
    p.add_argument("--guidance", type=floats, default=floats("0,1,1.5,2,3,5"),
                   help='guidance scales of the guidance sweep ("" for none)')
    p.add_argument("--guidance-steps", type=int, default=20)
    p.add_argument("--clamp", action=argparse.BooleanOptionalAction, default=None,
                   help="clamp each x0 to its nearest tokens in every setting (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer", default="ptb", choices=["ptb", "simple"])
    p.add_argument("--meteor", action=argparse.BooleanOptionalAction, default=True,
                   help="also METEOR (a Java process per setting; --no-meteor leaves it out)")
    p.add_argument("--out", default="docs/sweep", help="writes OUT.json, OUT.md and OUT.png")
    args = p.parse_args(argv)
    model = load_model(args.checkpoint, device=args.device)
    if model_kind(model) != "diffusion":
        raise SystemExit("the sweep varies diffusion sampling settings; give a diffusion checkpoint")
    records = load_records(args)
    image_features(model.image_encoder, [r.image_path for r in records], args.cache_dir)  # encode once, cached
    g_steps = model.sampling.guidance if args.steps_guidance is None else args.steps_guidance
    spacings = [x.strip() for x in (args.spacings or model.sampling.spacing).split(",") if x.strip()]
    plan = [("steps", dict(steps=s, sampler=smp, guidance=g_steps, spacing=sp))
            for smp in args.samplers.split(",") for sp in spacings for s in args.steps]
    plan += [("guidance", dict(steps=args.guidance_steps, sampler="ddim", guidance=g, spacing=spacings[0]))
             for g in args.guidance]
    try:  # every setting checked before the first evaluation
        for _, kw in plan:
            model.settings(args.seed, clamp=args.clamp, **kw)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    rows, results = [], []
    for sweep, kw in tqdm(plan, desc="sweep"):
        torch.manual_seed(args.seed)
        settings = model.settings(args.seed, clamp=args.clamp, **kw)
        res = evaluate(model, records, settings, args.batch_size, args.cache_dir, tokenizer=args.tokenizer,
                       meteor=args.meteor)
        res.pop("captions")
        results.append({"sweep": sweep, **res})
        row = {"sweep": sweep, "sampler": kw["sampler"], "spacing": kw["spacing"], "steps": kw["steps"],
               "guidance": kw["guidance"], **summary_row(res), "ms/image": res["seconds"]["per_image_ms"]}
        rows.append(row)
        tqdm.write(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"checkpoint": args.checkpoint, "data": args.data, "split": args.split, "results": results}, f,
                  indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown_table(rows, first="sweep"))
    title = f"{args.checkpoint} on {args.data}/{args.split} ({len(records)} images)"
    plot([r for r in rows if r["spacing"] == spacings[0]], args.out + ".png",
         title + (f", spacing {spacings[0]}" if len(spacings) > 1 else ""))
    written = [args.out + ".json", args.out + ".md", args.out + ".png"]
    if len(spacings) > 1:
        plot_spacing(rows, args.out + "_spacing.png", title)
        written.append(args.out + "_spacing.png")
    print(markdown_table(rows, first="sweep"))
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
