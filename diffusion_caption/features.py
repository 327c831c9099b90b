"""Precomputed image features: the image encoder is frozen, so each image is encoded once and cached.

The cache file name is a hash of the encoder's weights and of the image list, so a changed encoder or
dataset never reads stale features.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .image_encoder import ImageEncoder


def encoder_fingerprint(encoder: ImageEncoder) -> str:
    h = hashlib.sha1(json.dumps(encoder.source, sort_keys=True).encode())
    for k, v in sorted(encoder.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().reshape(-1).numpy().tobytes())
    return h.hexdigest()[:16]


def image_features(encoder: ImageEncoder, image_paths: list[str], cache_dir: str | None = None,
                   batch_size: int = 256, desc: str = "encoding images") -> torch.Tensor:
    """[N, D] L2-normalised features of ``image_paths``, read from or written to ``cache_dir``."""
    cache = None
    if cache_dir:
        key = hashlib.sha1(("\n".join(image_paths)).encode()).hexdigest()[:16]
        cache = os.path.join(cache_dir, f"features-{encoder_fingerprint(encoder)}-{key}.safetensors")
        if os.path.isfile(cache):
            feats = ckpt.load_tensors(cache)["features"]
            if feats.shape[0] == len(image_paths):
                return feats
    chunks = []
    for i in tqdm(range(0, len(image_paths), batch_size), desc=desc, leave=False):
        chunks.append(encoder.encode(image_paths[i:i + batch_size], batch_size=batch_size).cpu())
    feats = torch.cat(chunks) if chunks else torch.zeros(0, encoder.feature_dim)
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        ckpt.save_tensors({"features": feats}, cache)
    return feats
