import json
import subprocess
import sys


def test_cli_prints_captions_and_trace(make_captioner, scene_image, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    make_captioner().save_pretrained(ckpt)
    base = [sys.executable, "-m", "diffusion_caption", "--checkpoint", ckpt, "--steps", "4"]
    out = subprocess.run(base + [scene_image, "--trace"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(scene_image + ":")
    assert sum(1 for line in lines if line.strip().startswith("step")) == 4
    js = subprocess.run(base + [scene_image, "--json"], capture_output=True, text=True, timeout=120)
    trace = json.loads(js.stdout)
    assert len(trace["steps"]) == 4 and trace["settings"]["steps"] == 4
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    res = subprocess.run(base + [str(bad), scene_image], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "not an image" in res.stderr and "Traceback" not in res.stderr
    assert scene_image in res.stdout  # the good image is still captioned
    missing = subprocess.run([sys.executable, "-m", "diffusion_caption", "--checkpoint", str(tmp_path / "nope"),
                              scene_image], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "not found" in missing.stderr
    # MBR and spacing from the command line; a bad value is one message before any image is read
    mbr = subprocess.run(base + [scene_image, "--candidates", "3", "--spacing", "trailing^2", "--json"],
                         capture_output=True, text=True, timeout=120)
    trace = json.loads(mbr.stdout)
    assert len(trace["candidates"]) == 3 and trace["text"] == trace["candidates"][trace["chosen"]]
    assert trace["settings"]["spacing"] == "trailing^2" and trace["settings"]["candidates"] == 3
    bad_k = subprocess.run(base + [scene_image, "--candidates", "0"], capture_output=True, text=True, timeout=120)
    assert bad_k.returncode == 2 and "candidates must be" in bad_k.stderr and "Traceback" not in bad_k.stderr
    bad_p = subprocess.run(base + [scene_image, "--candidates", "4", "--propose", "rounding", "--select", "mbr"],
                           capture_output=True, text=True, timeout=120)
    assert bad_p.returncode == 2 and "select='clip'" in bad_p.stderr and "Traceback" not in bad_p.stderr


def test_cli_ranks_roundings_with_another_clips_text_tower(tmp_path, capsys):
    from diffusion_caption import Captioner
    from diffusion_caption.selection.rerank import clip_scores

    student, scorer = "assets/checkpoints/shapes-diffusion-fast-small", "assets/checkpoints/shapes-clip-binding"
    image = "assets/examples/shapes_01.png"
    base = [sys.executable, "-m", "diffusion_caption", "--checkpoint", student, "--candidates", "16",
            "--select", "clip", "--propose", "rounding", "--json", image]
    out = subprocess.run(base + ["--scorer", scorer], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    trace = json.loads(out.stdout)
    assert trace["text"] == trace["candidates"][trace["chosen"]]
    cap = Captioner.from_pretrained(student, scorer=scorer)
    scores = clip_scores(cap.scorer, cap.encode_images([image]), [trace["candidates"]])[0]
    assert trace["chosen"] == max(range(len(scores)), key=lambda j: (scores[j], -j))
    # no CLIP there; a CLIP without its text tokenizer; a CLIP with another image tower: one line each, exit 2
    import torch

    from diffusion_caption.image_encoder import ImageEncoder

    moved = ImageEncoder.from_pretrained(scorer)
    with torch.no_grad():
        moved.model.visual.attnpool.c_proj.bias.add_(0.01)
    moved.save_pretrained(str(tmp_path / "moved"))
    import shutil

    from diffusion_caption.__main__ import main

    mute = shutil.copytree("assets/checkpoints/shapes-clip", str(tmp_path / "mute"),
                           ignore=shutil.ignore_patterns("tokenizer*"))  # the CLIP without its text tokenizer
    for folder, message in ((str(tmp_path / "nope"), "not found"),
                            (mute, "no text tokenizer"),
                            (str(tmp_path / "moved"), "image tower differs")):
        assert main(base[3:] + ["--scorer", folder]) == 2
        err = capsys.readouterr().err
        assert message in err and "scorer" in err, (folder, err)
