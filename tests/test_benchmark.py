"""training.benchmark: every model's default call timed side by side, with and without image encoding."""
import json
import os

from app_server import save_tiny_baseline, save_tiny_checkpoint


def test_benchmark_times_every_model_both_ways_at_each_batch(tokenizer, clip_encoder, world_dir, tmp_path):
    from training.benchmark.__main__ import main

    diff = save_tiny_checkpoint(tokenizer, clip_encoder, str(tmp_path / "diff"))
    base = save_tiny_baseline(tokenizer, clip_encoder, str(tmp_path / "base"))
    out = str(tmp_path / "speed.json")
    got = main(["--diffusion", diff, "--baseline", base, "--data-dir", world_dir, "--batches", "1,4", "--n1", "2",
                "--warmup", "0", "--repeats", "2", "--threads", "1", "--out", out])
    res = json.load(open(out))
    rows = res["rows"]
    assert {(r["model"], r["batch"], r["encoding"]) for r in rows} == {
        (m, b, e) for m in ("diff", "base") for b in (1, 4) for e in (True, False)}
    for r in rows:
        assert r["ms_min"] <= r["ms_per_image"] <= r["ms_max"] and abs(r["images_per_s"] * r["ms_per_image"] - 1000) < 1e-6
    md = open(os.path.splitext(out)[0] + ".md").read()
    assert md.count("| base |") == 4 and "| diff | 4 | included |" in md and "1.00x" in md
    assert res["command"].startswith("python -m training.benchmark --diffusion")
    assert res["models"]["diff"]["kind"] == "diffusion" and res["models"]["diff"]["sampling"] == got["models"]["diff"]["sampling"]
    assert res["models"]["base"]["kind"] == "baseline" and res["models"]["diff"]["parameters"] > 0
    assert all(r["peak_bytes"] is None for r in rows)  # measured on CUDA only
    assert "`diff`: kind diffusion" in md


def test_benchmark_times_each_model_in_the_other_precision_too(tokenizer, clip_encoder, world_dir, tmp_path):
    from training.benchmark.__main__ import main

    diff = save_tiny_checkpoint(tokenizer, clip_encoder, str(tmp_path / "diff"))
    base = save_tiny_baseline(tokenizer, clip_encoder, str(tmp_path / "base"))
    got = main(["--diffusion", diff, "--baseline", base, "--data-dir", world_dir, "--batches", "2", "--n1", "1",
                "--warmup", "0", "--repeats", "1", "--threads", "1", "--other-precision"])
    assert {r["model"] for r in got["rows"]} == {"diff", "base", "diff+bf16", "base+bf16"}
    assert got["models"]["diff+bf16"]["precision"] == "bfloat16" and got["models"]["diff+bf16"]["sampling"].endswith(":bf16")
    assert got["models"]["base+bf16"]["precision"] == "bfloat16" and "precision" not in got["models"]["base"]


def test_benchmark_refuses_bad_arguments(tmp_path):
    import pytest

    from training.benchmark.__main__ import main

    with pytest.raises(SystemExit, match="--batches"):
        main(["--diffusion", "x", "--batches", "one"])
    with pytest.raises(SystemExit, match="positive"):
        main(["--diffusion", "x", "--batches", "0"])
