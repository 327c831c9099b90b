"""The shipped checkpoints load from the repository and caption the shipped example scenes.

A smoke test of what a newcomer gets from a clean checkout: the files in ``assets/checkpoints`` load
through the normal path (safetensors + JSON, header-checked), sample with their own defaults, and the
captions are checked against the examples' exact ground truth.
"""
import glob
import json
import os

import pytest
import torch

from diffusion_caption.world.attributes import attribute_scores, parse_caption
from diffusion_caption.world.scenes import Scene

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "assets", "checkpoints")
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "assets", "examples", "shapes_*.png")))


def _scene(png: str) -> Scene:
    with open(png[:-4] + ".json") as f:
        return Scene.from_json(json.load(f))


@pytest.mark.parametrize("name", ["shapes-diffusion-block", "shapes-diffusion", "shapes-baseline"])
def test_shipped_checkpoint_captions_the_example_scenes(name):
    from diffusion_caption.eval.evaluation import load_model

    assert len(EXAMPLES) >= 4
    model = load_model(os.path.join(CKPT, name))
    texts = [t.text for t in model.caption_batch(EXAMPLES)]
    scores = [attribute_scores(parse_caption(t), _scene(p)) for t, p in zip(texts, EXAMPLES)]
    shape = [s["shape"] for s in scores if s["shape"] is not None]
    color = [s["color"] for s in scores if s["color"] is not None]
    # every caption names something, and most of what is named is right (the test split scores are in
    # docs/RESULTS.md; this checks the files load and behave, on a handful of scenes)
    assert len(shape) == len(EXAMPLES) and len(color) == len(EXAMPLES), texts
    assert sum(shape) / len(shape) >= 0.6 and sum(color) / len(color) >= 0.6, list(zip(texts, EXAMPLES))


def test_the_default_model_writes_its_caption_over_several_steps_and_is_what_the_app_and_cli_load():
    """shapes-diffusion-block: block diffusion, one block of the caption denoised a step given the blocks before
    it; the app's and the command line's default, its config carrying every sampling default, so the library
    call is the app's caption."""
    import app
    from diffusion_caption import Captioner
    from diffusion_caption.__main__ import DEFAULT_CHECKPOINT
    from diffusion_caption.world.whole_caption import whole_caption_errors

    path = os.path.join(CKPT, "shapes-diffusion-block")
    assert os.path.abspath(app.DEFAULT_CHECKPOINTS[0]) == path == os.path.abspath(DEFAULT_CHECKPOINT)
    cap = Captioner.from_pretrained(path)
    s = cap.sampling
    assert (s.sampler, s.guidance, s.candidates, cap.config.block_size) == ("block", 1.0, 1, 2)
    assert 0 < s.commit < 1  # a block cut short only where both positions are unsure
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["image_encoder"] == {"kind": "local-dir", "path": "../shapes-clip"}  # the one shared CLIP
    traces = cap.caption_batch(EXAMPLES, seed=0)
    # several steps, each writing the next block of the caption (or its sure first position), as many as
    # the caption needs, within the checkpoint's most
    assert all(4 <= len(tr.steps) <= s.steps for tr in traces), [len(tr.steps) for tr in traces]
    assert all(len({st.text for st in tr.steps}) >= 4 for tr in traces)
    # single-object example scenes are captioned wholly right
    single = [(tr.text, _scene(p)) for tr, p in zip(traces, EXAMPLES) if len(_scene(p).objects) == 1]
    assert single and all(not whole_caption_errors(t, sc) for t, sc in single), single
    # the app, with the model's own defaults in its settings, streams exactly the library's caption
    m = app.load_models(app.parse_args(["--baseline", "", "--vocab-map", "pca"]))
    h = app.Handlers(m)
    chosen = h.choose_model(m.default)
    steps, sampler, guidance, clamp, spacing = (chosen[c] for c in (h.ui.steps, h.ui.sampler, h.ui.guidance,
                                                                    h.ui.clamp, h.ui.spacing))
    out = list(h.caption_stream(EXAMPLES[2], steps.value, sampler.value, guidance.value, clamp.value, 0,
                                "predicted x0", spacing.value, m.default))
    view = out[-1][h.ui.view]
    assert [st.text for st in view.steps] == [st.text for st in cap.caption(EXAMPLES[2], seed=0).steps]
    # a shapes scene gets no out-of-domain notice; a photograph does, in the page and in the API's trace
    assert out[0][h.ui.ood_note] == "" and view.ood == cap.caption(EXAMPLES[2]).ood
    photo = os.path.join(ROOT, "assets", "examples", "photo_cat.jpg")
    first = next(h.caption_stream(photo, steps.value, sampler.value, guidance.value, clamp.value, 0,
                                  "predicted x0", spacing.value, m.default))
    assert "unlike anything this model was trained on" in first[h.ui.ood_note]
    final = list(h.api_caption(photo, steps.value, sampler.value, guidance.value, clamp.value, 0, spacing.value,
                               m.default))[-1]
    assert final["done"] and final["ood"]["unlike_training"] and final["ood"] == cap.caption(photo).ood
    assert final["text"] == cap.caption(photo, seed=0).text
    # the last step's chips and the API carry the calibrated confidence (the library's, for the same seed)
    # (the chips of every step come as frames, the last one's after the start of its frame)
    chips = out[-1][h.ui.chips]
    last = f"data-s='{len(view.steps)}'>"
    assert "calibrated confidence that the word is right" in chips.split(last)[1]
    assert "calibrated" not in chips.split(last)[0]  # earlier steps: rounding probability
    assert final["token_confidence"] == cap.caption(photo, seed=0).token_confidence


def test_shipped_diffusion_defaults_are_the_documented_ones():
    from diffusion_caption import Captioner

    cap = Captioner.from_pretrained(os.path.join(CKPT, "shapes-diffusion"))
    c, s = cap.config, cap.sampling
    assert (s.sampler, s.steps, s.guidance, s.clamp, s.spacing) == ("ddpm", 20, 5.0, True, "trailing^2")
    tr = cap.caption(EXAMPLES[0], seed=0)
    assert len(tr.steps) == 20 and tr.settings["clamp"] is True and tr.settings["spacing"] == "trailing^2" and tr.text
    assert tr.steps[0].t == c.T - 1 and tr.steps[-1].t > 0


def test_shipped_two_layer_checkpoint_is_the_one_step_model_cut_to_two_layers():
    """shapes-diffusion-fast-small: layers 0 and 2 of a four-layer one-step student's (--init-layers), then
    fine-tuned twice and once more on the canonical phrasings (training/README.md, section 5);
    its lineage is in extra.init, nested."""
    from safetensors.torch import load_file

    from diffusion_caption import Captioner

    cap = Captioner.from_pretrained(os.path.join(CKPT, "shapes-diffusion-fast-small"))
    c = cap.config
    assert c.n_layers == 2 and cap.denoiser.encoder.config.n_layers == 2
    assert (cap.sampling.sampler, cap.sampling.steps, cap.sampling.guidance) == ("ddim", 1, 1.0)
    assert c.extra["sampling_choice"]["chosen"] == "DDIM 1, guidance 1" and c.extra["sampling_choice"]["split"] == "val"
    last = c.extra["init"]  # the previous shapes-diffusion-fast-small (before the canonical phrasings)
    assert last["checkpoint"] == "assets/checkpoints/shapes-diffusion-fast-small" and last["steps"] == 8000
    first = last["init"]["init"]  # the first stage: where the layers came from
    assert first["checkpoint"] == "assets/checkpoints/shapes-diffusion-fast" and first["layers"] == [0, 2]
    assert "--margin 0.5" in c.extra["distilled"]["command"] and cap.objective.p_uncond == 0.0
    # half the transformer: the denoiser has the tensors of 2 layers
    small = load_file(os.path.join(CKPT, "shapes-diffusion-fast-small", "model.safetensors"))
    layer = "encoder.transformer.layer."
    assert {k.split(".")[3] for k in small if k.startswith(layer)} == {"0", "1"}
    # one call per caption; the single-object examples exactly right (test colour 1.000, shape 0.998)
    traces = cap.caption_batch(EXAMPLES, seed=0)
    assert all(len(t.steps) == 1 and t.text for t in traces)
    for t, p in zip(traces, EXAMPLES):
        scene = _scene(p)
        sc = attribute_scores(parse_caption(t.text), scene)
        assert sc["shape"] is not None and sc["color"] is not None, t.text
        if len(scene.objects) == 1:
            assert sc["shape"] == 1.0 and sc["color"] == 1.0, (t.text, p)


@pytest.mark.parametrize("name", ["shapes-diffusion", "shapes-diffusion-fast-small"])
def test_shipped_diffusion_checkpoints_can_rank_candidates_by_clip_score(name):
    """Each shipped diffusion checkpoint carries its CLIP's text tokenizer, so ``select="clip"`` works."""
    from diffusion_caption import Captioner
    from diffusion_caption.selection.rerank import clip_scores

    cap = Captioner.from_pretrained(os.path.join(CKPT, name))
    assert cap.sampling.select == "mbr" and cap.sampling.candidates == 1  # the defaults are unchanged
    tr = cap.caption(EXAMPLES[0], candidates=4, select="clip", seed=0, steps=2, record="final")
    scores = clip_scores(cap.image_encoder, cap.encode_images([EXAMPLES[0]]), [tr.candidates])[0]
    assert scores[tr.chosen] == max(scores) and tr.text == tr.candidates[tr.chosen]


def test_shipped_binding_clip_shares_the_image_tower_and_tokenizer():
    """shapes-clip-binding (research.tune_clip_text) may replace a student's clip/ folder: only its text
    tower differs from shapes-clip's, so every image feature the students were trained on is unchanged."""
    from safetensors.torch import load_file

    base = os.path.join(ROOT, "assets", "checkpoints", "shapes-clip")
    tuned = os.path.join(ROOT, "assets", "checkpoints", "shapes-clip-binding")
    a, b = (load_file(os.path.join(d, "open_clip_model.safetensors")) for d in (base, tuned))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("visual.") or k == "logit_scale")
    assert any(not torch.equal(a[k], b[k]) for k in a if not k.startswith("visual."))
    for name in ("tokenizer.json", "open_clip_config.json"):
        assert open(os.path.join(base, name)).read() == open(os.path.join(tuned, name)).read()


def test_shipped_text_scorer_serves_the_students_and_reads_binding():
    """shapes-text-scorer (research.train_text_scorer) was trained against the shapes CLIP's image tower, so
    the captioners on that tower accept it; on the example scenes it ranks each correct caption above the same
    caption with two objects' colours swapped, or one object's shape or colour repeated from another."""
    import numpy as np

    from diffusion_caption import Captioner
    from diffusion_caption.world.negatives import changed_scene, correct_captions
    from diffusion_caption.selection.text_scorer import TextScorer
    from diffusion_caption.world.scenes import caption_candidates

    path = os.path.join(CKPT, "shapes-text-scorer")
    scorer = TextScorer.from_pretrained(path)
    for name in ("shapes-diffusion-block", "shapes-diffusion-fast-small"):
        assert isinstance(Captioner.from_pretrained(os.path.join(CKPT, name), scorer=path).scorer, TextScorer)
    cap = Captioner.from_pretrained(os.path.join(CKPT, "shapes-diffusion-fast-small"))
    rng = np.random.default_rng(0)
    wins = []
    for png in EXAMPLES:
        scene = _scene(png)
        if len(scene.objects) < 2:
            continue
        image = cap.encode_images([png])[0]
        positive = caption_candidates(scene)[0]
        for kind in ("swap", "repeat_shape", "repeat_color"):
            other = changed_scene(scene, kind, rng)
            if other is None:
                continue
            negative = caption_candidates(other)[0]
            if negative in correct_captions(scene):
                continue
            pos, neg = scorer.encode_text([positive, negative]) @ image.float()
            wins.append(bool(pos > neg))
    assert len(wins) >= 10 and sum(wins) >= 0.9 * len(wins), wins


def test_the_default_verifies_its_guesses_without_changing_a_caption(world_dir, monkeypatch):
    """The shipped default with ``BlockSampler.VERIFY`` (a block cut short is finished together with the next
    block, predicted given the held-back position's guess, kept where the guess is confirmed) writes the same
    captions as one block a step, token for token, on scenes of its world, in fewer steps."""
    from diffusion_caption import Captioner
    from diffusion_caption.data import load_karpathy
    from diffusion_caption.samplers import BlockSampler

    cap = Captioner.from_pretrained(os.path.join(CKPT, "shapes-diffusion-block"))
    images = [r.image_path for r in load_karpathy("shapes", world_dir, splits=["train", "val", "test"])]
    features = cap.encode_images(images)
    runs = {}
    for verify in (False, True):
        monkeypatch.setattr(BlockSampler, "VERIFY", verify)
        runs[verify] = [cap.caption_batch(features=features[i:i + 32], seed=s) for s in range(3)
                        for i in range(0, len(images), 32)]
    flat = {v: [tr for batch in runs[v] for tr in batch] for v in runs}
    assert [tr.final.token_ids for tr in flat[True]] == [tr.final.token_ids for tr in flat[False]]
    steps = {v: [len(tr.steps) for tr in flat[v]] for v in flat}
    assert all(a <= b for a, b in zip(steps[True], steps[False])) and sum(steps[True]) < sum(steps[False])
