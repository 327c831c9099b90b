"""Figures of a denoising trace: the tokens x steps confidence heatmap, and trajectories on the vocabulary map.

Both read a trace's steps (``trace.DenoisingStep``) and nothing else, and return a
``matplotlib.figure.Figure`` built without pyplot (thread-safe, no display needed), so a web app, a
notebook and a test can all call them. The colours of the confidence scale are the same everywhere
(``CONFIDENCE_CMAP``), so a token chip in the app and its heatmap cell agree.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize, to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..trace import DenoisingStep

CONFIDENCE_CMAP = "RdYlGn"  # red: unsure, yellow: half-sure, green: sure
STEP_CMAP = "viridis"  # trajectories: dark (noisy, early) to bright (clean, late)
PAD_TOKEN = "[PAD]"


def confidence_color(c: float, lighten: float = 0.35) -> str:
    """Hex colour of a confidence in [0, 1] on the shared scale, mixed with white for text backgrounds."""
    r, g, b, _ = colormaps[CONFIDENCE_CMAP](float(np.clip(c, 0.0, 1.0)))
    return to_hex((r + (1 - r) * lighten, g + (1 - g) * lighten, b + (1 - b) * lighten))


def is_special(token: str) -> bool:
    return token.startswith("[") and token.endswith("]")


def shown_positions(tokens: Sequence[str], pad_token: str = PAD_TOKEN) -> list[int]:
    """Caption positions worth showing: all up to the last one that is not padding in ``tokens``."""
    last = max((i for i, t in enumerate(tokens) if t != pad_token), default=len(tokens) - 1)
    return list(range(last + 1))


def _check(steps: Sequence[DenoisingStep], current: int | None) -> int:
    if not steps:
        raise ValueError("the trace has no steps to plot")
    current = len(steps) - 1 if current is None else int(current)
    if not 0 <= current < len(steps):
        raise ValueError(f"current step {current} is outside the trace's 0..{len(steps) - 1}")
    return current


def _step_ticks(n: int, max_ticks: int = 12) -> list[int]:
    every = max(1, int(np.ceil(n / max_ticks)))
    ticks = list(range(0, n, every))
    if ticks[-1] != n - 1:
        ticks.append(n - 1)
    return ticks


def confidence_heatmap(steps: Sequence[DenoisingStep], current: int | None = None,
                       positions: Sequence[int] | None = None, annotate: bool | None = None) -> Figure:
    """Rounding confidence of every shown position (rows) at every step (columns), current step boxed.

    A cell shows the token that position rounds to where it differs from the step before (and in the
    current step's column), so each row reads as that position's history of changes; rows are labelled
    with the final tokens.
    """
    current = _check(steps, current)
    final = steps[-1].tokens
    positions = list(shown_positions(final) if positions is None else positions)
    S, P = len(steps), len(positions)
    conf = np.array([[steps[s].confidence[p] for s in range(S)] for p in positions], dtype=np.float32)
    annotate = S <= 40 and P <= 40 if annotate is None else annotate
    width = min(16.0, max(6.5, 1.6 + (0.62 if annotate else 0.2) * S))
    fig = Figure(figsize=(width, max(2.8, 1.2 + 0.3 * P)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(conf, cmap=CONFIDENCE_CMAP, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    if annotate:  # a token where it changes from the step before, and every token of the current step
        for j, p in enumerate(positions):
            for s in range(S):
                tok = steps[s].tokens[p]
                if s != current and s > 0 and steps[s - 1].tokens[p] == tok:
                    continue
                text = "·" if tok == PAD_TOKEN else (tok if len(tok) <= 7 else tok[:6] + "…")
                c = conf[j, s]
                ax.text(s, j, text, ha="center", va="center", fontsize=7 if s == current else 6.5,
                        color="white" if c < 0.15 or c > 0.88 else "black",
                        fontweight="bold" if s == current else "normal")
    ax.set_yticks(range(P), [f"{p}  {final[p]}" for p in positions], fontsize=8)
    ticks = _step_ticks(S)
    ax.set_xticks(ticks, [f"{s + 1}\nt={steps[s].t}" for s in ticks], fontsize=7)
    ax.set_xlabel("denoising step (and its timestep t)", fontsize=8)
    ax.set_ylabel("position  final token", fontsize=8)
    ax.add_patch(Rectangle((current - 0.5, -0.5), 1, P, fill=False, edgecolor="black", linewidth=2.2))
    ax.set_title(f"Rounding confidence per position and step (step {current + 1} of {S} boxed)", fontsize=10)
    cb = fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    cb.set_label("confidence", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return fig


def _label_tokens(tokens: Sequence[str], wanted: set[str], max_all: int) -> list[int]:
    """Indices of vocabulary tokens to label: every whole word of a small vocabulary, else only ``wanted``."""
    if len(tokens) <= max_all:
        return [i for i, t in enumerate(tokens)
                if t in wanted or (not is_special(t) and not t.startswith("##") and len(t) > 1)]
    return [i for i, t in enumerate(tokens) if t in wanted]


def trajectory_map(vocab_coords: np.ndarray, vocab_tokens: Sequence[str], points: np.ndarray,
                   steps: Sequence[DenoisingStep], current: int | None = None,
                   positions: Sequence[int] | None = None, what: str = "predicted x0",
                   method: str = "UMAP", label_all_below: int = 400) -> Figure:
    """Each caption position's path over the vocabulary map, coloured by step, the current step marked.

    ``vocab_coords`` [V, 2] and ``vocab_tokens`` are the map; ``points`` [S, L, 2] are the trace's
    vectors already placed on it (``VocabMap.place``). Steps after ``current`` are drawn faintly, as
    the future of the scrubbed-to step. Positions whose final token is special ([CLS], [SEP], [PAD])
    are left out so the words stay readable.
    """
    current = _check(steps, current)
    pts = np.asarray(points, dtype=np.float32)
    S = len(steps)
    if pts.ndim != 3 or pts.shape[0] != S or pts.shape[2] != 2:
        raise ValueError(f"points must have shape [steps={S}, positions, 2], got {tuple(pts.shape)}")
    coords = np.asarray(vocab_coords, dtype=np.float32)
    if coords.shape != (len(vocab_tokens), 2):
        raise ValueError(f"vocab_coords of shape {coords.shape} do not match {len(vocab_tokens)} tokens")
    final = steps[-1].tokens
    if positions is None:
        positions = [p for p in shown_positions(final) if not is_special(final[p])]
    positions = list(positions)

    fig = Figure(figsize=(8.0, 6.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(coords[:, 0], coords[:, 1], s=7, color="#c9c9c9", zorder=1, linewidths=0)
    trace_tokens = {steps[s].tokens[p] for s in range(S) for p in positions}
    current_tokens = {steps[current].tokens[p] for p in positions}  # these get a bold label at the marker
    for i in _label_tokens(vocab_tokens, trace_tokens, label_all_below):
        if vocab_tokens[i] in current_tokens:
            continue
        in_trace = vocab_tokens[i] in trace_tokens
        ax.annotate(vocab_tokens[i], coords[i], fontsize=7.5 if in_trace else 6.5, xytext=(2, 2),
                    textcoords="offset points", color="#444" if in_trace else "#9a9a9a", zorder=2)

    cmap, norm = colormaps[STEP_CMAP], Normalize(0, max(S - 1, 1))
    many = S > 40  # long traces (DDPM with hundreds of steps) get thinner, lighter paths
    line_w, line_a, dot_s = (0.8, 0.45, 4) if many else (1.6, 0.9, 14)
    for p in positions:
        path = pts[:, p]
        seg = np.stack([path[:-1], path[1:]], axis=1)  # [S-1, 2, 2]
        if len(seg):
            colors = cmap(norm(np.arange(1, S)))
            colors[:, 3] = np.where(np.arange(1, S) <= current, line_a, 0.08)
            ax.add_collection(LineCollection(seg, colors=colors, linewidths=line_w, zorder=3))
        face = cmap(norm(np.arange(S)))
        face[:, 3] = np.where(np.arange(S) <= current, 0.95, 0.1)
        ax.scatter(path[:, 0], path[:, 1], s=dot_s, c=face, zorder=4, linewidths=0)
        ax.scatter(path[0, 0], path[0, 1], s=40, marker="x", color=cmap(norm(0)), zorder=5, linewidths=1.4)
        ax.scatter(path[current, 0], path[current, 1], s=95, color=cmap(norm(current)), edgecolors="black",
                   linewidths=1.6, zorder=6)
        ax.annotate(f"{steps[current].tokens[p]}", path[current], xytext=(6, -10), textcoords="offset points",
                    fontsize=8.5, fontweight="bold", zorder=7,
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", ec=cmap(norm(current)), alpha=0.85))
    allp = np.concatenate([coords, pts[:, positions].reshape(-1, 2)]) if positions else coords
    lo, hi = allp.min(0), allp.max(0)
    pad = 0.06 * np.maximum(hi - lo, 1e-3)
    ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
    ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
    ax.set_xticks([])
    ax.set_yticks([])
    sm = colormaps[STEP_CMAP].resampled(max(S, 2))
    cb = fig.colorbar(_mappable(sm, S), ax=ax, fraction=0.035, pad=0.01)
    cb.set_label("step (x: the first, ringed: the current one)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    n_words = len(positions)
    ax.set_title(f"{what} of {n_words} caption position{'s' if n_words != 1 else ''} on the vocabulary map "
                 f"({method}), step {current + 1} of {S}", fontsize=10)
    return fig


def _mappable(cmap, S: int):
    from matplotlib.cm import ScalarMappable

    sm = ScalarMappable(norm=Normalize(1, max(S, 2)), cmap=cmap)
    sm.set_array([])
    return sm


def figure_png(fig: Figure, dpi: int | None = None) -> bytes:
    """The figure as PNG bytes (for files, tests and benchmarks)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
