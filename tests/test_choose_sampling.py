"""Choosing a checkpoint's sampling defaults on val: the selection rule and the command end to end."""
import pytest

from training import choose_sampling


def test_choose_prefers_the_best_score_then_the_fewest_calls():
    rows = [{"setting": "a", "score": 0.90, "calls": 40}, {"setting": "b", "score": 0.95, "calls": 200},
            {"setting": "c", "score": 0.945, "calls": 100}]
    assert choose_sampling.choose(rows, tie=0.0)["setting"] == "b"
    assert choose_sampling.choose(rows, tie=0.01)["setting"] == "c"  # within 0.01 of the best, half the calls
    assert choose_sampling.choose(rows, tie=0.1)["setting"] == "a"


def test_parse_setting():
    assert choose_sampling.parse_setting("ddpm:50:5:clamp") == {"sampler": "ddpm", "steps": 50, "guidance": 5.0,
                                                                "clamp": True, "spacing": "linspace",
                                                                "candidates": 1, "select": "mbr", "propose": "noise"}
    assert choose_sampling.parse_setting("DDIM:20:1")["clamp"] is False
    s = choose_sampling.parse_setting("ddpm:10:5:clamp:trailing^2")
    assert s["clamp"] is True and s["spacing"] == "trailing^2"
    assert choose_sampling.parse_setting("ddim:5:1:trailing") == {"sampler": "ddim", "steps": 5, "guidance": 1.0,
                                                                  "clamp": False, "spacing": "trailing",
                                                                  "candidates": 1, "select": "mbr", "propose": "noise"}
    assert choose_sampling.name(s) == "DDPM 10, guidance 5, clamp, trailing^2"
    # K candidates per image, kept by consensus unless CLIP score is named
    k = choose_sampling.parse_setting("ddpm:2:1:clamp:trailing^2:k8:clip")
    assert (k["candidates"], k["select"], k["spacing"], k["clamp"]) == (8, "clip", "trailing^2", True)
    assert choose_sampling.name(k) == "DDPM 2, guidance 1, clamp, trailing^2, 8 candidates by CLIP"
    assert choose_sampling.parse_setting("ddim:1:1:k4")["select"] == "mbr"
    # ...from the likeliest roundings of one draw when named
    r = choose_sampling.parse_setting("ddim:1:1:k8:clip:rounding")
    assert (r["candidates"], r["select"], r["propose"], r["spacing"]) == (8, "clip", "rounding", "linspace")
    assert choose_sampling.name(r) == "DDIM 1, guidance 1, 8 roundings by CLIP"
    for bad in ("ddim:20", "ddim:x:1", "ddim:20:1:yes", "ddim:20:1:clamp:clamp", "ddim:5:1:trailing:linspace",
                "ddim:5:1:trailing^0", "ddim:1:1:clip", "ddim:1:1:k2:k4", "ddim:1:1:k4:clip:mbr",
                "ddim:1:1:rounding", "ddim:1:1:k4:clip:rounding:noise"):
        with pytest.raises(SystemExit, match="--settings"):
            choose_sampling.parse_setting(bad)


def test_command_scores_each_setting_and_writes_the_choice(make_captioner, world_dir, tmp_path, capsys):
    from diffusion_caption import Captioner

    d = str(tmp_path / "ckpt")
    make_captioner().save_pretrained(d)
    out = choose_sampling.main(["--checkpoint", d, "--data-dir", world_dir, "--split", "val", "--settings",
                                "ddim:2:1,ddpm:3:2:clamp:trailing^2", "--seeds", "0,1", "--cache-dir", str(tmp_path / "c"),
                                "--write", "--out", str(tmp_path / "choice.md")])
    rows, best = out["rows"], out["chosen"]
    assert [r["setting"] for r in rows] == ["DDIM 2, guidance 1", "DDPM 3, guidance 2, clamp, trailing^2"]
    assert [r["calls"] for r in rows] == [2, 6]
    for r in rows:
        assert 0.0 <= r["colour"] <= 1.0 and 0.0 <= r["shape"] <= 1.0 and len(r["colour per seed"].split()) == 2
    assert best["score"] == max(r["score"] for r in rows)
    cap = Captioner.from_pretrained(d)
    c = cap.config
    assert (c.sampler, c.sample_steps, c.sample_guidance, c.sample_clamp, c.sample_spacing) == (
        best["sampler"], best["steps"], best["guidance"], best["clamp"], best["spacing"])
    assert c.extra["sampling_choice"]["chosen"] == best["setting"]
    assert "chosen: " + best["setting"] in open(tmp_path / "choice.md").read()
    with pytest.raises(SystemExit, match="steps must be an integer"):
        choose_sampling.main(["--checkpoint", d, "--data-dir", world_dir, "--settings", "ddim:0:1"])
