"""Caption images from the command line.

    python -m diffusion_caption scene.png photo.jpg            # final captions
    python -m diffusion_caption scene.png --trace              # the caption at every denoising step
    python -m diffusion_caption scene.png --json               # the whole trace as JSON

Exit status: 0 when every image was captioned; 1 when some image could not be read (each gets a one-line
error, the others are still captioned); 2 for a bad option, setting or checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .ood import NOTICE
from .samplers import SAMPLERS

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "assets", "checkpoints", "shapes-diffusion-block")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusion_caption", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint directory or hub id")
    p.add_argument("--clip", default=None, metavar="SPEC", help="load the checkpoint's CLIP from this copy instead of "
                   "the one it names: a CLIP folder or open_clip:MODEL:FILE (a local weights file, for offline use)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the checkpoint's)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clamp", action=argparse.BooleanOptionalAction, default=None,
                   help="clamp each predicted x0 to its nearest tokens (default: the checkpoint's)")
    p.add_argument("--spacing", default=None,
                   help="linspace | trailing | trailing^k: which timesteps the sampler keeps (default: the checkpoint's)")
    p.add_argument("--candidates", type=int, default=None,
                   help="K > 1: denoise each image K times at once and print the one --select keeps")
    p.add_argument("--select", default=None, choices=["mbr", "clip"],
                   help="which of K candidates: the consensus (mbr) or the highest CLIP score (clip); "
                        "default: the checkpoint's")
    p.add_argument("--commit", type=float, default=None, metavar="C",
                   help="block sampler: cut a block short before its second position rounded with probability "
                        "< C, the rest predicted again given what was revealed (0 = whole blocks; default: the "
                        "checkpoint's)")
    p.add_argument("--propose", default=None, choices=["noise", "rounding"],
                   help="the K candidates: K noise draws (noise), or the K likeliest roundings of one draw "
                        "(rounding, with --select clip); default: the checkpoint's")
    p.add_argument("--scorer", default=None, metavar="DIR",
                   help="rank candidates (--select clip) with this CLIP's text tower (its image tower must be "
                        "the checkpoint's), e.g. assets/checkpoints/shapes-clip-binding, or with a text scorer "
                        "trained against that image tower (research.train_text_scorer)")
    p.add_argument("--trace", action="store_true", help="print the caption at every step")
    p.add_argument("--json", action="store_true", help="print each trace as JSON")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import torch

    from diffusion_caption import Captioner, CheckpointError, ImageLoadError

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: CUDA is not available on this machine (use --device cpu)",
              file=sys.stderr)
        return 2
    try:
        cap = Captioner.from_pretrained(args.checkpoint, device=args.device, scorer=args.scorer, clip=args.clip)
    except (CheckpointError, OSError, RuntimeError, ValueError) as e:  # RuntimeError: an open_clip model that cannot load
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # bad settings are one mistake, said once, before any image is read
        cap.settings(args.seed, steps=args.steps, sampler=args.sampler, guidance=args.guidance, clamp=args.clamp,
                     spacing=args.spacing, candidates=args.candidates, select=args.select, propose=args.propose,
                     commit=args.commit)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    status = 0
    for path in args.images:
        try:
            trace = cap.caption(path, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                                seed=args.seed, clamp=args.clamp, spacing=args.spacing, candidates=args.candidates,
                                select=args.select, propose=args.propose, commit=args.commit)
        except (ImageLoadError, ValueError) as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            status = 1
            continue
        if args.json:
            print(json.dumps({"image": path, **trace.to_json()}))
            continue
        extra = f"  (confidence {trace.caption_confidence:.2f})" if trace.caption_confidence is not None else ""
        print(f"{path}: {trace.text}{extra}")
        if trace.ood is not None and trace.ood["unlike_training"]:
            print(f"  note: {NOTICE} (out-of-domain score {trace.ood['score']:.1f} > {trace.ood['threshold']:.1f})")
        if trace.candidates is not None and args.trace:
            how = trace.settings.get("select", "mbr")
            for k, c in enumerate(trace.candidates):
                print(f"  candidate {k + 1}{f' (chosen by {how})' if k == trace.chosen else ''}: {c}")
        if args.trace:
            for s in trace.steps:
                conf = sum(s.confidence) / len(s.confidence)
                print(f"  step {s.index + 1:>4} t={s.t:>4} mean conf {conf:.2f}  {s.text}")
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
