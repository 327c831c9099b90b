"""The quality-against-steps/guidance sweep command, end to end on a tiny checkpoint and split."""
import json
import os


def test_sweep_writes_table_plot_and_json(make_captioner, world_dir, tmp_path, capsys):
    from PIL import Image

    from research import sweep

    ckpt_dir = str(tmp_path / "ckpt")
    make_captioner(sampling=dict(guidance=2.0)).save_pretrained(ckpt_dir)
    out = str(tmp_path / "sweep" / "s")
    sweep.main(["--checkpoint", ckpt_dir, "--data-dir", world_dir, "--split", "test", "--limit", "4",
                "--steps", "1,3", "--samplers", "ddim,ddpm", "--guidance", "1,3", "--guidance-steps", "2",
                "--tokenizer", "simple", "--no-meteor", "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"), "--out", out])
    res = json.load(open(out + ".json"))["results"]
    steps = [(r["settings"]["sampler"], r["settings"]["steps"], r["settings"]["guidance"])
             for r in res if r["sweep"] == "steps"]
    # the steps sweep runs at the checkpoint's own guidance unless told otherwise
    assert steps == [("ddim", 1, 2.0), ("ddim", 3, 2.0), ("ddpm", 1, 2.0), ("ddpm", 3, 2.0)]
    guid = [(r["settings"]["steps"], r["settings"]["guidance"]) for r in res if r["sweep"] == "guidance"]
    assert guid == [(2, 1.0), (2, 3.0)]
    assert all(r["n_images"] == 4 and "BLEU-4" in r["metrics"] for r in res)
    md = open(out + ".md").read()
    assert md.startswith("| sweep |") and md.count("\n") == 2 + 6
    with Image.open(out + ".png") as im:
        assert im.size[0] > 800
    assert "wrote" in capsys.readouterr().out

    sweep.main(["--checkpoint", ckpt_dir, "--data-dir", world_dir, "--split", "test", "--limit", "2",
                "--steps", "2", "--samplers", "ddim", "--steps-guidance", "1", "--guidance", "",
                "--tokenizer", "simple", "--no-meteor", "--cache-dir", str(tmp_path / "cache"), "--out", out + "2"])
    res = json.load(open(out + "2.json"))["results"]
    assert [(r["sweep"], r["settings"]["guidance"]) for r in res] == [("steps", 1.0)]
    assert os.path.getsize(out + "2.png") > 1000

    # several timestep spacings: one steps sweep per sampler and spacing, and a plot comparing them
    sweep.main(["--checkpoint", ckpt_dir, "--data-dir", world_dir, "--split", "test", "--limit", "2",
                "--steps", "1,2", "--samplers", "ddim", "--spacings", "linspace,trailing^2", "--guidance", "",
                "--tokenizer", "simple", "--no-meteor", "--cache-dir", str(tmp_path / "cache"), "--out", out + "3"])
    res = json.load(open(out + "3.json"))["results"]
    assert [(r["settings"]["spacing"], r["settings"]["steps"]) for r in res] == [
        ("linspace", 1), ("linspace", 2), ("trailing^2", 1), ("trailing^2", 2)]
    with Image.open(out + "3_spacing.png") as im:
        assert im.size[0] > 1200  # three metric panels
    assert "| trailing^2 |" in open(out + "3.md").read()
    import pytest

    with pytest.raises(SystemExit, match="spacing must be"):
        sweep.main(["--checkpoint", ckpt_dir, "--data-dir", world_dir, "--split", "test", "--limit", "2",
                    "--spacings", "leading", "--guidance", "", "--cache-dir", str(tmp_path / "cache"), "--out", out + "4"])
