"""The out-of-domain score (diffusion_caption/ood.py): calibration, ordering, files, and the trace carrying it."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_caption.checkpoint import CheckpointError
from diffusion_caption.ood import FeatureDensity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gaussian(n, d=8, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.05, 0.3, d) + shift
    x[:, 0] += 3.0  # unit vectors near one direction, as CLIP features of one world are
    return torch.nn.functional.normalize(x, dim=-1)


def test_the_threshold_passes_the_calibration_share_and_far_inputs_fail():
    train, val, test = _gaussian(4000), _gaussian(2000, seed=1), _gaussian(2000, seed=2)
    density = FeatureDensity.fit(train, val, pass_rate=0.9)
    assert float((density.scores(val) <= density.threshold).float().mean()) == pytest.approx(0.9, abs=0.002)
    assert float((density.scores(test) <= density.threshold).float().mean()) == pytest.approx(0.9, abs=0.03)
    far = torch.nn.functional.normalize(torch.randn(200, 8, generator=torch.Generator().manual_seed(3)), dim=-1)
    assert float((density.scores(far) > density.threshold).float().mean()) > 0.95
    verdicts = density.assess(torch.cat([val[:1], far[:1]]))
    assert set(verdicts[0]) == {"score", "threshold", "unlike_training"} and verdicts[1]["unlike_training"]
    # the training mean's direction is more in domain than the typical validation image
    assert float(density.scores(density.mean[None])) < float(density.scores(val).median())
    with pytest.raises(ValueError, match="pass_rate"):
        FeatureDensity.fit(train, val, pass_rate=1.0)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        FeatureDensity.fit(train, val[:, :4])


def test_it_is_saved_and_loaded_with_the_same_scores_and_bad_files_are_named(tmp_path):
    density = FeatureDensity.fit(_gaussian(500), _gaussian(200, seed=1), info={"train": "x"})
    density.save(str(tmp_path))
    back = FeatureDensity.load(str(tmp_path), feature_dim=8)
    x = _gaussian(50, seed=5)
    assert torch.allclose(back.scores(x), density.scores(x)) and back.threshold == density.threshold
    assert back.info["train"] == "x" and back.info["n_train"] == 500
    with pytest.raises(CheckpointError, match="8-d"):
        FeatureDensity.load(str(tmp_path), feature_dim=16)
    (tmp_path / "ood.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="format"):
        FeatureDensity.load(str(tmp_path))


def test_shapes_scenes_score_as_more_in_domain_than_noise_blanks_and_photographs():
    """With the shipped shapes CLIP's raw embeddings of 800 freshly drawn world scenes, noise and text score
    above every one of 60 held-out scenes; each shipped photograph and blank image above the typical one, and
    most of them above all."""
    from diffusion_caption.eval.ood_set import ood_families
    from diffusion_caption.image_encoder import ImageEncoder
    from diffusion_caption.world.scenes import render_scene, sample_scene

    enc = ImageEncoder.from_pretrained(os.path.join(ROOT, "assets", "checkpoints", "shapes-clip"))
    rng = np.random.default_rng(7)
    images = [render_scene(sample_scene(rng)) for _ in range(860)]
    with torch.no_grad():
        raw = enc.encode(images, normalize=False)
        feats = {"train": raw[:600], "val": raw[600:800], "test": raw[800:]}
    density = FeatureDensity.fit(feats["train"], feats["val"], pass_rate=0.95)
    scenes = images[800:803]
    fam = ood_families(os.path.join(ROOT, "assets", "examples"), scenes, n=8)
    assert len(fam["photographs"]) == 3 and len(fam["hue-shifted scenes"]) == 9
    test = density.scores(feats["test"])
    in_domain, typical = float(test.max()), float(test.median())
    for name in ("photographs", "noise", "text", "blank"):
        with torch.no_grad():
            s = density.scores(enc.encode(fam[name], normalize=False))
        if name in ("noise", "text"):
            assert float(s.min()) > in_domain, (name, s.tolist(), in_domain)
        elif name == "photographs":  # one can sit among the least typical scenes
            assert float(s.min()) > typical and float(s.median()) > in_domain, (name, s.tolist(), typical, in_domain)
        else:  # a black or gray blank is a background of the world with nothing on it: in domain, if empty
            assert float(s.median()) > typical and float(s.max()) > in_domain, (name, s.tolist(), typical, in_domain)
    assert float((density.scores(feats["test"]) <= density.threshold).float().mean()) > 0.85


def test_a_checkpoint_with_the_statistics_puts_the_verdict_in_every_trace(make_captioner, scene_image, tmp_path):
    from diffusion_caption import Captioner

    cap = make_captioner()
    d = tmp_path / "ckpt"
    cap.save_pretrained(str(d))
    assert Captioner.from_pretrained(str(d)).caption(scene_image).ood is None  # no statistics, no verdict
    D = cap.image_encoder.feature_dim
    FeatureDensity.fit(_gaussian(300, d=D), _gaussian(100, d=D, seed=1)).save(str(d))
    loaded = Captioner.from_pretrained(str(d))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    a, b = loaded.caption_batch([scene_image, noise], seed=0)
    assert a.ood is not None and set(a.ood) == {"score", "threshold", "unlike_training"}
    assert a.to_json()["ood"] == a.ood and a.text == cap.caption(scene_image, seed=0).text
    raw = loaded.image_encoder.encode([scene_image, noise], normalize=False)
    assert [a.ood, b.ood] == loaded.density.assess(raw)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), loaded.encode_images([scene_image, noise]))


def test_the_default_flags_the_shipped_photographs_and_passes_the_shipped_scenes():
    """The default checkpoint ships its statistics (``training.fit_ood``): its traces say the photographs
    are unlike its training images and the example scenes are not; precomputed features carry no verdict."""
    import glob

    from diffusion_caption import Captioner

    cap = Captioner.from_pretrained(os.path.join(ROOT, "assets", "checkpoints", "shapes-diffusion-block"))
    assert cap.density is not None and cap.density.pass_rate == 0.95
    examples = os.path.join(ROOT, "assets", "examples")
    photos = sorted(glob.glob(os.path.join(examples, "photo_*.jpg")))
    scenes = sorted(glob.glob(os.path.join(examples, "shapes_*.png")))
    traces = cap.caption_batch(photos + scenes, record="final")
    assert [t.ood["unlike_training"] for t in traces] == [True] * len(photos) + [False] * len(scenes)
    assert cap.caption_batch(features=cap.encode_images(scenes[:1]))[0].ood is None


def test_the_command_line_notes_an_image_unlike_the_training_images(capsys):
    from diffusion_caption.__main__ import main

    assert main([os.path.join(ROOT, "assets", "examples", "photo_cat.jpg"),
                 os.path.join(ROOT, "assets", "examples", "shapes_01.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    cat = next(i for i, line in enumerate(out) if "photo_cat.jpg:" in line)
    assert "(confidence 0." in out[cat] and "unlike anything this model was trained on" in out[cat + 1]
    assert not any("unlike" in line for line in out[cat + 2:])  # the shapes scene gets no note


def test_fit_ood_writes_the_statistics_into_a_checkpoint_and_reports_every_set(make_captioner, world_dir, tmp_path):
    """training.fit_ood end to end on a small world: the checkpoint then loads them, the val split passes at the
    asked rate, and the report has the test split and every out-of-domain family."""
    import json

    from diffusion_caption import Captioner
    from training import fit_ood

    d = tmp_path / "ckpt"
    make_captioner().save_pretrained(str(d))
    rep = fit_ood.main(["--checkpoint", str(d), "--train-data-dir", world_dir, "--data-dir", world_dir,
                        "--pass-rate", "0.9", "--hue-scenes", "2", "--cache-dir", str(tmp_path / "c"),
                        "--out", str(tmp_path / "ood.json")])
    cap = Captioner.from_pretrained(str(d))
    assert cap.density is not None and cap.density.threshold == pytest.approx(rep["threshold"])
    assert [r["set"] for r in rep["rows"]] == ["test split (in domain)", "photographs", "noise", "blank", "text",
                                              "hue-shifted scenes"]
    assert rep["rows"][-1]["n"] == 6 and all(0 <= r["flagged"] <= 1 for r in rep["rows"])
    assert json.loads((tmp_path / "ood.json").read_text()) == rep and (tmp_path / "ood.md").is_file()
