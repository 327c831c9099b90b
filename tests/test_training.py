"""The training commands end to end on the tiny world: they run, save loadable checkpoints, resume."""
import os

import pytest
import torch
from safetensors.torch import load_file

from diffusion_caption import Captioner
from training import train_clip, train_diffusion


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, world_dir):
    out = str(tmp_path_factory.mktemp("clip") / "shapes-clip")
    run = str(tmp_path_factory.mktemp("clip-run"))
    train_clip.main(["--data-dir", world_dir, "--out", out, "--run-dir", run, "--steps", "3", "--batch-size", "16", "--corpus-size", "24",
                     "--val-every", "3", "--ckpt-every", "3", "--warmup", "1", "--device", "cpu"])
    return out


def test_train_clip_writes_an_open_clip_folder(clip_dir, scene_image):
    from diffusion_caption.image_encoder import ImageEncoder
    from diffusion_caption.tokenizer import CaptionTokenizer

    assert {"open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json"} <= set(os.listdir(clip_dir))
    enc = ImageEncoder.from_pretrained(clip_dir)
    f = enc.encode([scene_image])
    assert f.shape == (1, 128) and torch.allclose(f.norm(dim=-1), torch.ones(1), atol=1e-5)
    tok = CaptionTokenizer.from_pretrained(clip_dir)
    assert tok.decode(tok.encode(["a red circle"], 8)[0].tolist()) == "a red circle"


def _train(world_dir, clip_dir, tmp, *extra):
    args = ["--preset", "tiny", "--data-dir", world_dir, "--clip", clip_dir, "--out", str(tmp / "out"),
            "--run-dir", str(tmp / "run"), "--cache-dir", str(tmp.parent / "cache"), "--steps", "6",
            "--batch-size", "8", "--val-every", "3", "--ckpt-every", "2", "--device", "cpu", "--dropout", "0.1",
            *extra]
    train_diffusion.main(args)
    return tmp / "out", tmp / "run"


def test_train_diffusion_end_to_end_and_bitwise_resume(world_dir, clip_dir, tmp_path, scene_image):
    out, run = _train(world_dir, clip_dir, tmp_path / "a")
    cap = Captioner.from_pretrained(str(out))
    assert len(cap.caption(scene_image, steps=3).steps) == 3
    assert cap.config.extra["data"] == "shapes"
    assert os.path.isfile(run / "log.jsonl")

    # killed after step 3 (between checkpoints at 2 and 4), resumed: identical to the uninterrupted run
    _train(world_dir, clip_dir, tmp_path / "b", "--stop-at", "3")
    assert not (tmp_path / "b" / "out").exists()
    out_b, _ = _train(world_dir, clip_dir, tmp_path / "b", "--resume", "true")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(out_b / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_flags_and_wrong_types_fail_loudly(world_dir):
    with pytest.raises(SystemExit):
        train_diffusion.main(["--no-such-flag", "1"])
    with pytest.raises(SystemExit):
        train_diffusion.main(["--steps", "many"])


def test_torchrun_ddp_on_cpu(world_dir, clip_dir, tmp_path):
    """Two gloo ranks through torchrun: the multi-GPU code path, run on CPU."""
    import subprocess
    import sys

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training.train_diffusion", "--preset", "tiny", "--data-dir", world_dir, "--clip", clip_dir,
           "--out", str(out), "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
           "--steps", "4", "--batch-size", "8", "--val-every", "2", "--ckpt-every", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    assert len(Captioner.from_pretrained(str(out)).caption_batch(features=torch.randn(2, 128), steps=2)) == 2
