"""Which words of a caption are right about its scene, word by word: the ground truth a token confidence is
calibrated against.

Judged words (the rest are None, not judged): a shape word is right when the scene has that shape; a colour
word before a shape word is right when the scene has an object of that colour *and* that shape (so a colour
bound to the wrong object is wrong); a colour before "background" is right when it is the scene's
background; a size before a shape is right when an object of that shape (and colour, if named) has that
size; "two"/"three" are right when that many objects match the phrase they count ("three shapes": all of
the scene's objects). A two-word colour ("dark blue") is one judgement for both of its words. "empty"
("an empty gray background") is right when the scene has no object; "no" when nothing matches the phrase
it opens ("no shapes": the scene is empty; "no red circles": no red circle).
"""
from __future__ import annotations

from .scenes import COLORS, SHAPES, SIZES, Scene

NUMBERS = {"one": 1, "two": 2, "three": 3}
BACKGROUND_COLOURS = ("black", "gray", "dark blue", "pink", "beige")


def _shape(word: str) -> str | None:
    if word in SHAPES:
        return word
    if word.endswith("s") and word[:-1] in SHAPES:
        return word[:-1]
    return None


def _colour_at(words: list[str], j: int) -> tuple[str | None, int]:
    """The colour named at ``words[j]`` (one or two words) and the index after it; (None, j) if none."""
    if j + 1 < len(words) and words[j] == "dark" and words[j + 1] == "blue":
        return "dark blue", j + 2
    if j < len(words) and words[j] in COLORS:
        return words[j], j + 1
    return None, j


def word_truth(words: list[str], scene: Scene) -> list[bool | None]:
    """For each word of a caption (lower case, special tokens removed), True/False when it is judged."""
    objs = [(o.color, o.shape, o.size) for o in scene.objects]
    out: list[bool | None] = [None] * len(words)
    i = 0
    while i < len(words):
        w = words[i]
        colour, span = None, 1
        if w == "dark" and i + 1 < len(words) and words[i + 1] == "blue":
            colour, span = "dark blue", 2
        elif w in COLORS or w in BACKGROUND_COLOURS:
            colour = w
        if colour is not None:
            nxt = words[i + span] if i + span < len(words) else ""
            if nxt == "background":
                verdict = colour == scene.background
            elif _shape(nxt):
                verdict = any(c == colour and s == _shape(nxt) for c, s, _ in objs)
            else:
                verdict = False  # a colour naming nothing ("... on a gray")
            for k in range(i, i + span):
                out[k] = verdict
            i += span
            continue
        s = _shape(w)
        if s is not None:
            out[i] = any(sh == s for _, sh, _ in objs)
        elif w in SIZES:
            colour, j = _colour_at(words, i + 1)
            s = _shape(words[j]) if j < len(words) else None
            out[i] = s is not None and any(sh == s and sz == w and (colour is None or c == colour) for c, sh, sz in objs)
        elif w == "empty":
            out[i] = not objs
        elif w == "no":
            colour, j = _colour_at(words, i + 1)
            nxt = words[j] if j < len(words) else ""
            if nxt in ("shapes", "objects"):
                out[i] = not objs
            elif _shape(nxt):
                out[i] = not any(sh == _shape(nxt) and (colour is None or c == colour) for c, sh, _ in objs)
        elif w in NUMBERS:
            colour, j = _colour_at(words, i + 1)
            nxt = words[j] if j < len(words) else ""
            if nxt == "shapes":
                out[i] = NUMBERS[w] == len(objs)
            elif _shape(nxt):
                out[i] = NUMBERS[w] == sum(sh == _shape(nxt) and (colour is None or c == colour) for c, sh, _ in objs)
        i += 1
    return out
