"""The training commands end to end on the tiny world: they run, save loadable checkpoints, resume."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from diffusion_caption import Captioner
from training import train_clip, train_diffusion


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, world_dir):
    out = str(tmp_path_factory.mktemp("clip") / "shapes-clip")
    run = str(tmp_path_factory.mktemp("clip-run"))
    train_clip.main(["--data-dir", world_dir, "--out", out, "--run-dir", run, "--steps", "3", "--batch-size", "16", "--corpus-size", "24",
                     "--val-every", "3", "--ckpt-every", "3", "--warmup", "1", "--device", "cpu"])
    return out


def test_train_clip_writes_an_open_clip_folder(clip_dir, scene_image):
    from diffusion_caption.image_encoder import ImageEncoder
    from diffusion_caption.tokenizer import CaptionTokenizer

    assert {"open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json"} <= set(os.listdir(clip_dir))
    enc = ImageEncoder.from_pretrained(clip_dir)
    f = enc.encode([scene_image])
    assert f.shape == (1, 128) and torch.allclose(f.norm(dim=-1), torch.ones(1), atol=1e-5)
    tok = CaptionTokenizer.from_pretrained(clip_dir)
    assert tok.decode(tok.encode(["a red circle"], 8)[0].tolist()) == "a red circle"


def _train(world_dir, clip_dir, tmp, *extra):
    args = ["--preset", "tiny", "--data-dir", world_dir, "--clip", clip_dir, "--out", str(tmp / "out"),
            "--run-dir", str(tmp / "run"), "--cache-dir", str(tmp.parent / "cache"), "--steps", "6",
            "--batch-size", "8", "--val-every", "3", "--ckpt-every", "2", "--device", "cpu", "--dropout", "0.1",
            *extra]
    train_diffusion.main(args)
    return tmp / "out", tmp / "run"


def test_train_diffusion_end_to_end_and_bitwise_resume(world_dir, clip_dir, tmp_path, scene_image):
    out, run = _train(world_dir, clip_dir, tmp_path / "a")
    cap = Captioner.from_pretrained(str(out))
    assert len(cap.caption(scene_image, steps=3).steps) == 3
    assert cap.config.extra["data"] == "shapes"
    assert os.path.isfile(run / "log.jsonl")

    # killed after step 3 (between checkpoints at 2 and 4), resumed: identical to the uninterrupted run
    _train(world_dir, clip_dir, tmp_path / "b", "--stop-at", "3")
    assert not (tmp_path / "b" / "out").exists()
    out_b, _ = _train(world_dir, clip_dir, tmp_path / "b", "--resume", "true")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(out_b / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_flags_and_wrong_types_fail_loudly(world_dir):
    with pytest.raises(SystemExit):
        train_diffusion.main(["--no-such-flag", "1"])
    with pytest.raises(SystemExit):
        train_diffusion.main(["--steps", "many"])


def test_torchrun_ddp_on_cpu(world_dir, clip_dir, tmp_path):
    """Two gloo ranks through torchrun: the multi-GPU code path, run on CPU."""
    import subprocess
    import sys

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training.train_diffusion", "--preset", "tiny", "--data-dir", world_dir, "--clip", clip_dir,
           "--out", str(out), "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
           "--steps", "4", "--batch-size", "8", "--val-every", "2", "--ckpt-every", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    assert len(Captioner.from_pretrained(str(out)).caption_batch(features=torch.randn(2, 128), steps=2)) == 2


def test_distilled_captions_replace_the_training_references_and_train(world_dir, clip_dir, clip_encoder, tokenizer,
                                                                     tmp_path):
    from diffusion_caption import BaselineCaptioner
    from diffusion_caption.baseline.captioner import PrefixCaptioner, baseline_preset
    from diffusion_caption.data import load_karpathy
    from diffusion_caption.eval.evaluation import attribute_report
    from diffusion_caption.world.scenes import Scene
    from training import distill_captions

    torch.manual_seed(0)
    cfg = baseline_preset("tiny", vocab_size=tokenizer.vocab_size, cond_dim=clip_encoder.feature_dim,
                          bos_id=tokenizer.cls_id, eos_id=tokenizer.sep_id)
    model = PrefixCaptioner(cfg)
    # a briefly trained teacher, so that its captions are words (an untrained one writes nothing)
    world = load_karpathy("shapes", world_dir, "train")
    feats = clip_encoder.encode([r.image_path for r in world])
    ids = tokenizer.encode([r.captions[0] for r in world], cfg.max_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(feats, ids)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    teacher = BaselineCaptioner(cfg, model, clip_encoder, tokenizer)
    teacher_dir = str(tmp_path / "teacher")
    teacher.save_pretrained(teacher_dir)
    kd_dir = str(tmp_path / "kd")
    common = ["--teacher", teacher_dir, "--data-dir", world_dir, "--beam", "2", "--cache-dir", str(tmp_path / "cache")]
    distill_captions.main(common + ["--out", kd_dir])

    src = {s: load_karpathy("shapes", world_dir, s) for s in ("train", "val", "test")}
    kd = {s: load_karpathy("shapes", kd_dir, s) for s in ("train", "val", "test")}
    train = src["train"]
    expected = [c.text for c in teacher.caption_batch([r.image_path for r in train], beam=2)]
    assert [r.image_path for r in kd["train"]] == [r.image_path for r in train]  # the same image files
    assert [r.captions for r in kd["train"]] == [[c] for c in expected]
    assert any(e not in r.captions for e, r in zip(expected, train))  # not the references
    for s in ("val", "test"):  # evaluation splits keep their human references
        assert [(r.image_path, r.captions, r.scene) for r in kd[s]] == [(r.image_path, r.captions, r.scene)
                                                                          for r in src[s]]
    with open(os.path.join(kd_dir, "dataset_shapes.json")) as f:
        meta = json.load(f)["distilled"]
    assert meta["teacher"] == teacher_dir and meta["decoding"]["beam"] == 2 and meta["images"] == len(train)

    both = str(tmp_path / "kd-refs")
    distill_captions.main(common + ["--out", both, "--keep-references"])
    assert [r.captions for r in load_karpathy("shapes", both, "train")] == [r.captions + [e]
                                                                           for r, e in zip(train, expected)]
    with pytest.raises(SystemExit, match="new folder"):
        distill_captions.main(common + ["--out", world_dir])

    # --select typical: each training caption is one of the teacher's hypotheses within the margin
    typical = str(tmp_path / "kd-typical")
    distill_captions.main(common + ["--out", typical, "--select", "typical", "--margin", "0.5"])
    hyps = distill_captions.teacher_hypotheses(teacher, clip_encoder.encode([r.image_path for r in train]),
                                               teacher.settings(beam=2))
    chosen = [r.captions for r in load_karpathy("shapes", typical, "train")]
    for (c,), r in zip(chosen, hyps):
        assert c in {tokenizer.decode(ids) for s, ids in r if s >= r[0][0] - 0.5}
    assert [tokenizer.decode(r[0][1]) for r in hyps] == expected  # best first: what --select best writes
    with open(os.path.join(typical, "dataset_shapes.json")) as f:
        sel = json.load(f)["distilled"]["selection"]
    assert sel["select"] == "typical" and sel["margin"] == 0.5 and 0 <= sel["not_the_best"] <= len(train)
    # --object-order left-to-right: the same hypotheses, multi-object scenes' objects named left to right
    # where a near hypothesis does so
    ordered = str(tmp_path / "kd-ordered")
    distill_captions.main(common + ["--out", ordered, "--select", "typical", "--margin", "0.5",
                                    "--object-order", "left-to-right"])
    with open(os.path.join(ordered, "dataset_shapes.json")) as f:
        osel = json.load(f)["distilled"]["selection"]
    assert osel["object_order"] == "left-to-right" and osel["multi_object_images"] > 0
    assert osel["in_order"] >= osel["in_order_without_preference"]
    scenes = [Scene.from_json(r.scene) for r in train]
    with open(os.path.join(ordered, "dataset_shapes.json")) as f:
        checked = json.load(f)["distilled"]["against_scenes"]  # the written captions scored against their scenes
    written = attribute_report([r.captions[0] for r in load_karpathy("shapes", ordered, "train")], scenes)
    assert checked == {"single_object_colour": written["single_object"]["color_acc"],
                       "single_object_shape": written["single_object"]["shape_acc"],
                       "color": written["color"]["acc"], "shape": written["shape"]["acc"],
                       "binding": written["binding"]["acc"], "hallucination": written["hallucination"]}
    for (c,), r, sc in zip([r.captions for r in load_karpathy("shapes", ordered, "train")], hyps, scenes):
        assert c in {tokenizer.decode(ids) for s, ids in r if s >= r[0][0] - 0.5}
        near = [tokenizer.decode(ids) for s, ids in r if s >= r[0][0] - 0.5 and ids]
        assert distill_captions.in_left_to_right_order(c, sc) or not any(
            distill_captions.in_left_to_right_order(h, sc) for h in near)
    # --reference-weight: the near hypothesis closest to the image's own references (by sentence BLEU-2)
    # wins once the weight outgrows the teacher's preferences
    closest = str(tmp_path / "kd-closest")
    distill_captions.main(common + ["--out", closest, "--select", "typical", "--margin", "0.5",
                                    "--typicality-weight", "0", "--reference-weight", "1000"])
    with open(os.path.join(closest, "dataset_shapes.json")) as f:
        csel = json.load(f)["distilled"]
    assert csel["selection"]["reference_weight"] == 1000 and "--reference-weight 1000" in csel["command"]
    for (c,), r, rec in zip([r.captions for r in load_karpathy("shapes", closest, "train")], hyps, train):
        near = [tokenizer.decode(ids) for s, ids in r if s >= r[0][0] - 0.5 and ids]
        assert c in near
        assert distill_captions.sentence_bleu([c], rec.captions)[0] == pytest.approx(
            max(distill_captions.sentence_bleu(near, rec.captions)), abs=1e-5)
    with pytest.raises(SystemExit, match="positive weight with --select typical"):
        distill_captions.main(common + ["--out", str(tmp_path / "y"), "--reference-weight", "1"])
    with pytest.raises(SystemExit, match="with --select typical"):
        distill_captions.main(common + ["--out", str(tmp_path / "y"), "--object-order", "left-to-right"])
    with pytest.raises(SystemExit, match="--beam >= 2"):
        distill_captions.main(common[:-4] + ["--beam", "1", "--cache-dir", str(tmp_path / "cache"),
                                             "--out", str(tmp_path / "x"), "--select", "typical"])

    # a captioner trained on the distilled file records its teacher
    out, _ = _train(kd_dir, clip_dir, tmp_path / "student")
    assert Captioner.from_pretrained(str(out)).config.extra["distilled"]["teacher"] == teacher_dir
    out, _ = _train(typical, clip_dir, tmp_path / "student-typical")  # and how its captions were chosen
    assert Captioner.from_pretrained(str(out)).config.extra["distilled"]["selection"] == sel


def test_init_fine_tunes_from_a_checkpoint_with_its_architecture(world_dir, clip_dir, tmp_path):
    # a start checkpoint whose architecture differs from the tiny preset's, so inheritance is visible
    start, _ = _train(world_dir, clip_dir, tmp_path / "start", "--n-layers", "1", "--seq-len", "12")
    start_cfg = Captioner.from_pretrained(str(start)).config
    assert (start_cfg.n_layers, start_cfg.seq_len) == (1, 12)

    # no steps: the saved weights are exactly the start's, and the config is the start's plus the flags given
    same, _ = _train(world_dir, clip_dir, tmp_path / "same", "--init", str(start), "--steps", "0",
                     "--focus-steps", "1", "--p-focus", "0.8")
    a, b = load_file(str(start / "model.safetensors")), load_file(str(same / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same_cap = Captioner.from_pretrained(str(same))
    cfg, obj = same_cap.config, same_cap.objective
    assert (cfg.n_layers, cfg.seq_len, obj.focus_steps, obj.p_focus) == (1, 12, 1, 0.8)
    assert cfg.extra["init"] == {"checkpoint": str(start), "steps": 6}

    # a few steps move the weights away from the start
    moved, _ = _train(world_dir, clip_dir, tmp_path / "moved", "--init", str(start), "--steps", "2")
    c = load_file(str(moved / "model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # ...and so do a few of step-unrolled training, which the saved config records
    unrolled, _ = _train(world_dir, clip_dir, tmp_path / "unrolled", "--init", str(start), "--steps", "2",
                         "--focus-steps", "2", "--p-unroll", "0.5")
    assert Captioner.from_pretrained(str(unrolled)).objective.p_unroll == 0.5
    u = load_file(str(unrolled / "model.safetensors"))
    assert any(not torch.equal(a[k], u[k]) for k in a)

    # a flag that would change a tensor's shape is refused before any training, naming the flag
    with pytest.raises(SystemExit, match="--seq-len"):
        _train(world_dir, clip_dir, tmp_path / "bad", "--init", str(start), "--seq-len", "16")
    with pytest.raises(SystemExit, match="not a readable"):
        _train(world_dir, clip_dir, tmp_path / "bad", "--init", str(tmp_path / "nowhere"))


def test_init_may_grow_a_conditioning_mlp_that_starts_as_the_linear_projection(world_dir, clip_dir, tmp_path, scene_image):
    start, _ = _train(world_dir, clip_dir, tmp_path / "start", "--n-layers", "1")
    # no steps: the MLP is added with its last layer at zero, so the captioner's predictions are the start's
    grown, _ = _train(world_dir, clip_dir, tmp_path / "grown", "--init", str(start), "--steps", "0", "--cond-mlp", "24")
    a, b = Captioner.from_pretrained(str(start)), Captioner.from_pretrained(str(grown))
    assert b.config.cond_mlp == 24 and b.denoiser.cond_mlp[0].weight.shape == (24, b.config.cond_dim)
    assert set(load_file(str(grown / "model.safetensors"))) - set(load_file(str(start / "model.safetensors"))) == {
        "cond_mlp.0.weight", "cond_mlp.0.bias", "cond_mlp.2.weight", "cond_mlp.2.bias"}
    x_t, t, cond = torch.randn(2, a.config.seq_len, a.config.emb_dim), torch.tensor([5, 50]), torch.randn(2, a.config.cond_dim)
    with torch.no_grad():
        assert torch.equal(a.denoiser.eval()(x_t, t, cond)[0], b.denoiser.eval()(x_t, t, cond)[0])
    # trained, the MLP leaves zero and changes the conditioning; the captioner still captions
    moved, _ = _train(world_dir, clip_dir, tmp_path / "moved", "--init", str(grown), "--steps", "2", "--lr", "1e-2")
    c = Captioner.from_pretrained(str(moved))
    assert c.denoiser.cond_mlp[2].weight.abs().sum() > 0
    assert len(c.caption(scene_image, steps=2).steps) == 2
    # an MLP once there keeps its width: it cannot be resized or dropped by a fine-tune
    with pytest.raises(SystemExit, match="--cond-mlp"):
        _train(world_dir, clip_dir, tmp_path / "bad", "--init", str(grown), "--cond-mlp", "8")
    with pytest.raises(SystemExit, match="--cond-mlp"):
        _train(world_dir, clip_dir, tmp_path / "bad", "--init", str(grown), "--cond-mlp", "0")


def test_init_may_grow_self_conditioning_onto_a_checkpoint(world_dir, clip_dir, tmp_path, scene_image):
    start, _ = _train(world_dir, clip_dir, tmp_path / "start", "--n-layers", "1")
    grown, _ = _train(world_dir, clip_dir, tmp_path / "grown", "--init", str(start), "--steps", "0", "--self-cond", "true")
    a, b = Captioner.from_pretrained(str(start)), Captioner.from_pretrained(str(grown))
    assert b.config.self_cond and b.diffusion.self_cond
    assert set(load_file(str(grown / "model.safetensors"))) - set(load_file(str(start / "model.safetensors"))) == {
        "self_cond_proj.weight"}
    # the new input starts at zero: the same captions as the start, step for step
    assert [s.text for s in a.caption(scene_image, steps=3).steps] == [s.text for s in b.caption(scene_image, steps=3).steps]
    moved, _ = _train(world_dir, clip_dir, tmp_path / "moved", "--init", str(grown), "--steps", "2", "--lr", "1e-2")
    c = Captioner.from_pretrained(str(moved))
    assert c.denoiser.self_cond_proj.weight.abs().sum() > 0 and len(c.caption(scene_image, steps=2).steps) == 2
    with pytest.raises(SystemExit, match="--self-cond"):  # once there, it stays
        _train(world_dir, clip_dir, tmp_path / "bad", "--init", str(grown), "--self-cond", "false")


def test_typical_selection_breaks_near_ties_toward_the_common_phrasing():
    from training.distill_captions import BigramModel, select_typical

    common_, rare = [1, 2, 3, 9], [4, 5, 1, 9]  # two phrasings; the corpus uses the first 9 times in 10
    lm = BigramModel([common_] * 9 + [rare], vocab_size=10)
    assert lm.mean_log_prob(common_) > lm.mean_log_prob(rare)
    assert abs(sum(math.exp(lm.log_prob(1, t)) for t in range(10)) - 1) < 1e-9  # a distribution per context
    near_tie = [(-0.20, rare), (-0.21, common_)]
    assert select_typical(near_tie, lm, margin=0.1, weight=1.0) is common_
    assert select_typical(near_tie, lm, margin=0.1, weight=0.0) is rare  # no typicality: the teacher's best
    assert select_typical(near_tie, lm, margin=0.005, weight=1.0) is rare  # outside the margin: never chosen
    assert select_typical([(-0.2, rare), (-0.9, common_)], lm, margin=0.1, weight=100.0) is rare

    # a preference narrows the near hypotheses when it accepts one of them, and is ignored otherwise
    assert select_typical(near_tie, lm, margin=0.1, weight=1.0, prefer=lambda ids: ids is rare) is rare
    assert select_typical(near_tie, lm, margin=0.1, weight=1.0, prefer=lambda ids: False) is common_
    far = [(-0.2, rare), (-0.9, common_)]  # a preferred hypothesis outside the margin is still never chosen
    assert select_typical(far, lm, margin=0.1, weight=0.0, prefer=lambda ids: ids is common_) is rare


def test_reference_similarity_picks_the_near_hypothesis_the_references_support():
    from training.distill_captions import BigramModel, select_typical, sentence_bleu

    refs = ["a purple star and a red square", "a red square next to a purple star on a blue background"]
    right, swapped = "a purple star and a red square", "a red star and a purple square"
    b_right, b_swapped, b_none = sentence_bleu([right, swapped, "two shapes"], refs)
    assert b_right == pytest.approx(1.0) and 0 < b_swapped < b_right and b_none < b_swapped
    assert sentence_bleu([right], []) == [0.0]  # no references: no signal, not an error

    hyp_swapped, hyp_right = [1, 2, 3], [1, 3, 2]
    lm = BigramModel([hyp_swapped, hyp_right], vocab_size=5)
    text = {tuple(hyp_swapped): swapped, tuple(hyp_right): right}
    bonus = lambda near: [2.0 * b for b in sentence_bleu([text[tuple(ids)] for ids in near], refs)]
    ranked = [(-0.20, hyp_swapped), (-0.25, hyp_right)]  # the teacher prefers the swapped one
    assert select_typical(ranked, lm, margin=0.1, weight=0.0) is hyp_swapped
    assert select_typical(ranked, lm, margin=0.1, weight=0.0, bonus=bonus) is hyp_right
    assert select_typical(ranked, lm, margin=0.01, weight=0.0, bonus=bonus) is hyp_swapped  # outside the margin


def test_left_to_right_order_follows_the_scene_layout():
    from diffusion_caption.world.scenes import Scene, ShapeObject
    from training.distill_captions import in_left_to_right_order

    red_circle, blue_square = ShapeObject("circle", "red", "large", 10, 30, 8), ShapeObject("square", "blue", "small", 50, 5, 4)
    scene = Scene([blue_square, red_circle], "gray")  # listed right to left: the order of the list is not used
    assert in_left_to_right_order("a red circle and a blue square", scene)
    assert in_left_to_right_order("a red circle left of a blue square on a gray background", scene)
    assert not in_left_to_right_order("a blue square and a red circle", scene)
    assert not in_left_to_right_order("a red square and a blue circle", scene)  # a mention no object matches
    assert in_left_to_right_order("a small square on a gray background", Scene([blue_square], "gray"))
    assert in_left_to_right_order("two shapes on a gray background", scene)  # names no object
    green = ShapeObject("circle", "green", "small", 30, 30, 4)
    assert in_left_to_right_order("a red circle , a green circle and a blue square", Scene([blue_square, green, red_circle], "gray"))
    assert not in_left_to_right_order("a red circle , a blue square and a green circle", Scene([blue_square, green, red_circle], "gray"))


def test_shape_order_follows_the_world_shape_list():
    from diffusion_caption.world.scenes import Scene
    from training.distill_captions import OBJECT_ORDERS, in_shape_order

    anywhere = Scene([], "gray")  # the order is one of words: the scene is not consulted
    assert in_shape_order("a red circle and a blue star", anywhere)
    assert not in_shape_order("a blue star and a red circle", anywhere)
    assert in_shape_order("a red circle , a green circle and a blue square", anywhere)  # a tie in either order
    assert in_shape_order("a green circle , a red circle and a blue square", anywhere)
    assert not in_shape_order("a red and a blue star", anywhere)  # a mention without a shape
    assert in_shape_order("two shapes on a gray background", anywhere)
    assert in_shape_order("a pink background with a red star", anywhere)
    assert set(OBJECT_ORDERS) == {"left-to-right", "by-shape"}


def test_init_from_a_distilbert_checkpoint_needs_no_distilbert_weights(world_dir, clip_dir, tmp_path):
    """A fine-tune rebuilds the encoder from the checkpoint's stored config: the DistilBERT folder the start
    was trained from may be gone (offline, or a hub id that cannot be reached)."""
    import shutil

    from transformers import DistilBertConfig, DistilBertModel

    bert = tmp_path / "bert"
    DistilBertModel(DistilBertConfig(vocab_size=40, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                     max_position_embeddings=64)).save_pretrained(str(bert))
    arch = ["--encoder", str(bert), "--dim", "32", "--n-layers", "2", "--n-heads", "2", "--hidden-dim", "64"]
    start, _ = _train(world_dir, clip_dir, tmp_path / "start", *arch)
    shutil.rmtree(bert)
    same, _ = _train(world_dir, clip_dir, tmp_path / "same", "--init", str(start), "--steps", "0")
    a, b = load_file(str(start / "model.safetensors")), load_file(str(same / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_layers_starts_a_shallower_student_from_chosen_layers(world_dir, clip_dir, tmp_path, scene_image):
    """``--init-layers 0,2`` keeps layers 0 and 2 of a 3-layer checkpoint as layers 0 and 1 of the new one
    (DistilBERT's initialisation); every other tensor is carried over unchanged."""
    start, _ = _train(world_dir, clip_dir, tmp_path / "start", "--n-layers", "3")
    small, _ = _train(world_dir, clip_dir, tmp_path / "small", "--init", str(start), "--init-layers", "0,2",
                      "--steps", "0")
    a, b = load_file(str(start / "model.safetensors")), load_file(str(small / "model.safetensors"))
    layer = "encoder.transformer.layer."
    renumbered = {k.replace(f"{layer}2.", f"{layer}1."): v for k, v in a.items() if not k.startswith(f"{layer}1.")}
    assert renumbered.keys() == b.keys() and all(torch.equal(renumbered[k], b[k]) for k in b)
    model = Captioner.from_pretrained(str(small))  # loads as a 2-layer model and captions
    assert model.config.n_layers == 2 and model.denoiser.encoder.config.n_layers == 2
    assert model.config.extra["init"]["layers"] == [0, 2]
    assert len(model.caption(scene_image, steps=2).steps) == 2
    # a fine-tune of that student records its whole lineage, the layer choice included
    again, _ = _train(world_dir, clip_dir, tmp_path / "again", "--init", str(small), "--steps", "1")
    init = Captioner.from_pretrained(str(again)).config.extra["init"]
    assert init["checkpoint"] == str(small) and init["init"] == {"checkpoint": str(start), "steps": 6, "layers": [0, 2]}

    for spec, match in [("0,3", "layers 0-2"), ("2,0", "increasing order"), ("1,1", "increasing order"),
                        ("a", "layer indices"), (",", "names no layer")]:
        with pytest.raises(SystemExit, match=match):
            _train(world_dir, clip_dir, tmp_path / "bad", "--init", str(start), "--init-layers", spec)
    with pytest.raises(SystemExit, match="give --init too"):
        _train(world_dir, clip_dir, tmp_path / "bad", "--init-layers", "0")
    with pytest.raises(SystemExit, match="--n-layers would change.*depth is set by --init-layers"):
        _train(world_dir, clip_dir, tmp_path / "bad", "--init", str(start), "--init-layers", "0,2", "--n-layers", "3")


def test_correct_captions_keeps_right_ones_and_replaces_wrong_ones_by_beam_then_references():
    from types import SimpleNamespace

    from diffusion_caption.world.scenes import Scene, ShapeObject
    from training.distill_captions import correct_captions

    scene = Scene(background="gray", objects=[ShapeObject("circle", "red", "large", 30, 30, 14),
                                               ShapeObject("square", "blue", "small", 90, 30, 8)])
    refs = ["a large red circle to the left of a small blue square on a gray background",
            "a red circle and a blue square on a gray background"]
    rec = SimpleNamespace(scene=scene.to_json(), captions=refs)
    vocab = {i: w for i, w in enumerate("a red blue circle square and on gray background".split())}
    enc = {w: i for i, w in vocab.items()}

    def ids(text):
        return [enc[w] for w in text.split()]

    def decode(toks):
        return " ".join(vocab[i] for i in toks)

    right, swapped = "a red circle and a blue square on a gray background", "a blue circle and a red square on a gray background"
    hyps = [[(-0.1, ids(swapped)), (-0.2, ids(right))], [(-0.1, ids(swapped))], [(-0.1, ids(right))]]
    out, counts = correct_captions([swapped, swapped, right], [rec, rec, rec], hyps, decode)
    assert out[0] == right  # the beam's likeliest right hypothesis
    assert out[1] == refs[1]  # no right hypothesis: the reference closest to the teacher's caption
    assert out[2] == right and counts == {"wrong": 2, "from_beam": 1, "from_references": 1}
    # a vague caption is right as it stands, and replaced only when the student must name every object
    vocab[9], enc["shapes"], enc["two"] = "shapes", 9, 10
    vocab[10] = "two"
    vague = "two shapes on a gray background"
    hyps = [[(-0.1, ids(vague)), (-0.3, ids(right))], [(-0.1, ids(vague))]]
    assert correct_captions([vague, vague], [rec, rec], hyps, decode)[0] == [vague, vague]
    out, counts = correct_captions([vague, vague], [rec, rec], hyps, decode, specific=True)
    assert out == [right, refs[1]] and counts == {"wrong": 2, "vague": 2, "from_beam": 1, "from_references": 1}


def test_ship_refers_to_the_shared_clip_and_writes_the_summary_and_sampling_defaults(make_captioner, tmp_path):
    import json

    from diffusion_caption import Captioner
    from training import ship

    cap = make_captioner(fusion="add", block_size=2, sampling="block:6:1")
    src, clip, dest = str(tmp_path / "run"), str(tmp_path / "shapes-clip"), str(tmp_path / "assets" / "m")
    cap.save_pretrained(src)
    cap.image_encoder.save_pretrained(clip)
    ship.main([src, dest, "--clip", clip, "--summary", "one line", "--sampling", "block:5:1:auto"])
    shipped = Captioner.from_pretrained(dest)
    assert (shipped.sampling.steps, shipped.sampling.precision) == (5, "auto")
    assert shipped.config.extra["summary"] == "one line"
    with open(os.path.join(dest, "config.json")) as f:
        assert json.load(f)["image_encoder"]["path"] == os.path.relpath(clip, dest)
    with pytest.raises(SystemExit, match="block"):
        ship.main([src, dest, "--clip", clip, "--sampling", "ddim:5:1"])
