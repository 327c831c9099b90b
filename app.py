"""The browser demo: watch a caption being denoised step by step, beside the autoregressive baseline.

    python app.py                                   # http://127.0.0.1:7860, the shipped shapes checkpoints
    python app.py --checkpoint DIR --baseline DIR   # other checkpoints (local directories or hub ids)
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=8080 python app.py
    DIFFUSION_CAPTION_CHECKPOINT=USER/NAME DIFFUSION_CAPTION_BASELINE=USER/NAME-baseline python app.py   # a Space's variables

UI only: captioning, plots, the vocabulary map, variants and scene composition all live in the
``diffusion_caption`` library; this file lays them out and wires the events. The named API endpoint
``/caption`` (for ``gradio_client``) streams one JSON chunk per denoising step, then the whole trace.
"""
from __future__ import annotations

import argparse
import atexit
import html
import itertools
import os
import sys
import time
import types
from collections import OrderedDict
from dataclasses import dataclass, field

import gradio as gr
import torch

from diffusion_caption import BaselineCaptioner, Captioner, CheckpointError, ImageLoadError, Trace, load_image
from diffusion_caption.checkpoint import resolve
from diffusion_caption.eval.compare import changed_words, diff_html, scene_check
from diffusion_caption.ood import NOTICE
from diffusion_caption.samplers import SAMPLERS
from diffusion_caption.viz.html_views import VariantRow, candidates_list, confidence_legend, token_chips, variants_table
from diffusion_caption.viz.common import is_special, shown_positions
from diffusion_caption.viz.step_viewer import (STEP_VIEWER_CSS, STEP_VIEWER_JS, MapFrame, heatmap_html, stepped_frames,
                                               trajectory_svg)
from diffusion_caption.viz.vocab_map import VocabMapJob
from diffusion_caption.world.composer import ObjectSpec, compose_scene
from diffusion_caption.world.scenes import BACKGROUNDS, COLORS, IMAGE_SIZE, SHAPES, SIZES, Scene, render_scene
from diffusion_caption.world.variants import known_scenes, scene_key, variants_for

try:  # a ZeroGPU Space: a GPU is attached while a function wrapped by spaces.GPU runs (see on_gpu)
    import spaces
except ImportError:
    spaces = None

ROOT = os.path.dirname(os.path.abspath(__file__))
# the models the app offers, the first one the default: what each is, is read from its config.json (extra.summary)
DEFAULT_CHECKPOINTS = [os.path.join(ROOT, "assets", "checkpoints", name)
                       for name in ("shapes-diffusion-block", "shapes-diffusion", "shapes-diffusion-fast-small")]
DEFAULT_CHECKPOINT = DEFAULT_CHECKPOINTS[0]
DEFAULT_BASELINE = os.path.join(ROOT, "assets", "checkpoints", "shapes-baseline")
EXAMPLES_DIR = os.path.join(ROOT, "assets", "examples")
MAX_UI_STEPS = 250  # the steps slider's top (every step is a network call; the API accepts up to T)
SPACING_CHOICES = ("linspace", "trailing", "trailing^2", "trailing^3")  # the dropdown's; any trailing^k is accepted
TRACE_CACHE_SIZE = 64
PLAY_INTERVAL_MS = 700  # playback's pace, in the browser
MAP_POLL_S = 1.0  # how often a page polls for a vocabulary map still being computed
VIEWS_STREAM_S = 0.25  # while a caption streams, its heatmap and map are redrawn at most this often
# The stream is paced so that a person sees the caption form: at least this long between two shown steps,
# but never more than STREAM_BUDGET_S of waiting in all (a fast model would otherwise flash straight to the
# end). The wall times reported are the model's own, without this pacing.
STREAM_MIN_INTERVAL_S = 0.04
STREAM_BUDGET_S = 0.8


def spacing_choices(default: str) -> list[str]:
    """The dropdown's spacings, with the checkpoint's own default added when it is another trailing^k."""
    return list(SPACING_CHOICES) + ([default] if default not in SPACING_CHOICES else [])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python app.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", default=None,
                   help="diffusion checkpoint directory or hub id; repeat it to offer several (the first is the default; "
                        "default: the shipped shapes-diffusion-block, shapes-diffusion and shapes-diffusion-fast-small)")
    p.add_argument("--baseline", default=None,
                   help="autoregressive baseline checkpoint directory or hub id ('' for none; default: the shipped "
                        "shapes-baseline, unless a --checkpoint was trained on other data: then none)")
    p.add_argument("--clip", default=None, metavar="SPEC",
                   help="load the models' CLIP from this copy instead of the one their checkpoints name: a CLIP folder "
                        "or open_clip:MODEL:FILE (a local weights file, for offline use)")
    p.add_argument("--host", default=None, help="address to serve on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--vocab-map", default="umap", choices=["umap", "pca"],
                   help="projection of the vocabulary map (umap: fitted once per checkpoint and stored; pca: instant)")
    p.add_argument("--cache-dir", default=os.path.join(ROOT, "cache"), help="where computed vocabulary maps are kept")
    p.add_argument("--examples", default=EXAMPLES_DIR, help="directory of example images")
    p.add_argument("--concurrency", type=int, default=2, help="requests computed at once (the rest queue)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per request (1: the small models gain nothing from more, and concurrent "
                        "requests would oversubscribe the cores)")
    args = p.parse_args(argv)
    # a Space runs app.py without arguments: its variables name the models instead (docs/REAL_DATA.md)
    env_checkpoints = [c.strip() for c in os.environ.get("DIFFUSION_CAPTION_CHECKPOINT", "").split(",") if c.strip()]
    args.checkpoint = args.checkpoint or env_checkpoints or None
    if args.baseline is None and "DIFFUSION_CAPTION_BASELINE" in os.environ:
        args.baseline = os.environ["DIFFUSION_CAPTION_BASELINE"].strip()
    args.checkpoints = args.checkpoint or list(DEFAULT_CHECKPOINTS)
    args.checkpoint = args.checkpoints[0]
    return args


# ---------------------------------------------------------------------------------------------- models
@dataclass
class Models:
    """Everything loaded once at start-up and shared by all sessions."""

    caps: dict  # name -> Captioner, the default first
    checkpoints: dict  # name -> the path or hub id it was loaded from
    checkpoint_dirs: dict  # name -> its local directory (a hub id's snapshot)
    vocab_jobs: dict  # name -> its vocabulary map (each model has its own embedding table)
    baseline: object | None
    baseline_path: str
    baseline_note: str  # why there is no baseline, or what is loaded
    scenes: dict
    examples: list[str]
    load_seconds: float
    concurrency: int = 2
    traces: OrderedDict = field(default_factory=OrderedDict)  # memo of finished traces (see remember())

    @property
    def default(self) -> str:
        return next(iter(self.caps))

    @property
    def cap(self):
        """The default captioner."""
        return self.caps[self.default]

    @property
    def checkpoint(self) -> str:
        return self.checkpoints[self.default]

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint_dirs[self.default]

    @property
    def vocab_job(self):
        return self.vocab_jobs[self.default]

    def name(self, model: str | None) -> str:
        """The model a request asked for (None: the default), or a clear error."""
        if model in (None, ""):
            return self.default
        if model not in self.caps:
            raise _user_error(f"Model: unknown model {model!r}; this app offers {', '.join(self.caps)}")
        return model


def model_summary(cap) -> str:
    """One line on what a checkpoint is, from its config (extra.summary), else from its sampling defaults."""
    cfg = cap.config
    smp = cap.sampling
    summary = (cfg.extra or {}).get("summary")
    if summary:
        return summary
    return (f"{cfg.n_layers}-layer denoiser, {smp.steps} {smp.sampler.upper()} steps"
            + (f", guidance {smp.guidance:g}" if smp.guidance != 1 else ""))


# the handlers that run the models: on a ZeroGPU Space each gets the GPU for the length of a call
GPU_HANDLERS = ("caption_stream", "api_caption", "variants")


def model_device() -> str:
    """Where the models live: CUDA on a ZeroGPU Space (the ``spaces`` package present), else the CPU."""
    if spaces is None:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def on_gpu(h: "Handlers") -> "Handlers":
    """Wrap ``h``'s model-running handlers in ``spaces.GPU`` when the ``spaces`` package is present; else nothing."""
    if spaces is not None:
        for name in GPU_HANDLERS:
            setattr(h, name, spaces.GPU(getattr(h, name)))
    return h


def default_baseline(caps: dict) -> tuple[str, str]:
    """The baseline to pair with ``caps`` when no --baseline is given, and why: the shipped shapes baseline for
    shapes-world models, none for a model trained on other data (photographs), which it would only mislead."""
    other = {name: cap.config.extra.get("data") for name, cap in caps.items()
             if (cap.config.extra or {}).get("data") not in (None, "", "shapes")}
    if not other:
        return DEFAULT_BASELINE, ""
    name, data = next(iter(other.items()))
    note = (f"No baseline loaded: {name} was trained on {data}, and the shipped baseline knows only the shapes "
            "world; start the app with --baseline DIR_OR_HUB_ID (a baseline trained on the same data, e.g. the "
            "recipe's baseline/) to see one beside it.")
    print(note, file=sys.stderr)
    return "", note


def load_models(args) -> Models:
    t0 = time.perf_counter()
    device = model_device()
    caps, checkpoints, dirs, jobs = {}, {}, {}, {}
    for path in getattr(args, "checkpoints", None) or [args.checkpoint]:
        name = os.path.basename(os.path.normpath(path))
        try:
            cap = Captioner.from_pretrained(path, device=device, clip=getattr(args, "clip", None))
        except (CheckpointError, OSError) as e:
            hint = ""
            if os.path.abspath(path) in DEFAULT_CHECKPOINTS:
                hint = ("\nThe shipped checkpoints are made by the commands in training/README.md; "
                        "or start the app with --checkpoint DIR.")
            raise SystemExit(f"error: cannot load the diffusion checkpoint: {e}{hint}") from None
        if name in caps:
            raise SystemExit(f"error: two checkpoints named {name!r}; give each --checkpoint a distinct folder name")
        caps[name], checkpoints[name] = cap, path
        dirs[name] = resolve(path)  # a hub id's local snapshot (already fetched by from_pretrained)
        tokens = cap.tokenizer.token_strings(list(range(cap.tokenizer.vocab_size)))
        jobs[name] = VocabMapJob(cap.denoiser.embeddings, tokens, cache_dir=args.cache_dir, checkpoint_dir=dirs[name],
                                 method=args.vocab_map)
        atexit.register(jobs[name].close)
    baseline = None
    baseline_path, note = default_baseline(caps) if args.baseline is None else (args.baseline, "")
    if not baseline_path:
        note = note or "No baseline loaded: the app was started with --baseline ''."
    else:
        try:
            baseline = BaselineCaptioner.from_pretrained(baseline_path, device=device, clip=getattr(args, "clip", None))
            note = f"Baseline: {os.path.basename(os.path.normpath(baseline_path))}"
        except (CheckpointError, OSError, ValueError) as e:
            hint = (" Train it with `python -m training.train_baseline --preset shapes`, or start the app "
                    "with --baseline DIR." if os.path.abspath(baseline_path) == DEFAULT_BASELINE else "")
            note = f"No baseline loaded: {e}.{hint}"
    examples = []
    if os.path.isdir(args.examples):
        examples = [os.path.join(args.examples, f) for f in sorted(os.listdir(args.examples))
                    if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))]
    return Models(caps=caps, checkpoints=checkpoints, checkpoint_dirs=dirs, vocab_jobs=jobs, baseline=baseline,
                  baseline_path=baseline_path, baseline_note=note, scenes=known_scenes(args.examples),
                  examples=examples, load_seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- per-session view
@dataclass
class View:
    """What the step viewer shows for the last captioned image (kept per browser session)."""

    steps: list
    seconds: float
    first_step_seconds: float
    baseline: object | None = None
    baseline_seconds: float | None = None
    points: dict | None = None  # "predicted x0" / "noisy x_t" -> [S, L, 2] map coordinates
    cached: bool = False
    model: str = ""  # which of the app's models made it (its vocabulary map places the points)
    ood: dict | None = None  # how unlike the training images the input is (the checkpoint's ood.json), if known
    # the calibrated probability that each final token is right (the checkpoint's confidence.json), if known
    token_confidence: list | None = None
    caption_confidence: float | None = None
    run: str = ""  # the caption's run, written into its views (playback in the page stops at a new one)


VARIANT_SEEDS = 3  # the error analysis counts changed captions under this many noise seeds
TRAJECTORY_KINDS = ("predicted x0", "noisy x_t")
TRAJECTORY_HELP = """**How to read the map.** Grey dots are the vocabulary's token embeddings, laid out in 2-D so that
tokens with similar embeddings sit close together. Each coloured path is one caption position: an **x** where
it starts, dark to bright as the steps go by, a ringed dot at the current step with the token it rounds to.

*predicted x0* is the network's guess of the clean caption at each step; *noisy x_t* is the sample itself,
from pure noise to the final embeddings. Points are placed between their nearest tokens, weighted by the
rounding probabilities, so a position that rounds with confidence 0.95 sits on its token."""


@dataclass(eq=False)
class UI:
    """The components the handlers update, made by ``build()``. A handler returns ``{component: value}`` for
    those it changes; gradio leaves the other outputs of its event as they are (a missing key is a skip)."""

    # the Caption tab: the step viewer, the plots, the table, the baseline and the timing line
    chips: gr.HTML
    ood_note: gr.HTML  # the notice that the image is unlike anything the model was trained on
    status: gr.HTML
    slider: gr.Slider
    heat: gr.HTML  # the confidence heatmap of every step (the step viewer's, step_viewer.heatmap_html)
    traj: gr.HTML  # the trajectory map of every step (step_viewer.trajectory_svg)
    map_note: gr.Markdown
    map_positions: gr.CheckboxGroup  # which caption positions the map draws
    table: gr.Dataframe
    base_html: gr.HTML
    timing: gr.Markdown
    view: gr.State  # the session's View
    map_timer: gr.Timer  # polls while the vocabulary map is computed
    compare_html: gr.HTML  # a second run of the same image, under the same step controller
    # the settings a model's choice resets, and the line on what the model is
    steps: gr.Slider
    sampler: gr.Radio
    guidance: gr.Slider
    clamp: gr.Checkbox
    spacing: gr.Dropdown
    commit: gr.Slider
    model_line: gr.HTML
    # the Error analysis tab
    a_image: gr.Image
    scene_state: gr.State
    compose_note: gr.Markdown
    variants_html: gr.HTML

    @classmethod
    def detached(cls) -> "UI":
        """Components on no page, for calling the handlers directly (the tests, research.benchmark_app)."""
        kinds = dict(chips=gr.HTML, ood_note=gr.HTML, status=gr.HTML, slider=gr.Slider, heat=gr.HTML, traj=gr.HTML,
                     map_note=gr.Markdown, map_positions=gr.CheckboxGroup, table=gr.Dataframe, base_html=gr.HTML, timing=gr.Markdown, view=gr.State,
                     map_timer=gr.Timer, compare_html=gr.HTML, steps=gr.Slider, sampler=gr.Radio, guidance=gr.Slider,
                     clamp=gr.Checkbox, spacing=gr.Dropdown, commit=gr.Slider, model_line=gr.HTML, a_image=gr.Image,
                     scene_state=gr.State, compose_note=gr.Markdown, variants_html=gr.HTML)
        return cls(**{name: kind(render=False) for name, kind in kinds.items()})

    # what each kind of event may update: its outputs
    @property
    def step_outputs(self) -> set:
        """A trace's step viewer drawn (every step; the page then shows any of them without the server)."""
        return {self.slider, self.chips, self.status, self.heat, self.traj, self.map_note, self.view, self.map_timer}

    @property
    def map_outputs(self) -> set:
        """The map drawn once the vocabulary map is there."""
        return {self.traj, self.map_note, self.view, self.map_timer}

    @property
    def stream_outputs(self) -> set:
        """An image captioned: every step streamed, then the plots, the table, the baseline and the timing."""
        return self.step_outputs | {self.table, self.base_html, self.timing, self.ood_note, self.map_positions,
                                    self.compare_html}

    @property
    def model_outputs(self) -> set:
        """A model chosen: its sampling defaults in the settings, and the line on what it is."""
        return {self.steps, self.sampler, self.guidance, self.clamp, self.spacing, self.commit, self.model_line}

    @property
    def compose_outputs(self) -> set:
        return {self.a_image, self.scene_state, self.compose_note}


def _user_error(msg: str):
    return gr.Error(msg, print_exception=False)


def without_folder(message: str, path) -> str:
    """``message`` with the file's folder left out: an upload's path is the server's temporary copy
    (/tmp/gradio/<hash>/name.png), which says nothing to the person and is not theirs to see; its base name
    (the name the file was uploaded under) says which file is meant."""
    if not isinstance(path, (str, os.PathLike)):
        return message
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if not folder:
        return message
    message = message.replace(path, os.path.basename(path))
    return message.replace(folder + os.sep, "").replace(folder, "…")


def upload_image(*args, **kw):
    """A ``gr.Image`` whose uploads reach the handlers as the file's path without gradio opening it first:
    a file PIL cannot open (corrupt bytes, text named .png, a decompression bomb) then gets the library
    loader's specific message instead of gradio's generic "Error".

    The instance's ``preprocess`` is replaced rather than subclassing ``gr.Image``: a subclass would make
    gradio write a type-stub file next to this one at import time."""
    box = gr.Image(*args, **kw)
    default = box.preprocess

    def preprocess(self, payload):
        path = getattr(payload, "path", None)
        url = getattr(payload, "url", None) or ""
        if self.type == "filepath" and path and not url.startswith("data:"):
            return str(path)
        return default(payload)

    box.preprocess = types.MethodType(preprocess, box)
    return box


def baseline_html(m: Models, view: View | None) -> str:
    """The baseline's caption of the view's image as chips, or why there is no baseline."""
    if m.baseline is None:
        return f"<div style='color:#8a5a00'>{html.escape(m.baseline_note)}</div>"
    if view is None or view.baseline is None:
        return ""
    b = view.baseline
    return (f"<div style='font-size:1.05em;margin-bottom:4px'>{html.escape(b.text) or '<i>(empty)</i>'}</div>"
            + token_chips(b.tokens, b.confidence, end_token="\x00", label="probability")
            + confidence_legend("token probability"))


class Handlers:
    """The page's event handlers; each returns (or yields) ``{component of ui: value}``."""

    def __init__(self, m: Models, ui: UI | None = None):
        self.m = m
        self.ui = ui if ui is not None else UI.detached()
        self._runs = itertools.count(1)  # each caption's views carry their own run, so the page's playback stops
        self._frames: dict = {}  # model name -> (its vocabulary map, MapFrame, background PNG)

    # ------------------------------------------------------------------ helpers (formatting only)
    def _load(self, image):
        if image is None or image == "":
            raise _user_error("Pick an example, upload an image or paste one from the clipboard first.")
        try:
            return load_image(image)
        except ImageLoadError as e:
            raise _user_error(without_folder(str(e), image)) from None

    def _settings(self, steps, sampler, guidance, clamp, seed, spacing=None, model=None, commit=None) -> dict:
        cap = self.m.caps[self.m.name(model)]
        try:
            seed = int(seed) if seed is not None and float(seed) == int(float(seed)) else seed
            steps = int(steps) if steps is not None and float(steps) == int(float(steps)) else steps
            # the page shows one caption forming: a model that ranks the roundings of its last step keeps
            # them (the last step lists the candidates), one that compares K noise draws shows a single draw
            candidates = None if cap.sampling.propose == "rounding" else 1
            sampler = str(sampler).lower()
            # the block sampler's threshold (None: the checkpoint's); other samplers have none
            commit = float(commit) if commit is not None and sampler == "block" else None
            return cap.settings(seed, steps=steps, sampler=sampler, guidance=float(guidance), clamp=bool(clamp),
                                spacing=spacing or None, candidates=candidates, commit=commit)
        except (TypeError, ValueError) as e:
            raise _user_error(f"Settings: {e}") from None

    def _map_points(self, view: View) -> str:
        """Place the trace on the vocabulary map if the map is ready; returns a note for the UI."""
        job = self.m.vocab_jobs[view.model or self.m.default]
        vmap = job.poll()
        if vmap is None:
            return job.status
        if view.points is None:
            view.points = {"predicted x0": vmap.place(torch.stack([s.x0_pred for s in view.steps])),
                           "noisy x_t": vmap.place(torch.stack([s.x_t for s in view.steps]))}
        return ""

    def _chips(self, step, calibrated: list | None = None) -> str:
        """A step's tokens coloured by their rounding probability; the last step's, when the model has a
        calibrator, by the calibrated probability that each word is right (the heatmap keeps the rounding)."""
        if calibrated is not None:
            out = (token_chips(step.tokens, calibrated) + confidence_legend("calibrated confidence that the word is right")
                   + "<div class='dc-note'>from each word's rounding probability at the step it was decided; the "
                     "heatmap and earlier steps show the raw rounding probability</div>")
        else:
            out = token_chips(step.tokens, step.confidence) + confidence_legend()
        if step.candidates:
            out += candidates_list(step.candidates, step.scores, step.chosen)
        return out

    def _status(self, view_steps, k: int, total: int | None = None) -> str:
        s = view_steps[k]
        total = total or len(view_steps)
        mean = sum(s.confidence) / len(s.confidence)
        return (f"<b>Step {k + 1} of {total}</b> · timestep t = {s.t} · mean confidence {mean:.2f} · "
                f"caption: <i>{html.escape(s.text) or '(empty)'}</i>")

    def _table(self, steps) -> list[list]:
        rows = []
        for s in steps:
            c = s.confidence
            rows.append([s.index + 1, s.t, s.text, round(sum(c) / len(c), 3), round(min(c), 3)])
        return rows

    def _timing(self, view: View, settings: dict) -> str:
        spacing = "" if settings["sampler"] == "block" else f", {settings['spacing']} spacing"
        parts = [f"diffusion **{view.seconds:.2f} s** for {len(view.steps)} {settings['sampler'].upper()} steps"
                 f"{spacing} (first step after {view.first_step_seconds * 1000:.0f} ms)"]
        if view.baseline_seconds is not None:
            parts.append(f"baseline **{view.baseline_seconds:.2f} s** (greedy)")
        note = " · replayed from the memo of finished traces" if view.cached else ""
        return "Wall time on this server for this image: " + " · ".join(parts) + note

    def _remember(self, key, value) -> None:
        self.m.traces[key] = value
        self.m.traces.move_to_end(key)
        while len(self.m.traces) > TRACE_CACHE_SIZE:
            self.m.traces.popitem(last=False)

    # ------------------------------------------------------------------ the caption stream
    def caption_stream(self, image, steps, sampler, guidance, clamp, seed, kind, spacing=None, model=None,
                       commit=None):
        """Yield the caption at every denoising step, the views filling as the steps come; the last yield
        holds every step's views, the table and the baseline. When it cannot caption (no image, a broken
        file, bad settings), it first clears what the page showed of the previous caption, then raises the
        message."""
        try:
            yield from self._caption_stream(image, steps, sampler, guidance, clamp, seed, kind, spacing, model, commit)
        except gr.Error as e:
            yield self.cleared(e.message)
            raise

    def cleared(self, why: str = "") -> dict:
        """The step viewer emptied: no caption, status, plots, table, baseline or timing of an image that is no
        longer the one asked about; the session's trace forgotten (the step buttons then show nothing)."""
        u = self.ui
        note = f"No caption: {html.escape(why)}" if why else "The caption appears here as it is denoised."
        return {u.chips: f"<div class='dc-note dc-error'>{note}</div>", u.status: "", u.ood_note: "",
                u.slider: gr.Slider(minimum=1, maximum=2, value=1, interactive=False, label="Step"),
                u.heat: "", u.traj: "", u.map_note: "", u.table: [], u.map_positions: no_positions(),
                u.base_html: baseline_html(self.m, None), u.timing: "", u.view: None,
                u.map_timer: gr.Timer(active=False), u.compare_html: ""}

    def _caption_stream(self, image, steps, sampler, guidance, clamp, seed, kind, spacing, model, commit=None):
        img = self._load(image)
        name = self.m.name(model)
        s = self._settings(steps, sampler, guidance, clamp, seed, spacing, name, commit)
        key = (name, scene_key(img), tuple(sorted(s.items())))
        u = self.ui
        run = f"{next(self._runs)}"
        memo = self.m.traces.get(key)
        if memo is not None:
            view = View(steps=memo.steps, seconds=memo.seconds, first_step_seconds=memo.first_step_seconds,
                        baseline=memo.baseline, baseline_seconds=memo.baseline_seconds, cached=True, model=name,
                        ood=memo.ood, token_confidence=memo.token_confidence, caption_confidence=memo.caption_confidence)
            step_iter, ood = iter(memo.steps), memo.ood
        else:
            view = None
            step_iter, ood = self._steps(name, img, s)
        done, first, busy, shown = [], None, 0.0, time.perf_counter()  # busy: time spent computing, not waiting
        views_at = 0.0  # when the heatmap and map were last streamed (they are redrawn at most every VIEWS_STREAM_S)
        total = s["steps"]
        while True:
            tc = time.perf_counter()
            try:
                step = next(step_iter)
            except StopIteration:
                break
            except ValueError as e:  # the library's own checks (settings, image): a message, not a trace
                raise _user_error(str(e)) from None
            busy += time.perf_counter() - tc
            done.append(step)
            update = {u.chips: stepped_frames([self._chips(step)], run=run, kind="chips"),
                      u.status: stepped_frames([self._status(done, len(done) - 1, total)], run=run, kind="status",
                                               main=True)}
            if time.perf_counter() - views_at >= VIEWS_STREAM_S:
                update.update(self._views(done, len(done), kind, None, name, run, total))
                views_at = time.perf_counter()
            if first is None:
                first = busy
                # the first update also clears what belonged to the previous image
                yield {u.heat: "", u.traj: "", **update, u.ood_note: ood_notice(ood),
                       u.slider: gr.Slider(minimum=1, maximum=max(total, 2), value=1, interactive=False),
                       u.map_note: "", u.table: [], u.map_positions: no_positions(),
                       u.base_html: baseline_html(self.m, None) if self.m.baseline is None else "", u.timing: "",
                       u.map_timer: gr.Timer(active=False), u.compare_html: ""}
            else:
                wait = min(STREAM_MIN_INTERVAL_S, STREAM_BUDGET_S / max(total, 1)) - (time.perf_counter() - shown)
                if wait > 0:
                    time.sleep(wait)
                yield update
            shown = time.perf_counter()
        seconds = busy
        if view is None:
            view = View(steps=done, seconds=seconds, first_step_seconds=first or seconds, model=name, ood=ood)
            judged = self.m.caps[name].calibrate(Trace(done, dict(s)))
            view.token_confidence, view.caption_confidence = judged.token_confidence, judged.caption_confidence
            if self.m.baseline is not None:
                tb = time.perf_counter()
                view.baseline = self.m.baseline.caption(img)
                view.baseline_seconds = time.perf_counter() - tb
            self._remember(key, View(view.steps, view.seconds, view.first_step_seconds, view.baseline,
                                     view.baseline_seconds, model=name, ood=ood, token_confidence=view.token_confidence,
                                     caption_confidence=view.caption_confidence))
        view.run = run
        final = view.steps[-1].tokens
        yield {**self.show(view, len(view.steps), kind), u.table: self._table(view.steps),
               u.map_positions: gr.CheckboxGroup(choices=[(f"{p} {final[p]}", p) for p in shown_positions(final)],
                                                 value=content_positions(final)),
               u.base_html: baseline_html(self.m, view), u.timing: self._timing(view, s)}

    def auto_caption(self, image, steps, sampler, guidance, clamp, seed, kind, spacing=None, model=None,
                     commit=None):
        """Caption as soon as an image arrives (example click, upload, paste); nothing when it is cleared."""
        if image is None or image == "":
            yield gr.skip()  # one skip for all of the event's outputs
            return
        yield from self.caption_stream(image, steps, sampler, guidance, clamp, seed, kind, spacing, model, commit)

    def choose_model(self, model):
        """A model picked: its own sampling defaults in the settings, and the line on what it is."""
        cap = self.m.caps[self.m.name(model)]
        smp = cap.sampling
        u = self.ui
        return {u.steps: gr.Slider(value=min(smp.steps, MAX_UI_STEPS)), u.sampler: gr.Radio(value=smp.sampler),
                u.guidance: gr.Slider(value=smp.guidance), u.clamp: gr.Checkbox(value=smp.clamp),
                u.spacing: gr.Dropdown(choices=spacing_choices(smp.spacing), value=smp.spacing),
                u.commit: gr.Slider(value=smp.commit), u.model_line: model_note(cap)}

    # ------------------------------------------------------------------ the step viewer
    # The server draws every step of a trace once; the page shows any of them (slider, step buttons, play and
    # pause, the map's kind and positions) with STEP_VIEWER_JS, without a round trip.
    def _map_of(self, name: str):
        """The model's vocabulary map with its drawing frame and background PNG (made once per map), or None."""
        vmap = self.m.vocab_jobs[name].poll()
        if vmap is None:
            return None
        got = self._frames.get(name)
        if got is None or got[0] is not vmap:
            frame = MapFrame(vmap.coords)
            got = self._frames[name] = (vmap, frame, frame.background())
        return got

    def _views(self, steps, k: int, kind, positions, name: str, run: str, total: int | None = None,
               points: dict | None = None) -> dict:
        """The heatmap and the trajectory map of ``steps`` (step ``k`` shown), the map only once it is there;
        ``points`` are the steps placed on it (None: placed here)."""
        u = self.ui
        out = {u.heat: heatmap_html(steps, current=k - 1, run=run, total=total)}
        mapped = self._map_of(name)
        if mapped is not None:
            vmap, frame, background = mapped
            if points is None:
                points = {"predicted x0": vmap.place(torch.stack([s.x0_pred for s in steps])),
                          "noisy x_t": vmap.place(torch.stack([s.x_t for s in steps]))}
            kind = kind if kind in TRAJECTORY_KINDS else TRAJECTORY_KINDS[0]
            out[u.traj] = trajectory_svg(vmap.coords, vmap.tokens, points, steps, current=k - 1, run=run, kind=kind,
                                         positions=positions, method=vmap.method.upper(), background=background,
                                         frame=frame)
        return out

    def show(self, view: View | None, k, kind, positions=None):
        """The step viewer of the session's trace, step ``k`` (1-based) shown: every step's chips and status
        line, the heatmap and the trajectory map (of the caption ``positions`` picked; None: its words)."""
        u = self.ui
        if view is None:
            return {u.view: None, u.map_timer: gr.Timer(active=False)}
        S = len(view.steps)
        k = int(min(max(1, S if k is None else int(k)), S))
        note = self._map_points(view)
        chips = stepped_frames([self._chips(st, view.token_confidence if i == S - 1 else None)
                                for i, st in enumerate(view.steps)], current=k - 1, run=view.run, kind="chips")
        status = stepped_frames([self._status(view.steps, i) for i in range(S)], current=k - 1, run=view.run,
                                kind="status", main=True)
        slider = gr.Slider(minimum=1, maximum=max(S, 2), value=k, step=1, interactive=S > 1,
                           label=f"Step (1 = pure noise … {S} = final caption)")
        views = self._views(view.steps, k, kind, picked_positions(view, positions), view.model or self.m.default,
                            view.run, points=view.points)
        return {u.heat: "", u.traj: "", **views, u.slider: slider, u.chips: chips, u.status: status,
                u.map_note: note, u.view: view, u.map_timer: gr.Timer(active=self._map_pending(view))}

    def _map_pending(self, view: View) -> bool:
        """Whether the shown trace waits for a vocabulary map still being computed (the page then polls)."""
        job = self.m.vocab_jobs[view.model or self.m.default]
        return view.points is None and job.poll() is None and not job.error

    def map_ready(self, view, k, kind, positions=None):
        """The page's poll while the vocabulary map is computed: once it is there (or has failed), the map is
        drawn, step ``k`` (the step the page shows) current; until then nothing changes."""
        u = self.ui
        if view is None:
            return {u.map_timer: gr.Timer(active=False)}
        if self._map_pending(view):
            return gr.skip()
        drawn = self.show(view, k, kind, positions)
        return {c: drawn[c] for c in (u.traj, u.map_note, u.view, u.map_timer)}

    # ------------------------------------------------------------------ a second run, compared
    def compare(self, image, steps, sampler, guidance, clamp, seed, spacing, model, b_steps, b_sampler, b_guidance,
                b_seed, view=None, commit=None):
        """The image captioned again with other settings (run B), its chips, status line and heatmap under the page's
        step controller beside the run shown (run A, ``view``): each step of A shows B at the same share of its
        run. The line above them names what differs and marks B's final words that A's caption lacks."""
        img = self._load(image)
        name = self.m.name(model)
        a = self._settings(steps, sampler, guidance, clamp, seed, spacing, name, commit)
        b = self._settings(b_steps, b_sampler, b_guidance, clamp, b_seed, spacing, name, commit)
        steps_iter, _ = self._steps(name, img, b)
        try:
            done = list(steps_iter)
        except ValueError as e:
            raise _user_error(str(e)) from None
        run = f"{next(self._runs)}"
        S = len(done)
        chips = stepped_frames([self._chips(st) for st in done], run=run, kind="chips")
        status = stepped_frames([self._status(done, i) for i in range(S)], run=run, kind="status")
        heat = heatmap_html(done, run=run)
        differs = ", ".join(f"{k} {a[k]} → {b[k]}" for k in ("sampler", "steps", "guidance", "seed") if a[k] != b[k])
        a_text = view.steps[-1].text if view is not None and view.steps else None
        final = (f"final caption: {diff_html(a_text, done[-1].text)} <span class='dc-note'>(words that run A's caption "
                 f"lacks marked)</span>" if a_text is not None else f"final caption: <i>{html.escape(done[-1].text)}</i>")
        head = (f"<div class='dc-compare-head'><b>Run B</b>: {html.escape(differs) or 'the same settings as run A'}; "
                f"{final}</div>")
        return {self.ui.compare_html: f"<div class='dc-follows dc-compare'>{head}{chips}{status}{heat}</div>"}

    def compare_event(self, *args):
        """``compare`` as the page's button gets it: an error replaces an earlier comparison by its reason."""
        try:
            return self.compare(*args)
        except gr.Error as e:
            return {self.ui.compare_html: f"<div class='dc-note dc-error'>No second run: {html.escape(e.message)}</div>"}

    # ------------------------------------------------------------------ the API endpoint
    def _steps(self, name: str, img, s: dict):
        """The image's steps as they are computed, and how unlike the training images it is (one pass of the
        image tower gives both)."""
        cap = self.m.caps[name]
        try:
            feats, ood = cap.encode_and_assess([img])
        except ValueError as e:
            raise _user_error(str(e)) from None
        return (batch[0] for batch in cap.iter_caption_batch(features=feats, **s)), ood[0]

    def api_caption(self, image, steps, sampler, guidance, clamp, seed, spacing=None, model=None, commit=None):
        """Stream one JSON chunk per step ({"done": false, "step": ...}), then the whole trace ({"done": true, ...},
        with "ood": how unlike the training images the image is, when the model knows)."""
        img = self._load(image)
        name = self.m.name(model)
        s = self._settings(steps, sampler, guidance, clamp, seed, spacing, name, commit)
        t0 = time.perf_counter()
        done = []
        steps_iter, ood = self._steps(name, img, s)
        try:
            for step in steps_iter:
                done.append(step)
                yield {"done": False, "step": step.to_json(), "of": s["steps"]}
        except ValueError as e:
            raise _user_error(str(e)) from None
        trace = self.m.caps[name].calibrate(Trace(done, dict(s), time.perf_counter() - t0, candidates=done[-1].candidates,
                                                  chosen=done[-1].chosen, ood=ood))
        yield {"done": True, "model": name, **trace.to_json()}

    # ------------------------------------------------------------------ error analysis
    def variants_event(self, image, scene_state, steps, sampler, guidance, clamp, seed, spacing=None, model=None,
                       commit=None):
        """The variants table, as the page's button gets it: when the variants cannot be captioned (no image, a
        broken file, bad settings), the table of an earlier image is replaced by the reason before the message."""
        try:
            yield self.variants(image, scene_state, steps, sampler, guidance, clamp, seed, spacing, model, commit)
        except gr.Error as e:
            yield {self.ui.variants_html: f"<div class='dc-note dc-error'>No variants: {html.escape(e.message)}</div>"}
            raise

    def variants(self, image, scene_state, steps, sampler, guidance, clamp, seed, spacing=None, model=None,
                 commit=None):
        img = self._load(image)
        name = self.m.name(model)
        s = self._settings(steps, sampler, guidance, clamp, seed, spacing, name, commit)
        key = scene_key(img)
        scene = None
        if scene_state and scene_state.get("key") == key:
            scene = Scene.from_json(scene_state["scene"])
        scene = scene or self.m.scenes.get(key)
        vs = variants_for(img, scene)
        images = [v.image for v in vs]
        # each variant captioned on its own from the seed's noise, as the Caption tab captions one image: in one
        # batch every row would get other noise, and a changed word could be the noise's doing, not the edit's
        cap = self.m.caps[name]
        traces = [cap.caption(im, **s) for im in images]
        models = ["diffusion"]
        captions = {"diffusion": [t.text for t in traces]}
        if self.m.baseline is not None:
            models.append("baseline")
            captions["baseline"] = [c.text for c in self.m.baseline.caption_batch(images)]
        rows, changed = [], {m: 0 for m in models}
        for i, v in enumerate(vs):
            caps = {m: captions[m][i] for m in models}
            row = VariantRow(v.name, v.image, v.note, caps)
            for m in models:
                ref = captions[m][0]
                row.html_captions[m] = diff_html(ref, caps[m]) if i else html.escape(caps[m]) or "<i>(empty)</i>"
                if v.scene is not None:
                    row.checks[m] = scene_check(caps[m], v.scene)
                if i and changed_words(ref, caps[m]):
                    changed[m] += 1
            rows.append(row)
        n = len(vs) - 1
        # the same count under other noise: an edit that changes the caption under every seed is the edit's doing
        per_seed = {s["seed"]: changed["diffusion"]}
        for extra in range(1, VARIANT_SEEDS):
            other = [cap.caption(im, **{**s, "seed": s["seed"] + extra}).text for im in images]
            per_seed[s["seed"] + extra] = sum(bool(changed_words(other[0], c)) for c in other[1:])
        kind = ("exact re-renders of a known shapes scene (✓/✗ checks against the ground truth)" if scene is not None
                else "pixel-level edits (no ground truth for this image)")
        summary = (f"{n} variants, {kind}, each captioned from the same noise (seed {s['seed']}) as the Caption "
                   "tab's caption of the original. Words new in a variant's caption are "
                   f"<mark style='background:#ffe08a'>highlighted</mark>, the original's words it lost are listed "
                   "below it. " + " · ".join(f"<b>{m}</b>: caption changed in {changed[m]} of {n}" for m in models)
                   + "<div class='dc-note'>diffusion under other noise, each variant again from one seed's noise: "
                   + ", ".join(f"seed {k}: changed in {v} of {n}" for k, v in per_seed.items()) + "</div>")
        if self.m.baseline is None:
            summary += f"<div style='color:#8a5a00'>{html.escape(self.m.baseline_note)}</div>"
        return {self.ui.variants_html: f"<div style='margin-bottom:8px'>{summary}</div>" + variants_table(rows, models)}

    def compose(self, background, *obj_fields):
        """Render the composed scene with the world's own renderer: the image, its scene (state), warnings."""
        specs = []
        for i in range(0, len(obj_fields), 6):
            on, shape, color, size, x, y = obj_fields[i:i + 6]
            if on:
                specs.append(ObjectSpec(shape, color, size, x, y))
        try:
            scene, warnings = compose_scene(specs, background)
        except ValueError as e:
            raise _user_error(str(e)) from None
        img = render_scene(scene)
        note = " ".join(f"⚠ {w}." for w in warnings) or "Rendered by the shapes world's own renderer."
        u = self.ui
        return {u.a_image: img, u.scene_state: {"key": scene_key(img), "scene": scene.to_json()}, u.compose_note: note}


def content_positions(tokens) -> list[int]:
    """The caption's word positions (not [CLS], [SEP] or padding): what the map draws unless others are picked."""
    return [p for p in shown_positions(tokens) if not is_special(tokens[p])]


def picked_positions(view: View, positions) -> list[int] | None:
    """The positions picked for the map, as valid caption positions of the view's trace (None: not picked)."""
    if positions is None:
        return None
    n = len(view.steps[-1].tokens)
    out = set()
    for p in positions:
        try:
            p = int(p)
        except (TypeError, ValueError):
            continue
        if 0 <= p < n:
            out.add(p)
    return sorted(out)


def no_positions():
    return gr.CheckboxGroup(choices=[], value=[])


# ---------------------------------------------------------------------------------------------- about
def ood_notice(ood: dict | None) -> str:
    """The notice above the caption when the image is unlike the model's training images (else nothing)."""
    if not ood or not ood.get("unlike_training"):
        return ""
    return (f"<div class='dc-ood' role='alert'><b>{html.escape(NOTICE)}</b> "
            f"<span class='dc-note'>(out-of-domain score {ood['score']:.1f}, threshold {ood['threshold']:.1f}: "
            f"95% of the validation scenes score below it)</span></div>")


def model_note(cap) -> str:
    """The line under the model choice."""
    return f"<span class='dc-note'>{html.escape(model_summary(cap))}</span>"


def served_url(request) -> str | None:
    """The address this page was opened at, as the browser asked for it (a proxy's X-Forwarded-Host and
    X-Forwarded-Proto first, as on a Space), from the request of a page event; None when it does not say."""
    headers = getattr(request, "headers", None) or {}
    host = (headers.get("x-forwarded-host") or headers.get("host") or "").split(",")[0].strip()
    if not host:
        return None
    url = getattr(request, "url", None)
    scheme = ((headers.get("x-forwarded-proto") or "").split(",")[0].strip()
              or getattr(url, "scheme", None) or "http")
    return f"{scheme}://{host}/"


def about_markdown(m: Models, url: str | None = None) -> str:
    """The About tab; ``url`` is the server's address for the API example (unknown: a placeholder to fill in)."""
    lines = []
    for name, cap in m.caps.items():
        lines += _about_model(name, cap, m.checkpoints[name], m.checkpoint_dirs[name], name == m.default)
    lines += ["", "### Autoregressive baseline"]
    if m.baseline is None:
        lines.append(f"- {m.baseline_note}")
    else:
        bc = m.baseline.config
        bextra = getattr(bc, "extra", {}) or {}
        lines += [f"- checkpoint: `{m.baseline_path}`",
                  f"- ClipCap-style: CLIP prefix ({getattr(bc, 'mapper', '?')} mapper) into a GPT-2 "
                  f"({getattr(bc, 'n_layer', '?')} layers × {getattr(bc, 'n_embd', '?')} wide), greedy decoding",
                  f"- training data: `{bextra.get('data', 'not recorded')}`"]
        lines += _evaluations(m.baseline_path)
    lines += ["", "### Vocabulary maps"] + [f"- {name}: {job.status}" for name, job in m.vocab_jobs.items()]
    lines += ["- trajectory points are placed on the stored map by rounding-weighted barycentres of their "
              "nearest tokens (no UMAP call per request; see `diffusion_caption/vocab_map.py`)",
              "", "### API",
              "The named endpoint `/caption` streams one JSON chunk per denoising step, then the whole trace "
              f"(the last argument names the model: {', '.join(f'`{n}`' for n in m.caps)}):",
              "```python\nfrom gradio_client import Client, handle_file\n"
              f"client = Client(\"{url or 'http://HOST:PORT/'}\")   # this server's address\n"
              f"job = client.submit(handle_file(\"scene.png\"), {m.cap.sampling.steps}, \"{m.cap.sampling.sampler}\", "
              f"{m.cap.sampling.guidance:g}, {m.cap.sampling.clamp}, 0, \"{m.cap.sampling.spacing}\", "
              f"\"{m.default}\", api_name=\"/caption\")\n"
              "trace = job.result()   # {'done': True, 'text': ..., 'steps': [{'text', 'tokens', 'confidence', ...}]}\n```",
              "", f"Models loaded in {m.load_seconds:.1f} s at start-up."]
    return "\n".join(lines)


def _about_model(name: str, cap, checkpoint: str, checkpoint_dir: str, default: bool) -> list[str]:
    cfg = cap.config
    smp = cap.sampling
    n_params = sum(p.numel() for p in cap.denoiser.parameters())
    extra = cfg.extra or {}
    train = extra.get("train_config", {})
    lines = [f"### Diffusion captioner `{name}`" + (" (the default)" if default else ""),
             f"- {model_summary(cap)}",
             f"- checkpoint: `{checkpoint}`",
             f"- denoiser: DistilBERT-style encoder, {cfg.n_layers} layers × {cfg.dim} wide, {n_params / 1e6:.2f} M "
             f"parameters; {cfg.emb_dim}-d token embeddings, vocabulary of {cfg.vocab_size} tokens, "
             f"{cfg.seq_len} caption positions",
             f"- diffusion: {cfg.schedule} noise schedule, T = {cfg.T}, predicts {cfg.predict}; "
             f"CLIP fusion `{cfg.fusion}`; default {smp.steps} {smp.sampler.upper()} steps, "
             f"{smp.spacing} spacing, guidance {smp.guidance:g}"
             + (", clamped to tokens" if smp.clamp else "")
             + (f"; block diffusion, {cfg.block_size} positions a block, one block a step (steps: the most "
                f"a caption may take)" if cfg.block_size else "")
             + (f"; where both positions of a block are rounded with probability below {smp.commit:g}, the "
                f"second is decided again at the next step" if smp.commit else ""),
             f"- training data: `{extra.get('data', 'not recorded')}`"
             + (f", {train.get('steps')} steps of batch {train.get('batch_size')}" if train else ""),
             f"- image encoder: `{extra.get('clip', 'as stored in the checkpoint')}`"]
    if smp.candidates > 1:
        rule = (f"the scorer `{smp.scorer or 'its own CLIP'}`" if smp.select == "clip"
                else "consensus (MBR)")
        what = "likeliest roundings of the last step" if smp.propose == "rounding" else "noise draws"
        lines.append(f"- candidates: the {smp.candidates} {what}, one kept by {rule}")
    if cfg.self_cond:
        lines.append("- self-conditioned: every step also reads the previous step's predicted x0")
    return lines + _evaluations(checkpoint_dir) + [""]


def _evaluations(path: str) -> list[str]:
    """Evaluation tables found next to a checkpoint (``eval*.md`` / ``evaluation*.md``, as training.evaluate writes)."""
    if not path or not os.path.isdir(path):
        return []
    found = sorted(f for f in os.listdir(path) if f.lower().startswith(("eval", "evaluation")) and f.endswith(".md"))
    if not found:
        return ["- evaluation: none stored with this checkpoint (run `python -m training.evaluate --checkpoint DIR "
                "--out DIR/evaluation.json`)"]
    out = []
    for f in found:
        with open(os.path.join(path, f), encoding="utf-8") as fh:
            out += ["", f"**{f}**", "", fh.read().strip()]
    return out


# ---------------------------------------------------------------------------------------------- layout
CSS = """
#step-controls button {min-width: 0 !important; padding-left: 8px; padding-right: 8px}
#caption-chips {min-height: 64px}
.dc-head b {font-size: 1.1em}
.dc-compare {border-left: 3px solid #7a5af8; padding-left: 8px; margin-top: 4px}
.dc-compare-head {margin: 2px 0 4px}
.dc-note {color: #666; font-size: 0.9em}
.dc-ood {background: #fff4e5; border-left: 4px solid #e8590c; padding: 6px 10px; margin-bottom: 6px}
/* the heatmap and the map keep their drawn size, so their text stays readable on a phone; each scrolls
   sideways in its own box (.dc-scroll), not the page */
#heatmap, #trajectories {min-width: 0; max-width: 100%}
"""


def build(m: Models, url: str | None = None):
    """The page; ``url``, the address it is served on, goes into the About tab's API example until the page's
    own request says where it was opened (behind a proxy, that is another address)."""
    cfg = m.cap.config
    smp = m.cap.sampling
    with gr.Blocks(title="diffusion-caption: watch a caption being denoised") as demo:
        gr.Markdown("# Watch a caption being denoised\n"
                    "A CLIP-conditioned diffusion language model starts caption positions from Gaussian noise "
                    "and removes the noise step by step (the default, a block at a time, left to right, each "
                    "block given the ones before); each position is rounded to its nearest token, with a "
                    "confidence. Pick an image, then scrub through the steps.")
        view = gr.State(None)
        scene_state = gr.State(None)
        # polls for the vocabulary map while a child process computes it, so a caption shown before the map
        # was ready gets its trajectories without a click
        map_timer = gr.Timer(MAP_POLL_S, active=False)
        with gr.Tabs():
            with gr.Tab("Caption", id="caption"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=4, min_width=300):
                        first = next((p for p in m.examples if os.path.basename(p).startswith("shapes")),
                                     m.examples[0] if m.examples else None)
                        # upload_image: gradio hands the uploaded file over unopened, and the library's loader
                        # converts it (transparency on white, 16-bit scaling, EXIF rotation) or says what is wrong
                        image = upload_image(first, type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Image",
                                         height=260, format="png", elem_id="input-image")
                        if m.examples:
                            gr.Examples(examples=[[p] for p in m.examples], inputs=[image], examples_per_page=12,
                                        label="Examples: shapes scenes, and photographs unlike anything the models saw",
                                        elem_id="examples")
                        model = gr.Dropdown(list(m.caps), value=m.default, label="Model", elem_id="model-choice",
                                            interactive=len(m.caps) > 1)
                        model_line = gr.HTML(model_note(m.cap), elem_id="model-note")
                        with gr.Accordion("Sampling settings", open=True):
                            steps = gr.Slider(1, min(cfg.T, MAX_UI_STEPS), value=min(smp.steps, MAX_UI_STEPS),
                                              step=1, label="Denoising steps")
                            sampler = gr.Radio(list(SAMPLERS), value=smp.sampler, label="Sampler",
                                               info="DDIM: deterministic; DDPM: adds fresh noise every step; block: "
                                                    "one block of the caption denoised "
                                                    "per step given the ones before (block models only; steps are "
                                                    "the most a caption may take, it ends at its [SEP])")
                            guidance = gr.Slider(0, 10, value=smp.guidance, step=0.5, label="Guidance scale",
                                                 info="classifier-free guidance; 1 = none")
                            with gr.Row():
                                clamp = gr.Checkbox(smp.clamp, label="Clamp to tokens",
                                                    info="snap each predicted x0 to its nearest token embeddings")
                                seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                            spacing = gr.Dropdown(spacing_choices(smp.spacing), value=smp.spacing,
                                                  allow_custom_value=True, label="Timestep spacing",
                                                  info="which timesteps the steps visit: linspace ends at t = 0; "
                                                       "trailing^k packs them towards the noisy end")
                            commit = gr.Slider(0, 0.99, value=smp.commit, step=0.01, label="Commit threshold",
                                               elem_id="commit",
                                               info="block sampler: where both positions of a block are "
                                                    "rounded with probability below this, the second is decided "
                                                    "at the next step, given the first (at most twice a "
                                                    "caption); 0 reveals whole blocks")
                        run = gr.Button("Caption", variant="primary", elem_id="caption-button")
                    with gr.Column(scale=8, min_width=420):
                        # the step viewer: caption, status, step controls and both views, on one screen at 1366x768
                        gr.HTML("<div class='dc-head'><b>Diffusion caption</b> <span class='dc-note'>each token "
                                "coloured by its confidence: the rounding probability while it denoises, at the last "
                                "step the calibrated probability that the word is right</span></div>")
                        ood_note = gr.HTML("", elem_id="ood-note")
                        chips = gr.HTML("<div class='dc-note'>The caption appears here as it is denoised.</div>",
                                        elem_id="caption-chips")
                        status = gr.HTML("", elem_id="step-status")
                        slider = gr.Slider(1, 2, value=1, step=1, label="Step", interactive=False,
                                           elem_id="step-slider")
                        with gr.Row(elem_id="step-controls"):
                            first_b = gr.Button("|◀ first", size="sm", min_width=60)
                            prev_b = gr.Button("◀ back", size="sm", min_width=60)
                            play_b = gr.Button("▶ play", size="sm", min_width=60, elem_id="play-button")
                            pause_b = gr.Button("❚❚ pause", size="sm", min_width=60, elem_id="pause-button")
                            next_b = gr.Button("forward ▶", size="sm", min_width=60)
                            last_b = gr.Button("last ▶|", size="sm", min_width=60)
                        with gr.Row(equal_height=False, elem_id="step-views"):
                            with gr.Column(scale=1, min_width=300):
                                heat = gr.HTML("", elem_id="heatmap")
                            with gr.Column(scale=1, min_width=300):
                                traj = gr.HTML("", elem_id="trajectories")
                                map_note = gr.Markdown("", elem_classes=["dc-note"])
                        with gr.Accordion("The map: which trajectories, which positions, how to read it", open=False,
                                          elem_id="map-settings"):
                            with gr.Row(equal_height=False):
                                kind = gr.Radio(list(TRAJECTORY_KINDS), value=TRAJECTORY_KINDS[0], label="Trajectories of")
                                map_positions = gr.CheckboxGroup([], value=[], label="Positions on the map",
                                                                 info="whose paths to draw (position and final token; "
                                                                      "at first the caption's words)",
                                                                 elem_id="map-positions")
                            gr.Markdown(TRAJECTORY_HELP, elem_classes=["dc-note"])
                        with gr.Accordion("Compare: the same image with other settings, under the same step controller",
                                          open=False, elem_id="compare-settings"):
                            with gr.Row(equal_height=False):
                                b_sampler = gr.Radio(list(SAMPLERS), value=smp.sampler, label="Run B's sampler")
                                b_steps = gr.Slider(1, min(cfg.T, MAX_UI_STEPS), value=min(smp.steps, MAX_UI_STEPS),
                                                    step=1, label="Run B's steps", elem_id="b-steps")
                                b_guidance = gr.Slider(0, 10, value=smp.guidance, step=0.5, label="Run B's guidance")
                                b_seed = gr.Number(1, precision=0, minimum=0, label="Run B's seed")
                            compare_b = gr.Button("Caption the image as run B too", size="sm", elem_id="compare-button")
                        compare_html = gr.HTML("", elem_id="compare")
                        gr.Markdown("#### Autoregressive baseline (same image; each token coloured by its probability)")
                        base_html = gr.HTML(baseline_html(m, None), elem_id="baseline")
                        timing = gr.Markdown("", elem_id="timing")
                with gr.Accordion("The caption at every step", open=False):
                    table = gr.Dataframe(headers=["step", "t", "caption", "mean confidence", "lowest confidence"],
                                         datatype=["number", "number", "str", "number", "number"], value=[],
                                         interactive=False, wrap=True, elem_id="step-table", max_height=420)

            with gr.Tab("Error analysis", id="errors"):
                gr.Markdown("Caption one image and its variants with both models: hue rotations, grayscale, another "
                            "background, object colours swapped. Words that change are highlighted. For a shapes "
                            "scene (an example, or one you compose below) the background and colour variants are "
                            "re-rendered exactly and every caption is checked against the ground truth, so a colour "
                            "bias (captions that follow the background instead of the objects) shows up directly.")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3, min_width=260):
                        a_image = upload_image(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Image", height=220,
                                           format="png", elem_id="analysis-image")
                        copy_b = gr.Button("Use the Caption tab's image", size="sm")
                        variants_b = gr.Button("Caption the variants", variant="primary", elem_id="variants-button")
                    with gr.Column(scale=9, min_width=600):
                        with gr.Accordion("Scene composer: build a shapes scene, rendered by the world's own generator",
                                          open=True):
                            obj_inputs = []
                            defaults = [("circle", "blue", "large", 40, 64), ("square", "yellow", "small", 92, 64),
                                        ("star", "green", "small", 64, 100)]
                            with gr.Row(equal_height=False):
                                with gr.Column(min_width=170):
                                    background = gr.Dropdown(list(BACKGROUNDS), value="pink", label="Background")
                                    compose_b = gr.Button("Render and caption this scene", variant="primary",
                                                          elem_id="compose-button")
                                    compose_note = gr.Markdown("", elem_classes=["dc-note"])
                                for i, (sh, co, sz, x, y) in enumerate(defaults):
                                    with gr.Column(min_width=170, variant="panel"):
                                        on = gr.Checkbox(i < 2, label=f"object {i + 1}")
                                        o_shape = gr.Dropdown(list(SHAPES), value=sh, label="shape")
                                        o_color = gr.Dropdown(list(COLORS), value=co, label="colour")
                                        o_size = gr.Radio(list(SIZES), value=sz, label="size")
                                        o_x = gr.Slider(0, IMAGE_SIZE, value=x, step=1, label="x (left → right)")
                                        o_y = gr.Slider(0, IMAGE_SIZE, value=y, step=1, label="y (top → bottom)")
                                    obj_inputs += [on, o_shape, o_color, o_size, o_x, o_y]
                variants_html = gr.HTML("<div class='dc-note'>The variants and their captions appear here.</div>",
                                        elem_id="variants-table")

            with gr.Tab("About", id="about"):
                about = gr.Markdown(about_markdown(m, url), elem_id="about")

        # ------------------------------------------------------------------ events
        ui = UI(chips=chips, ood_note=ood_note, status=status, slider=slider, heat=heat, traj=traj, map_note=map_note,
                map_positions=map_positions, table=table,
                base_html=base_html, timing=timing, view=view, map_timer=map_timer, steps=steps,
                sampler=sampler, guidance=guidance, clamp=clamp, spacing=spacing, commit=commit, model_line=model_line,
                a_image=a_image, scene_state=scene_state, compose_note=compose_note, variants_html=variants_html,
                compare_html=compare_html)
        h = on_gpu(Handlers(m, ui))
        settings = [steps, sampler, guidance, clamp, seed]
        stream_out = ui.stream_outputs
        model_events = dict(concurrency_id="model", concurrency_limit=m.concurrency)
        run.click(h.caption_stream, [image] + settings + [kind, spacing, model, commit], stream_out,
                  api_visibility="undocumented", api_name="caption_ui", **model_events)
        image.change(h.auto_caption, [image] + settings + [kind, spacing, model, commit], stream_out,
                     api_visibility="undocumented", trigger_mode="always_last", **model_events)
        # another model: its own defaults in the settings, then the same image captioned by it
        model.input(h.choose_model, model, ui.model_outputs,
                    api_visibility="undocumented").then(
            h.auto_caption, [image] + settings + [kind, spacing, model, commit], stream_out, api_visibility="undocumented",
            **model_events)
        # the step shown, the map's kind and its positions change in the page alone (STEP_VIEWER_JS): the server
        # sent every step's views with the caption
        viewer = "window.dcViewer"
        slider.input(None, slider, None, js=f"(k) => {{ {viewer}.show(k); }}")
        for b, delta in ((first_b, "'first'"), (prev_b, "-1"), (next_b, "1"), (last_b, "'last'")):
            b.click(None, None, None, js=f"() => {{ {viewer}.by({delta}); }}")
        play_b.click(None, None, None, js=f"() => {{ {viewer}.play({PLAY_INTERVAL_MS}); }}")
        pause_b.click(None, None, None, js=f"() => {{ {viewer}.pause(); }}")
        kind.input(None, kind, None, js=f"(k) => {{ {viewer}.kind(k); }}")
        map_positions.input(None, map_positions, None, js=f"(p) => {{ {viewer}.positions(p); }}")
        compare_b.click(h.compare_event,
                        [image] + settings + [spacing, model, b_steps, b_sampler, b_guidance, b_seed, view, commit],
                        {compare_html}, api_visibility="undocumented", **model_events)
        # a caption shown before its vocabulary map was ready: the map drawn when it is, at the step the page shows
        map_timer.tick(h.map_ready, [view, slider, kind, map_positions], ui.map_outputs,
                       js=f"(v, k, kind, p) => [v, {viewer}.current(), kind, p]", trigger_mode="always_last",
                       api_visibility="undocumented")

        # the API takes the image as a plain file, so the library's loader (not the Image component's
        # preprocessing) reads it and a broken file gets the loader's message
        # and its own settings inputs, so it accepts what the library accepts (steps up to T) and not
        # only what the sliders offer
        api_image = gr.File(visible=False, type="filepath", label="image")
        api_settings = [gr.Number(smp.steps, precision=0, visible=False, label="steps"),
                        gr.Textbox(smp.sampler, visible=False, label="sampler"),
                        gr.Number(smp.guidance, visible=False, label="guidance"),
                        gr.Checkbox(smp.clamp, visible=False, label="clamp"),
                        gr.Number(0, precision=0, visible=False, label="seed"),
                        gr.Textbox(smp.spacing, visible=False, label="spacing"),
                        gr.Textbox(m.default, visible=False, label="model"),
                        gr.Number(smp.commit, visible=False, label="commit")]
        api_out = gr.JSON(visible=False)
        api_btn = gr.Button(visible=False)
        api_btn.click(h.api_caption, [api_image] + api_settings, api_out, api_name="caption",
                      api_description="Caption an image; streams one JSON chunk per denoising step "
                                      "({done: false, step: {index, t, text, tokens, confidence}}), then the whole "
                                      "trace ({done: true, text, settings, seconds, steps}).", **model_events)

        copy_b.click(lambda x: x, image, a_image, api_visibility="undocumented")
        variants_b.click(h.variants_event, [a_image, scene_state] + settings + [spacing, model, commit], {variants_html},
                         api_visibility="undocumented", **model_events)
        compose_b.click(h.compose, [background] + obj_inputs, ui.compose_outputs,
                        api_visibility="undocumented").then(
            h.variants_event, [a_image, scene_state] + settings + [spacing, model, commit], {variants_html}, api_visibility="undocumented",
            **model_events)
        def about_here(request: gr.Request):  # gradio hands the page's request to a parameter typed gr.Request
            return about_markdown(m, served_url(request) or url)

        demo.load(about_here, None, about, api_visibility="undocumented")
        # the page opens with the first example already denoised
        demo.load(h.auto_caption, [image] + settings + [kind, spacing, model, commit], stream_out, api_visibility="undocumented",
                  **model_events)
    return demo


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    m = load_models(args)
    m.concurrency = max(1, args.concurrency)
    host = args.host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    port = args.port or int(os.environ.get("GRADIO_SERVER_PORT") or 7860)
    demo = build(m, f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/")
    demo.queue(default_concurrency_limit=m.concurrency, max_size=64)
    print(f"diffusion-caption app: {', '.join(m.caps)} loaded in {m.load_seconds:.1f} s (default {m.default}), page "
          f"built in {time.perf_counter() - t0 - m.load_seconds:.1f} s; {m.vocab_job.status}; {m.baseline_note}", flush=True)
    try:
        demo.launch(server_name=host, server_port=port, css=CSS + STEP_VIEWER_CSS, head=STEP_VIEWER_JS,
                    footer_links=["api", "gradio"], show_error=True,
                    allowed_paths=[EXAMPLES_DIR, os.path.abspath(args.examples)])
    except OSError as e:
        print(f"error: cannot serve on {host}:{port}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
