"""python -m training.benchmark: see the package's docstring (``training/benchmark/__init__.py``)."""
from __future__ import annotations

import argparse
import sys

import torch

from . import __doc__ as DOC
from .measure import measure
from .report import machine_info, markdown, write
from .suites import build


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m training.benchmark", description=DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusion", action="append", required=True, help="a diffusion checkpoint (repeatable)")
    p.add_argument("--baseline", default="assets/checkpoints/shapes-baseline", help="the model every ratio is against")
    p.add_argument("--data-dir", default="data/shapes")
    p.add_argument("--split", default="test")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--n1", type=int, default=16, help="images captioned one at a time for the batch-1 figure")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--other-precision", action="store_true",
                   help="also time each model in the other precision (float32 / bfloat16: a diffusion model's bfloat16 "
                        "copy, the baseline under autocast), as '+fp32' / '+bf16' rows")
    p.add_argument("--out", default="", help="write the rows as JSON here, and the table beside it as .md")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {a.device}: no CUDA device here")
    try:
        batches = [int(b) for b in a.batches.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"--batches {a.batches!r}: give batch sizes such as 1,32") from None
    if not batches or min(batches) < 1 or a.n1 < 1 or a.repeats < 1 or a.warmup < 0:
        raise SystemExit("--batches, --n1 and --repeats must be positive, --warmup non-negative")
    torch.set_num_threads(a.threads)
    suite = build(a.diffusion, a.baseline, a.data_dir, a.split, max(max(batches), a.n1), a.device, a.other_precision)
    rows = measure(suite, batches, a.n1, a.warmup, a.repeats)
    info = machine_info(a.device, a.repeats, a.warmup)
    models = {name: suite.describe(name) for name in suite.models}
    table = markdown(rows, suite.baseline, info, models)
    print(table)
    if a.out:
        command = "python -m training.benchmark " + " ".join(sys.argv[1:] if argv is None else argv)
        write(a.out, rows, info, models, command, table)
    return {"rows": rows, "info": info, "models": models}


if __name__ == "__main__":
    main()
