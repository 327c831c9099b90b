"""Counting single-object attribute misses on a held-out set: the interval, the counting, the command."""
import json
import math

import pytest
import torch

from diffusion_caption import BaselineCaptioner
from diffusion_caption.baseline.captioner import PrefixCaptioner, baseline_preset
from diffusion_caption.world.scenes import Scene, ShapeObject
from research import attribute_errors


def test_clopper_pearson_matches_known_intervals():
    lo, hi = attribute_errors.clopper_pearson(1, 10)
    assert lo == pytest.approx(0.002529, abs=1e-6) and hi == pytest.approx(0.445016, abs=1e-6)
    lo, hi = attribute_errors.clopper_pearson(0, 3963)  # zero misses: the upper end is 1 - 0.025 ** (1 / n)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 3963), rel=1e-9)
    assert attribute_errors.clopper_pearson(5, 5)[1] == 1.0
    with pytest.raises(ValueError):
        attribute_errors.clopper_pearson(0, 0)


def _scene(color, shape, bg="gray"):
    return Scene([ShapeObject(shape, color, "small", 32.0, 32.0, 8.0)], bg)


def test_count_per_draw_distinct_and_every_draw():
    scenes = [_scene("red", "circle"), _scene("blue", "square"), _scene("purple", "star", "pink")]
    draws = [["a red circle on a gray background", "a pink square on a gray background",
              "a pink star on a pink background"],
             ["a red circle on a gray background", "a blue square on a gray background",
              "a pink background with a pink background"]]
    r = attribute_errors.count(draws, scenes, examples=5)
    assert r["captions"] == 6
    assert r["colour"]["misses"] == 3 and r["colour"]["per_draw"] == [2, 1]
    assert r["colour"]["distinct_images"] == 2 and r["colour"]["every_draw"] == 1
    assert r["shape"]["misses"] == 1 and r["shape"]["per_draw"] == [0, 1]  # no shape named in the last caption
    lo, hi = r["colour"]["ci95"]
    assert lo < 0.5 < hi and r["colour"]["rate"] == 0.5
    assert [e["image"] for e in r["colour_examples"]] == [1, 2]  # each image listed once, first draw first
    assert r["colour_examples"][1]["truth"] == "small purple star on pink"


def test_command_counts_a_baseline_and_a_diffusion_checkpoint(make_captioner, tokenizer, clip_encoder, world_dir,
                                                              tmp_path):
    diff_dir, base_dir = str(tmp_path / "diffusion"), str(tmp_path / "baseline")
    make_captioner(sampling=dict(steps=1)).save_pretrained(diff_dir)
    torch.manual_seed(0)
    cfg = baseline_preset("tiny", vocab_size=tokenizer.vocab_size, cond_dim=clip_encoder.feature_dim,
                          bos_id=tokenizer.cls_id, eos_id=tokenizer.sep_id)
    BaselineCaptioner(cfg, PrefixCaptioner(cfg), clip_encoder, tokenizer).save_pretrained(base_dir)
    out = tmp_path / "errors.md"
    res = attribute_errors.main(["--checkpoints", f"{base_dir},{diff_dir}", "--data-dir", world_dir, "--split", "val",
                                 "--seeds", "0,1", "--settings", "ddim:1:1,ddpm:2:1:clamp", "--cache-dir",
                                 str(tmp_path / "c"), "--out", str(out)])["results"]
    assert [(r["model"], r["setting"], r["draws"]) for r in res] == [
        (base_dir, "greedy", 1), (diff_dir, "DDIM 1, guidance 1", 2), (diff_dir, "DDPM 2, guidance 1, clamp", 2)]
    for r in res:
        for attr in ("colour", "shape"):
            a = r[attr]
            assert sum(a["per_draw"]) == a["misses"] <= r["captions"] == r["images"] * r["draws"]
            assert a["ci95"][0] <= a["rate"] <= a["ci95"][1] and math.isclose(a["rate"], a["misses"] / r["captions"])
    text = out.read_text()
    assert f"| {base_dir} | greedy |" in text and f"| {diff_dir} | DDPM 2, guidance 1, clamp |" in text
    assert json.loads((tmp_path / "errors.json").read_text())["results"][1]["colour"] == res[1]["colour"]
    with pytest.raises(SystemExit, match="--settings"):
        attribute_errors.main(["--checkpoints", diff_dir, "--data-dir", world_dir, "--split", "val",
                               "--settings", "ddim:0:1", "--cache-dir", str(tmp_path / "c")])
