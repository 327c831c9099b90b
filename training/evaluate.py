"""Evaluate a captioning checkpoint (diffusion or baseline) on a split, by the standard protocol.

    python -m training.evaluate --checkpoint assets/checkpoints/shapes-diffusion --data shapes --split test
    python -m training.evaluate --checkpoint assets/checkpoints/shapes-baseline --split test --beam 3
    python -m training.evaluate --checkpoint assets/checkpoints/shapes-diffusion --split test --counterfactuals all
    python -m training.evaluate --checkpoint runs/base-diffusion/final --data coco --data-dir DIR --split test

Captions every image of the split, then reports corpus-level BLEU-1..4, METEOR, ROUGE-L and CIDEr
against all references of each image after PTB tokenisation (pycocoevalcap; needs Java), and on the
shapes world the exact per-attribute accuracy, hallucination rate and colour-bias score from the
ground truth (``--counterfactuals``: the same on counterfactual sets built from the split -- typical vs
atypical backgrounds, hue-rotated, grayscale -- with a bias score for each). Evaluating a Flickr-trained
checkpoint on COCO (zero-shot) is the same command with another ``--data``. Writes the full result as JSON (``--out``, every caption included) and the headline
numbers as a markdown table (``--markdown``, default: next to ``--out``), with the sampler settings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from diffusion_caption.checkpoint import CheckpointError
from diffusion_caption.data import load_datasets
from diffusion_caption.world.counterfactuals import SETS
from diffusion_caption.samplers import SAMPLERS
from diffusion_caption.eval.step_report import step_report
from diffusion_caption.eval.evaluation import (counterfactual_report, counterfactual_tables, evaluate, load_model,
                                          markdown_table, model_kind, summary_row, two_object_table,
                                          whole_caption_table)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a diffusion or baseline checkpoint directory (or hub id)")
    p.add_argument("--clip", default="", metavar="SPEC", help="load the checkpoint's CLIP from this copy instead of the "
                   "one it names: a CLIP folder or open_clip:MODEL:FILE (a local weights file, for offline use)")
    p.add_argument("--data", default="shapes", help="shapes | flickr8k | flickr30k | coco (or a+b)")
    p.add_argument("--data-dir", default="data/shapes")
    p.add_argument("--image-dir", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N images only")
    g = p.add_argument_group("diffusion sampling")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--sampler", default=None, choices=list(SAMPLERS))
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--clamp", action=argparse.BooleanOptionalAction, default=None,
                   help="clamp each x0 to its nearest tokens (default: the checkpoint's)")
    g.add_argument("--spacing", default=None,
                   help="linspace | trailing | trailing^k: which timesteps are kept (default: the checkpoint's)")
    g.add_argument("--candidates", type=int, default=None,
                   help="K > 1: caption each image K times and keep one (see --select; default: the checkpoint's)")
    g.add_argument("--select", default=None, choices=["mbr", "clip"],
                   help="which of K candidates is kept: the consensus (mbr) or the highest CLIP score (clip); "
                        "default: the checkpoint's")
    g.add_argument("--commit", type=float, default=None, metavar="C",
                   help="block sampler: cut a block short before its second position rounded with probability "
                        "< C, the rest predicted again given what was revealed (0 = whole blocks; default: the "
                        "checkpoint's)")
    g.add_argument("--propose", default=None, choices=["noise", "rounding"],
                   help="where the K candidates come from: K noise draws (noise) or the K likeliest roundings of "
                        "one draw's last x0 (rounding, with --select clip); default: the checkpoint's")
    g.add_argument("--scorer", default=None, metavar="DIR",
                   help="rank candidates (--select clip) with this CLIP's text tower, e.g. "
                        "assets/checkpoints/shapes-clip-binding (its image tower must be the checkpoint's), or "
                        "with a text scorer trained against that image tower (research.train_text_scorer)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("baseline decoding")
    g.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--device", default="auto", help="cuda | cpu | auto (default: cuda when available)")
    p.add_argument("--tokenizer", default="ptb", choices=["ptb", "simple"],
                   help="ptb: the COCO protocol (needs Java); simple: pure Python, close but not identical")
    p.add_argument("--meteor", action=argparse.BooleanOptionalAction, default=True,
                   help="score METEOR (--no-meteor: skip it; it starts a Java process and is the slowest metric)")


def device_from_args(args) -> str:
    """``--device``, with ``auto`` meaning cuda when this machine has it (the base model is ~1 s an image on CPU)."""
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device} was asked for, but CUDA is not available on this machine")
    return args.device


def settings_from_args(model, args) -> dict:
    if getattr(args, "scorer", None) and model_kind(model) != "diffusion":
        raise SystemExit("error: --scorer ranks a diffusion captioner's candidates; the baseline has none")
    if model_kind(model) == "diffusion":
        try:
            if getattr(args, "scorer", None):
                model.use_scorer(args.scorer)
            return model.settings(args.seed, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                                  clamp=args.clamp, spacing=args.spacing, candidates=args.candidates,
                                  select=args.select, propose=args.propose, commit=args.commit)
        except (ValueError, CheckpointError) as e:
            raise SystemExit(f"error: {e}")
    return {"beam": args.beam}


def load_records(args):
    records = load_datasets(args.data, args.data_dir, splits=[args.split], image_dir=args.image_dir)
    if not records:
        raise SystemExit(f"no images in split {args.split!r} of {args.data} at {args.data_dir}")
    return records[: args.limit] if args.limit else records


def parse_sets(text: str) -> tuple[str, ...]:
    if not text:
        return ()
    if text == "all":
        return SETS
    sets = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in sets if x not in SETS]
    if bad:
        raise SystemExit(f"--counterfactuals: unknown set(s) {bad}; choose from {', '.join(SETS)} or 'all'")
    return sets


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--counterfactuals", default="", metavar="SETS",
                   help="shapes world: also caption counterfactual sets built from the split and score the colour "
                        "bias on them; comma-separated, from: background,hue,grayscale (or 'all')")
    p.add_argument("--per-step", action="store_true",
                   help="diffusion on the shapes world: also score the caption every denoising step holds (whole "
                        "captions, colour and shape over all objects, positions changed since the step before)")
    p.add_argument("--out", default="", help="write the full result (every caption) as JSON here")
    p.add_argument("--markdown", default="", help="write the headline table here (default: --out with .md)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        model = load_model(args.checkpoint, device=device_from_args(args), clip=args.clip or None)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    records = load_records(args)
    sets = parse_sets(args.counterfactuals)
    if sets and not all(r.scene for r in records):
        raise SystemExit("--counterfactuals needs the shapes world (its scenes are the ground truth)")
    settings = settings_from_args(model, args)
    res = evaluate(model, records, settings, args.batch_size, args.cache_dir, tokenizer=args.tokenizer,
                   meteor=args.meteor)
    res.update(checkpoint=args.checkpoint, data=args.data, split=args.split)
    if args.scorer:
        res["scorer"] = args.scorer
    name = f"{res['kind']} ({os.path.basename(os.path.normpath(args.checkpoint))})"
    table = markdown_table([{"model": name, "split": args.split, **summary_row(res)}])
    if (res.get("attributes") or {}).get("two_objects", {}).get("n"):
        table += "\nTwo-object scenes, objects of different colours and shapes: what the captions made of them\n\n"
        table += two_object_table([(name, res["attributes"]["two_objects"])])
    if (res.get("attributes") or {}).get("whole", {}).get("n"):
        table += ("\nWhole captions: the share wholly right by the scene's number of objects, the defect rate, and "
                  "the commonest reasons a caption is not (shares of captions)\n\n")
        table += whole_caption_table([(name, res["attributes"]["whole"])])
    if args.per_step:
        if res["kind"] != "diffusion" or not all(r.scene for r in records):
            raise SystemExit("--per-step scores a diffusion captioner's steps on the shapes world")
        res["per_step"] = step_report(model, records, settings, args.batch_size)
        table += ("\nEvery step's caption (the last row is the call's caption): wholly right by number of objects, "
                  "defect rate, colour and shape over all objects, positions changed since the step before and "
                  "the share of captions that changed, and the share still being written (a block captioner ends each "
                  "caption at its [SEP]; an ended caption holds its last step)\n\n")
        table += markdown_table(res["per_step"], first="step")
    if sets:
        res["counterfactuals"] = counterfactual_report(model, records, settings, args.batch_size, sets, args.seed)
        table += "\n" + counterfactual_tables(res["counterfactuals"], name)
    print(json.dumps({k: v for k, v in res.items() if k not in ("captions", "counterfactuals")}, indent=2))
    print(table)
    for ex in res["captions"][:4]:
        print(f"  {os.path.basename(ex['image'])}: {ex['caption']!r}  (ref: {ex['references'][0]!r})")
    md = args.markdown or (os.path.splitext(args.out)[0] + ".md" if args.out else "")
    for path, text in ((args.out, json.dumps(res, indent=2)), (md, table)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)


if __name__ == "__main__":
    main()
