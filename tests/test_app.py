"""The app: its ``/caption`` API through gradio_client against a running server, and its event handlers."""
import os

import pytest
import torch
from matplotlib.figure import Figure

from app_server import running_app, save_tiny_baseline, save_tiny_checkpoint, write_examples

STEPS = 5


@pytest.fixture(scope="module")
def app_files(tmp_path_factory, tokenizer, clip_encoder):
    d = tmp_path_factory.mktemp("app")
    ck = save_tiny_checkpoint(tokenizer, clip_encoder, str(d / "ckpt"))
    examples = write_examples(str(d / "examples"))
    cache = d / "cache"
    cache.mkdir()
    return {"checkpoint": ck, "examples_dir": str(d / "examples"), "examples": examples, "cache": str(cache)}


@pytest.fixture(scope="module")
def handlers(app_files):
    import app

    args = app.parse_args(["--checkpoint", app_files["checkpoint"], "--baseline", "", "--vocab-map", "pca",
                           "--cache-dir", app_files["cache"], "--examples", app_files["examples_dir"]])
    models = app.load_models(args)
    assert models.vocab_job.wait(120) is not None, models.vocab_job.error
    return app.Handlers(models)


def test_caption_api_through_gradio_client(app_files):
    from gradio_client import Client, handle_file

    from diffusion_caption import Captioner

    image = app_files["examples"][0]
    with running_app(app_files["checkpoint"], app_files["examples_dir"], app_files["cache"]) as url:
        client = Client(url, verbose=False)
        job = client.submit(handle_file(image), STEPS, "ddim", 1.0, False, 3, api_name="/caption")
        final = job.result(timeout=120)
        chunks = job.outputs()
        # a bad image and bad settings come back as messages, not stack traces
        bad = os.path.join(app_files["cache"], "not-an-image.png")
        with open(bad, "w") as f:
            f.write("hello")
        with pytest.raises(Exception, match="not an image file"):
            client.predict(handle_file(bad), STEPS, "ddim", 1.0, False, 0, api_name="/caption")
        with pytest.raises(Exception, match="steps must be an integer from 1 to 100"):
            client.predict(handle_file(image), 0, "ddim", 1.0, False, 0, api_name="/caption")
        # the timestep spacing is an optional last input; left out, it is the checkpoint's own (above)
        trailing = client.predict(handle_file(image), STEPS, "ddim", 1.0, False, 3, "trailing^2", api_name="/caption")
        with pytest.raises(Exception, match="spacing must be"):
            client.predict(handle_file(image), STEPS, "ddim", 1.0, False, 3, "leading", api_name="/caption")

    assert final["done"] is True
    assert len(final["steps"]) == STEPS
    assert [s["index"] for s in final["steps"]] == list(range(STEPS))
    assert final["settings"]["sampler"] == "ddim" and final["settings"]["steps"] == STEPS
    for s in final["steps"]:
        assert all(0.0 <= c <= 1.0 for c in s["confidence"])
        assert len(s["confidence"]) == len(s["tokens"])
    assert final["text"] == final["steps"][-1]["text"]
    # streamed: one chunk per step, then the whole trace
    streamed = [c for c in chunks if isinstance(c, dict) and c.get("done") is False]
    assert [c["step"]["index"] for c in streamed] == list(range(STEPS))
    # the same numbers as the library itself gives for this checkpoint, image and seed
    trace = Captioner.from_pretrained(app_files["checkpoint"]).caption(image, steps=STEPS, sampler="ddim", seed=3)
    assert final["text"] == trace.text
    assert final["steps"][-1]["token_ids"] == trace.final.token_ids
    assert final["steps"][-1]["confidence"] == pytest.approx(trace.final.confidence, abs=1e-5)
    assert final["settings"]["spacing"] == "linspace"
    assert trailing["settings"]["spacing"] == "trailing^2"
    lib = Captioner.from_pretrained(app_files["checkpoint"]).caption(image, steps=STEPS, sampler="ddim", seed=3,
                                                                      spacing="trailing^2")
    assert [s["t"] for s in trailing["steps"]] == [s.t for s in lib.steps] != [s["t"] for s in final["steps"]]
    assert trailing["text"] == lib.text


def test_caption_stream_yields_every_step_then_plots(handlers, app_files):
    from app import View

    out = list(handlers.caption_stream(app_files["examples"][0], STEPS, "ddim", 1.0, False, 0, "predicted x0"))
    assert len(out) == STEPS + 1  # one update per step, then the final one with plots
    first_chips, first_status = out[0][0], out[0][1]
    assert "Step 1 of 5" in first_status and "confidence" in first_chips
    chips, status, slider, heat, traj, note, table, base, timing, view, timer, playing = out[-1]
    assert playing is False and timer.active is False
    assert isinstance(view, View) and len(view.steps) == STEPS
    assert "Step 5 of 5" in status
    assert isinstance(heat, Figure) and isinstance(traj, Figure) and note == ""
    assert len(table) == STEPS and table[-1][2] == view.steps[-1].text
    assert "No baseline loaded" in base
    assert "first step after" in timing and "replayed" not in timing
    # the same image and settings again: replayed from the memo, same steps
    again = list(handlers.caption_stream(app_files["examples"][0], STEPS, "ddim", 1.0, False, 0, "noisy x_t"))
    assert "replayed" in again[-1][8]
    assert [s.text for s in again[-1][9].steps] == [s.text for s in view.steps]
    assert torch.equal(again[-1][9].steps[-1].x0_pred, view.steps[-1].x0_pred)
    # the spacing dropdown: other timesteps, a trace of its own (not the memo's), named in the timing line
    from diffusion_caption.samplers import spaced_timesteps

    tr = list(handlers.caption_stream(app_files["examples"][0], STEPS, "ddim", 1.0, False, 0, "predicted x0",
                                      "trailing"))[-1]
    assert [s.t for s in tr[9].steps] == spaced_timesteps(handlers.m.cap.config.T, STEPS, "trailing")
    assert "replayed" not in tr[8] and "trailing spacing" in tr[8] and "linspace spacing" in timing


def test_step_viewer_scrubs_and_plays(handlers, app_files):
    out = list(handlers.caption_stream(app_files["examples"][1], STEPS, "ddpm", 2.0, True, 1, "predicted x0"))
    view = out[-1][9]
    slider, chips, status, heat, traj, note, v, timer, playing = handlers.goto(view, 2, "noisy x_t")
    assert slider.value == 2 and "Step 2 of 5" in status and v is view and playing is False
    assert "step 2 of 5" in traj.axes[0].get_title() and traj.axes[0].get_title().startswith("noisy x_t")
    assert handlers.step_by("first")(view, 4, "predicted x0")[0].value == 1
    assert handlers.step_by("last")(view, 2, "predicted x0")[0].value == STEPS
    assert handlers.step_by(-1)(view, 1, "predicted x0")[0].value == 1  # clamped at the first step
    assert handlers.step_by(1)(view, 3, "predicted x0")[0].value == 4
    # play from the end restarts at step 1; ticks advance while playing and stop at the last step
    played = handlers.play(view, STEPS, "predicted x0")
    assert played[0].value == 1 and played[-2].active is True and played[-1] is True
    tick = handlers.tick(view, 2, "predicted x0", True)
    assert tick[0].value == 3 and tick[-1] is True
    tick = handlers.tick(view, STEPS - 1, "predicted x0", True)
    assert tick[0].value == STEPS and tick[-2].active is False and tick[-1] is False
    # after a pause, a tick that was already queued changes nothing and keeps the timer off
    timer, playing = handlers.pause()
    assert timer.active is False and playing is False
    late = handlers.tick(view, 2, "predicted x0", False)
    import gradio as gr

    assert all(isinstance(x, type(gr.skip())) for x in late[:7]) and late[-2].active is False
    # nothing captioned yet in this session: nothing to show, no error
    assert handlers.goto(None, 3, "predicted x0")[6] is None


def test_user_errors_are_messages(handlers, app_files):
    import gradio as gr

    with pytest.raises(gr.Error, match="Pick an example"):
        list(handlers.caption_stream(None, STEPS, "ddim", 1.0, False, 0, "predicted x0"))
    with pytest.raises(gr.Error, match="steps must be an integer"):
        list(handlers.caption_stream(app_files["examples"][0], 0, "ddim", 1.0, False, 0, "predicted x0"))
    with pytest.raises(gr.Error, match="guidance must be"):
        list(handlers.caption_stream(app_files["examples"][0], 3, "ddim", 99.0, False, 0, "predicted x0"))
    with pytest.raises(gr.Error, match="image file not found"):
        list(handlers.api_caption("/nonexistent.png", 3, "ddim", 1.0, False, 0))
    with pytest.raises(gr.Error, match="spacing must be"):
        list(handlers.caption_stream(app_files["examples"][0], 3, "ddim", 1.0, False, 0, "predicted x0", "trailing^0"))
    # a cleared image does nothing at all
    assert all(isinstance(x, type(gr.skip())) for x in next(handlers.auto_caption(None, 3, "ddim", 1, False, 0, "x")))


def test_uploads_gradio_cannot_open_get_the_loaders_message(handlers, app_files, tmp_path):
    """The image box hands even an unreadable upload to the library's loader, whose message names the problem
    (gradio's own Image would try PIL first and show a generic error)."""
    import gradio as gr
    from gradio.data_classes import FileData
    from PIL import Image

    import app

    box = app.upload_image(type="filepath", image_mode=None)
    assert isinstance(box, gr.Image) and box.get_block_name() == "image"
    text = tmp_path / "notes.png"
    text.write_text("hello, not pixels")
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:120])
    for path, why in ((text, "not an image file"), (truncated, "could not be decoded")):
        handed = box.preprocess(FileData(path=str(path), orig_name=path.name))
        assert handed == str(path)
        with pytest.raises(gr.Error, match=why):
            list(handlers.caption_stream(handed, STEPS, "ddim", 1.0, False, 0, "predicted x0"))
    good = box.preprocess(FileData(path=app_files["examples"][0], orig_name="scene.png"))
    assert next(iter(handlers.caption_stream(good, STEPS, "ddim", 1.0, False, 0, "predicted x0")))


def test_error_analysis_variants_and_composer(handlers, app_files):
    from diffusion_caption.world.variants import known_scenes, scene_key, variants_for
    from diffusion_caption.images import load_image

    scene_png = app_files["examples"][1]
    html = handlers.variants(scene_png, None, 3, "ddim", 1.0, False, 0)
    img = load_image(scene_png)
    n = len(variants_for(img, known_scenes(app_files["examples_dir"])[scene_key(img)]))
    assert html.count("<tr>") == n + 1 and "exact re-renders" in html
    assert ("✓ right on" in html) or ("✗ wrong" in html) or ("states nothing" in html)
    photo = handlers.variants(app_files["examples"][2], None, 3, "ddim", 1.0, False, 0)
    assert "pixel-level edits" in photo and "✓" not in photo
    # the composer renders with the world's renderer and the variants use its exact scene
    fields = [True, "star", "red", "large", 40, 64, True, "circle", "blue", "small", 95, 64,
              False, "square", "green", "small", 64, 100]
    image, state, note = handlers.compose("beige", *fields)
    assert state["key"] == scene_key(image) and state["scene"]["background"] == "beige"
    assert "own renderer" in note
    path = os.path.join(app_files["cache"], "composed.png")
    image.save(path)
    composed = handlers.variants(path, state, 3, "ddim", 1.0, False, 0)
    assert "exact re-renders" in composed and "colours swapped" in composed
    import gradio as gr

    with pytest.raises(gr.Error, match="1 to 3 objects"):
        handlers.compose("beige", *([False, "star", "red", "large", 40, 64] * 3))


def test_start_up_reports_a_missing_checkpoint(tmp_path):
    import app

    args = app.parse_args(["--checkpoint", str(tmp_path / "nope"), "--cache-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="cannot load the diffusion checkpoint.*not found"):
        app.load_models(args)


def test_about_names_checkpoints_and_missing_baseline(handlers):
    import app

    md = app.about_markdown(handlers.m)
    assert handlers.m.checkpoint in md and "No baseline loaded" in md and "/caption" in md
    assert "evaluation: none stored" in md
    # an evaluation table stored next to the checkpoint (as training.evaluate --markdown writes it) is shown
    table = "| split | BLEU-4 |\n| --- | --- |\n| test | 0.123 |"
    path = os.path.join(handlers.m.checkpoint_dir, "evaluation.md")
    with open(path, "w") as f:
        f.write(table)
    try:
        md = app.about_markdown(handlers.m)
    finally:
        os.remove(path)
    assert table in md and "**evaluation.md**" in md


def test_baseline_beside_the_diffusion_caption(app_files, tokenizer, clip_encoder, tmp_path):
    import app

    base = save_tiny_baseline(tokenizer, clip_encoder, str(tmp_path / "baseline"))
    args = app.parse_args(["--checkpoint", app_files["checkpoint"], "--baseline", base, "--vocab-map", "pca",
                           "--cache-dir", app_files["cache"], "--examples", app_files["examples_dir"]])
    m = app.load_models(args)
    assert m.baseline is not None and m.baseline_note.startswith("Baseline:")
    h = app.Handlers(m)
    image = app_files["examples"][0]
    last = list(h.caption_stream(image, STEPS, "ddim", 1.0, False, 0, "predicted x0"))[-1]
    view, base_html, timing = last[9], last[7], last[8]
    expected = m.baseline.caption(image)
    assert view.baseline.text == expected.text and view.baseline.token_ids == expected.token_ids
    assert "token probability" in base_html and base_html.count("title='position") == len(expected.tokens)
    assert "baseline" in timing and "greedy" in timing
    table = h.variants(image, None, 3, "ddim", 1.0, False, 0)
    assert ">baseline</th>" in table and "baseline</b>: caption changed in" in table
    assert base in app.about_markdown(m)
    # a baseline directory that is not one: the app starts anyway and says why there is no baseline
    args = app.parse_args(["--checkpoint", app_files["checkpoint"], "--baseline", app_files["checkpoint"],
                           "--vocab-map", "pca", "--cache-dir", app_files["cache"]])
    m2 = app.load_models(args)
    assert m2.baseline is None and m2.baseline_note.startswith("No baseline loaded:") and "Captioner" in m2.baseline_note


def test_the_app_offers_several_models_each_with_its_own_defaults(app_files, tokenizer, clip_encoder, tmp_path):
    """Two checkpoints: the first is the default; picking the other loads its sampling defaults and captions
    with it; one that ranks its last step's roundings shows the candidates and their scores there."""
    import json

    import app
    from diffusion_caption import Captioner

    other = save_tiny_checkpoint(tokenizer, clip_encoder, str(tmp_path / "ranked"), seed=5)
    from diffusion_caption.image_encoder import ImageEncoder

    # the same CLIP with its text tokenizer, so that it reads captions: the ranked model's scorer
    ImageEncoder(clip_encoder.model, clip_encoder.preprocess, clip_encoder.source,
                 text_tokenizer=tokenizer).save_pretrained(str(tmp_path / "scorer-clip"))
    with open(os.path.join(other, "config.json")) as f:
        meta = json.load(f)
    meta["sampling"].update(steps=3, sampler="ddpm", guidance=2.0, candidates=8, select="clip", propose="rounding",
                            scorer="../scorer-clip")
    meta["captioner"].update(extra={"summary": "a tiny model that ranks its roundings"})
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(meta, f)
    args = app.parse_args(["--checkpoint", app_files["checkpoint"], "--checkpoint", other, "--baseline", "",
                           "--vocab-map", "pca", "--cache-dir", app_files["cache"], "--examples", app_files["examples_dir"]])
    m = app.load_models(args)
    assert list(m.caps) == ["ckpt", "ranked"] and m.default == "ckpt"
    h = app.Handlers(m)
    steps, sampler, guidance, clamp, spacing, note = h.choose_model("ranked")
    assert (steps.value, sampler.value, guidance.value) == (3, "ddpm", 2.0) and "ranks its roundings" in note
    image = app_files["examples"][0]
    out = list(h.caption_stream(image, 3, "ddpm", 2.0, False, 0, "predicted x0", None, "ranked"))
    view = out[-1][9]
    assert view.model == "ranked" and len(view.steps) == 3
    # exactly the library's caption with the checkpoint's defaults, candidates and scores included
    direct = Captioner.from_pretrained(other).caption(image, seed=0)
    assert view.steps[-1].text == direct.text and view.steps[-1].candidates == direct.candidates
    assert len(direct.candidates) > 1 and direct.scores is not None  # an untrained model is unsure: many roundings
    assert "Chosen among" in out[-1][0] and f"{max(direct.scores):.3f}" in out[-1][0]
    # the default model is another captioner, with its own caption
    first = list(h.caption_stream(image, 3, "ddpm", 2.0, False, 0, "predicted x0"))[-1][9]
    assert first.model == "ckpt" and first.steps[-1].candidates is None
    with pytest.raises(Exception, match="unknown model"):
        list(h.caption_stream(image, 3, "ddim", 1.0, False, 0, "predicted x0", None, "nope"))
    api = list(h.api_caption(image, 3, "ddpm", 2.0, False, 0, None, "ranked"))[-1]
    assert api["model"] == "ranked" and api["text"] == direct.text and api["candidates"] == direct.candidates
    md = app.about_markdown(m)
    assert "`ranked`" in md and "`ckpt` (the default)" in md and "likeliest roundings" in md
