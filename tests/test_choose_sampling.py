"""Choosing a checkpoint's sampling defaults on val: the selection rule and the command end to end."""
import pytest

from research import choose_sampling


def test_choose_prefers_the_best_score_then_the_fewest_calls():
    rows = [{"setting": "a", "score": 0.90, "calls": 40}, {"setting": "b", "score": 0.95, "calls": 200},
            {"setting": "c", "score": 0.945, "calls": 100}]
    assert choose_sampling.choose(rows, tie=0.0)["setting"] == "b"
    assert choose_sampling.choose(rows, tie=0.01)["setting"] == "c"  # within 0.01 of the best, half the calls
    assert choose_sampling.choose(rows, tie=0.1)["setting"] == "a"


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
    assert cap.sampling.spec == best["spec"] and cap.sampling.describe() == best["setting"]
    c = cap.config
    assert c.extra["sampling_choice"]["chosen"] == best["setting"]
    assert "chosen: " + best["setting"] in open(tmp_path / "choice.md").read()
    with pytest.raises(SystemExit, match="steps must be an integer"):
        choose_sampling.main(["--checkpoint", d, "--data-dir", world_dir, "--settings", "ddim:0:1"])
