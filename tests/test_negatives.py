"""Binding hard negatives (diffusion_caption.world.negatives) and the text-tower fine-tune that uses them."""
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusion_caption.world import scenes as world
from diffusion_caption.world.attributes import parse_caption, two_object_outcome
from diffusion_caption.world.negatives import KINDS, changed_scene, correct_captions, positive_and_negatives
from diffusion_caption.world.scenes import Scene, ShapeObject


def _two(c1="purple", s1="star", c2="red", s2="square") -> Scene:
    return Scene([ShapeObject(s1, c1, "large", 30, 60, 22), ShapeObject(s2, c2, "small", 90, 62, 12)], "gray")


@pytest.mark.parametrize("kind,outcome", [("swap", "swapped"), ("repeat_shape", "repeated shape"),
                                          ("repeat_color", "repeated colour")])
def test_two_object_negatives_make_the_error_they_are_named_for(kind, outcome):
    scene = _two()
    for seed in range(10):
        other = changed_scene(scene, kind, np.random.default_rng(seed))
        caption = world.caption_candidates(other, [0, 1])[0]
        assert two_object_outcome(parse_caption(caption), scene) == outcome, caption
    assert two_object_outcome(parse_caption(world.caption_candidates(scene, [0, 1])[0]), scene) == "right"


def test_recolor_and_reshape_bring_in_a_value_the_scene_lacks():
    scene = _two()
    scene.background = "pink"  # an object colour too: a recoloured object must not vanish into it
    for seed in range(30):
        rng = np.random.default_rng(seed)
        recol, reshp = changed_scene(scene, "recolor", rng), changed_scene(scene, "reshape", rng)
        assert {o.color for o in recol.objects} - {"purple", "red"} and {o.shape for o in recol.objects} == {"star", "square"}
        assert {o.shape for o in reshp.objects} - {"star", "square"} and {o.color for o in reshp.objects} == {"purple", "red"}
        assert "pink" not in {o.color for o in recol.objects}


def test_kinds_a_scene_cannot_have_give_none():
    same_colour = _two(c2="purple")
    one = Scene([ShapeObject("star", "red", "large", 60, 60, 22)], "gray")
    rng = np.random.default_rng(0)
    assert changed_scene(same_colour, "swap", rng) is None  # swapping one colour changes nothing
    assert changed_scene(same_colour, "repeat_color", rng) is None
    assert changed_scene(one, "swap", rng) is None and changed_scene(one, "repeat_shape", rng) is None
    with pytest.raises(ValueError, match="unknown negative kind"):
        changed_scene(one, "shuffle", rng)


def test_negatives_are_wrong_distinct_and_phrased_like_their_positive():
    attribute_words = set(world.COLORS) | set(world.SHAPES) | {s + "s" for s in world.SHAPES} | {"a", "an"}
    skeleton = lambda c: [w if w not in attribute_words else "_" for w in c.split()]  # noqa: E731
    n_pairs = 0
    for i in range(80):
        scene, _ = world.scene_for(0, "val", i, 0.0)
        positive, negatives = positive_and_negatives(scene, np.random.default_rng(i), 4)
        correct = correct_captions(scene)
        assert positive in correct and " shapes " not in positive
        assert len(negatives) == len(set(negatives)) <= 4 and negatives
        assert not correct & set(negatives)
        for neg in negatives:
            assert ("background" in neg) == ("background" in positive), (positive, neg)
            if not {"two", "three"} & set(positive.split() + neg.split()):
                n_pairs += 1  # no objects merged: the same template, only attribute words differ
                assert skeleton(neg) == skeleton(positive), (positive, neg)
    assert n_pairs > 100


def test_kinds_cover_the_module_docstring():
    import diffusion_caption.world.negatives as m

    assert all(f"``{k}``" in m.__doc__ for k in KINDS)


def _clip_dir(tmp_path, clip_encoder, tokenizer) -> str:
    d = str(tmp_path / "clip")
    clip_encoder.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def _straight_and_resumed(common: list[str], tmp_path, steps: int) -> None:
    """``tune_clip_text`` run straight for ``steps`` steps into ``a``, and the same run killed halfway and resumed
    into ``b``."""
    from research import tune_clip_text

    tune_clip_text.main(common + ["--steps", str(steps), "--out", str(tmp_path / "a"), "--run-dir", str(tmp_path / "run-a")])
    tune_clip_text.main(common + ["--steps", str(steps // 2), "--out", str(tmp_path / "b0"),
                                  "--run-dir", str(tmp_path / "run-b")])
    tune_clip_text.main(common + ["--steps", str(steps), "--out", str(tmp_path / "b"), "--run-dir", str(tmp_path / "run-b"),
                                  "--resume", "true"])


def test_tune_clip_text_changes_only_the_text_tower_and_resumes_exactly(world_dir, clip_encoder, tokenizer, tmp_path):
    from diffusion_caption.image_encoder import ImageEncoder
    from research import tune_clip_text

    clip = _clip_dir(tmp_path, clip_encoder, tokenizer)
    common = ["--clip", clip, "--data-dir", world_dir, "--cache-dir", str(tmp_path / "cache"), "--batch-size", "8",
              "--negatives", "3", "--val-every", "2", "--ckpt-every", "2", "--warmup", "1", "--lr", "1e-3",
              "--device", "cpu"]
    _straight_and_resumed(common, tmp_path, 4)

    before = load_file(os.path.join(clip, "open_clip_model.safetensors"))
    after = load_file(str(tmp_path / "a" / "open_clip_model.safetensors"))
    resumed = load_file(str(tmp_path / "b" / "open_clip_model.safetensors"))
    assert before.keys() == after.keys()
    visual = [k for k in before if k.startswith("visual.")]
    text = [k for k in before if not k.startswith("visual.") and k != "logit_scale"]
    assert visual and text
    assert all(torch.equal(before[k], after[k]) for k in visual + ["logit_scale"])
    assert any(not torch.equal(before[k], after[k]) for k in text)
    assert all(torch.equal(after[k], resumed[k]) for k in before)

    enc = ImageEncoder.from_pretrained(str(tmp_path / "a"))  # loads as a CLIP, with its tokenizer
    assert enc.encode_text(["a red circle"]).shape == (1, enc.feature_dim)
    log = (tmp_path / "run-a" / "log.jsonl").read_text().splitlines()
    assert len(log) == 3 and '"val_swap"' in log[-1]


def test_tune_clip_text_cuts_the_text_tower_and_learns_from_the_whole_one(world_dir, clip_encoder, tokenizer, tmp_path,
                                                                         make_captioner):
    """``--text-layers N`` keeps the first N blocks (a cheaper scorer) and ``--distill`` adds the whole tower's
    rankings as soft labels; the result loads as a CLIP of N text blocks with the same image tower, and a
    killed run resumes to the same weights."""
    from diffusion_caption.image_encoder import ImageEncoder
    from research import tune_clip_text

    clip = _clip_dir(tmp_path, clip_encoder, tokenizer)
    common = ["--clip", clip, "--data-dir", world_dir, "--cache-dir", str(tmp_path / "cache"), "--batch-size", "8",
              "--negatives", "2", "--val-every", "2", "--ckpt-every", "1", "--warmup", "1", "--lr", "1e-3",
              "--device", "cpu", "--text-layers", "1", "--distill", "1.0"]
    _straight_and_resumed(common, tmp_path, 2)
    before = load_file(os.path.join(clip, "open_clip_model.safetensors"))
    after = load_file(str(tmp_path / "a" / "open_clip_model.safetensors"))
    assert not any(k.startswith("transformer.resblocks.1.") for k in after)
    assert any(k.startswith("transformer.resblocks.0.") for k in after)
    assert set(after) == {k for k in before if not k.startswith("transformer.resblocks.") or
                          k.startswith("transformer.resblocks.0.")}
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual.") or k == "logit_scale")
    assert all(torch.equal(after[k], v) for k, v in load_file(str(tmp_path / "b" / "open_clip_model.safetensors")).items())
    enc = ImageEncoder.from_pretrained(str(tmp_path / "a"))
    assert len(enc.model.transformer.resblocks) == 1 and enc.source["model_cfg"]["text_cfg"]["layers"] == 1
    # it stands in as a scorer for a captioner of that CLIP: the image tower is the same
    cap = make_captioner()
    assert cap.use_scorer(enc).scorer is enc
    with pytest.raises(SystemExit, match="--text-layers 9"):
        tune_clip_text.main(common[:-4] + ["--text-layers", "9", "--out", str(tmp_path / "c"),
                                           "--run-dir", str(tmp_path / "run-c")])


def test_tune_clip_text_refuses_a_world_without_scenes(tmp_path, clip_encoder, tokenizer):
    import json

    from research import tune_clip_text

    d = tmp_path / "flat"
    (d / "images").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(d / "images" / "x.png")
    img = {"filename": "x.png", "filepath": "images", "split": "train", "imgid": 0,
           "sentences": [{"raw": "a red circle", "tokens": ["a", "red", "circle"]}]}
    (d / "dataset_shapes.json").write_text(json.dumps({"images": [img, dict(img, split="val", imgid=1)]}))
    with pytest.raises(SystemExit, match="no scene"):
        tune_clip_text.main(["--clip", _clip_dir(tmp_path, clip_encoder, tokenizer), "--data-dir", str(d),
                             "--out", str(tmp_path / "o"), "--run-dir", str(tmp_path / "r"), "--device", "cpu"])
