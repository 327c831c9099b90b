"""The real-photo recipe (``training.recipe``) and the fixes found when its path was tried offline.

The end-to-end test runs the whole recipe on a small Karpathy-layout fixture of photographs and rendered
scenes, with random-weight stand-ins of the real architectures saved locally: open_clip's ViT-B-32
(``pretrained=None``, saved to a file), a DistilBERT and a GPT-2 of their real configurations shrunk in
depth and width, and tokenizers trained on the fixture's words.
"""
from __future__ import annotations

import argparse
import shutil
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
    tcfg, mcfg, _ = train_diffusion.configs_from_args(["--preset", "base", "--encoder", str(enc), "--tokenizer", str(enc)])
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


# ------------------------------------------------------------------------------------------------ the recipe end to end
PHOTO_CAPTIONS = {
    "photo_cat.jpg": ["a cat lies on a blanket", "a small cat resting", "a cat looks at the camera"],
    "photo_coffee.jpg": ["a cup of coffee on a table", "a white cup of coffee", "coffee in a cup on a saucer"],
    "photo_rocket.jpg": ["a rocket launches into the sky", "a rocket with smoke and fire", "a rocket lifting off"],
}


def write_fixture(root: str) -> dict:
    """A Karpathy-layout Flickr8k (``dataset_flickr8k.json`` + ``Images/``) of the three shipped photographs and
    twelve rendered scenes, several captions each; a COCO of three of them (``dataset_coco.json`` + ``val2014/``);
    random-weight stand-ins of ViT-B-32, DistilBERT and GPT-2 with tokenizers trained on the fixture's words."""
    import numpy as np
    import open_clip
    from PIL import Image
    from safetensors.torch import save_file
    from tokenizers import ByteLevelBPETokenizer
    from transformers import DistilBertConfig, DistilBertModel, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from diffusion_caption.tokenizer import CaptionTokenizer
    from diffusion_caption.world.scenes import render_scene, sample_captions, sample_scene

    data = os.path.join(root, "data")
    os.makedirs(os.path.join(data, "Images"))
    entries = []
    for i, (fn, caps) in enumerate(PHOTO_CAPTIONS.items()):
        Image.open(os.path.join(ROOT, "assets", "examples", fn)).convert("RGB").resize((160, 120)).save(
            os.path.join(data, "Images", fn))
        entries.append({"filename": fn, "caps": caps})
    rng = np.random.default_rng(0)
    for i in range(12):
        scene = sample_scene(rng, n_objects=1 + i % 2)
        fn = f"scene_{i:02d}.jpg"
        render_scene(scene).convert("RGB").save(os.path.join(data, "Images", fn))
        entries.append({"filename": fn, "caps": sample_captions(scene, rng, k=3)})
    # photographs in every split; train 9, val 3, test 3
    splits = ["train", "val", "test"] + ["train"] * 6 + ["val", "val", "test", "test"] + ["train"] * 2
    images = [{"filename": e["filename"], "imgid": i, "split": s, "sentences": [{"raw": c} for c in e["caps"]]}
              for i, (e, s) in enumerate(zip(entries, splits))]
    with open(os.path.join(data, "dataset_flickr8k.json"), "w") as f:
        json.dump({"dataset": "flickr8k", "images": images}, f)
    coco = os.path.join(root, "coco")
    os.makedirs(os.path.join(coco, "val2014"))
    coco_images = []
    for i, e in enumerate(images[:3]):
        name = f"COCO_val2014_{i:012d}.jpg"
        shutil.copyfile(os.path.join(data, "Images", e["filename"]), os.path.join(coco, "val2014", name))
        coco_images.append({"filepath": "val2014", "filename": name, "imgid": i, "cocoid": i, "split": "test",
                            "sentences": e["sentences"]})
    with open(os.path.join(coco, "dataset_coco.json"), "w") as f:
        json.dump({"dataset": "coco", "images": coco_images}, f)
    words = [c for e in entries for c in e["caps"]]

    # ViT-B-32 (OpenAI's architecture, quick GELU) with random weights, saved as a weights file: --clip open_clip:...:FILE
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    clip_file = os.path.join(root, "vit-b-32-random.safetensors")
    save_file({k: v.half().contiguous() for k, v in clip.state_dict().items()}, clip_file)
    del clip
    # DistilBERT's configuration shrunk in depth and width, with a WordPiece vocabulary of the fixture's words
    bert = os.path.join(root, "distilbert")
    tok = CaptionTokenizer.train(words, vocab_size=200)
    tok.save_pretrained(bert)
    DistilBertModel(DistilBertConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=2, hidden_dim=128,
                                     max_position_embeddings=64)).save_pretrained(bert)
    # GPT-2's configuration shrunk, with a byte-level BPE of the fixture's words
    gpt2 = os.path.join(root, "gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(words, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    hf = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                           unk_token="<|endoftext|>")
    hf.save_pretrained(gpt2)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(hf), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=hf.eos_token_id, eos_token_id=hf.eos_token_id)).save_pretrained(gpt2)
    return {"data": data, "coco": coco, "clip": f"open_clip:ViT-B-32-quickgelu:{clip_file}", "bert": bert,
            "gpt2": gpt2}


class FakeHfApi:
    """Records the calls at the one network boundary, huggingface_hub's HfApi; keeps a copy of each upload."""

    def __init__(self, keep: str):
        self.keep, self.calls = keep, []

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        dest = os.path.join(self.keep, kw["repo_id"].replace("/", "__"))
        shutil.copytree(kw["folder_path"], dest)
        self.calls.append(("upload_folder", {**kw, "files": sorted(os.listdir(dest)), "copy": dest}))


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    from training import recipe

    root = str(tmp_path_factory.mktemp("recipe"))
    fx = write_fixture(root)
    out = os.path.join(root, "out")
    argv = ["--data", "flickr8k", "--data-dir", fx["data"], "--out", out, "--eval-coco", fx["coco"],
            "--clip", fx["clip"], "--encoder", fx["bert"], "--tokenizer", fx["bert"], "--gpt2", fx["gpt2"],
            "--device", "cpu", "--diffusion-steps", "4", "--diffusion-batch", "8", "--baseline-steps", "4",
            "--baseline-batch", "8", "--sampling-grid", "ddim:2:1:trailing^2,ddim:3:1:clamp", "--sampling-limit", "0",
            "--baseline-beams", "1,2", "--batch-size", "16", "--no-meteor", "--push-to-hub", "someone/f8k-test",
            "--hub-clip", "ViT-B-32-quickgelu:openai"]
    api = FakeHfApi(os.path.join(root, "uploaded"))
    t0 = time.time()
    summary = recipe.main(argv, hub_api=api)
    return {"fx": fx, "out": out, "argv": argv, "api": api, "summary": summary, "seconds": time.time() - t0,
            "root": root}


def test_the_recipe_trains_chooses_evaluates_and_documents_both_models(recipe_run):
    from diffusion_caption import Captioner
    from diffusion_caption.baseline import BaselineCaptioner

    out = recipe_run["out"]
    cap = Captioner.from_pretrained(os.path.join(out, "diffusion"))
    c = cap.config
    # the seed's choices, and what the shapes default proved
    o = cap.objective
    assert (c.seq_len, c.predict, o.lambda_round, o.p_uncond, c.fusion) == (16, "x0", 0.3, 0.2, "concat")
    assert c.self_cond and o.focus_steps == 4 and c.dim == 64 and c.n_layers == 2
    assert c.extra["train_config"]["steps"] == 4 and c.extra["clip"] == recipe_run["fx"]["clip"]
    assert cap.image_encoder.source["model_name"] == "ViT-B-32-quickgelu" and cap.image_encoder.feature_dim == 512
    # the sampling stage chose one of the grid on val and stored it as the default
    choice = c.extra["sampling_choice"]
    assert choice["split"] == "val" and choice["n_images"] == 3 and len(choice["rows"]) == 2
    assert (cap.sampling.sampler, cap.sampling.steps) in (("ddim", 2), ("ddim", 3)) and choice["chosen"] in [r["setting"] for r in choice["rows"]]
    photo = os.path.join(ROOT, "assets", "examples", "photo_cat.jpg")
    trace = cap.caption(photo, seed=0)
    assert len(trace.steps) == cap.sampling.steps and isinstance(trace.text, str)
    base = BaselineCaptioner.from_pretrained(os.path.join(out, "baseline"))
    assert base.config.gpt == recipe_run["fx"]["gpt2"] and base.config.n_layer == 2 and base.config.prefix_len == 10
    assert isinstance(base.caption(photo).text, str)
    # every test set evaluated by the COCO protocol, and the numbers in the model cards
    for label in ("diffusion", "baseline-beam1", "baseline-beam2"):
        for data in ("flickr8k", "coco"):
            with open(os.path.join(out, "eval", f"{label}-{data}.json")) as f:
                res = json.load(f)
            assert res["n_images"] == 3 and res["metrics"]["tokenizer"] == "ptb"
            card = open(os.path.join(out, "diffusion" if label == "diffusion" else "baseline", "README.md")).read()
            row = next(line for line in card.splitlines() if line.startswith(f"| {label} | {data} "))
            assert f"{res['metrics']['CIDEr']:.3f} |" in row and f"{res['metrics']['BLEU-4']:.3f}" in row
    card = open(os.path.join(out, "diffusion", "README.md")).read()
    assert card.startswith("---\npipeline_tag: image-to-text") and "chosen on 3 val images" in card
    assert "python app.py --checkpoint someone/f8k-test --baseline someone/f8k-test-baseline" in card
    assert recipe_run["summary"]["results"]["diffusion/coco"]["CIDEr"] == pytest.approx(
        json.load(open(os.path.join(out, "eval", "diffusion-coco.json")))["metrics"]["CIDEr"])


def test_push_uploads_weights_config_tokenizer_and_card_with_the_clip_by_name(recipe_run):
    calls = recipe_run["api"].calls
    assert [(k, kw["repo_id"]) for k, kw in calls] == [
        ("create_repo", "someone/f8k-test"), ("upload_folder", "someone/f8k-test"),
        ("create_repo", "someone/f8k-test-baseline"), ("upload_folder", "someone/f8k-test-baseline")]
    assert all(kw["repo_type"] == "model" for _, kw in calls)
    diffusion, baseline = calls[1][1], calls[3][1]
    for up in (diffusion, baseline):  # exactly these: no CLIP, no training state, no pickle
        assert up["files"] == ["README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
        meta = json.load(open(os.path.join(up["copy"], "config.json")))
        # the CLIP by its open_clip name and tag, not the local random-weight file it was trained with
        assert meta["image_encoder"] == {"kind": "open_clip", "model_name": "ViT-B-32-quickgelu", "pretrained": "openai"}
    # the checkpoints on disk keep their local CLIP file (they still load here)
    local = json.load(open(os.path.join(recipe_run["out"], "diffusion", "config.json")))
    assert local["image_encoder"]["pretrained"].endswith("vit-b-32-random.safetensors")


def test_a_rerun_skips_every_complete_stage(recipe_run, capsys):
    from training import recipe

    out = recipe_run["out"]
    evals = {f: os.path.getmtime(os.path.join(out, "eval", f)) for f in os.listdir(os.path.join(out, "eval"))}
    argv = [a for a in recipe_run["argv"]]
    i = argv.index("--push-to-hub")
    del argv[i:i + 2]
    recipe.main(argv)
    log = capsys.readouterr().out + capsys.readouterr().err
    for stage in ("diffusion", "baseline", "sampling"):
        assert f"stage {stage}: already complete, skipped" in log
    assert "estimated time left" in log
    assert {f: os.path.getmtime(os.path.join(out, "eval", f)) for f in evals} == evals  # nothing re-evaluated


def test_the_app_serves_the_recipe_model_beside_its_gpt2_baseline(recipe_run):
    from gradio_client import Client, handle_file

    from app_server import running_app

    out, cache = recipe_run["out"], os.path.join(recipe_run["root"], "app-cache")
    os.makedirs(cache)
    examples = os.path.join(ROOT, "assets", "examples")
    with running_app(os.path.join(out, "diffusion"), examples, cache, baseline=os.path.join(out, "baseline")) as url:
        final = Client(url, verbose=False).predict(handle_file(os.path.join(examples, "photo_rocket.jpg")),
                                                   api_name="/caption")
        log = open(next(os.path.join(cache, f) for f in os.listdir(cache) if f.startswith("app-"))).read()
    assert final["done"] and len(final["steps"]) == json.load(open(os.path.join(out, "diffusion", "config.json")))[
        "sampling"]["steps"]
    assert "Baseline: baseline" in log


def test_the_recipe_refuses_what_would_fail_later(tmp_path):
    from training import recipe

    d, bert = tmp_path / "data", tmp_path / "bert"
    d.mkdir()
    bert.mkdir()
    base = ["--data-dir", str(d), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="--encoder .* is a local DistilBERT: give its tokenizer too"):
        recipe.main(base + ["--encoder", str(bert)])
    with pytest.raises(SystemExit, match="give --hub-clip MODEL:TAG"):
        recipe.main(base + ["--clip", f"open_clip:ViT-B-32-quickgelu:{bert}/w.safetensors", "--push-to-hub", "a/b"])
    with pytest.raises(SystemExit, match="trained on open_clip 'ViT-B-32-quickgelu' features, not 'ViT-B-16'"):
        recipe.main(base + ["--clip", "open_clip:ViT-B-32-quickgelu:/w.safetensors", "--push-to-hub", "a/b",
                            "--hub-clip", "ViT-B-16:openai"])
    with pytest.raises(SystemExit, match="flickr8k, flickr30k or flickr8k\\+flickr30k"):
        recipe.main(base + ["--data", "coco"])


def test_on_a_zerogpu_space_the_model_handlers_run_under_spaces_gpu(monkeypatch):
    import types

    import app

    assert app.spaces is None and app.model_device() == "cpu"  # no spaces package here: nothing changes
    h = app.Handlers(None)
    assert app.on_gpu(h).api_caption.__func__ is app.Handlers.api_caption
    calls = []

    def gpu(fn):
        def wrapped(*a, **kw):
            calls.append(fn.__name__)
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(app, "spaces", types.SimpleNamespace(GPU=gpu))

    def api_caption(self, *a):
        return "captioned", a

    monkeypatch.setattr(app.Handlers, "api_caption", api_caption)
    h = app.on_gpu(app.Handlers(None))
    assert h.api_caption("img.png", 4) == ("captioned", ("img.png", 4)) and calls == ["api_caption"]
    assert all(getattr(h, n) is not getattr(app.Handlers(None), n) for n in app.GPU_HANDLERS)


def test_a_space_names_its_models_by_variables(monkeypatch):
    import app

    monkeypatch.setenv("DIFFUSION_CAPTION_CHECKPOINT", "someone/f8k, someone/f8k-fast")
    monkeypatch.setenv("DIFFUSION_CAPTION_BASELINE", "someone/f8k-baseline")
    args = app.parse_args([])
    assert args.checkpoints == ["someone/f8k", "someone/f8k-fast"] and args.baseline == "someone/f8k-baseline"
    args = app.parse_args(["--checkpoint", "mine", "--baseline", ""])  # flags win
    assert args.checkpoints == ["mine"] and args.baseline == ""
    monkeypatch.delenv("DIFFUSION_CAPTION_CHECKPOINT")
    monkeypatch.delenv("DIFFUSION_CAPTION_BASELINE")
    args = app.parse_args([])
    assert args.checkpoints == app.DEFAULT_CHECKPOINTS and args.baseline is None


def test_the_recipe_under_torchrun_shares_one_process_group_between_its_trainers(recipe_run):
    """Two gloo ranks: both trainers join one process group (made again, it would reach stale addresses)."""
    import subprocess
    import sys

    fx, out = recipe_run["fx"], os.path.join(recipe_run["root"], "out-ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "training.recipe", "--data-dir", fx["data"], "--out", out, "--clip", fx["clip"], "--encoder", fx["bert"],
           "--tokenizer", fx["bert"], "--gpt2", fx["gpt2"], "--device", "cpu", "--diffusion-steps", "4",
           "--diffusion-batch", "8", "--baseline-steps", "4", "--baseline-batch", "8", "--sampling-grid",
           "ddim:2:1:trailing^2", "--baseline-beams", "1", "--no-meteor"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("world size 2") >= 2  # both trainers ran with DDP
    assert proc.stdout.count("[recipe] done") == 1  # the stages after training ran on rank 0 only
    for name in ("diffusion-flickr8k.json", "baseline-beam1-flickr8k.json"):
        assert os.path.isfile(os.path.join(out, "eval", name))


def test_a_published_checkpoint_loads_its_clip_by_tag_from_the_hub_cache_offline(recipe_run, tmp_path):
    """What a user of the pushed repository gets: the config names ViT-B-32-quickgelu:openai, which open_clip
    fetches through the hub; here the hub cache holds that file (the fixture's weights) and HF_HUB_OFFLINE is set."""
    import subprocess
    import sys

    from diffusion_caption import Captioner

    uploaded = next(kw["copy"] for k, kw in recipe_run["api"].calls
                    if k == "upload_folder" and kw["repo_id"] == "someone/f8k-test")
    repo = tmp_path / "hf" / "hub" / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    weights = recipe_run["fx"]["clip"].split(":", 2)[2]
    shutil.copyfile(weights, repo / "snapshots" / ("0" * 40) / "open_clip_model.safetensors")
    photo = os.path.join(ROOT, "assets", "examples", "photo_cat.jpg")
    code = ("import sys; from diffusion_caption import Captioner; cap = Captioner.from_pretrained(sys.argv[1]); "
            "print(cap.image_encoder.source); print(cap.image_encoder.encode([sys.argv[2]])[0, :4].tolist())")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", code, uploaded, photo], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    source, feats = proc.stdout.strip().splitlines()[-2:]
    assert "'pretrained': 'openai'" in source
    local = Captioner.from_pretrained(os.path.join(recipe_run["out"], "diffusion")).image_encoder.encode([photo])[0, :4]
    assert torch.allclose(torch.tensor(json.loads(feats)), local, atol=1e-5)  # the same weights, by tag
