"""Render the synthetic shapes world to disk in the Karpathy-split layout.

    python -m training.make_world --out data/shapes [--n-train 8000 --p-corr 0.9 --seed 0]
    python -m training.make_world --examples assets/examples      # the app's and README's example scenes
"""
from __future__ import annotations

import argparse
import json
import os
import time

from diffusion_caption.world.scenes import WorldConfig, render_scene, scene_for, write_dataset
from training.common import add_dataclass_args, dataclass_from_args


EXAMPLE_SEED = 2024


def write_examples(folder: str, n: int = 8) -> None:
    """Scenes from an uncorrelated draw (one to three objects), each as PNG beside its ground truth."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        scene, _ = scene_for(EXAMPLE_SEED, "test", i, 0.0)
        render_scene(scene).save(os.path.join(folder, f"shapes_{i:02d}.png"))
        with open(os.path.join(folder, f"shapes_{i:02d}.json"), "w") as f:
            json.dump(scene.to_json(), f, indent=1)
    print(f"wrote {n} example scenes to {folder}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (dataset_shapes.json + images/)")
    p.add_argument("--examples", help="instead, write a few example scenes (PNG + scene JSON) to this folder")
    add_dataclass_args(p, WorldConfig)
    args = p.parse_args(argv)
    cfg = dataclass_from_args(WorldConfig, args)
    if args.examples:
        write_examples(args.examples)
        return
    if not args.out:
        p.error("give --out (a dataset folder) or --examples (a folder for example scenes)")
    t0 = time.time()
    path = write_dataset(args.out, cfg)
    print(f"wrote {path} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
