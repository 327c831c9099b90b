"""Shared fixtures: a tiny shapes world on disk, a tokenizer trained on it, a small CLIP and captioner.

Everything is built here from scratch (no downloads), small enough for the whole suite to run in a few
minutes on 2 CPU cores.
"""
from __future__ import annotations

import os

import pytest
import torch

if "OMP_NUM_THREADS" not in os.environ:  # respect an explicit thread count (e.g. beside a training run)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    from diffusion_caption.world.scenes import WorldConfig, write_dataset

    d = str(tmp_path_factory.mktemp("shapes"))
    write_dataset(d, WorldConfig(n_train=48, n_val=12, n_test=12, seed=3), progress=False)
    return d


@pytest.fixture(scope="session")
def tokenizer(world_dir):
    from diffusion_caption.data import load_karpathy
    from diffusion_caption.tokenizer import CaptionTokenizer

    caps = [c for r in load_karpathy("shapes", world_dir, splits=["train", "val", "test"]) for c in r.captions]
    return CaptionTokenizer.train(caps, vocab_size=512)


@pytest.fixture(scope="session")
def clip_encoder(tokenizer):
    from diffusion_caption.image_encoder import ImageEncoder

    torch.manual_seed(0)
    return ImageEncoder.create_shapes(tokenizer.vocab_size, eos_id=tokenizer.sep_id, pad_id=tokenizer.pad_id)


@pytest.fixture
def make_captioner(tokenizer, clip_encoder):
    """A randomly initialised tiny captioner: config overrides as keyword arguments, its sampling defaults as
    ``sampling`` (a ``SamplingConfig.parse`` form or a dict of settings)."""
    from diffusion_caption import Captioner
    from diffusion_caption.config import preset
    from diffusion_caption.denoiser import Denoiser
    from diffusion_caption.sampling import SamplingConfig

    def make(sampling=None, **overrides):
        torch.manual_seed(overrides.pop("init_seed", 0))
        cfg = preset("tiny", vocab_size=tokenizer.vocab_size, cond_dim=clip_encoder.feature_dim, **overrides)
        if isinstance(sampling, str):
            sampling = SamplingConfig.parse(sampling)
        elif isinstance(sampling, dict):
            sampling = SamplingConfig(**sampling)
        return Captioner(cfg, Denoiser(cfg), clip_encoder, tokenizer, sampling=sampling)

    return make


@pytest.fixture(scope="session")
def scene_image(world_dir):
    return os.path.join(world_dir, "images", "test_000000.png")
