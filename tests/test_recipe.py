"""The real-photo recipe (``training.recipe``) and the fixes found when its path was tried offline.

The end-to-end test runs the whole recipe on a small Karpathy-layout fixture of photographs and rendered
scenes, with random-weight stand-ins of the real architectures saved locally: open_clip's ViT-B-32
(``pretrained=None``, saved to a file), a DistilBERT and a GPT-2 of their real configurations shrunk in
depth and width, and tokenizers trained on the fixture's words.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import pytest
import torch

from diffusion_caption import hub
from training import train_baseline, train_diffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_hub(monkeypatch):
    """The hub out of reach the way it is on a machine without a network: its endpoint refuses connections."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    hub._reachable.clear()
    yield
    hub._reachable.clear()


# ------------------------------------------------------------------------------------------------ offline fixes
def test_encoder_dir_without_tokenizer_is_refused(tmp_path):
    enc = tmp_path / "distilbert"
    enc.mkdir()
    with pytest.raises(SystemExit, match="--tokenizer DIR"):
        train_diffusion.configs_from_args(["--preset", "base", "--encoder", str(enc)])
    tcfg, mcfg = train_diffusion.configs_from_args(["--preset", "base", "--encoder", str(enc), "--tokenizer", str(enc)])
    assert mcfg.encoder == str(enc) and tcfg.tokenizer == str(enc)


def test_offline_the_commands_fail_at_once_naming_each_model_and_its_flag(no_hub, world_dir, tmp_path):
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        train_diffusion.main(["--preset", "base", "--data", "shapes", "--data-dir", world_dir, "--run-dir",
                              str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--device", "cpu"])
    msg = str(e.value)
    assert "cannot be reached" in msg
    assert "'distilbert-base-uncased': give a local copy with --encoder DIR" in msg
    assert "--tokenizer DIR" in msg
    assert "CLIP 'ViT-B-32-quickgelu:openai'" in msg and "--clip open_clip:ViT-B-32-quickgelu:FILE" in msg
    with pytest.raises(SystemExit) as e:
        train_baseline.main(["--preset", "base", "--data", "shapes", "--data-dir", world_dir, "--run-dir",
                             str(tmp_path / "r2"), "--out", str(tmp_path / "o2"), "--device", "cpu"])
    assert "GPT-2 'gpt2': give a local copy with --gpt DIR" in str(e.value)
    assert time.time() - t0 < 15  # not a minute of retries per model


def test_offline_hf_hub_offline_is_honoured_without_probing(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://192.0.2.1")  # TEST-NET: a probe would hang, not refuse
    t0 = time.time()
    with pytest.raises(hub.HubUnavailable, match="HF_HUB_OFFLINE is set") as e:
        hub.require([hub.Need("gpt2", "GPT-2", "--gpt2 DIR")])
    assert "--gpt2 DIR" in str(e.value) and time.time() - t0 < 1


def test_open_clip_offline_fails_fast_with_the_flag_for_a_local_file(no_hub):
    from diffusion_caption.image_encoder import ImageEncoder

    t0 = time.time()
    with pytest.raises(RuntimeError, match="--clip open_clip:ViT-B-32-quickgelu:FILE"):
        ImageEncoder.from_open_clip("ViT-B-32-quickgelu", "openai")
    assert time.time() - t0 < 10
    with pytest.raises(RuntimeError, match="no pretrained tag 'openia'.*openai"):
        ImageEncoder.from_open_clip("ViT-B-32-quickgelu", "openia")
    with pytest.raises(RuntimeError, match="not found"):
        ImageEncoder.from_open_clip("ViT-B-32-quickgelu", "/no/such/weights.safetensors")


def test_offline_errors_are_recognised_whatever_their_case():
    assert hub.looks_offline(OSError("We couldn't CONNECT to 'https://huggingface.co' to load this file"))
    assert hub.looks_offline(RuntimeError("HTTPSConnectionPool(host='huggingface.co'): Max retries exceeded"))
    assert hub.looks_offline(FileNotFoundError("Failed to download file (open_clip_pytorch_model.bin)"))
    assert not hub.looks_offline(RuntimeError("size mismatch for visual.proj"))


def test_local_paths_need_no_hub(no_hub, tmp_path):
    hub.require([hub.Need(str(tmp_path), "DistilBERT", "--encoder DIR")])  # exists: nothing to fetch
    with pytest.raises(FileNotFoundError, match="no such file or directory.*--encoder DIR"):
        hub.require([hub.Need(str(tmp_path / "missing"), "DistilBERT", "--encoder DIR")])


def test_evaluate_picks_cuda_when_there_is_one(monkeypatch):
    from training.evaluate import device_from_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_from_args(argparse.Namespace(device="auto")) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_from_args(argparse.Namespace(device="auto")) == "cpu"
    with pytest.raises(SystemExit, match="CUDA is not available"):
        device_from_args(argparse.Namespace(device="cuda"))


def test_app_pairs_a_photo_model_with_no_shapes_baseline(make_captioner):
    import app

    shapes, photo = make_captioner(), make_captioner()
    shapes.config.extra = {"data": "shapes"}
    photo.config.extra = {"data": "flickr8k"}
    assert app.default_baseline({"shapes": shapes}) == (app.DEFAULT_BASELINE, "")
    path, note = app.default_baseline({"shapes": shapes, "mine": photo})
    assert path == "" and "mine was trained on flickr8k" in note and "--baseline" in note
