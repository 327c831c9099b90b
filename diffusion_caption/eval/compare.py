"""Comparing captions: a word-level diff against a reference caption, and exact checks against a scene.

``word_diff(reference, text)`` aligns the two word sequences (difflib) and labels every word of ``text``
as kept or changed, with the reference words that disappeared; ``diff_html`` renders that as HTML
(new words marked, the lost ones listed struck through below). ``scene_errors`` names the attributes a caption gets
wrong about a shapes-world scene, through the project's caption parser (``attributes.py``);
``scene_check`` also says what it states at all, so a caption that says nothing checkable is not
mistaken for a correct one.
"""
from __future__ import annotations

import difflib
import html
from dataclasses import dataclass

from ..world.attributes import attribute_scores, parse_caption
from ..world.scenes import Scene

ATTRIBUTE_NAMES = {"color": "colour", "shape": "shape", "size": "size", "count": "count", "relation": "relation",
                   "background": "background"}


@dataclass
class DiffWord:
    word: str
    op: str  # "equal": also in the reference; "changed": replaces or adds to the reference; "removed": only there


def word_diff(reference: str, text: str) -> list[DiffWord]:
    """The words of ``text`` in order, each "equal" or "changed", with "removed" reference words in place."""
    a, b = reference.split(), text.split()
    out: list[DiffWord] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            out += [DiffWord(w, "equal") for w in b[j1:j2]]
            continue
        out += [DiffWord(w, "removed") for w in a[i1:i2]]
        out += [DiffWord(w, "changed") for w in b[j1:j2]]
    return out


def changed_words(reference: str, text: str) -> int:
    """How many words of ``text`` are not in the reference, plus how many reference words are gone."""
    return sum(d.op != "equal" for d in word_diff(reference, text))


def diff_html(reference: str, text: str) -> str:
    """``text`` as HTML with its new words in ``<mark>``, then the reference words it lost in ``<del>``.

    The caption stays readable as a sentence; the lost words follow on a line of their own.
    """
    if not text.split():
        return "<i>(empty caption)</i>"
    diff = word_diff(reference, text)
    words = [html.escape(d.word) if d.op == "equal" else f"<mark>{html.escape(d.word)}</mark>"
             for d in diff if d.op != "removed"]
    out = " ".join(words)
    lost = [html.escape(d.word) for d in diff if d.op == "removed"]
    if lost:
        out += ("<div style='font-size:0.8em;color:#777;margin-top:2px'>no longer says: "
                + " ".join(f"<del>{w}</del>" for w in lost) + "</div>")
    return out


@dataclass
class SceneCheck:
    checked: list[str]  # attributes the caption states (and so could be checked), e.g. ["colour", "shape"]
    wrong: list[str]  # those it gets wrong, plus "made-up object" when it names something not in the scene

    @property
    def verdict(self) -> str:
        """"right", "wrong" or "unchecked" (the caption states nothing the parser can check)."""
        return "wrong" if self.wrong else "right" if self.checked else "unchecked"


def scene_check(caption: str, scene: Scene) -> SceneCheck:
    """What the caption states about ``scene`` and what of it is wrong, through ``attributes.attribute_scores``.

    An attribute the caption does not mention is neither checked nor wrong; a partly wrong one (some
    of several objects) is wrong.
    """
    scores = attribute_scores(parse_caption(caption), scene)
    checked = [name for key, name in ATTRIBUTE_NAMES.items() if scores.get(key) is not None]
    wrong = [name for key, name in ATTRIBUTE_NAMES.items() if scores.get(key) is not None and scores[key] < 1.0]
    if scores.get("hallucination"):
        wrong.append("made-up object")
    return SceneCheck(checked, wrong)


def scene_errors(caption: str, scene: Scene) -> list[str]:
    """The attributes the caption states wrongly about ``scene`` (see ``scene_check``)."""
    return scene_check(caption, scene).wrong
