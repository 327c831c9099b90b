"""Sequence-level knowledge distillation: a copy of a dataset whose training captions are a teacher's.

    python -m training.distill_captions --teacher assets/checkpoints/shapes-baseline --beam 3 \\
        --data-dir data/shapes-aug --out data/shapes-aug-kd

A non-autoregressive captioner predicts every position at once, so when one image has several
differently worded references ("a red circle above a blue square", "a blue square and a red circle")
its one-shot prediction averages them and the rounded caption mixes both. Training on one
deterministic caption per image, decoded by an autoregressive teacher, removes that ambiguity: this is
sequence-level knowledge distillation (Kim & Rush 2016), the standard recipe for non-autoregressive
translation (Gu et al. 2018) and captioning. It is what makes few-step diffusion sampling work here
(``docs/BENCHMARKS.md``).

``--select typical`` addresses the same ambiguity inside the teacher. Its beam often ends with two
phrasings of one content a hair apart ("a pink background with an orange circle" at -0.207 per token,
"an orange circle on a pink background" at -0.212), so which one becomes the training caption is close
to arbitrary, and the student cannot learn the choice. Among the teacher's finished hypotheses within
``--margin`` of its best (length-normalised log probability), this keeps the one with the best teacher
score plus ``--typicality-weight`` times its mean per-token log probability under a bigram model of
all the teacher's best captions: the phrasing the teacher uses most often elsewhere wins such near-ties.
It lowers the complexity of the distilled data, which Zhou et al. (2020) found governs how well a
non-autoregressive student learns it.

``--object-order`` (shapes world only; it needs each image's ground-truth scene) is an experiment on
one more arbitrary choice. The references list a scene's objects in random order, so which object the
teacher names first has no fixed relation to the layout (on the test split its first object is the
left one of a pair about half the time, the larger one about half the time). The one-step students
swap colours between the objects of a scene ("a white star and a green circle" for a green star and a
white circle) twice as often as greedy decoding. ``left-to-right`` keeps, among the near-best
hypotheses, only those naming their objects left to right (by the x of the scene objects they name),
``by-shape`` those naming them in the order of ``world.SHAPES``, when there is one, before the
typicality choice; an image with no such hypothesis keeps the usual choice. The captions stay the
teacher's own. Neither is used by a shipped checkpoint: research/README.md (finding 4) has what they
did to a student.

``--reference-weight`` is Kim & Rush's *sequence-level interpolation*: among the near-best
hypotheses, the objective also counts each one's sentence BLEU-2 against the image's own human
references, times the weight. The teacher's captions stay the teacher's (so the phrasing stays as
predictable for the student), but where the teacher's beam holds a caption the references support
better -- the colours with the right shapes, say -- that one is kept. It needs only the references,
so it works on any dataset, not only where ground-truth scenes exist. No shipped checkpoint uses it
either: research/README.md (finding 4) has what it did to a student (its captions bind far better,
the student trained on them did not).

The new folder holds only ``dataset_<name>.json``: the chosen splits' sentences are replaced by the
teacher's caption (``--keep-references`` adds the teacher's caption to the references instead), every
other split keeps its human references, so evaluation is unchanged. Images are not copied: each entry's
``filepath`` points back to the source folder. The teacher, its decoding settings and the time taken
are recorded under the file's ``"distilled"`` key.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import time
from typing import Callable

import torch
from tqdm import tqdm

from diffusion_caption.world.attributes import parse_caption
from diffusion_caption.baseline.captioner import BaselineCaptioner
from diffusion_caption.checkpoint import CheckpointError
from diffusion_caption.baseline.decoding import beam_search_n_best
from diffusion_caption.data import find_dataset_json, load_karpathy, resolve_image_path
from diffusion_caption.features import image_features
from diffusion_caption.eval.evaluation import attribute_report
from diffusion_caption.world.scenes import SHAPES, Scene


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="assets/checkpoints/shapes-baseline", help="a baseline checkpoint directory")
    p.add_argument("--data", default="shapes", help="one dataset: shapes | flickr8k | flickr30k | coco")
    p.add_argument("--data-dir", default="data/shapes-aug")
    p.add_argument("--image-dir", default=None)
    p.add_argument("--out", required=True, help="folder for the distilled dataset file (must differ from --data-dir)")
    p.add_argument("--splits", default="train", help="comma-separated splits whose captions the teacher writes")
    p.add_argument("--beam", type=int, default=3, help="the teacher's beam size (1 = greedy)")
    p.add_argument("--select", choices=("best", "typical"), default="best",
                   help="best: the teacher's top hypothesis; typical: among hypotheses within --margin of it, "
                        "the most typical phrasing (needs --beam >= 2)")
    p.add_argument("--margin", type=float, default=0.1,
                   help="--select typical: how far below the best length-normalised log probability a hypothesis may be")
    p.add_argument("--typicality-weight", type=float, default=1.0,
                   help="--select typical: weight of the bigram typicality against the teacher's score")
    p.add_argument("--object-order", choices=("teacher", *OBJECT_ORDERS), default="teacher",
                   help="with --select typical: prefer hypotheses naming their objects left to right (left-to-right) "
                        "or in the world's order of shape names (by-shape); needs the shapes world's scenes")
    p.add_argument("--reference-weight", type=float, default=0.0,
                   help="with --select typical: weight of each hypothesis's sentence BLEU-2 against the image's "
                        "own human references (Kim & Rush's sequence-level interpolation); 0 = off")
    p.add_argument("--keep-references", action="store_true",
                   help="add the teacher's caption to the human references instead of replacing them")
    p.add_argument("--correct", action="store_true",
                   help="shapes world: a teacher caption that is not wholly right against its scene is replaced by the "
                        "teacher's likeliest beam hypothesis that is, else by the image's reference closest to it "
                        "(sentence BLEU-2): the student then learns the teacher's phrasing without its mistakes")
    p.add_argument("--specific", action="store_true",
                   help="with --correct, a vague caption (\"two shapes on a gray background\") counts as not right "
                        "either: it is replaced as a wrong one is, so the student names every object")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--device", default="cpu")
    return p


class BigramModel:
    """Add-alpha smoothed bigram model of token-id sequences (each starting after a virtual BOS)."""

    BOS = -1

    def __init__(self, sequences: list[list[int]], vocab_size: int, alpha: float = 0.1):
        self.pairs = collections.Counter()
        self.firsts = collections.Counter()
        for ids in sequences:
            prev = self.BOS
            for tok in ids:
                self.pairs[prev, tok] += 1
                self.firsts[prev] += 1
                prev = tok
        self.vocab_size, self.alpha = vocab_size, alpha

    def log_prob(self, prev: int, tok: int) -> float:
        return math.log((self.pairs[prev, tok] + self.alpha) / (self.firsts[prev] + self.alpha * self.vocab_size))

    def mean_log_prob(self, ids: list[int]) -> float:
        if not ids:
            return -math.inf
        prev, total = self.BOS, 0.0
        for tok in ids:
            total += self.log_prob(prev, tok)
            prev = tok
        return total / len(ids)


def select_typical(ranked: list[tuple[float, list[int]]], lm: BigramModel, margin: float, weight: float,
                   prefer: Callable[[list[int]], bool] | None = None,
                   bonus: Callable[[list[list[int]]], list[float]] | None = None) -> list[int]:
    """From one image's ``(score, token ids)`` hypotheses, best first: among those within ``margin`` of
    the best score, the one maximising score + weight * mean bigram log probability (the first on ties).
    With ``prefer``, only the near hypotheses it accepts compete, if it accepts any; ``bonus`` maps the
    competing hypotheses to one extra term each, added to that objective."""
    best = ranked[0][0]
    near = [(s, ids) for s, ids in ranked if s >= best - margin and ids]
    if not near:
        return ranked[0][1]
    if prefer is not None:
        near = [c for c in near if prefer(c[1])] or near
    extra = bonus([ids for _, ids in near]) if bonus is not None else [0.0] * len(near)
    objective = [s + weight * lm.mean_log_prob(ids) + b for (s, ids), b in zip(near, extra)]
    return near[max(range(len(near)), key=objective.__getitem__)][1]  # max keeps the first of equals


def sentence_bleu(hypotheses: list[str], references: list[str], n: int = 2) -> list[float]:
    """Sentence BLEU-n of each hypothesis against one image's references (pycocoevalcap's scorer,
    closest reference length for the brevity penalty); a reference-free image scores 0."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    refs = [r for r in references if r.strip()]
    if not refs or not hypotheses:
        return [0.0] * len(hypotheses)
    scorer = BleuScorer(n=n)
    for h in hypotheses:
        scorer += (h, refs)
    _, per = scorer.compute_score(option="closest", verbose=0)
    return [float(v) for v in per[n - 1]]


def in_left_to_right_order(caption: str, scene: Scene) -> bool:
    """Whether ``caption`` names its objects in the left-to-right order of the scene objects they match.

    Each mentioned object is placed at the mean x of the scene objects with the colour and shape it
    names (either may be unnamed); a mention that matches none, or two mentions at the same place, fail. A caption
    naming fewer than two objects is in order."""
    mentions = parse_caption(caption).objects
    if len(mentions) < 2:
        return True
    xs = []
    for o in mentions:
        same = [s.x for s in scene.objects if o.color in (None, s.color) and o.shape in (None, s.shape)]
        if not same:
            return False
        xs.append(sum(same) / len(same))
    return all(a < b for a, b in zip(xs, xs[1:]))


def in_shape_order(caption: str, scene: Scene) -> bool:
    """Whether ``caption`` names its objects in the world's order of shape names (``world.SHAPES``:
    circle, square, triangle, diamond, star), two of one shape in either order. A mention without a
    shape fails; a caption naming fewer than two objects is in order. The scene is not looked at: the
    order is one of the words, which the image features encode, not of the layout."""
    mentions = parse_caption(caption).objects
    if len(mentions) < 2:
        return True
    if any(o.shape is None for o in mentions):
        return False
    ranks = [SHAPES.index(o.shape) for o in mentions]
    return all(a <= b for a, b in zip(ranks, ranks[1:]))


OBJECT_ORDERS = {"left-to-right": in_left_to_right_order, "by-shape": in_shape_order}


def correct_captions(captions: list[str], records, hyps, decode, specific: bool = False) -> tuple[list[str], dict]:
    """``captions`` with every one that is not wholly right against its record's scene replaced: by the
    likeliest of its beam hypotheses ``hyps`` (ranked, as ``teacher_hypotheses`` gives them; None: no
    beam) that is wholly right, else by the record's reference caption closest to it by sentence BLEU-2
    (references are the world's own captions, right by construction). With ``specific``, a vague caption
    (``whole_caption.is_vague``) is not right either. Returns the captions and counts."""
    from diffusion_caption.world.whole_caption import is_vague, whole_caption_errors

    def right(text: str, scene: Scene) -> bool:
        return not whole_caption_errors(text, scene) and not (specific and is_vague(text))

    out, counts = list(captions), {"wrong": 0, "from_beam": 0, "from_references": 0}
    if specific:
        counts["vague"] = 0
    for i, (caption, r) in enumerate(zip(captions, records)):
        scene = Scene.from_json(r.scene)
        if right(caption, scene):
            continue
        counts["wrong"] += 1
        if specific and not whole_caption_errors(caption, scene):
            counts["vague"] += 1
        good = [text for text in (decode(ids) for _, ids in (hyps[i] if hyps else [])) if right(text, scene)]
        if good:
            out[i] = good[0]
            counts["from_beam"] += 1
            continue
        refs = [c for c in r.captions if right(c, scene)]
        if refs:
            scores = sentence_bleu(refs, [caption])
            out[i] = refs[max(range(len(refs)), key=lambda j: (scores[j], -j))]
            counts["from_references"] += 1
    return out, counts


def teacher_hypotheses(teacher: BaselineCaptioner, feats: torch.Tensor, settings: dict) -> list[list[tuple[float, list[int]]]]:
    """Every finished beam hypothesis per image, ``(length-normalised log probability, token ids)``, best first."""
    cfg = teacher.config
    prefix = teacher.model.prefix(feats.to(teacher.device).float())
    ranked = beam_search_n_best(teacher.model, prefix, cfg.bos_id, cfg.eos_id, settings["max_len"] - 1,
                                settings["beam"], settings["length_penalty"])
    return [[(score, h.token_ids) for score, h in r] for r in ranked]


def distill(args) -> dict:
    if "+" in args.data:
        raise SystemExit("--data takes one dataset here; distil each dataset into its own folder")
    try:
        src_json = find_dataset_json(args.data, args.data_dir)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    if os.path.abspath(args.out) == os.path.abspath(args.data_dir):
        raise SystemExit("--out must be a new folder: the source dataset file is not overwritten")
    try:
        teacher = BaselineCaptioner.from_pretrained(args.teacher, device=args.device)
    except (CheckpointError, FileNotFoundError, OSError, ValueError) as e:
        raise SystemExit(f"could not load the teacher {args.teacher}: {e}") from None
    settings = teacher.settings(beam=args.beam)
    if args.select == "typical" and (settings["beam"] < 2 or not args.margin >= 0 or not args.typicality_weight >= 0):
        raise SystemExit("--select typical chooses among beam hypotheses: it needs --beam >= 2, --margin >= 0 "
                         "and --typicality-weight >= 0")
    if args.object_order != "teacher" and args.select != "typical":
        raise SystemExit("--object-order chooses among beam hypotheses: use it with --select typical")
    if args.reference_weight != 0 and (args.select != "typical" or not args.reference_weight > 0):
        raise SystemExit("--reference-weight chooses among beam hypotheses: use a positive weight with --select typical")
    if args.specific and not args.correct:
        raise SystemExit("--specific says which captions --correct replaces: give --correct too")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    records = load_karpathy(args.data, args.data_dir, splits, image_dir=args.image_dir, restval_as_train=False)
    if not records:
        raise SystemExit(f"{src_json}: no images in split(s) {splits}")
    if args.object_order != "teacher" and any(r.scene is None for r in records):
        raise SystemExit(f"--object-order {args.object_order} needs each image's ground-truth scene (the shapes "
                         f"world's \"scene\" entries); {src_json} has images without one")

    t0 = time.perf_counter()
    feats = image_features(teacher.image_encoder, [r.image_path for r in records], args.cache_dir,
                           desc="encoding images")
    captions: list[str] = []
    selection = None
    hyps: list[list[tuple[float, list[int]]]] | None = None
    if args.correct and any(r.scene is None for r in records):
        raise SystemExit(f"--correct needs each image's ground-truth scene (the shapes world); {src_json} has images without one")
    if args.select == "best":
        for i in tqdm(range(0, len(records), args.batch_size), desc=f"teacher beam {settings['beam']}"):
            out = teacher.caption_batch(features=feats[i:i + args.batch_size], **settings)
            captions += [c.text for c in out]
    else:
        hyps = []
        for i in tqdm(range(0, len(records), args.batch_size), desc=f"teacher beam {settings['beam']}, n-best"):
            hyps += teacher_hypotheses(teacher, feats[i:i + args.batch_size], settings)
        lm = BigramModel([r[0][1] for r in hyps], teacher.tokenizer.vocab_size)
        prefer = [None] * len(hyps)
        if args.object_order != "teacher":
            in_order = OBJECT_ORDERS[args.object_order]
            scenes = [Scene.from_json(r.scene) for r in records]
            prefer = [lambda ids, sc=sc: in_order(teacher.tokenizer.decode(ids), sc) for sc in scenes]
        bonus = [None] * len(hyps)
        if args.reference_weight > 0:
            decode = teacher.tokenizer.decode
            bonus = [lambda near, refs=r.captions: [args.reference_weight * b for b in
                                                    sentence_bleu([decode(ids) for ids in near], refs)]
                     for r in records]
        chosen = [select_typical(r, lm, args.margin, args.typicality_weight, p, b)
                  for r, p, b in tqdm(list(zip(hyps, prefer, bonus)), desc="choosing", leave=False)]
        captions = [teacher.tokenizer.decode(ids) for ids in chosen]
        selection = {"select": "typical", "margin": args.margin, "typicality_weight": args.typicality_weight,
                     **({"reference_weight": args.reference_weight} if args.reference_weight > 0 else {}),
                     "not_the_best": sum(c is not r[0][1] for c, r in zip(chosen, hyps))}
        if args.object_order != "teacher":
            multi = [i for i, sc in enumerate(scenes) if len(sc.objects) > 1]
            unordered = [select_typical(hyps[i], lm, args.margin, args.typicality_weight) for i in multi]
            selection.update({
                "object_order": args.object_order, "multi_object_images": len(multi),
                "in_order": sum(in_order(captions[i], scenes[i]) for i in multi),
                "in_order_without_preference": sum(in_order(teacher.tokenizer.decode(ids), scenes[i])
                                                   for i, ids in zip(multi, unordered)),
            })
    corrected = None
    if args.correct:
        captions, corrected = correct_captions(captions, records, hyps, teacher.tokenizer.decode, args.specific)
    seconds = time.perf_counter() - t0
    empty = sum(1 for c in captions if not c.strip())
    if empty:
        raise SystemExit(f"the teacher wrote {empty} empty caption(s); is {args.teacher} trained?")

    against_scenes = None
    if all(r.scene is not None for r in records):  # the shapes world: how right the distilled captions are
        rep = attribute_report(captions, [Scene.from_json(r.scene) for r in records])
        against_scenes = {"single_object_colour": rep["single_object"]["color_acc"],
                          "single_object_shape": rep["single_object"]["shape_acc"],
                          **{a: rep[a]["acc"] for a in ("color", "shape", "binding")},
                          "hallucination": rep["hallucination"]}

    with open(src_json, encoding="utf-8") as f:
        meta = json.load(f)
    by_path = {r.image_path: c for r, c in zip(records, captions)}
    out_dir = os.path.abspath(args.out)
    n_changed = 0
    for i, e in enumerate(meta["images"]):
        path = resolve_image_path(e, args.data, args.data_dir, args.image_dir)
        # images stay where they are: the entry points at their folder from the new file's folder
        e["filepath"] = os.path.relpath(os.path.dirname(os.path.abspath(path)), out_dir)
        if path in by_path:
            teacher_sentence = {"raw": by_path[path], "tokens": by_path[path].split(), "teacher": True}
            e["sentences"] = (e["sentences"] if args.keep_references else []) + [teacher_sentence]
            n_changed += 1
    meta["distilled"] = {
        "teacher": args.teacher, "decoding": settings, "splits": splits, "source": os.path.abspath(src_json),
        "keep_references": bool(args.keep_references), "images": n_changed, "seconds": round(seconds, 1),
        "distinct_captions": len(set(captions)),
        **({"selection": selection} if selection else {}),
        **({"corrected": corrected} if corrected else {}),
        **({"against_scenes": against_scenes} if against_scenes else {}),
        "command": "python -m training.distill_captions " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in (("teacher", args.teacher), ("data", args.data),
                                                          ("data_dir", args.data_dir), ("out", args.out),
                                                          ("splits", args.splits), ("beam", args.beam)))
                   + (f" --select typical --margin {args.margin} --typicality-weight {args.typicality_weight}"
                      if selection else "")
                   + (f" --object-order {args.object_order}" if args.object_order != "teacher" else "")
                   + (f" --reference-weight {args.reference_weight}" if args.reference_weight > 0 else "")
                   + (" --keep-references" if args.keep_references else "")
                   + (" --correct" if args.correct else "") + (" --specific" if args.specific else ""),
    }
    os.makedirs(args.out, exist_ok=True)
    dst = os.path.join(args.out, os.path.basename(src_json))
    tmp = dst + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    os.replace(tmp, dst)
    print(f"wrote {dst}: {n_changed} images of {','.join(splits)} captioned by {args.teacher} "
          f"(beam {settings['beam']}) in {seconds:.0f} s; {len(set(captions))} distinct captions"
          + (f"; {selection['not_the_best']} not the teacher's best (--select typical)" if selection else "")
          + (f"; objects in {args.object_order} order in {selection['in_order']} of {selection['multi_object_images']} "
             f"multi-object captions ({selection['in_order_without_preference']} without --object-order)"
             if selection and "object_order" in selection else "")
          + (f"; against the scenes: single-object colour {against_scenes['single_object_colour']:.4f}, "
             f"binding {against_scenes['binding']:.3f}" if against_scenes and against_scenes["binding"] is not None else ""))
    return meta["distilled"]


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with torch.no_grad():
        distill(args)


if __name__ == "__main__":
    main()
