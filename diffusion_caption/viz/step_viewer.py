"""The step viewer drawn in the browser: every step of a trace sent once, the step shown chosen on the page.

A caption's views (its chips, its status line, the confidence heatmap and the trajectory map) are HTML
and SVG fragments that hold *every* step of the trace. Each element that belongs to one step carries
``data-s`` (1-based); a fragment's root is a ``.dc-stepped`` element with ``data-n`` (the number of
steps), ``data-cur`` (the step shown) and ``data-run`` (which trace it is). ``STEP_VIEWER_JS`` shows a
step by setting ``cur`` on the elements of that step and ``future`` on those after it, in every fragment
at once, so scrubbing, the step buttons and playback cost no round trip to the server and no redraw.
The fragments are also right without the script: the server marks the step it renders as current.
Fragments inside a ``.dc-follows`` element (a second run compared with the first) show the step at the same
share of their run as the main run's step (``stepped_frames(main=True)`` marks the main run).

The heatmap is a table (positions x steps, each cell coloured on the shared confidence scale, a token
written where it changes); the map is an SVG over a PNG of the vocabulary's dots, with one group per
trajectory kind and per caption position, so the kind and the positions drawn are switched on the page too.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex
from PIL import Image, ImageDraw

from ..trace import DenoisingStep
from .common import PAD_TOKEN, confidence_color, is_special, shown_positions

STEP_CMAP = "viridis"  # trajectories: dark (noisy, early) to bright (clean, late)
MAP_W, MAP_H = 440, 340  # the map's drawing box, in CSS pixels (SVG user units)
KIND_CLASS = {"predicted x0": "x0", "noisy x_t": "xt"}


def _esc(s) -> str:
    return html.escape(str(s), quote=True)


def _check(steps: Sequence[DenoisingStep], current: int | None) -> int:
    """``current`` as a 0-based index into ``steps`` (None: the last)."""
    if not steps:
        raise ValueError("the trace has no steps to show")
    current = len(steps) - 1 if current is None else int(current)
    if not 0 <= current < len(steps):
        raise ValueError(f"current step {current} is outside the trace's 0..{len(steps) - 1}")
    return current


def _state(s: int, current: int) -> str:
    """The class of an element of step ``s`` (1-based) when step ``current`` (1-based) is shown."""
    return "cur" if s == current else "future" if s > current else ""


def _root(kind: str, n: int, current: int, run: str, body: str, extra: str = "", main: bool = False) -> str:
    cls = f"dc-stepped dc-{kind}" + (" dc-main" if main else "")
    return f"<div class='{cls}' data-n='{n}' data-cur='{current}' data-run='{_esc(run)}'{extra}>{body}</div>"


def stepped_frames(frames: Sequence[str], current: int | None = None, run: str = "", kind: str = "frames",
                   main: bool = False) -> str:
    """One HTML frame per step (already-escaped HTML each), only the current one (0-based; None: the last) shown.
    ``main``: these are the page's leading run (the step controller counts its steps; other runs on the page,
    a second one compared with it, follow it in proportion)."""
    if not frames:
        raise ValueError("no frames to show")
    cur = _check(frames, current) + 1
    body = "".join(f"<div class='dc-frame {_state(s, cur)}' data-s='{s}'>{f}</div>" for s, f in enumerate(frames, 1))
    return _root(kind, len(frames), cur, run, body, main=main)


def heatmap_html(steps: Sequence[DenoisingStep], current: int | None = None, run: str = "",
                 positions: Sequence[int] | None = None, total: int | None = None) -> str:
    """Rounding confidence of every shown position (rows) at every step (columns), the current column
    outlined. A cell shows its token where it differs from the step before, the current column every
    token; every cell's title gives position, step, timestep, token and confidence. ``total``: the number
    of steps the run will have (a trace still streaming has fewer); the columns still to come are blank."""
    cur = _check(steps, current) + 1
    final = steps[-1].tokens
    positions = list(shown_positions(final) if positions is None else positions)
    S, total = len(steps), max(total or 0, len(steps))
    head = "".join(f"<th data-s='{s}' class='{_state(s, cur)}' title='step {s}, timestep t = {steps[s - 1].t}'>"
                   f"{s}<br><span class='dc-t'>t={steps[s - 1].t}</span></th>" for s in range(1, S + 1))
    head += "".join(f"<th class='dc-todo'>{s}</th>" for s in range(S + 1, total + 1))
    rows = []
    for p in positions:
        cells = []
        for s in range(1, S + 1):
            st = steps[s - 1]
            tok, c = st.tokens[p], float(st.confidence[p])
            same = s > 1 and steps[s - 2].tokens[p] == tok
            text = "·" if tok == PAD_TOKEN else (tok if len(tok) <= 8 else tok[:7] + "…")
            cls = " ".join(x for x in (_state(s, cur), "same" if same else "") if x)
            dark = c < 0.15 or c > 0.88
            cells.append(f"<td data-s='{s}' class='{cls}' style='background:{confidence_color(c, lighten=0.0)};"
                         f"color:{'#fff' if dark else '#111'}' title='position {p}, step {s} (t = {st.t}): "
                         f"{_esc(tok)}, confidence {c:.3f}'><span>{_esc(text)}</span></td>")
        cells += ["<td class='dc-todo'></td>"] * (total - S)
        rows.append(f"<tr><th class='dc-pos'>{p}&nbsp;&nbsp;{_esc(final[p])}</th>{''.join(cells)}</tr>")
    legend = ("<div class='dc-scale'><span>rounding confidence</span><span class='dc-bar' style='background:"
              f"linear-gradient(90deg,{confidence_color(0, 0)},{confidence_color(0.5, 0)},{confidence_color(1, 0)})'>"
              "</span><span>0</span><span>0.5</span><span>1</span></div>")
    table = (f"<table class='dc-heat'><thead><tr><th class='dc-pos'>position, final token</th>{head}</tr>"
             f"</thead><tbody>{''.join(rows)}</tbody></table>")
    title = ("<div class='dc-title'>Rounding confidence of each position at each step (the step shown outlined; "
             "a token written where it changes)</div>")
    return _root("heatmap", S, cur, run, title + f"<div class='dc-scroll'>{table}</div>" + legend)


def _label_tokens(tokens: Sequence[str], wanted: set[str], max_all: int) -> list[int]:
    """Indices of vocabulary tokens to label: every whole word of a small vocabulary, else only ``wanted``."""
    if len(tokens) <= max_all:
        return [i for i, t in enumerate(tokens)
                if t in wanted or (not is_special(t) and not t.startswith("##") and len(t) > 1)]
    return [i for i, t in enumerate(tokens) if t in wanted]


class MapFrame:
    """The vocabulary map's placement in the drawing box, and the PNG of its dots (``background``): both fixed
    by the map alone, so a page reuses them for every trace and every streamed step."""

    def __init__(self, vocab_coords: np.ndarray):
        coords = np.asarray(vocab_coords, dtype=np.float32)
        lo, hi = coords.min(0), coords.max(0)  # a trace's points lie among their tokens (VocabMap.place)
        span = np.maximum(hi - lo, 1e-6)
        self.lo, self.hi = lo - 0.05 * span, hi + 0.05 * span
        self.coords = coords

    def xy(self, pts: np.ndarray) -> np.ndarray:
        """Map coordinates [..., 2] to drawing-box pixels (y pointing down)."""
        pts = np.asarray(pts, dtype=np.float32)
        u = (pts - self.lo) / (self.hi - self.lo)
        return np.stack([u[..., 0] * MAP_W, (1.0 - u[..., 1]) * MAP_H], axis=-1)

    def background(self) -> str:
        """The vocabulary's dots as a PNG data URI (drawn at twice the box's size, for sharp screens)."""
        scale = 2
        img = Image.new("RGBA", (MAP_W * scale, MAP_H * scale), (255, 255, 255, 0))
        d = ImageDraw.Draw(img)
        r = 3 if len(self.coords) < 5000 else 2
        for x, y in self.xy(self.coords) * scale:
            d.ellipse([x - r, y - r, x + r, y + r], fill=(201, 201, 201, 255))
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _step_colors(S: int) -> list[str]:
    cmap = colormaps[STEP_CMAP]
    return [to_hex(cmap(i / max(S - 1, 1))) for i in range(S)]


def trajectory_svg(vocab_coords: np.ndarray, vocab_tokens: Sequence[str], points: Mapping[str, np.ndarray],
                   steps: Sequence[DenoisingStep], current: int | None = None, run: str = "",
                   kind: str = "predicted x0", positions: Sequence[int] | None = None, method: str = "UMAP",
                   background: str | None = None, frame: MapFrame | None = None, label_all_below: int = 400) -> str:
    """Each caption position's path over the vocabulary map, one group per kind of ``points`` (name ->
    [S, L, 2], already placed on the map) and per position; ``kind`` and ``positions`` (None: the caption's
    words) are the ones shown at first. An x marks where a path starts, dots go dark to bright with the
    steps, the current step's dot is ringed and labelled with its token, later steps are faint.
    ``background`` and ``frame`` (from ``MapFrame``) may be passed in to reuse them across calls."""
    cur = _check(steps, current) + 1
    S = len(steps)
    coords = np.asarray(vocab_coords, dtype=np.float32)
    if coords.shape != (len(vocab_tokens), 2):
        raise ValueError(f"vocab_coords of shape {coords.shape} do not match {len(vocab_tokens)} tokens")
    pts = {}
    for name, p in points.items():
        if name not in KIND_CLASS:
            raise ValueError(f"unknown trajectory kind {name!r}; expected one of {list(KIND_CLASS)}")
        p = np.asarray(p, dtype=np.float32)
        if p.ndim != 3 or p.shape[0] != S or p.shape[2] != 2:
            raise ValueError(f"points of {name!r} must have shape [steps={S}, positions, 2], got {tuple(p.shape)}")
        pts[name] = p
    if kind not in pts:
        raise ValueError(f"kind {kind!r} is not among the points given ({list(pts)})")
    final = steps[-1].tokens
    drawable = [p for p in shown_positions(final) if not is_special(final[p])] or shown_positions(final)
    shown = set(drawable if positions is None else positions)
    every = sorted(set(drawable) | shown)
    frame = frame or MapFrame(coords)
    background = background or frame.background()
    colors = _step_colors(S)

    parts = [f"<image href='{background}' x='0' y='0' width='{MAP_W}' height='{MAP_H}'/>"]
    trace_tokens = {steps[s].tokens[p] for s in range(S) for p in every}
    for i in _label_tokens(vocab_tokens, trace_tokens, label_all_below):
        x, y = frame.xy(coords[i])
        cls = "dc-vtok in" if vocab_tokens[i] in trace_tokens else "dc-vtok"
        parts.append(f"<text class='{cls}' x='{x + 3:.1f}' y='{y - 3:.1f}'>{_esc(vocab_tokens[i])}</text>")
    many = S > 40
    for name, p in pts.items():
        xy = frame.xy(p)
        groups = []
        for pos in every:
            path = xy[:, pos]
            g = []
            for s in range(2, S + 1):
                (x0, y0), (x1, y1) = path[s - 2], path[s - 1]
                g.append(f"<line data-s='{s}' class='{_state(s, cur)}' x1='{x0:.1f}' y1='{y0:.1f}' x2='{x1:.1f}' "
                         f"y2='{y1:.1f}' stroke='{colors[s - 1]}'/>")
            x, y = path[0]
            g.append(f"<path class='dc-start' d='M{x - 4:.1f},{y - 4:.1f}l8,8m0,-8l-8,8' stroke='{colors[0]}'/>")
            for s in range(1, S + 1):
                x, y = path[s - 1]
                g.append(f"<circle data-s='{s}' class='dc-dot {_state(s, cur)}' cx='{x:.1f}' cy='{y:.1f}' "
                         f"r='{1.8 if many else 3.2}' fill='{colors[s - 1]}'/>")
            for s in range(1, S + 1):  # the ringed marker and the token label of each step: only the current shown
                x, y = path[s - 1]
                tok = _esc(steps[s - 1].tokens[pos])
                g.append(f"<g data-s='{s}' class='dc-mark {_state(s, cur)}'><circle cx='{x:.1f}' cy='{y:.1f}' r='6.5' "
                         f"fill='{colors[s - 1]}'/><text x='{x + 8:.1f}' y='{y + 14:.1f}'>{tok}</text></g>")
            hidden = "" if pos in shown else " dc-hidden"
            groups.append(f"<g class='dc-pos{hidden}' data-p='{pos}'><title>position {pos}: "
                          f"{_esc(final[pos])}</title>{''.join(g)}</g>")
        parts.append(f"<g class='dc-kind dc-kind-{KIND_CLASS[name]}'>{''.join(groups)}</g>")
    svg = (f"<svg class='dc-map-svg' viewBox='0 0 {MAP_W} {MAP_H}' style='max-width:{MAP_W}px' "
           f"role='img' aria-label='trajectories of the caption positions on the vocabulary map'>{''.join(parts)}</svg>")
    titles = "".join(f"<span data-s='{s}' class='dc-frame {_state(s, cur)}'>step {s} of {S}</span>"
                     for s in range(1, S + 1))
    names = "".join(f"<span class='dc-kind dc-kind-{KIND_CLASS[n]}'>{_esc(n)}</span>" for n in pts)
    title = (f"<div class='dc-title'>{names} of the caption positions on the vocabulary map ({_esc(method)}), "
             f"{titles}</div>")
    scale = ("<div class='dc-scale'><span>step</span><span class='dc-bar' style='background:linear-gradient(90deg,"
             + ",".join(colors if S > 1 else colors * 2) + f")'></span><span>1</span><span>{S}</span>"
             "<span>(x: the first, ringed: the one shown)</span></div>")
    extra = f" data-kind='{KIND_CLASS[kind]}'"
    return _root("map", S, cur, run, title + f"<div class='dc-scroll'>{svg}</div>" + scale, extra)


# The page's side: show a step in every fragment, step, play and pause, and switch the map's kind and positions.
# Playback advances the step slider itself (its range input), so the slider, the views and the page agree.
STEP_VIEWER_JS = """
<script>
(() => {
  const roots = () => document.querySelectorAll('.dc-stepped');
  const first = () => document.querySelector('.dc-stepped.dc-main') || document.querySelector('.dc-stepped');
  // a run of another length (a second run compared with the main one) shows the step at the same share of its run
  const scaled = (k, n, N) => n === N ? k : Math.max(1, Math.round(k * n / N));
  const dc = window.dcViewer = {
    timer: null,
    current() { const r = first(); return r ? parseInt(r.dataset.cur) : 1; },
    count() { const r = first(); return r ? parseInt(r.dataset.n) : 1; },
    show(k) {
      k = parseInt(k);
      if (!Number.isFinite(k)) return;
      const N = dc.count();
      roots().forEach(root => {
        const n = parseInt(root.dataset.n);
        const c = Math.max(1, Math.min(root.closest('.dc-follows') ? scaled(k, n, N) : k, n));
        if (root.dataset.cur === String(c)) return;
        root.dataset.cur = c;
        root.querySelectorAll('[data-s]').forEach(el => {
          const s = parseInt(el.dataset.s);
          el.classList.toggle('cur', s === c);
          el.classList.toggle('future', s > c);
        });
        const box = root.querySelector('.dc-scroll'), th = root.querySelector('th.cur');
        if (box && th) {  // a heatmap wider than its box: keep the column shown in sight
          const left = th.offsetLeft - box.clientWidth / 2;
          if (th.offsetLeft < box.scrollLeft + 140 || th.offsetLeft + th.offsetWidth > box.scrollLeft + box.clientWidth)
            box.scrollLeft = Math.max(0, left);
        }
      });
    },
    slider(k) {  // move the step slider to k: gradio's own input event then shows the step (and so does this)
      const r = document.querySelector('#step-slider input[type=range]');
      if (r) { r.value = k; r.dispatchEvent(new Event('input', {bubbles: true})); }
      dc.show(k);
    },
    by(delta) {
      dc.pause();
      const n = dc.count();
      const k = delta === 'first' ? 1 : delta === 'last' ? n : Math.max(1, Math.min(n, dc.current() + delta));
      dc.slider(k);
    },
    play(ms) {
      dc.pause();
      const r = first();
      if (!r || dc.count() < 2) return;
      const run = r.dataset.run;
      if (dc.current() >= dc.count()) dc.slider(1);
      dc.timer = setInterval(() => {
        const now = first();
        if (!now || now.dataset.run !== run) return dc.pause();  // another caption came: playback ends
        const k = dc.current() + 1;
        if (k > dc.count()) return dc.pause();
        dc.slider(k);
        if (k >= dc.count()) dc.pause();
      }, ms);
    },
    pause() { if (dc.timer !== null) { clearInterval(dc.timer); dc.timer = null; } },
    playing() { return dc.timer !== null; },
    kind(name) {
      const cls = {'predicted x0': 'x0', 'noisy x_t': 'xt'}[name];
      if (cls) document.querySelectorAll('.dc-map').forEach(m => { m.dataset.kind = cls; });
    },
    positions(picked) {
      const on = new Set((picked || []).map(String));
      document.querySelectorAll('.dc-map .dc-pos').forEach(g => g.classList.toggle('dc-hidden', !on.has(g.dataset.p)));
    },
  };
})();
</script>
"""

STEP_VIEWER_CSS = """
.dc-stepped .dc-frame:not(.cur) {display: none;}
.dc-stepped .dc-title {font-size: 0.85rem; font-weight: 600; margin: 2px 0 4px;}
.dc-stepped .dc-scroll {overflow-x: auto; max-width: 100%;}
.dc-heat {border-collapse: collapse; font: 11px/1.2 ui-monospace, Menlo, Consolas, monospace; margin: 0;}
.dc-heat th, .dc-heat td {border: 1px solid rgba(0,0,0,0.08); padding: 1px 3px; text-align: center;
  min-width: 2.9em; white-space: nowrap;}
.dc-heat th {background: #fafafa; font-weight: 500;}
.dc-heat th.dc-pos {text-align: left; position: sticky; left: 0; background: #fafafa; z-index: 1;}
.dc-heat .dc-t {color: #777; font-size: 10px;}
.dc-heat td.same:not(.cur) span {visibility: hidden;}
.dc-heat td.future {opacity: 0.45;}
.dc-heat td.cur, .dc-heat th.cur {outline: 2px solid #111; outline-offset: -2px; font-weight: 700;}
.dc-heat td.dc-todo {background: repeating-linear-gradient(45deg, #f4f4f4, #f4f4f4 4px, #fff 4px, #fff 8px);}
.dc-scale {display: flex; align-items: center; gap: 6px; font-size: 11px; color: #555; margin-top: 4px;}
.dc-scale .dc-bar {display: inline-block; width: 140px; height: 10px; border-radius: 2px;}
.dc-map-svg {display: block; background: #fff; width: 100%; height: auto; min-width: 360px;}
.dc-map-svg line {stroke-width: 1.8; stroke-linecap: round; opacity: 0.9;}
.dc-map-svg line.future, .dc-map-svg .dc-dot.future {opacity: 0.1;}
.dc-map-svg .dc-start {stroke-width: 1.6; fill: none;}
.dc-map-svg .dc-mark {display: none;}
.dc-map-svg .dc-mark.cur {display: inline;}
.dc-map-svg .dc-mark circle {stroke: #111; stroke-width: 1.6;}
.dc-map-svg .dc-mark text {font: 700 12px sans-serif; paint-order: stroke; stroke: #fff; stroke-width: 3px;}
.dc-map-svg .dc-vtok {font: 9px sans-serif; fill: #a0a0a0;}
.dc-map-svg .dc-vtok.in {font-size: 10px; fill: #444;}
.dc-map-svg .dc-hidden {display: none;}
.dc-map[data-kind='x0'] .dc-kind:not(.dc-kind-x0), .dc-map[data-kind='xt'] .dc-kind:not(.dc-kind-xt) {display: none;}
"""
