"""Calibrate both captioners' token confidence on val and measure it on test (``diffusion_caption/confidence.py``).

    python -m training.fit_confidence --diffusion assets/checkpoints/shapes-diffusion-block \\
        --baseline assets/checkpoints/shapes-baseline --data-dir data/shapes --out docs/results/confidence.json

Every judged word of a caption (``world/token_truth.py``: shapes, colours bound to their shape, background
colours, sizes, counts) is right or wrong against its scene. The diffusion captioner's signal is a token's
rounding probability at the step it was decided, the baseline's its token probability; each is calibrated
by Platt scaling on val (written as ``confidence.json`` into its checkpoint) and reported on test: the
reliability diagram and expected calibration error of the raw and the calibrated confidence, the area under
the ROC curve for telling right words from wrong ones, and for telling wholly right captions from others by
the caption's confidence (its least confident word's).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from diffusion_caption.confidence import (SPECIAL, Calibrator, auroc, decision_confidence,  # noqa: E402
                                          expected_calibration_error, reliability)
from diffusion_caption.data import load_datasets  # noqa: E402
from diffusion_caption.eval.evaluation import load_model, model_kind  # noqa: E402
from diffusion_caption.world.scenes import Scene  # noqa: E402
from diffusion_caption.world.token_truth import word_truth  # noqa: E402
from diffusion_caption.world.whole_caption import whole_caption_errors  # noqa: E402


def judged(model, paths: list[str], scenes: list[Scene], batch: int = 100, desc: str = "captioning") -> dict:
    """Every judged word's raw signal and truth, and every caption's text and its words' signals."""
    words, captions = [], []
    for i in tqdm(range(0, len(paths), batch), desc=desc, leave=False):
        if model_kind(model) == "diffusion":
            outs = model.caption_batch(paths[i:i + batch], seed=0)
            signals = [decision_confidence(tr) for tr in outs]
            lasts = [tr.confidence for tr in outs]
        else:
            outs = model.caption_batch(paths[i:i + batch])
            signals = lasts = [o.confidence for o in outs]
        for out, sig, last, scene in zip(outs, signals, lasts, scenes[i:i + batch]):
            toks = out.final.tokens if hasattr(out, "final") else out.tokens
            keep = [p for p, t in enumerate(toks) if t not in SPECIAL]
            truth = word_truth([toks[p] for p in keep], scene)
            words += [(sig[p], t, last[p]) for p, t in zip(keep, truth) if t is not None]
            captions.append({"text": out.text, "signals": [sig[p] for p in keep],
                             "whole": not whole_caption_errors(out.text, scene)})
    return {"words": words, "captions": captions}


def _auc(scores: list[float], positive: list[bool]) -> float | None:
    """The area, or None where the split has only one class (a small run)."""
    return auroc(scores, positive) if any(positive) and not all(positive) else None


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def measure(cal: Calibrator, test: dict) -> dict:
    raw = [w[0] for w in test["words"]]
    right = [w[1] for w in test["words"]]
    last = [w[2] for w in test["words"]]
    calibrated = cal(raw)
    cap_conf = [min(cal(c["signals"])) if c["signals"] else 0.0 for c in test["captions"]]
    whole = [c["whole"] for c in test["captions"]]
    return {"n_words": len(raw), "words_right": sum(right) / len(right),
            "ece_last_step": expected_calibration_error(last, right), "auc_words_last_step": _auc(last, right),
            "ece_raw": expected_calibration_error(raw, right), "ece_calibrated": expected_calibration_error(calibrated, right),
            "auc_words": _auc(raw, right), "auc_captions_wholly_right": _auc(cap_conf, whole),
            "n_captions": len(whole), "captions_wholly_right": sum(whole) / len(whole),
            "reliability_raw": reliability(raw, right), "reliability_calibrated": reliability(calibrated, right),
            "calibrator": {"a": cal.a, "b": cal.b, "n": cal.n}}


def plot(results: dict, path: str) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="perfectly calibrated")
        for key, colour, label in (("reliability_raw", "#d6604d", f"raw (ECE {r['ece_raw']:.3f})"),
                                   ("reliability_calibrated", "#1b7837", f"calibrated (ECE {r['ece_calibrated']:.3f})")):
            bins = r[key]
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color=colour, label=label)
            for b in bins:
                ax.annotate(str(b["n"]), (b["confidence"], b["accuracy"]), fontsize=7, color=colour,
                            xytext=(3, -9), textcoords="offset points")
        ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="token confidence (mean in bin)", ylabel="share of words right",
               title=f"{name}\nword AUC {_f(r['auc_words'])}, wholly-right caption AUC {_f(r['auc_captions_wholly_right'])}")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Token confidence against word correctness, test split (numbers: words per bin)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict) -> str:
    lines = ["| model | signal | words judged | share right | ECE: last step / signal / calibrated | "
             "AUC, right vs wrong words: last step / signal | AUC, wholly right captions by caption confidence |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        sig = "token probability" if r["signal"] == "token" else "rounding probability at the decision step"
        lines.append(f"| {name} | {sig} | {r['n_words']} | {r['words_right']:.3f} | {r['ece_last_step']:.3f} / "
                     f"{r['ece_raw']:.3f} / {r['ece_calibrated']:.3f} | {_f(r['auc_words_last_step'])} / "
                     f"{_f(r['auc_words'])} | {_f(r['auc_captions_wholly_right'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusion", required=True)
    p.add_argument("--baseline", default="")
    p.add_argument("--data-dir", default="data/shapes")
    p.add_argument("--val-limit", type=int, default=0)
    p.add_argument("--test-limit", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=True,
                   help="store each calibrator as confidence.json in its checkpoint")
    p.add_argument("--out", default="", help="the report: OUT (.json), .md and .png beside it")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    splits = {}
    for split, limit in (("val", a.val_limit), ("test", a.test_limit)):
        recs = load_datasets("shapes", a.data_dir, splits=[split])
        recs = recs[:limit] if limit else recs
        if not recs:
            raise SystemExit(f"no {split} images in {a.data_dir}")
        splits[split] = ([r.image_path for r in recs], [Scene.from_json(r.scene) for r in recs])
    results = {}
    for path in [a.diffusion] + ([a.baseline] if a.baseline else []):
        model = load_model(path)
        kind = "decision" if model_kind(model) == "diffusion" else "token"
        name = os.path.basename(os.path.normpath(path))
        val = judged(model, *splits["val"], desc=f"{name} val")
        cal = Calibrator.fit([w[0] for w in val["words"]], [w[1] for w in val["words"]], kind)
        if a.write:
            cal.save(model.read_checkpoint(path)[0])
        results[name] = {"signal": kind, **measure(cal, judged(model, *splits["test"], desc=f"{name} test"))}
    print(markdown(results))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        stem = os.path.splitext(a.out)[0]
        command = "python -m training.fit_confidence " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(a.out, "w") as f:
            json.dump({"command": command, "results": results}, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(markdown(results))
        plot(results, stem + ".png")
    return results


if __name__ == "__main__":
    main()
