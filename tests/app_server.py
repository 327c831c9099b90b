"""Helpers for the app tests: a tiny checkpoint and example folder on disk, and ``python app.py`` on a free port."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_tiny_checkpoint(tokenizer, clip_encoder, path: str, seed: int = 0) -> str:
    """A randomly initialised tiny captioner saved as a real checkpoint directory."""
    import torch

    from diffusion_caption import Captioner
    from diffusion_caption.config import preset
    from diffusion_caption.denoiser import Denoiser

    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, cond_dim=clip_encoder.feature_dim)
    Captioner(cfg, Denoiser(cfg), clip_encoder, tokenizer).save_pretrained(path)
    return path


def save_tiny_baseline(tokenizer, clip_encoder, path: str, seed: int = 0) -> str:
    """A randomly initialised tiny autoregressive baseline saved as a real checkpoint directory."""
    import torch

    from diffusion_caption.baseline.captioner import BaselineCaptioner, PrefixCaptioner, baseline_preset

    torch.manual_seed(seed)
    cfg = baseline_preset("tiny", vocab_size=tokenizer.vocab_size, cond_dim=clip_encoder.feature_dim,
                          bos_id=tokenizer.cls_id, eos_id=tokenizer.sep_id)
    BaselineCaptioner(cfg, PrefixCaptioner(cfg), clip_encoder, tokenizer).save_pretrained(path)
    return path


def write_examples(path: str) -> list[str]:
    """Two shapes scenes (PNG + scene JSON) and one plain picture."""
    from PIL import Image

    from diffusion_caption.world.scenes import render_scene, sample_scene

    os.makedirs(path, exist_ok=True)
    out = []
    for i in range(2):
        scene = sample_scene(np.random.default_rng(100 + i), n_objects=i + 1)
        png = os.path.join(path, f"shapes_{i:02d}.png")
        render_scene(scene).save(png)
        with open(os.path.join(path, f"shapes_{i:02d}.json"), "w") as f:
            json.dump(scene.to_json(), f)
        out.append(png)
    photo = os.path.join(path, "photo_noise.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(photo)
    return out + [photo]


def memory_mib(pid: int) -> dict:
    """A process's resident memory now (``rss``) and its peak so far (``peak``, VmHWM), in MiB (Linux)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss" if key == "VmRSS" else "peak"] = int(value.split()[0]) / 1024
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(checkpoint: str, examples: str, cache_dir: str, startup_timeout: float = 120.0,
                processes: list | None = None, baseline: str = ""):
    """Serve ``app.py`` on a free port (PCA vocabulary map, no baseline unless ``baseline``) and yield its URL.

    ``processes``, when given, receives the server's ``subprocess.Popen`` (to read its memory, say); the
    server's output is in ``cache_dir/app-PORT.log``."""
    port = free_port()
    cmd = [sys.executable, os.path.join(ROOT, "app.py"), "--checkpoint", checkpoint, "--baseline", baseline,
           "--port", str(port), "--vocab-map", "pca", "--cache-dir", cache_dir, "--examples", examples]
    log = open(os.path.join(cache_dir, f"app-{port}.log"), "w+")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if processes is not None:
        processes.append(proc)
    url = f"http://127.0.0.1:{port}/"
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"app.py exited with {proc.returncode} before serving:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() - t0 > startup_timeout:
                log.seek(0)
                raise RuntimeError(f"app.py did not serve {url} within {startup_timeout:.0f} s:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
