"""The app: its ``/caption`` API through gradio_client against a running server, and its event handlers."""
import html
import os
import re

import gradio as gr
import pytest
import torch
from gradio.blocks import Block

from diffusion_caption.viz.common import is_special, shown_positions

from app import content_positions
from app_server import running_app, save_tiny_baseline, save_tiny_checkpoint, write_examples

STEPS = 5


def got(update, component):
    """What a handler's update sets ``component`` to, read as gradio reads it: a non-empty dict keyed by
    components (a component it leaves out is skipped), or one ``gr.skip()`` for all of the event's outputs."""
    if update == gr.skip():
        return gr.skip()
    assert update and all(isinstance(k, Block) for k in update), update
    return update.get(component, gr.skip())


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

    ui = handlers.ui
    out = list(handlers.caption_stream(app_files["examples"][0], STEPS, "ddim", 1.0, False, 0, "predicted x0"))
    assert len(out) == STEPS + 1  # one update per step, then the final one with plots
    assert all(set(u) <= ui.stream_outputs for u in out)  # only what the caption events list as their outputs
    first_chips, first_status = got(out[0], ui.chips), got(out[0], ui.status)
    assert "Step 1 of 5" in first_status and "confidence" in first_chips
    chips, status, slider, heat, traj, note, table, base, timing, view, timer = (
        got(out[-1], c) for c in (ui.chips, ui.status, ui.slider, ui.heat, ui.traj, ui.map_note, ui.table,
                                  ui.base_html, ui.timing, ui.view, ui.map_timer))
    assert timer.active is False  # the map was there: nothing to poll for
    assert isinstance(view, View) and len(view.steps) == STEPS
    assert "Step 5 of 5" in status
    assert "class='dc-heat'" in heat and "<svg" in traj and note == ""
    assert len(table) == STEPS and table[-1][2] == view.steps[-1].text
    assert "No baseline loaded" in base
    assert "first step after" in timing and "replayed" not in timing
    # the same image and settings again: replayed from the memo, same steps
    again = list(handlers.caption_stream(app_files["examples"][0], STEPS, "ddim", 1.0, False, 0, "noisy x_t"))
    assert "replayed" in got(again[-1], ui.timing)
    assert [s.text for s in got(again[-1], ui.view).steps] == [s.text for s in view.steps]
    assert torch.equal(got(again[-1], ui.view).steps[-1].x0_pred, view.steps[-1].x0_pred)
    # the spacing dropdown: other timesteps, a trace of its own (not the memo's), named in the timing line
    from diffusion_caption.samplers import spaced_timesteps

    tr = list(handlers.caption_stream(app_files["examples"][0], STEPS, "ddim", 1.0, False, 0, "predicted x0",
                                      "trailing"))[-1]
    assert [s.t for s in got(tr, ui.view).steps] == spaced_timesteps(handlers.m.cap.config.T, STEPS, "trailing")
    assert ("replayed" not in got(tr, ui.timing) and "trailing spacing" in got(tr, ui.timing)
            and "linspace spacing" in timing)


def test_a_caption_shown_before_the_vocabulary_map_is_ready_gets_its_map_when_it_is(handlers, app_files, tmp_path):
    """The page opens with a caption denoised at once, usually before the map's child process has finished:
    the page then polls (the map timer), and the first poll after the map is there draws the trajectories."""
    import signal

    from diffusion_caption.viz.vocab_map import VocabMapJob

    ui, m = handlers.ui, handlers.m
    ready = m.vocab_jobs[m.default]
    job = VocabMapJob(ready.E, ready.tokens, cache_dir=str(tmp_path), method="pca")  # a fresh cache: a real fit
    assert job.proc is not None
    os.kill(job.proc.pid, signal.SIGSTOP)  # held until the caption is shown, so it is surely shown first
    m.vocab_jobs[m.default] = job
    try:
        final = list(handlers.caption_stream(app_files["examples"][2], STEPS, "ddim", 1.0, False, 4, "predicted x0"))[-1]
        view = got(final, ui.view)
        assert got(final, ui.traj) == "" and "being computed" in got(final, ui.map_note)
        assert got(final, ui.map_timer).active is True
        assert handlers.map_ready(view, STEPS, "predicted x0") == gr.skip()  # still computing: nothing changes
        os.kill(job.proc.pid, signal.SIGCONT)
        assert job.wait(120) is not None, job.error
        drawn = handlers.map_ready(view, STEPS, "predicted x0")
        assert set(drawn) <= ui.map_outputs and "<svg" in got(drawn, ui.traj) and got(drawn, ui.map_note) == ""
        assert got(drawn, ui.map_timer).active is False and "step 5 of 5" in got(drawn, ui.traj)
        # no view (an error emptied the viewer): the poll stops
        assert got(handlers.map_ready(None, 1, "predicted x0"), ui.map_timer).active is False
    finally:
        if job.proc is not None and job.proc.poll() is None:
            os.kill(job.proc.pid, signal.SIGCONT)
            job.proc.kill()
        m.vocab_jobs[m.default] = ready


def _root_attr(fragment: str, kind: str, attr: str) -> str:
    """An attribute of a step-viewer fragment's root (``dc-stepped dc-<kind>``)."""
    m = re.search(rf"<div class='dc-stepped dc-{kind}(?: dc-main)?' ([^>]*)>", fragment)
    assert m, fragment[:200]
    return dict(re.findall(r"(data-\w+)='([^']*)'", m.group(1)))[attr]


def _current_frame(fragment: str) -> str:
    """The HTML of a stepped_frames fragment's current frame."""
    m = re.search(r"<div class='dc-frame cur' data-s='\d+'>(.*?)</div>(?=<div class='dc-frame|</div>$)", fragment, re.S)
    assert m, fragment[:300]
    return m.group(1)


def test_the_step_viewer_holds_every_step_and_shows_the_one_asked(handlers, app_files):
    """The server sends every step's views once (the page then shows any step without it): the chips and the
    status line of each step as frames, the heatmap's columns and the map's points of every step, each element
    tagged with its step, the step asked for marked current and the later ones future."""
    ui = handlers.ui
    out = list(handlers.caption_stream(app_files["examples"][1], STEPS, "ddpm", 2.0, True, 1, "predicted x0"))
    view = got(out[-1], ui.view)
    shown = handlers.show(view, 2, "noisy x_t")
    assert set(shown) <= ui.step_outputs
    slider, chips, status, heat, traj = (got(shown, c) for c in (ui.slider, ui.chips, ui.status, ui.heat, ui.traj))
    assert slider.value == 2 and slider.maximum == STEPS and slider.interactive
    for fragment, kind in ((chips, "chips"), (status, "status"), (heat, "heatmap"), (traj, "map")):
        assert _root_attr(fragment, kind, "data-n") == str(STEPS) and _root_attr(fragment, kind, "data-cur") == "2"
        assert _root_attr(fragment, kind, "data-run") == view.run != ""
    assert status.count("class='dc-frame") == STEPS and "Step 2 of 5" in re.sub(r"<[^>]+>", "", _current_frame(status))
    for k in range(1, STEPS + 1):
        assert f"Step {k} of {STEPS}" in status and f"caption: <i>{html.escape(view.steps[k - 1].text)}" in status
    assert chips.count("class='dc-frame") == STEPS and "title='position" in _current_frame(chips)
    # the heatmap: a cell per shown position and step, the current column outlined, the later ones future
    rows = heat.count("<th class='dc-pos'>") - 1
    assert rows == len(shown_positions(view.steps[-1].tokens))
    assert heat.count("<td data-s='2' class='cur") == rows and heat.count("<td data-s='3' class='future") == rows
    conf = view.steps[0].confidence[0]
    assert f"position 0, step 1 (t = {view.steps[0].t}): {html.escape(view.steps[0].tokens[0], quote=True)}, " \
           f"confidence {conf:.3f}" in heat
    # the map: both kinds, the kind asked for shown, a marker per step and position
    assert _root_attr(traj, "map", "data-kind") == "xt" and "dc-kind-x0" in traj and "dc-kind-xt" in traj
    assert "step 2 of 5" in traj and "<svg" in traj and "data:image/png;base64," in traj
    words = content_positions(view.steps[-1].tokens)
    assert traj.count("class='dc-mark cur'") == 2 * len(words)  # each kind's marker at step 2
    # out-of-range steps are clamped; nothing captioned yet in this session: nothing to show, no error
    assert got(handlers.show(view, 99, "predicted x0"), ui.slider).value == STEPS
    assert got(handlers.show(view, 0, "predicted x0"), ui.slider).value == 1
    assert got(handlers.show(None, 3, "predicted x0"), ui.view) is None


def drawn_positions(svg_html: str) -> list[int]:
    """The positions a map fragment shows at first: its first kind's position groups not hidden."""
    kinds = svg_html.split("<g class='dc-kind dc-kind-")[1:2]
    if not kinds:
        return []
    return [int(p) for hidden, p in re.findall(r"<g class='dc-pos( dc-hidden)?' data-p='(\d+)'>", kinds[0]) if not hidden]


def test_the_map_draws_the_positions_picked(handlers, app_files):
    """With many positions the map is a tangle: the person picks which caption positions it draws (at first the
    caption's words; the page hides the others itself); a new caption offers its own."""
    ui = handlers.ui
    out = list(handlers.caption_stream(app_files["examples"][0], STEPS, "ddim", 1.0, False, 0, "predicted x0"))
    view, pick = got(out[-1], ui.view), got(out[-1], ui.map_positions)
    final = view.steps[-1].tokens
    words = [p for p in range(len(final)) if final[p] != "[PAD]" and not is_special(final[p])]
    assert [v for _, v in pick.choices][0] == 0 and pick.value == words
    assert all(label == f"{p} {final[p]}" for label, p in pick.choices)
    assert drawn_positions(got(out[-1], ui.traj)) == words
    assert got(out[0], ui.map_positions).choices == []  # while it streams, no positions of the last image
    assert drawn_positions(got(handlers.show(view, 3, "predicted x0", [1, 3]), ui.traj)) == [1, 3]
    # none picked: the vocabulary alone; positions that are not the trace's are left out
    assert drawn_positions(got(handlers.show(view, 2, "predicted x0", []), ui.traj)) == []
    assert drawn_positions(got(handlers.show(view, 2, "predicted x0", [0, 99, -1, "x"]), ui.traj)) == [0]


def test_the_views_fill_as_the_steps_stream(handlers, app_files, monkeypatch):
    """While a caption streams, its heatmap (the steps still to come blank) and its map are drawn with the
    steps so far, so the views are never empty while the caption forms."""
    import app

    monkeypatch.setattr(app, "VIEWS_STREAM_S", 0.0)  # every streamed step redraws them (the app paces this)
    ui = handlers.ui
    out = list(handlers.caption_stream(app_files["examples"][2], STEPS, "ddim", 1.0, False, 7, "predicted x0"))
    for k, update in enumerate(out[:STEPS], 1):
        heat, traj = got(update, ui.heat), got(update, ui.traj)
        assert _root_attr(heat, "heatmap", "data-n") == str(k) and _root_attr(traj, "map", "data-n") == str(k)
        assert heat.count("<th class='dc-todo'>") == STEPS - k
        assert f"Step {k} of {STEPS}" in got(update, ui.status)


def test_user_errors_are_messages(handlers, app_files):
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
    cleared = next(handlers.auto_caption(None, 3, "ddim", 1, False, 0, "x"))
    assert all(isinstance(got(cleared, c), type(gr.skip())) for c in handlers.ui.stream_outputs)


def test_an_error_clears_the_old_caption_and_names_an_upload_by_its_base_name(handlers, app_files, tmp_path):
    """After a caption, a broken upload: the page is emptied of the previous image's caption (chips, status,
    plots, table, the session's trace) before the message comes, and the message names the file by the name
    it was uploaded under, not by the server's temporary copy (/tmp/gradio/<hash>/...)."""
    from app import View

    ui = handlers.ui
    shown = list(handlers.caption_stream(app_files["examples"][0], STEPS, "ddim", 1.0, False, 0, "predicted x0"))
    assert isinstance(got(shown[-1], ui.view), View) and "title='position" in got(shown[-1], ui.chips)
    upload_dir = tmp_path / "gradio" / "5f3c0a9e1d"  # where gradio keeps an upload
    upload_dir.mkdir(parents=True)
    bad = upload_dir / "holiday.png"
    bad.write_text("these are not pixels")
    empty = upload_dir / "empty.png"
    empty.write_bytes(b"")
    for path, why in ((bad, "not an image file"), (empty, "is empty")):
        stream = handlers.caption_stream(str(path), STEPS, "ddim", 1.0, False, 0, "predicted x0")
        cleared = next(stream)
        with pytest.raises(gr.Error, match=why) as err:
            next(stream)
        message = err.value.message
        assert path.name in message and str(upload_dir) not in message and "gradio" not in message, message
        assert set(cleared) <= ui.stream_outputs
        chips = got(cleared, ui.chips)
        assert "title='position" not in chips and path.name in chips and str(upload_dir) not in chips
        assert got(cleared, ui.status) == "" and got(cleared, ui.heat) == "" and got(cleared, ui.traj) == ""
        assert got(cleared, ui.table) == [] and got(cleared, ui.view) is None and got(cleared, ui.timing) == ""
        assert got(cleared, ui.slider).value == 1 and got(cleared, ui.map_timer).active is False
    # the API's message names the file the same way
    with pytest.raises(gr.Error) as err:
        list(handlers.api_caption(str(bad), 3, "ddim", 1.0, False, 0))
    assert "holiday.png" in err.value.message and str(upload_dir) not in err.value.message
    # bad settings clear the old caption too
    stream = handlers.caption_stream(app_files["examples"][0], 0, "ddim", 1.0, False, 0, "predicted x0")
    assert got(next(stream), ui.view) is None
    with pytest.raises(gr.Error, match="steps must be an integer"):
        next(stream)


def test_uploads_gradio_cannot_open_get_the_loaders_message(handlers, app_files, tmp_path):
    """The image box hands even an unreadable upload to the library's loader, whose message names the problem
    (gradio's own Image would try PIL first and show a generic error)."""
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

    ui = handlers.ui
    scene_png = app_files["examples"][1]
    html = got(handlers.variants(scene_png, None, 3, "ddim", 1.0, False, 0), ui.variants_html)
    img = load_image(scene_png)
    n = len(variants_for(img, known_scenes(app_files["examples_dir"])[scene_key(img)]))
    assert html.count("<tr>") == n + 1 and "exact re-renders" in html
    assert ("✓ right on" in html) or ("✗ wrong" in html) or ("states nothing" in html)
    photo = got(handlers.variants(app_files["examples"][2], None, 3, "ddim", 1.0, False, 0), ui.variants_html)
    assert "pixel-level edits" in photo and "✓" not in photo
    # the composer renders with the world's renderer and the variants use its exact scene
    fields = [True, "star", "red", "large", 40, 64, True, "circle", "blue", "small", 95, 64,
              False, "square", "green", "small", 64, 100]
    composed = handlers.compose("beige", *fields)
    assert set(composed) == ui.compose_outputs
    image, state, note = (got(composed, c) for c in (ui.a_image, ui.scene_state, ui.compose_note))
    assert state["key"] == scene_key(image) and state["scene"]["background"] == "beige"
    assert "own renderer" in note
    path = os.path.join(app_files["cache"], "composed.png")
    image.save(path)
    composed = got(handlers.variants(path, state, 3, "ddim", 1.0, False, 0), ui.variants_html)
    assert "exact re-renders" in composed and "colours swapped" in composed
    with pytest.raises(gr.Error, match="1 to 3 objects"):
        handlers.compose("beige", *([False, "star", "red", "large", 40, 64] * 3))


def test_an_error_in_the_error_analysis_replaces_the_old_table(handlers, app_files, tmp_path):
    """The variants of one image, then a broken file: the page's table of the first image is replaced by the
    reason (named by the file's base name) before the message, not left standing beside it."""
    ui = handlers.ui
    table = next(handlers.variants_event(app_files["examples"][1], None, 3, "ddim", 1.0, False, 0))
    assert "<tr>" in got(table, ui.variants_html)
    bad = tmp_path / "upload" / "scan.png"
    bad.parent.mkdir()
    bad.write_text("not pixels")
    stream = handlers.variants_event(str(bad), None, 3, "ddim", 1.0, False, 0)
    shown = got(next(stream), ui.variants_html)
    assert "<tr>" not in shown and "scan.png" in shown and str(bad.parent) not in shown
    with pytest.raises(gr.Error, match="not an image file"):
        next(stream)


def _original_caption(table_html: str) -> str:
    """The diffusion caption of the variants table's first row (the original image), as its cell shows it."""
    first_row = table_html.split("<tbody>")[1].split("</tr>")[0]
    cells = re.findall(r"<td style='[^']*'>(.*?)</td>", first_row)  # image, variant, diffusion[, baseline]
    return cells[2].split("<div")[0]


def test_the_variants_original_row_is_the_caption_tabs_caption(tmp_path):
    """Every variant starts from the Caption tab's noise for the seed (DDPM's fresh noise at every step
    included), so the original row is the caption the Caption tab shows, and a changed word is the edit's.
    The shipped shapes-diffusion (DDPM, guidance 5), whose captions do depend on the noise: in one batch of
    variants, the original's caption differed from the Caption tab's for every example scene tried."""
    from html import escape

    import app

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = app.parse_args(["--checkpoint", os.path.join(root, "assets", "checkpoints", "shapes-diffusion"),
                           "--baseline", "", "--vocab-map", "pca", "--cache-dir", str(tmp_path)])
    h = app.Handlers(app.load_models(args))
    smp = h.m.cap.sampling
    settings = (smp.steps, smp.sampler, smp.guidance, smp.clamp)
    assert settings[1:3] == ("ddpm", 5.0)
    image = os.path.join(root, "assets", "examples", "shapes_00.png")
    for seed in (0, 1):
        stream = list(h.caption_stream(image, *settings, seed, "predicted x0", smp.spacing))
        caption_tab = got(stream[-1], h.ui.view).steps[-1].text
        table = got(h.variants(image, None, *settings, seed, smp.spacing), h.ui.variants_html)
        assert "exact re-renders" in table and f"same noise (seed {seed})" in table
        assert _original_caption(table) == (escape(caption_tab) or "<i>(empty)</i>")
        # the count is reported under other seeds too, the table's own seed first and equal to its count
        counts = re.findall(r"seed (\d+): changed in (\d+) of (\d+)", table)
        assert [int(k) for k, _, _ in counts] == [seed + i for i in range(app.VARIANT_SEEDS)]
        shown = re.search(r"<b>diffusion</b>: caption changed in (\d+) of (\d+)", table)
        assert counts[0][1:] == shown.groups()
        # the next seed's count is the library's own: each variant captioned from that seed's noise
        from PIL import Image

        from diffusion_caption.eval.compare import changed_words
        from diffusion_caption.world.variants import scene_key, variants_for

        img = Image.open(image).convert("RGB")
        vs = variants_for(img, h.m.scenes.get(scene_key(img)))
        texts = [h.m.cap.caption(v.image, seed=seed + 1).text for v in vs]
        assert int(counts[1][1]) == sum(bool(changed_words(texts[0], t)) for t in texts[1:])


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
    # the API example names the address the server is served on, never a fixed port
    assert "7860" not in md and 'Client("http://HOST:PORT/")' in md
    served = app.about_markdown(handlers.m, "http://10.1.2.3:8123/")
    assert 'Client("http://10.1.2.3:8123/")' in served and "7860" not in served
    assert app.served_url(gr.Request(headers={"host": "10.1.2.3:8123"})) == "http://10.1.2.3:8123/"
    behind_proxy = gr.Request(headers={"host": "10.0.0.7:7860", "x-forwarded-host": "someone-demo.hf.space",
                                       "x-forwarded-proto": "https"})
    assert app.served_url(behind_proxy) == "https://someone-demo.hf.space/"
    assert app.served_url(gr.Request(headers={})) is None
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
    view, base_html, timing = got(last, h.ui.view), got(last, h.ui.base_html), got(last, h.ui.timing)
    expected = m.baseline.caption(image)
    assert view.baseline.text == expected.text and view.baseline.token_ids == expected.token_ids
    assert "token probability" in base_html and base_html.count("title='position") == len(expected.tokens)
    assert "baseline" in timing and "greedy" in timing
    table = got(h.variants(image, None, 3, "ddim", 1.0, False, 0), h.ui.variants_html)
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
    chosen = h.choose_model("ranked")
    assert set(chosen) == h.ui.model_outputs
    steps, sampler, guidance, clamp, spacing, note = (
        got(chosen, c) for c in (h.ui.steps, h.ui.sampler, h.ui.guidance, h.ui.clamp, h.ui.spacing, h.ui.model_line))
    assert (steps.value, sampler.value, guidance.value) == (3, "ddpm", 2.0) and "ranks its roundings" in note
    image = app_files["examples"][0]
    out = list(h.caption_stream(image, 3, "ddpm", 2.0, False, 0, "predicted x0", None, "ranked"))
    view = got(out[-1], h.ui.view)
    assert view.model == "ranked" and len(view.steps) == 3
    # exactly the library's caption with the checkpoint's defaults, candidates and scores included
    direct = Captioner.from_pretrained(other).caption(image, seed=0)
    assert view.steps[-1].text == direct.text and view.steps[-1].candidates == direct.candidates
    assert len(direct.candidates) > 1 and direct.scores is not None  # an untrained model is unsure: many roundings
    assert "Chosen among" in got(out[-1], h.ui.chips) and f"{max(direct.scores):.3f}" in got(out[-1], h.ui.chips)
    # the default model is another captioner, with its own caption
    first = got(list(h.caption_stream(image, 3, "ddpm", 2.0, False, 0, "predicted x0"))[-1], h.ui.view)
    assert first.model == "ckpt" and first.steps[-1].candidates is None
    with pytest.raises(Exception, match="unknown model"):
        list(h.caption_stream(image, 3, "ddim", 1.0, False, 0, "predicted x0", None, "nope"))
    api = list(h.api_caption(image, 3, "ddpm", 2.0, False, 0, None, "ranked"))[-1]
    assert api["model"] == "ranked" and api["text"] == direct.text and api["candidates"] == direct.candidates
    md = app.about_markdown(m)
    assert "`ranked`" in md and "`ckpt` (the default)" in md and "likeliest roundings" in md


def test_a_second_run_under_the_same_step_controller(handlers, app_files):
    """Run B (other settings, same image) comes as its own chips, status lines and heatmap inside a .dc-follows
    block, so the page's step controller moves it with run A; the line above names what differs and marks the
    words of B's final caption that A's lacks. Bad settings for B are a message in its place."""
    ui = handlers.ui
    image = app_files["examples"][0]
    view = got(list(handlers.caption_stream(image, STEPS, "ddim", 1.0, False, 0, "predicted x0"))[-1], ui.view)
    out = got(handlers.compare(image, STEPS, "ddim", 1.0, False, 0, None, None, 3, "ddpm", 2.0, 1, view),
              ui.compare_html)
    assert out.startswith("<div class='dc-follows dc-compare'>")
    for kind in ("chips", "status", "heatmap"):
        assert _root_attr(out, kind, "data-n") == "3" and _root_attr(out, kind, "data-cur") == "3"
    assert "dc-main" not in out  # the controller counts run A's steps, not B's
    assert "sampler ddim → ddpm, steps 5 → 3, guidance 1.0 → 2.0, seed 0 → 1" in out
    from diffusion_caption import Captioner

    b = Captioner.from_pretrained(app_files["checkpoint"]).caption(image, steps=3, sampler="ddpm", guidance=2.0, seed=1)
    assert [f"Step {k} of 3" in out for k in (1, 2, 3)] == [True] * 3
    assert all(html.escape(w) in out for w in b.text.split())
    same = got(handlers.compare(image, STEPS, "ddim", 1.0, False, 0, None, None, STEPS, "ddim", 1.0, 0, view),
               ui.compare_html)
    assert "the same settings as run A" in same and "<mark>" not in same.split("</div>")[0]
    bad = got(handlers.compare_event(image, STEPS, "ddim", 1.0, False, 0, None, None, 0, "ddim", 1.0, 0, view),
              ui.compare_html)
    assert "No second run" in bad and "steps must be an integer" in bad
    # a new caption of run A clears the comparison (it was of the image before)
    first = next(handlers.caption_stream(app_files["examples"][1], STEPS, "ddim", 1.0, False, 0, "predicted x0"))
    assert got(first, ui.compare_html) == ""


def test_the_commit_threshold_of_a_block_model_is_a_setting_of_the_page_and_the_api(app_files, tokenizer,
                                                                                      clip_encoder, tmp_path,
                                                                                      monkeypatch):
    """A block model's commit threshold starts at its checkpoint's, reaches the caption (and the record of its
    settings) from the page and from the API, and names the same caption the library gives; another sampler
    ignores it. (Steps counted one block a step: verified guesses would take the blocks cut short back.)"""
    import app
    from diffusion_caption import Captioner
    from diffusion_caption.config import preset
    from diffusion_caption.denoiser import Denoiser
    from diffusion_caption.samplers import BlockSampler
    from diffusion_caption.sampling import SamplingConfig

    monkeypatch.setattr(BlockSampler, "VERIFY", False)

    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, cond_dim=clip_encoder.feature_dim, block_size=2,
                 fusion="add")
    ck = str(tmp_path / "blocky")
    Captioner(cfg, Denoiser(cfg), clip_encoder, tokenizer,
              sampling=SamplingConfig.parse("block:12:1:commit0.9")).save_pretrained(ck)
    args = app.parse_args(["--checkpoint", ck, "--baseline", "", "--vocab-map", "pca", "--cache-dir", app_files["cache"],
                           "--examples", app_files["examples_dir"]])
    h = app.Handlers(app.load_models(args))
    assert got(h.choose_model("blocky"), h.ui.commit).value == 0.9
    image = app_files["examples"][0]
    views = {c: got(list(h.caption_stream(image, 12, "block", 1.0, False, 0, "predicted x0", None, None, c))[-1],
                    h.ui.view) for c in (0.0, 0.99)}
    direct = {c: Captioner.from_pretrained(ck).caption(image, seed=0, commit=c) for c in (0.0, 0.99)}
    for c, view in views.items():
        assert view.steps[-1].text == direct[c].text and len(view.steps) == len(direct[c].steps)
    assert len(views[0.99].steps) > len(views[0.0].steps)  # an untrained network is sure of little: blocks cut short
    api = list(h.api_caption(image, 12, "block", 1.0, False, 0, None, None, 0.99))[-1]
    assert api["settings"]["commit"] == 0.99 and api["text"] == direct[0.99].text
    assert list(h.api_caption(image, 12, "block", 1.0, False, 0))[-1]["settings"]["commit"] == 0.9  # the default
