"""Timing: calls interleaved round-robin over the models, repeated, each figure the median with its range.

Interleaving puts a change in the machine's load on every model alike. On CUDA each call is
synchronised before the clock stops, and the peak memory a model's calls allocate is read from
``torch.cuda.max_memory_allocated``; on the CPU the peak is not measured (None).
"""
from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def peak_memory(fn, device: torch.device) -> int | None:
    """Bytes allocated at the peak of one call beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure(suite, batches: list[int], n1: int, warmup: int, repeats: int) -> list[dict]:
    """One row per model, batch size and way (image encoding included or not)."""
    rows = []
    for B in batches:
        plan = {(name, way): fn for name in suite.models for way, fn in suite.calls(name, B, n1).items()}
        devices = {name: suite.models[name].device for name in suite.models}
        for (name, _), fn in plan.items():
            for _ in range(warmup):
                timed(fn, devices[name])
        times = {k: [] for k in plan}
        for _ in tqdm(range(repeats), desc=f"timing batch {B}", leave=False):
            for (name, way), fn in plan.items():  # round-robin: every model once per repeat
                times[(name, way)].append(timed(fn, devices[name]))
        for (name, way), ts in times.items():
            n = n1 if B == 1 else B
            per = [t / n for t in ts]
            rows.append({"model": name, "batch": B, "encoding": way == "images",
                         "ms_per_image": 1000 * statistics.median(per), "ms_min": 1000 * min(per),
                         "ms_max": 1000 * max(per), "images_per_s": 1 / statistics.median(per),
                         "peak_bytes": peak_memory(plan[(name, way)], devices[name])})
    return rows
