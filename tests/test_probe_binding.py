"""The binding probe: its questions come from the scenes, and the command runs end to end on the tiny world."""
import json

import pytest
import torch

from diffusion_caption.data import ImageRecord
from diffusion_caption.world.scenes import COLORS, SHAPES
from research import probe_binding


def _record(objects):
    scene = {"objects": [{"shape": s, "color": c, "size": "small", "x": 10.0 * i, "y": 5.0, "r": 4.0}
                         for i, (s, c) in enumerate(objects)], "background": "black"}
    return ImageRecord(image_path="x.png", captions=["a"], split="train", image_id="shapes:0", dataset="shapes", scene=scene)


def test_questions_ask_only_for_unique_shapes_in_scenes_with_several_colours():
    records = [_record([("circle", "red")]),                                      # one object: no binding
               _record([("circle", "red"), ("star", "red")]),                     # one colour: no binding
               _record([("circle", "red"), ("star", "blue"), ("star", "green")]),  # the stars are not unique
               _record([("square", "white"), ("diamond", "pink")])]
    idx, shape, colour, chance = probe_binding.binding_questions(records)
    rows = sorted(zip(idx.tolist(), shape.tolist(), colour.tolist()))
    assert rows == [(2, SHAPES.index("circle"), COLORS.index("red")),
                    (3, SHAPES.index("square"), COLORS.index("white")),
                    (3, SHAPES.index("diamond"), COLORS.index("pink"))]
    assert chance == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    with pytest.raises(SystemExit, match="shapes world"):
        probe_binding.binding_questions(records[:2])


def test_caption_ranking_compares_the_true_caption_with_its_variants(clip_encoder, tokenizer, scene_image):
    from diffusion_caption.image_encoder import ImageEncoder

    enc = ImageEncoder(clip_encoder.model, clip_encoder.preprocess, clip_encoder.source, text_tokenizer=tokenizer)
    rec = _record([("star", "purple"), ("square", "red")])
    feats = enc.encode([scene_image])
    rank = probe_binding.caption_ranking(enc, [rec, _record([("star", "red")])], feats.repeat(2, 1))
    texts = ["a purple star and a red square", "a red star and a purple square",
             "a purple star and a red star", "a purple square and a red square"]
    sims = (enc.encode_text(texts) @ feats[0]).tolist()
    assert rank == {"n": 1, "true above swapped": float(sims[0] > sims[1]),
                    "true above repeated shape (first object's)": float(sims[0] > sims[2]),
                    "true above repeated shape (second object's)": float(sims[0] > sims[3])}


def test_per_shape_linear_probe_reads_an_answer_that_depends_on_the_question():
    # the colour is the feature's sign, flipped for one shape: one linear map per shape solves it, one
    # shared map of [feature, one-hot shape] could not (the shape would only shift the logits)
    torch.manual_seed(0)
    x = torch.randn(2000, 3)
    shape = torch.randint(0, 2, (2000,))
    colour = ((x[:, 0] > 0) ^ (shape == 1)).long()
    net = probe_binding.train_probe(x, shape, colour, hidden=0, epochs=100)
    assert probe_binding.accuracy(net, x, shape, colour) > 0.95
    assert probe_binding.probe_inputs(x, shape, per_shape=True).shape == (2000, 3 * len(SHAPES))


def test_probe_command_end_to_end(world_dir, clip_encoder, tokenizer, tmp_path, capsys):
    from diffusion_caption.image_encoder import ImageEncoder

    clip = str(tmp_path / "clip")  # saved with its text tokenizer, so the caption ranking runs too
    ImageEncoder(clip_encoder.model, clip_encoder.preprocess, clip_encoder.source, text_tokenizer=tokenizer).save_pretrained(clip)
    out = tmp_path / "probe.json"
    probe_binding.main(["--clip", clip, "--data-dir", world_dir, "--split", "val", "--epochs", "2",
                        "--hidden", "0,16", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert [(p["features"], p["hidden"]) for p in result["probes"]] == [
        ("pooled", 0), ("pooled", 16), ("tokens", 0), ("tokens", 16)]
    assert result["questions"]["train"] > 0 and result["questions"]["val"] > 0
    assert all(0.0 <= p["val"] <= 1.0 and 0.0 <= p["train"] <= 1.0 for p in result["probes"])
    assert result["probes"][0]["dim"] == clip_encoder.feature_dim
    # the tiny world's val split has three two-object scenes whose objects differ in colour and shape
    rank = result["caption_ranking"]
    assert rank["n"] == 3 and all(abs(3 * v - round(3 * v)) < 1e-6 for k, v in rank.items() if k != "n")
    printed = capsys.readouterr().out
    assert "| pooled | " in printed and "- swapped: " in printed
    with pytest.raises(SystemExit, match="--hidden"):
        probe_binding.main(["--clip", clip, "--data-dir", world_dir, "--hidden", "wide"])
