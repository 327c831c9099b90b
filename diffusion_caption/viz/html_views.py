"""Small self-contained HTML fragments for the app: confidence-coloured tokens and the variants table.

Everything is escaped and styled inline (no stylesheet needed), and colours come from the same scale
as the heatmap (``common.confidence_color``), so a chip and its heatmap cell look alike.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from typing import Sequence

from PIL import Image

from .common import confidence_color, is_special

PAD = "[PAD]"
_CHIP = ("display:inline-flex;flex-direction:column;align-items:center;margin:2px 2px;padding:3px 7px 2px;"
         "border-radius:6px;line-height:1.15;color:#111;")
_WORD = "font-size:1.15em;font-weight:600;font-family:ui-monospace,Menlo,Consolas,monospace;"
_CONF = "font-size:0.72em;color:#333;"


def _chip(word: str, conf: float | None, title: str, special: bool = False, dim: bool = False) -> str:
    if special or conf is None:
        style = _CHIP + "background:#f1f1f1;border:1px dashed #aaa;color:#777;"
    else:
        style = _CHIP + f"background:{confidence_color(conf, lighten=0.5)};border:1px solid rgba(0,0,0,0.12);"
    if dim:
        style += "opacity:0.45;"
    c = "" if conf is None else f"<span style='{_CONF}'>{conf:.2f}</span>"
    return (f"<span style='{style}' title='{html.escape(title, quote=True)}'>"
            f"<span style='{_WORD}'>{html.escape(word)}</span>{c}</span>")


def token_chips(tokens: Sequence[str], confidence: Sequence[float], end_token: str = "[SEP]",
                label: str = "confidence") -> str:
    """Every token as a chip coloured by its confidence, with the number under it.

    Special tokens are grey, tokens after the end token are faded (they are not part of the caption),
    and the trailing run of padding is folded into one chip.
    """
    if len(tokens) != len(confidence):
        raise ValueError(f"{len(tokens)} tokens but {len(confidence)} confidences")
    n = len(tokens)
    last = n
    while last > 0 and tokens[last - 1] == PAD:
        last -= 1
    end = tokens.index(end_token) if end_token in tokens else n
    parts = []
    for i in range(last):
        tok, c = tokens[i], float(confidence[i])
        parts.append(_chip(tok, c, f"position {i}: {tok!r}, {label} {c:.3f}", special=is_special(tok), dim=i > end))
    if last < n:
        k = n - last
        parts.append(_chip(f"{PAD} ×{k}", None, f"positions {last}-{n - 1}: padding"))
    return "<div style='display:flex;flex-wrap:wrap;align-items:flex-end'>" + "".join(parts) + "</div>"


def confidence_legend(label: str = "rounding confidence") -> str:
    stops = ", ".join(confidence_color(v, lighten=0.5) for v in (0.0, 0.25, 0.5, 0.75, 1.0))
    return (f"<div style='display:flex;align-items:center;gap:6px;font-size:0.8em;color:#555;margin-top:4px'>"
            f"<span>{html.escape(label)}: 0</span><span style='display:inline-block;width:140px;height:10px;"
            f"border-radius:3px;background:linear-gradient(90deg, {stops})'></span><span>1</span></div>")


def candidates_list(candidates: Sequence[str], scores: Sequence[float] | None, chosen: int | None,
                    shown: int = 8) -> str:
    """The candidate captions a call chose among, best-scored first, the chosen one marked: why this caption.

    ``scores`` None means there was a single distinct candidate, kept without scoring."""
    if not candidates:
        return ""
    if scores is None:
        return ("<div class='dc-note' style='margin-top:6px'>Its roundings all read the same: one candidate, "
                "nothing to rank.</div>")
    order = sorted(range(len(candidates)), key=lambda j: (-scores[j], j))
    rows = []
    for rank, j in enumerate(order[:shown]):
        mark = "✓" if j == chosen else ""
        weight = "font-weight:600;" if j == chosen else ""
        rows.append(f"<tr style='{weight}'><td style='padding:0 6px'>{mark}</td><td style='padding:0 6px'>"
                    f"{scores[j]:.3f}</td><td style='padding:0 6px'>{html.escape(candidates[j]) or '<i>(empty)</i>'}"
                    "</td></tr>")
    more = (f"<div class='dc-note'>… and {len(candidates) - shown} more</div>" if len(candidates) > shown else "")
    return (f"<div style='margin-top:6px;font-size:0.85em'><div class='dc-note'>Chosen among "
            f"{len(candidates)} distinct roundings of the last step by the scorer's match to the image "
            "(highest first):</div><table style='border-collapse:collapse'>"
            "<tr style='color:#666'><th></th><th style='padding:0 6px'>score</th><th style='padding:0 6px;text-align:left'>"
            f"candidate</th></tr>{''.join(rows)}</table>{more}</div>")


def image_data_uri(img: Image.Image, size: int = 96) -> str:
    im = img.copy()
    im.thumbnail((size, size), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class VariantRow:
    name: str
    image: Image.Image
    note: str
    captions: dict[str, str]  # model name -> caption, possibly already diff-highlighted HTML (``html_captions``)
    html_captions: dict[str, str] = field(default_factory=dict)
    checks: dict[str, object] = field(default_factory=dict)  # model -> compare.SceneCheck (absent: no ground truth)


def variants_table(rows: Sequence[VariantRow], models: Sequence[str]) -> str:
    """One row per variant: thumbnail, what changed, then each model's caption (diff-highlighted) and its errors."""
    th = "padding:6px 8px;text-align:left;border-bottom:2px solid #ccc;font-weight:600"
    td = "padding:6px 8px;vertical-align:middle;border-bottom:1px solid #e5e5e5"
    head = "".join(f"<th style='{th}'>{html.escape(m)}</th>" for m in models)
    out = ["<style>.dc-vt mark{background:#ffe08a;padding:0 2px;border-radius:3px}"
           ".dc-vt del{color:#b33;opacity:0.8}</style>",
           f"<table class='dc-vt' style='border-collapse:collapse;width:100%;font-size:0.95em'>"
           f"<thead><tr><th style='{th}'>image</th><th style='{th}'>variant</th>{head}</tr></thead><tbody>"]
    for r in rows:
        cells = []
        for m in models:
            cap = r.html_captions.get(m) or html.escape(r.captions.get(m, ""))
            chk = r.checks.get(m)
            if chk is None:
                verdict = ""
            elif chk.wrong:
                verdict = ("<div style='font-size:0.8em;color:#b00020;margin-top:2px'>✗ wrong: "
                           + html.escape(", ".join(chk.wrong)) + "</div>")
            elif chk.checked:
                verdict = ("<div style='font-size:0.8em;color:#1b7f3b;margin-top:2px'>✓ right on "
                           + html.escape(", ".join(chk.checked)) + "</div>")
            else:
                verdict = ("<div style='font-size:0.8em;color:#8a5a00;margin-top:2px'>? states nothing that can be "
                           "checked against the scene</div>")
            cells.append(f"<td style='{td}'>{cap}{verdict}</td>")
        out.append(f"<tr><td style='{td};width:100px'><img src='{image_data_uri(r.image)}' alt='{html.escape(r.name)}' "
                   f"style='width:96px;height:auto;border-radius:4px'></td>"
                   f"<td style='{td}'><b>{html.escape(r.name)}</b><div style='font-size:0.8em;color:#666'>"
                   f"{html.escape(r.note)}</div></td>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    return "".join(out)
