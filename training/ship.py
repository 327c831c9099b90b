"""Copy a trained checkpoint into assets/ for shipping, its CLIP referenced instead of copied.

    python -m training.ship runs/shapes-diffusion-sc/final assets/checkpoints/shapes-diffusion-sc

Every shapes checkpoint is trained on the same frozen CLIP (``assets/checkpoints/shapes-clip``); shipped,
each refers to that one folder ("../shapes-clip" in its config.json) instead of carrying a copy in
``clip/``. The CLIP's weights are checked to be the checkpoint's own before the reference is written.
Files beside the weights that the app reads (``vocab_map.json``) and the model card (``README.md``) come along.
"""
from __future__ import annotations

import argparse
import os

from diffusion_caption.eval.evaluation import load_model

CARRIED = ("vocab_map.json", "README.md", "ood.json", "ood.safetensors")  # the app's vocabulary map; the model card; the out-of-domain statistics


def ship(src: str, dest: str, clip: str, summary: str | None = None, sampling: str | None = None) -> None:
    model = load_model(src)
    if summary is not None:  # the line the app shows under its model choice
        model.config.extra = {**(model.config.extra or {}), "summary": summary}
    if sampling is not None:  # the defaults every call starts from (a diffusion captioner's sampling section)
        from diffusion_caption.sampling import SamplingConfig

        if not hasattr(model, "sampling"):
            raise SystemExit("--sampling sets a diffusion captioner's sampling defaults; this is a baseline")
        try:
            model.sampling = model.resolve(SamplingConfig.parse(sampling, base=model.sampling))
        except ValueError as e:
            raise SystemExit(f"--sampling: {e}") from None
    carried = {}
    for name in CARRIED:  # read first: dest may be src, which the save replaces
        if os.path.isfile(os.path.join(src, name)):
            with open(os.path.join(src, name), "rb") as f:
                carried[name] = f.read()
    model.save_pretrained(dest, clip_reference=clip)
    for name, data in carried.items():
        with open(os.path.join(dest, name), "wb") as f:
            f.write(data)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a trained captioner or baseline checkpoint folder")
    p.add_argument("dest", help="where to write it (may be src itself)")
    p.add_argument("--clip", default="assets/checkpoints/shapes-clip", help="the shared CLIP folder to refer to")
    p.add_argument("--summary", default=None, help="one line on what the model is, shown by the app beside its name")
    p.add_argument("--sampling", default=None, metavar="SPEC",
                   help="the shipped sampling defaults, e.g. 'block:10:1:auto' (default: the checkpoint's own)")
    a = p.parse_args(argv)
    ship(a.src, a.dest, a.clip, a.summary, a.sampling)
    print(f"wrote {a.dest} (CLIP: {os.path.relpath(os.path.abspath(a.clip), os.path.abspath(a.dest))})")


if __name__ == "__main__":
    main()
