import json
import os
import shutil

import pytest
import torch

from diffusion_caption import Captioner, CheckpointError
from diffusion_caption.config import ObjectiveConfig
from diffusion_caption.diffusion import GaussianDiffusion
from diffusion_caption.schedule import NoiseSchedule


def _overfit(cap, tokenizer, steps=150, **loss_kw):
    captions = ["a red circle", "two blue squares", "a small green star on a black background", "a white diamond"]
    ids = tokenizer.encode(captions, cap.config.seq_len)
    cond = torch.nn.functional.normalize(torch.randn(4, cap.config.cond_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    diff = GaussianDiffusion(NoiseSchedule(cap.config.schedule, cap.config.T), cap.config.predict)
    model = cap.denoiser.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(steps):
        losses = diff.training_losses(model, ids, cond, generator=g, **loss_kw)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    model.eval()
    return history, ids, cond


def _mean(history, key, a, b):
    part = history[a:b]
    return sum(h[key] for h in part) / len(part)


def test_loss_falls_when_overfitting_a_tiny_batch(make_captioner, tokenizer):
    cap = make_captioner()
    hist, ids, cond = _overfit(cap, tokenizer, lambda_round=0.3)
    assert _mean(hist, "loss", -20, len(hist)) < 0.5 * _mean(hist, "loss", 0, 10)
    assert _mean(hist, "token_acc", -20, len(hist)) > 0.6
    # and the overfitted model now denoises its own captions
    traces = cap.caption_batch(features=cond, steps=20, seed=0)
    right = sum(t.text == c for t, c in zip(traces, ["a red circle", "two blue squares",
                                                     "a small green star on a black background", "a white diamond"]))
    assert right >= 2, [t.text for t in traces]


@pytest.mark.parametrize("overrides,loss_kw", [
    (dict(fusion="add"), dict(lambda_round=0.3)),
    (dict(predict="eps"), dict(lambda_round=0.3)),
    (dict(predict_feature=True), dict(lambda_round=0.3, lambda_feature=0.5)),
    (dict(), dict(lambda_round=0.0)),  # the paper's collapse case must run
    (dict(schedule="cosine", n_prefix=2), dict(lambda_round=1.0, p_uncond=0.5)),
])
def test_variants_train(make_captioner, tokenizer, overrides, loss_kw):
    cap = make_captioner(**overrides)
    hist, _, _ = _overfit(cap, tokenizer, steps=60, **loss_kw)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert _mean(hist, "loss", -15, 60) < _mean(hist, "loss", 0, 15)
    if overrides.get("predict_feature"):
        assert "feature" in hist[0]


def test_focus_training_draws_the_few_step_samplers_timesteps(make_captioner, tokenizer):
    """``t_focus`` puts a fraction ``p_focus`` of the batch at the given timesteps, the rest uniform."""
    cap = make_captioner()
    seen = []

    class Spy(torch.nn.Module):  # the denoiser, recording the timesteps it is given
        embeddings = cap.denoiser.embeddings

        def forward(self, x_t, t, cond, drop=None):
            seen.append(t.clone())
            return cap.denoiser(x_t, t, cond, drop)

    spy = Spy()

    ids = tokenizer.encode(["a red circle"] * 400, cap.config.seq_len)
    cond = torch.zeros(400, cap.config.cond_dim)
    diff = GaussianDiffusion(NoiseSchedule(cap.config.schedule, cap.config.T), cap.config.predict)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        diff.training_losses(spy, ids, cond, generator=g, t_focus=[99, 60], p_focus=1.0)
        diff.training_losses(spy, ids, cond, generator=g, t_focus=[99, 60], p_focus=0.5)
        diff.training_losses(spy, ids, cond, generator=g)
    all_focus, half, uniform = seen
    assert set(all_focus.tolist()) == {99, 60}
    in_focus = ((half == 99) | (half == 60)).float().mean().item()
    assert 0.4 < in_focus < 0.65 and len(set(half.tolist())) > 30
    assert ((uniform == 99) | (uniform == 60)).float().mean().item() < 0.1
    with pytest.raises(ValueError, match="p_focus"):
        ObjectiveConfig(p_focus=1.5)
    with pytest.raises(ValueError, match="focus_steps"):
        ObjectiveConfig(focus_steps=cap.config.T + 1).check(cap.config)
    with pytest.raises(ValueError, match="spacing must be"):
        ObjectiveConfig(focus_steps=3, focus_spacing="leading")


def test_unrolled_training_feeds_the_second_step_the_networks_own_first_draft(make_captioner, tokenizer):
    """With ``p_unroll``, rows sit at the second focus timestep with x_t = one DDIM step of the network's own
    x0 from pure noise, exactly what a two-step DDIM sampler gives it at inference."""
    from diffusion_caption.samplers import DDIMSampler, spaced_timesteps

    cap = make_captioner()
    T = cap.config.T
    t_focus = spaced_timesteps(T, 2, "trailing^2")
    calls = []

    class Spy(torch.nn.Module):
        embeddings = cap.denoiser.embeddings

        def forward(self, x_t, t, cond, drop=None):
            calls.append((x_t.clone(), t.clone(), cond.clone()))
            return cap.denoiser(x_t, t, cond, drop)

    cap.denoiser.eval()
    ids = tokenizer.encode(["a red circle"] * 64, cap.config.seq_len)
    cond = torch.randn(64, cap.config.cond_dim, generator=torch.Generator().manual_seed(1))
    diff = GaussianDiffusion(NoiseSchedule(cap.config.schedule, T), cap.config.predict)
    with torch.no_grad():
        diff.training_losses(Spy(), ids, cond, generator=torch.Generator().manual_seed(0), t_focus=t_focus,
                             p_focus=0.0, p_unroll=0.5, focus_spacing="trailing^2", focus_steps=2)
    (x_T, t_draft, cond_draft), (x_t, t, _) = calls  # the no-grad draft, then the training call
    assert set(t_draft.tolist()) == {t_focus[0]}
    unrolled = t == t_focus[1]
    n = int(unrolled.sum())
    assert n == x_T.shape[0] and 15 < n < 50  # about half the batch
    assert torch.equal(cond_draft, cond[unrolled])
    # the unrolled rows hold the sampler's step from the draft; the rest were drawn from q(x_t | x_0) as before
    x0_draft, _ = cap.denoiser(x_T, t_draft, cond_draft)
    expected = DDIMSampler(diff.schedule, 2, "trailing^2").step(x0_draft, t_focus[0], x_T).prev_sample
    assert torch.allclose(x_t[unrolled], expected, atol=1e-5)
    assert (t[~unrolled] != t_focus[1]).float().mean() > 0.9  # uniform t elsewhere (p_focus 0)
    with pytest.raises(ValueError, match="two focus timesteps"):
        diff.training_losses(cap.denoiser, ids, cond, t_focus=[T - 1], p_unroll=0.5, focus_steps=2)
    with pytest.raises(ValueError, match="p_unroll"):
        ObjectiveConfig(p_unroll=0.5, focus_steps=1)


def test_trace_structure_and_determinism(make_captioner, scene_image):
    cap = make_captioner()
    for steps in (1, 2, 7):
        tr = cap.caption(scene_image, steps=steps, seed=3)
        assert len(tr) == steps == len(tr.steps)
        assert [s.index for s in tr.steps] == list(range(steps))
        assert tr.steps[0].t == cap.config.T - 1 and (steps == 1 or tr.steps[-1].t == 0)
        s = tr.steps[-1]
        assert len(s.tokens) == len(s.confidence) == len(s.token_ids) == cap.config.seq_len
        assert all(0.0 <= c <= 1.0 for c in s.confidence)
        assert s.x_t.shape == s.x0_pred.shape == (cap.config.seq_len, cap.config.emb_dim)
        assert "[PAD]" not in tr.text and "[SEP]" not in tr.text and "[CLS]" not in tr.text
    a, b = cap.caption(scene_image, steps=10, seed=5), cap.caption(scene_image, steps=10, seed=5)
    assert torch.equal(a.x0_preds(), b.x0_preds()) and a.text == b.text
    c = cap.caption(scene_image, steps=10, seed=6)
    assert not torch.equal(a.x_t(), c.x_t())
    d1, d2 = cap.caption(scene_image, steps=10, sampler="ddpm", seed=1), cap.caption(scene_image, steps=10, sampler="ddpm", seed=1)
    assert torch.equal(d1.x0_preds(), d2.x0_preds())
    json.dumps(a.to_json())  # the API form is plain JSON


def test_streaming_matches_the_batched_trace(make_captioner, scene_image):
    cap = make_captioner()
    streamed = list(cap.iter_caption(scene_image, steps=5, seed=2, guidance=2.0, clamp=True))
    full = cap.caption(scene_image, steps=5, seed=2, guidance=2.0, clamp=True)
    assert [s.text for s in streamed] == [s.text for s in full.steps]
    assert torch.allclose(streamed[-1].x0_pred, full.steps[-1].x0_pred)


def test_guidance_combines_conditional_and_unconditional(make_captioner):
    cap = make_captioner()
    x = torch.randn(2, cap.config.seq_len, cap.config.emb_dim)
    cond = torch.randn(2, cap.config.cond_dim)
    t = torch.full((2,), 50)
    with torch.no_grad():
        c, _ = cap.denoiser(x, t, cond)
        u, _ = cap.denoiser(x, t, None)
        got = cap.diffusion.predict_x0(cap.denoiser, x, 50, cond, guidance=3.0)
    assert torch.allclose(got, u + 3.0 * (c - u), atol=1e-5)


def test_settings_are_validated(make_captioner, scene_image):
    cap = make_captioner()
    for kw, word in [(dict(steps=0), "steps"), (dict(steps=10**6), "steps"), (dict(steps=2.5), "steps"),
                     (dict(guidance=-1.0), "guidance"), (dict(guidance=float("nan")), "guidance"),
                     (dict(seed="x"), "seed"), (dict(seed=-1), "seed"), (dict(sampler="euler"), "sampler")]:
        with pytest.raises(ValueError, match=word):
            cap.caption(scene_image, **kw)


def test_save_load_round_trip_gives_identical_captions(make_captioner, scene_image, tmp_path):
    cap = make_captioner(init_seed=4)
    path = str(tmp_path / "ckpt")
    cap.save_pretrained(path)
    assert {"config.json", "model.safetensors", "tokenizer.json", "clip"} <= set(os.listdir(path))
    again = Captioner.from_pretrained(path)
    a, b = cap.caption(scene_image, steps=8, seed=1), again.caption(scene_image, steps=8, seed=1)
    assert a.text == b.text and torch.equal(a.x0_preds(), b.x0_preds())
    assert again.config == cap.config


def test_a_checkpoint_may_refer_to_a_shared_clip_instead_of_copying_it(make_captioner, clip_encoder, scene_image, tmp_path):
    from diffusion_caption.image_encoder import ImageEncoder

    cap = make_captioner(init_seed=4)
    clip_encoder.save_pretrained(str(tmp_path / "shared-clip"))
    path = str(tmp_path / "models" / "ckpt")
    cap.save_pretrained(path, clip_reference=str(tmp_path / "shared-clip"))
    assert "clip" not in os.listdir(path)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["image_encoder"]["path"] == os.path.join("..", "..", "shared-clip")
    again = Captioner.from_pretrained(path)
    assert again.caption(scene_image, steps=4, seed=1).text == cap.caption(scene_image, steps=4, seed=1).text
    # the reference must hold the captioner's own CLIP
    torch.manual_seed(9)
    ImageEncoder.create_shapes(cap.tokenizer.vocab_size, eos_id=cap.tokenizer.sep_id, pad_id=cap.tokenizer.pad_id).save_pretrained(str(tmp_path / "other-clip"))
    with pytest.raises(ValueError, match="weights differ"):
        cap.save_pretrained(str(tmp_path / "bad"), clip_reference=str(tmp_path / "other-clip"))
    assert not os.path.exists(tmp_path / "bad")
    # a moved checkpoint whose shared CLIP is not beside it says where it looked
    shutil.move(path, str(tmp_path / "moved"))
    with pytest.raises(CheckpointError, match="shared-clip"):
        Captioner.from_pretrained(str(tmp_path / "moved"))


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def test_broken_checkpoints_have_clear_errors(make_captioner, tmp_path):
    from safetensors.torch import load_file, save_file

    src = str(tmp_path / "good")
    make_captioner().save_pretrained(src)

    def drop(name):
        return lambda d: os.remove(os.path.join(d, name))

    def truncate(d):
        p = os.path.join(d, "model.safetensors")
        data = open(p, "rb").read()
        open(p, "wb").write(data[: len(data) // 2])

    def reshape(d):
        p = os.path.join(d, "model.safetensors")
        t = load_file(p)
        t["null_cond"] = torch.zeros(3)
        save_file(t, p)

    def retype(d):
        p = os.path.join(d, "model.safetensors")
        t = load_file(p)
        t["null_cond"] = t["null_cond"].double()
        save_file(t, p)

    def remove_tensor(d):
        p = os.path.join(d, "model.safetensors")
        t = load_file(p)
        del t["null_cond"]
        save_file(t, p)

    def mismatch_config(d):
        p = os.path.join(d, "config.json")
        meta = json.load(open(p))
        meta["captioner"]["dim"] = 48
        json.dump(meta, open(p, "w"))

    def bad_json(d):
        open(os.path.join(d, "config.json"), "w").write("{not json")

    cases = [(drop("model.safetensors"), r"model\.safetensors: file missing"),
             (drop("config.json"), r"config\.json: file missing"),
             (truncate, r"model\.safetensors: not a readable safetensors file"),
             (reshape, r"null_cond: shape \(3,\)"),
             (retype, r"null_cond: dtype torch.float64"),
             (remove_tensor, r"missing tensors \['null_cond'\]"),
             (mismatch_config, r"does not match the model"),
             (bad_json, r"config\.json: not valid JSON"),
             (drop("tokenizer.json"), r"tokenizer")]
    for i, (edit, msg) in enumerate(cases):
        d = _broken_copy(src, str(tmp_path / f"bad{i}"), edit)
        with pytest.raises(CheckpointError, match=msg):
            Captioner.from_pretrained(d)
    with pytest.raises(CheckpointError, match="not found"):
        Captioner.from_pretrained(str(tmp_path / "nowhere"))


def test_config_sampling_defaults_apply_when_a_call_gives_none(make_captioner, scene_image):
    cap = make_captioner(sampling=dict(guidance=3.0, steps=4))
    tr = cap.caption(scene_image)
    assert tr.settings["guidance"] == 3.0 and len(tr.steps) == 4
    assert cap.caption(scene_image, guidance=1.0).settings["guidance"] == 1.0
    # the clamp default comes from the config too, and changes the captioning: x0 snapped to token embeddings
    cc = make_captioner(sampling=dict(clamp=True, steps=4, sampler="ddpm"))
    tr = cc.caption(scene_image)
    assert tr.settings["clamp"] is True and tr.settings["sampler"] == "ddpm"
    off = cc.caption(scene_image, clamp=False)
    assert off.settings["clamp"] is False
    assert tr.steps[1].x_t is not None and not torch.equal(tr.steps[1].x_t, off.steps[1].x_t)
    with pytest.raises(ValueError, match="clamp must be true or false"):
        cc.caption(scene_image, clamp="yes")


def test_spacing_picks_the_timesteps_and_defaults_to_the_checkpoints(make_captioner, scene_image, tmp_path):
    from diffusion_caption.samplers import spaced_timesteps

    cap = make_captioner(sampling=dict(steps=5))
    T = cap.config.T
    lin = cap.caption(scene_image, seed=1)
    assert lin.settings["spacing"] == "linspace"
    assert [s.t for s in lin.steps] == spaced_timesteps(T, 5, "linspace")
    tr = cap.caption(scene_image, seed=1, spacing="trailing^2")
    assert tr.settings["spacing"] == "trailing^2"
    assert [s.t for s in tr.steps] == spaced_timesteps(T, 5, "trailing^2")
    assert tr.steps[0].t == T - 1 and tr.steps[-1].t > 0  # trailing stops short of t = 0
    # the first step sees the same noise at the same t, so it agrees; later steps do not
    assert torch.equal(lin.steps[0].x0_pred, tr.steps[0].x0_pred)
    assert not torch.equal(lin.steps[1].x_t, tr.steps[1].x_t)
    # the fast path and streaming use the same timesteps
    fast = cap.caption(scene_image, seed=1, spacing="trailing^2", record="final")
    assert fast.steps[-1].text == tr.steps[-1].text and fast.steps[-1].t == tr.steps[-1].t
    # a checkpoint's sampling spacing is its default and survives a save and load
    cap.sampling = cap.sampling.replace(spacing="trailing")
    cap.save_pretrained(str(tmp_path / "ck"))
    back = type(cap).from_pretrained(str(tmp_path / "ck"))
    assert back.sampling.spacing == "trailing"
    assert [s.t for s in back.caption(scene_image).steps] == spaced_timesteps(T, 5, "trailing")
    for bad in ("leading", 2, "trailing^0"):
        with pytest.raises(ValueError, match="spacing must be"):
            cap.caption(scene_image, spacing=bad)
