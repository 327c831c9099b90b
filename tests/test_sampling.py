"""SamplingConfig: one typed, validated set of sampling settings, its one text form, and its checkpoint section."""
import json

import pytest

from diffusion_caption.sampling import SamplingConfig, split_legacy


def test_parse_reads_the_one_text_form():
    s = SamplingConfig.parse("ddpm:50:5:clamp")
    assert s == SamplingConfig(sampler="ddpm", steps=50, guidance=5.0, clamp=True, spacing="linspace",
                               candidates=1, select="mbr", propose="noise")
    assert SamplingConfig.parse("DDIM:20:1").clamp is False
    s = SamplingConfig.parse("ddpm:10:5:clamp:trailing^2")
    assert s.clamp is True and s.spacing == "trailing^2"
    assert SamplingConfig.parse("ddim:5:1:trailing") == SamplingConfig(sampler="ddim", steps=5, spacing="trailing")
    assert s.describe() == "DDPM 10, guidance 5, clamp, trailing^2"
    # K candidates per image, kept by consensus unless CLIP score is named
    k = SamplingConfig.parse("ddpm:2:1:clamp:trailing^2:k8:clip")
    assert (k.candidates, k.select, k.spacing, k.clamp) == (8, "clip", "trailing^2", True)
    assert k.describe() == "DDPM 2, guidance 1, clamp, trailing^2, 8 candidates by CLIP"
    assert SamplingConfig.parse("ddim:1:1:k4").select == "mbr"
    # ...from the likeliest roundings of one draw when named
    r = SamplingConfig.parse("ddim:1:1:k8:clip:rounding")
    assert (r.candidates, r.select, r.propose, r.spacing) == (8, "clip", "rounding", "linspace")
    assert r.describe() == "DDIM 1, guidance 1, 8 roundings by CLIP"
    assert SamplingConfig.parse("block:6:1").sampler == "block"
    for bad in ("ddim:20", "ddim:x:1", "ddim:20:1:yes", "ddim:20:1:clamp:clamp", "ddim:5:1:trailing:linspace",
                "ddim:5:1:trailing^0", "ddim:1:1:clip", "ddim:1:1:k2:k4", "ddim:1:1:k4:clip:mbr",
                "ddim:1:1:rounding", "ddim:1:1:k4:clip:rounding:noise", "ddim:0:1", "euler:4:1",
                "ddim:1:1:k8:mbr:rounding", "ddim:4:99", "ddim:4:1:bf16:auto", "ddim:4:1:fp16"):
        with pytest.raises(ValueError):
            SamplingConfig.parse(bad)
    # the network's arithmetic: float32 unless named
    assert SamplingConfig.parse("ddpm:6:1:trailing^2").precision == "float32"
    a = SamplingConfig.parse("ddpm:6:1:trailing^2:auto")
    assert (a.precision, a.spacing) == ("auto", "trailing^2") and a.describe().endswith(", bfloat16 where native")
    assert SamplingConfig.parse("ddim:4:1:bf16").precision == "bfloat16"
    with pytest.raises(ValueError, match="precision"):
        SamplingConfig(precision="float16")
    # the block sampler's threshold for cutting a block short
    c = SamplingConfig.parse("block:12:1:auto:commit0.8")
    assert (c.commit, c.precision) == (0.8, "auto") and c.describe().endswith("blocks cut short at p < 0.8")
    assert SamplingConfig.parse("block:10:1").commit == 0.0
    for bad in ("block:12:1:commit1", "block:12:1:commit-0.5", "block:12:1:commit0.5:commit0.6", "ddim:4:1:commit0.5"):
        with pytest.raises(ValueError, match="commit|is not"):
            SamplingConfig.parse(bad)


def test_spec_and_parse_are_inverse():
    for text in ("ddim:20:5", "ddpm:10:5:clamp:trailing^2", "ddim:1:1:k8:clip:rounding", "ddpm:6:1:trailing^2",
                 "ddpm:2:1:clamp:trailing^2:k8:clip", "ddim:20:1:stop3", "ddpm:6:1:trailing^2:auto", "ddim:4:1:bf16",
                 "block:12:1:auto:commit0.8"):
        assert SamplingConfig.parse(text).spec == text
        s = SamplingConfig.parse(text)
        assert SamplingConfig.parse(s.spec) == s
    assert SamplingConfig.parse("ddim:20:5").calls == 40 and SamplingConfig.parse("ddim:20:1").calls == 20


def test_values_are_checked_once_when_made_and_replace_checks_again():
    with pytest.raises(ValueError, match="steps must be an integer"):
        SamplingConfig(steps=0)
    with pytest.raises(ValueError, match="steps must be an integer"):
        SamplingConfig(steps=2.5)
    with pytest.raises(ValueError, match="guidance must be a number from 0"):
        SamplingConfig(guidance=float("nan"))
    with pytest.raises(ValueError, match="clamp must be true or false"):
        SamplingConfig(clamp="yes")
    with pytest.raises(ValueError, match="spacing must be"):
        SamplingConfig(spacing="sideways")
    with pytest.raises(ValueError, match="candidates must be"):
        SamplingConfig(candidates=65)
    with pytest.raises(ValueError, match="select='clip'"):
        SamplingConfig(candidates=4, propose="rounding")
    s = SamplingConfig(steps=20.0, sampler="DDPM", spacing=" Trailing^2 ")
    assert (s.steps, type(s.steps), s.sampler, s.spacing) == (20, int, "ddpm", "trailing^2")
    assert s.replace(steps=None, guidance=None) is s  # None leaves a setting as it is
    assert s.replace(guidance=3).guidance == 3.0 and s.guidance == 1.0  # a new one; frozen
    with pytest.raises(ValueError, match="steps must be"):
        s.replace(steps=-1)
    with pytest.raises(TypeError, match="unknown sampling settings"):
        s.replace(stpes=4)
    with pytest.raises(ValueError, match="unknown sampling keys"):
        SamplingConfig.from_dict({"steps": 3, "temperature": 1})
    assert SamplingConfig.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_a_checkpoint_stores_sampling_apart_and_old_checkpoints_still_load(make_captioner, tmp_path, scene_image):
    from diffusion_caption import Captioner

    cap = make_captioner()
    cap.sampling = SamplingConfig.parse("ddpm:3:2:clamp:trailing")
    d = tmp_path / "ckpt"
    cap.save_pretrained(str(d))
    meta = json.loads((d / "config.json").read_text())
    assert meta["sampling"]["sampler"] == "ddpm" and meta["sampling"]["steps"] == 3
    assert not any(k.startswith("sample") for k in meta["captioner"])  # the network's config holds none
    back = Captioner.from_pretrained(str(d))
    assert back.sampling == cap.sampling
    want = back.caption(scene_image, seed=1)
    # a checkpoint written before the sampling section: its sample_* keys inside the captioner section
    old = dict(meta)
    old["captioner"] = {**meta["captioner"], "sampler": "ddpm", "sample_steps": 3, "sample_guidance": 2.0,
                        "sample_clamp": True, "sample_spacing": "trailing"}
    del old["sampling"]
    (d / "config.json").write_text(json.dumps(old))
    legacy = Captioner.from_pretrained(str(d))
    assert legacy.sampling == cap.sampling
    assert legacy.caption(scene_image, seed=1).text == want.text and want.settings["steps"] == 3
    net, smp = split_legacy(old["captioner"])
    assert smp == {"sampler": "ddpm", "steps": 3, "guidance": 2.0, "clamp": True, "spacing": "trailing"}
    assert "sample_steps" not in net and net["n_layers"] == meta["captioner"]["n_layers"]


def test_a_call_overrides_the_checkpoint_defaults_by_name(make_captioner, scene_image):
    cap = make_captioner()
    cap.sampling = SamplingConfig.parse("ddim:3:1")
    tr = cap.caption(scene_image)
    assert len(tr.steps) == 3 and tr.settings["sampler"] == "ddim"
    tr = cap.caption(scene_image, steps=2, sampler="ddpm")
    assert len(tr.steps) == 2 and tr.settings["sampler"] == "ddpm"
    tr2 = cap.caption(scene_image, sampling=SamplingConfig.parse("ddpm:2:1"))
    assert tr2.text == tr.text and tr2.settings == tr.settings
    with pytest.raises(ValueError, match=f"steps must be an integer from 1 to {cap.config.T}"):
        cap.caption(scene_image, steps=cap.config.T + 1)
    with pytest.raises(TypeError, match="unknown sampling settings"):
        cap.caption(scene_image, stpes=2)


def test_the_objective_is_its_own_section_and_old_checkpoints_split_into_it(make_captioner, tmp_path):
    """config.json keeps the network (captioner), the objective it was trained with, and the sampling apart;
    a checkpoint with the objective's keys inside its captioner section loads into the same three."""
    from diffusion_caption import Captioner
    from diffusion_caption.config import OBJECTIVE_KEYS, ObjectiveConfig

    cap = make_captioner()
    cap.objective = ObjectiveConfig(p_uncond=0.0, p_block_split=0.8, lambda_round=1.0, focus_steps=1)
    d = tmp_path / "ckpt"
    cap.save_pretrained(str(d))
    meta = json.loads((d / "config.json").read_text())
    assert meta["objective"]["p_block_split"] == 0.8 and not set(OBJECTIVE_KEYS) & set(meta["captioner"])
    assert Captioner.from_pretrained(str(d)).objective == cap.objective
    old = {**meta, "captioner": {**meta["captioner"], **meta["objective"]}}
    del old["objective"]
    (d / "config.json").write_text(json.dumps(old))
    back = Captioner.from_pretrained(str(d))
    assert back.objective == cap.objective and back.config == cap.config
    # the reveal sampler's training share, which checkpoints before 2026-12-07 wrote as 0, is read past;
    # a checkpoint trained for that sampler says why it cannot be loaded
    for p_reveal in (0.0, 0.7):
        (d / "config.json").write_text(json.dumps({**meta, "objective": {**meta["objective"], "p_reveal": p_reveal}}))
        if not p_reveal:
            assert Captioner.from_pretrained(str(d)).objective == cap.objective
        else:
            with pytest.raises(Exception, match="reveal sampler"):
                Captioner.from_pretrained(str(d))


def test_precision_runs_a_bfloat16_copy_of_the_network_when_asked_or_auto_on_native_hardware(
        make_captioner, scene_image, monkeypatch):
    """bfloat16 sampling runs a bfloat16 copy of the denoiser (the checkpoint's own weights stay float32, and the
    sampler's arithmetic stays float32); "auto" takes it where the device multiplies bfloat16 natively and the
    batch is large enough to gain; the record says what ran; a copy is made again when the weights change."""
    import torch

    from diffusion_caption import captioner as captioner_module
    from diffusion_caption.denoiser import Denoiser

    cap = make_captioner()
    seen = []
    inner = Denoiser._forward_full

    def spy(self, x_t, *args):
        seen.append(next(self.parameters()).dtype)
        assert x_t.dtype == seen[-1]
        return inner(self, x_t, *args)
    monkeypatch.setattr(Denoiser, "_forward_full", spy)
    images = [scene_image] * captioner_module.AUTO_BF16_ROWS
    tr = cap.caption(scene_image, steps=3, sampler="ddim", precision="bfloat16", record="all")
    assert seen == [torch.bfloat16] * 3 and tr.settings["precision"] == "bfloat16" and tr.text
    assert tr.final.x0_pred.dtype == torch.float32 and next(cap.denoiser.parameters()).dtype == torch.float32
    for native, batch, expected in ((True, images, "bfloat16"), (True, [scene_image], "float32"),
                                    (False, images, "float32")):
        monkeypatch.setattr(captioner_module, "native_bf16", lambda device, native=native: native)
        seen.clear()
        trs = cap.caption_batch(batch, steps=2, sampler="ddim", precision="auto")
        assert seen == [getattr(torch, expected)] * 2 and trs[0].settings["precision"] == expected
    # settings to pass on keep "auto", so a batch of many images resolves it for itself
    assert cap.settings(0, precision="auto")["precision"] == "auto"
    seen.clear()
    cap.caption(scene_image, steps=2, sampler="ddim")  # the default: float32
    assert seen == [torch.float32] * 2
    # the copy follows the weights: changed in place, the bfloat16 caption changes with them
    copy_before = cap._bfloat16().net
    assert cap._bfloat16().net is copy_before  # made once while the weights stay
    with torch.no_grad():
        cap.denoiser.output_down_proj[2].bias.add_(1.0)
    assert cap._bfloat16().net is not copy_before
    assert torch.equal(cap._bfloat16().net.output_down_proj[2].bias, cap.denoiser.output_down_proj[2].bias.bfloat16())
