"""The evaluation module and command: attribute report, bias score, and the command end to end."""
import json
import os

import pytest

from diffusion_caption.eval.evaluation import (attribute_report, bias_report, load_model, markdown_table,
                                          summary_row, typical_background)
from diffusion_caption.eval.metrics import java_available
from diffusion_caption.world.scenes import Scene, ShapeObject


def one(shape, color, background, size="small"):
    return Scene([ShapeObject(shape, color, size, 64.0, 64.0, 12.0)], background)


def test_attribute_report_by_hand():
    scenes = [one("circle", "red", "pink"), one("star", "blue", "black", "large"), one("square", "white", "gray")]
    caps = ["a small red circle on a pink background",          # all right
            "a small blue circle on a black background",        # shape and size wrong, circle hallucinated
            "a white background"]                               # background wrong, no object named
    rep = attribute_report(caps, scenes)
    assert rep["n"] == 3
    assert rep["color"] == {"acc": 1.0, "mentioned": pytest.approx(2 / 3)}
    assert rep["shape"]["acc"] == pytest.approx(0.5)
    assert rep["size"]["acc"] == pytest.approx(0.5)
    assert rep["background"]["acc"] == pytest.approx(2 / 3) and rep["background"]["mentioned"] == 1.0
    assert rep["hallucination"] == pytest.approx(1 / 3)
    so = rep["single_object"]
    assert so["n"] == 3 and so["color_acc"] == pytest.approx(2 / 3) and so["shape_acc"] == pytest.approx(1 / 3)
    whole = rep["whole"]  # only the first caption is wholly right; a background alone is not a whole sentence
    assert whole["n"] == 3 and whole["whole"] == pytest.approx(1 / 3) and whole["whole_1obj"] == pytest.approx(1 / 3)
    assert whole["whole_2obj"] is None and whole["defect_rate"] == pytest.approx(1 / 3)
    assert whole["defects"] == {"misplaced background": 1}
    assert whole["reasons"]["missing object"] == 1 and whole["reasons"]["wrong background"] == 1


def test_bias_score_is_typical_minus_counterfactual():
    typical = [one("circle", "red", "pink"), one("star", "blue", "black")]
    counter = [one("circle", "red", "black"), one("star", "blue", "pink")]
    assert all(map(typical_background, typical)) and not any(map(typical_background, counter))
    # a model that reads the shape off the background: right on typical scenes, wrong on the others
    caps = ["a red circle on a pink background", "a blue star on a black background",
            "a red star on a black background", "a blue circle on a pink background"]
    rep = bias_report(caps, typical + counter)
    assert rep["typical"]["n"] == 2 and rep["counterfactual"]["n"] == 2
    assert rep["bias"]["shape"] == pytest.approx(1.0)
    assert rep["bias"]["color"] == pytest.approx(0.0) and rep["bias"]["background"] == pytest.approx(0.0)


def test_markdown_table_columns_and_missing_cells():
    md = markdown_table([{"model": "a", "BLEU-4": 0.5}, {"model": "b", "CIDEr": 1.25}])
    lines = md.strip().splitlines()
    assert lines[0] == "| model | BLEU-4 | CIDEr |"
    assert lines[2] == "| a | 0.500 | - |" and lines[3] == "| b | - | 1.250 |"


def test_load_model_rejects_unknown_format(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    from diffusion_caption import CheckpointError

    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_model(str(tmp_path))


def test_evaluate_command_end_to_end(make_captioner, world_dir, tmp_path, capsys):
    from training import evaluate

    ckpt_dir = str(tmp_path / "ckpt")
    make_captioner().save_pretrained(ckpt_dir)
    out = str(tmp_path / "eval" / "test.json")
    tok = "ptb" if java_available() else "simple"
    evaluate.main(["--checkpoint", ckpt_dir, "--data-dir", world_dir, "--split", "test", "--limit", "12",
                   "--steps", "3", "--out", out, "--tokenizer", tok, "--cache-dir", str(tmp_path / "cache")])
    res = json.load(open(out))
    assert res["kind"] == "diffusion" and res["n_images"] == 12 and res["settings"]["steps"] == 3
    assert set(res["metrics"]) >= {"BLEU-4", "ROUGE-L", "CIDEr"} and res["metrics"]["tokenizer"] == tok
    assert len(res["captions"]) == 12 and all(isinstance(c["caption"], str) for c in res["captions"])
    assert 0.0 <= res["attributes"]["hallucination"] <= 1.0
    row = summary_row(res)
    assert "1-obj colour" in row and "bias shape" in row
    assert {"whole 1-obj", "whole 2-obj", "whole 3-obj", "whole", "defect rate"} <= set(row)
    assert row["whole"] == res["attributes"]["whole"]["whole"] and res["attributes"]["whole"]["n"] == 12
    assert all(isinstance(c["whole_errors"], list) for c in res["captions"])
    assert sum(not c["whole_errors"] for c in res["captions"]) == round(12 * row["whole"])
    md = open(os.path.splitext(out)[0] + ".md").read()
    assert md.startswith("| model | split |") and "diffusion (ckpt)" in md
    assert "| model | whole empty | whole 1-obj | whole 2-obj | whole 3-obj | whole | whole vague | defect rate |" in md
    # the tiny world's test split has two scenes of two objects differing in colour and shape
    two = res["attributes"]["two_objects"]
    assert two["n"] == 2 and sum(two[k] for k in ("right", "swapped", "repeated shape", "repeated colour", "other")) == 1.0
    assert "| model | two-object scenes | right | swapped | repeated shape | repeated colour | other |" in md
    assert "BLEU-4" in capsys.readouterr().out


def test_per_step_report_scores_every_steps_caption(make_captioner, world_dir, tmp_path):
    from diffusion_caption.data import load_datasets
    from diffusion_caption.eval.step_report import changed_positions, step_report
    from diffusion_caption.world.whole_caption import whole_caption_report
    from diffusion_caption.world.scenes import Scene
    from training import evaluate

    assert changed_positions([1, 5, 6, 0, 0], [1, 5, 7, 8, 0], pad_id=0) == 2  # padding on both sides not counted
    cap = make_captioner()
    records = load_datasets("shapes", world_dir, splits=["test"])
    settings = {"steps": 4, "sampler": "ddpm", "seed": 1}
    rows = step_report(cap, records, settings, batch_size=5)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "changed" not in rows[0]
    # each row scores exactly the caption that step holds, batches seeded as training.evaluate seeds them
    traces = []
    feats = cap.encode_images([r.image_path for r in records])
    for i in range(0, len(records), 5):
        traces += cap.caption_batch(features=feats[i:i + 5], steps=4, sampler="ddpm", seed=1 + i)
    scenes = [Scene.from_json(r.scene) for r in records]
    for k, row in enumerate(rows):
        assert row["whole"] == whole_caption_report([tr.steps[k].text for tr in traces], scenes)["whole"]
        if k:
            ch = [changed_positions(tr.steps[k - 1].token_ids, tr.steps[k].token_ids, cap.tokenizer.pad_id) for tr in traces]
            assert row["changed"] == pytest.approx(sum(ch) / len(ch)) and row["any_changed"] == sum(c > 0 for c in ch) / len(ch)
    # the command: --per-step adds the table and the rows to its result
    ckpt_dir = str(tmp_path / "ckpt")
    cap.save_pretrained(ckpt_dir)
    out = str(tmp_path / "eval" / "steps.json")
    evaluate.main(["--checkpoint", ckpt_dir, "--data-dir", world_dir, "--split", "test", "--steps", "4", "--sampler", "ddpm",
                   "--seed", "1", "--batch-size", "5", "--per-step", "--no-meteor", "--tokenizer", "simple", "--out", out,
                   "--cache-dir", str(tmp_path / "cache")])
    res = json.load(open(out))
    assert res["per_step"] == json.loads(json.dumps(rows))
    assert "| step | t | whole |" in open(os.path.splitext(out)[0] + ".md").read()


def test_evaluate_ranks_with_a_scorer_and_records_it(make_captioner, clip_encoder, tokenizer, world_dir, tmp_path):
    from diffusion_caption.image_encoder import ImageEncoder
    from training import evaluate

    ckpt_dir = str(tmp_path / "ckpt")
    make_captioner().save_pretrained(ckpt_dir)
    scorer = str(tmp_path / "scorer")  # the captioner's own CLIP, saved with its text tokenizer
    ImageEncoder(clip_encoder.model, clip_encoder.preprocess, clip_encoder.source,
                 text_tokenizer=tokenizer).save_pretrained(scorer)
    out = str(tmp_path / "eval" / "k.json")
    common = ["--checkpoint", ckpt_dir, "--data-dir", world_dir, "--split", "test", "--limit", "4", "--steps", "1",
              "--candidates", "4", "--select", "clip", "--propose", "rounding", "--tokenizer", "simple",
              "--no-meteor", "--cache-dir", str(tmp_path / "cache")]
    evaluate.main(common + ["--scorer", scorer, "--out", out])
    res = json.load(open(out))
    assert res["scorer"] == scorer and res["settings"]["select"] == "clip" and len(res["captions"]) == 4
    assert "METEOR" not in res["metrics"] and "CIDEr" in res["metrics"]  # --no-meteor
    # the captioner's CLIP has no text tokenizer, so without the scorer the same command is refused
    with pytest.raises(SystemExit, match="no text tokenizer"):
        evaluate.main(common + ["--out", str(tmp_path / "eval" / "none.json")])
    with pytest.raises(SystemExit, match="image tower differs"):
        evaluate.main(common + ["--scorer", "assets/checkpoints/shapes-clip-binding", "--out", out])
