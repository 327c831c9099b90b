"""The benchmark's table (markdown) and record (JSON): every row beside the baseline's at the same batch
size and way, as a speed ratio (> 1: faster than the baseline)."""
from __future__ import annotations

import json
import os
import platform
import time

import torch


def machine_info(device: str, repeats: int, warmup: int) -> dict:
    info = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeats": repeats, "warmup": warmup,
            "load_average": os.getloadavg()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def markdown(rows: list[dict], baseline: str, info: dict, models: dict) -> str:
    ref = {(r["batch"], r["encoding"]): r for r in rows if r["model"] == baseline}
    where = info.get("gpu") or info["machine"]
    lines = [f"Machine: {where}, torch {info['torch']} with {info['threads']} threads; {info['when']}; "
             f"{info['repeats']} interleaved repeats after {info['warmup']} warm-up calls, median (min-max).", ""]
    lines += [f"- `{name}`: " + ", ".join(f"{k} {v}" for k, v in m.items()) for name, m in models.items()]
    memory = any(r["peak_bytes"] is not None for r in rows)
    lines += ["", "| model | batch | image encoding | ms per image | images/s | vs baseline (speed) |"
              + (" peak MiB |" if memory else ""), "|---|---|---|---|---|---|" + ("---|" if memory else "")]
    for r in rows:
        b = ref[(r["batch"], r["encoding"])]
        line = (f"| {r['model']} | {r['batch']} | {'included' if r['encoding'] else 'excluded'} | "
                f"{r['ms_per_image']:.2f} ({r['ms_min']:.2f}-{r['ms_max']:.2f}) | {r['images_per_s']:.0f} | "
                f"{b['ms_per_image'] / r['ms_per_image']:.2f}x |")
        if memory:
            line += f" {r['peak_bytes'] / 2**20:.1f} |" if r["peak_bytes"] is not None else " |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def write(out: str, rows: list[dict], info: dict, models: dict, command: str, table: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"info": info, "models": models, "rows": rows, "command": command}, f, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table)
