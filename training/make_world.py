"""Render the synthetic shapes world to disk in the Karpathy-split layout.

    python -m training.make_world --out data/shapes [--n-train 8000 --p-corr 0.9 --seed 0]
"""
from __future__ import annotations

import argparse
import time

from diffusion_caption.world import WorldConfig, write_dataset
from training.common import add_dataclass_args, dataclass_from_args


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (dataset_shapes.json + images/)")
    add_dataclass_args(p, WorldConfig)
    args = p.parse_args(argv)
    cfg = dataclass_from_args(WorldConfig, args)
    t0 = time.time()
    path = write_dataset(args.out, cfg)
    print(f"wrote {path} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
