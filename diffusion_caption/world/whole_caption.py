"""Whole-caption correctness against a shapes-world scene, and the grammatical defects of a caption.

``attributes.attribute_scores`` checks each claim of a caption on its own, after a tolerant parse
(repeated words collapsed, stray words skipped). This module asks the stricter question a reader
asks: is the caption, as written, a right description of the image?

* ``caption_defects(text)``: the grammatical defects of the raw caption (repeats are *not* collapsed
  before they are looked for), as names from ``DEFECTS``.
* ``whole_caption_errors(text, scene)``: why the caption is not wholly right; ``[]`` when it is.
* ``whole_caption_report(captions, scenes)``: the share of wholly right captions, overall and by the
  scene's number of objects (and the part of it that is only the vague "<n> shapes" caption), the
  defect rate, and how often each reason and defect occurs.

**Wholly right** means: no defect; every object of the scene named (a plural phrase "two red circles"
names two objects of that colour and shape); a one-to-one matching of the named objects onto the
scene's objects on shape and colour (so "a red circle and a red circle" for one red circle is wrong,
and so are two objects with their colours swapped); a size, where one is said, that is the matched
object's; the total count right (also for "<n> shapes"); the background, where one is named, the
scene's; every relation stated true of the objects it links (by ``world.relation``: along the axis on
which the two objects are furthest apart, as the world's own captions use it); nothing named that is
not there. The world's one vague phrasing, "<n> shapes on a ... background", names its objects by
number only; it is wholly right when the number and background are. A shape word without a colour
("a circle") is not: the object's colour is not bound to its shape. An empty scene is described by
saying so: "an empty gray background", "a gray background with no shapes", "there are no shapes on a gray
background"; a caption that says a scene is empty while it has objects is wrong (``wrong count``).

**Defects** (``DEFECTS``), judged on the words as written:

* ``repeated token``: the same word twice in a row ("a red red circle", "circle circle", ", ,").
* ``double article``: two determiners in a row ("a the", "a two", "a a").
* ``article before plural``: "a"/"an"/"one" in front of a plural shape ("a red circles").
* ``number before singular``: "two"/"three" in front of a singular shape ("two red circle"): the same
  agreement error the other way round, so it is a defect too.
* ``article mismatch``: "a" before a vowel or "an" before a consonant ("an yellow star", "a orange
  circle"), by ``world.article``.
* ``missing article``: a noun phrase without any determiner ("there is green circle", "on beige
  background").
* ``dangling ending``: the caption ends on an article, number, preposition, conjunction or relation
  word ("... on a", "... and", "... to the left of").
* ``incomplete noun phrase``: a determiner or size/colour words with no noun after them ("a red on a
  gray background", "... on a gray", "a large and a red circle"); a lone determiner at the very end
  is a dangling ending instead.
* ``two colours in one phrase`` / ``two sizes in one phrase``: "a pink green background", "a red
  large blue circle", "a large small star"; the word nearest the noun is taken as the claim.
* ``relation without second object`` / ``relation without first object``: a relation ("above", "to
  the left of", ...) not followed / not preceded by a named object ("a red circle above on a gray
  background", "a red circle and above a blue square").
* ``broken relation phrase``: "left"/"right" without the rest of "to the left of" ("to the left a").
* ``conjunction without object``: "and" or "," with no object on one side ("a red circle and on a
  gray background").
* ``missing conjunction``: two object phrases side by side ("a red square a blue circle").
* ``verb agreement``: "there is" before a plural, "there are" before a single object.
* ``misplaced background``: a background phrase not after "on" nor opening "... background with".
* ``background named twice``.
* ``misplaced word``: a known word where the grammar has no place for it ("on" not before a
  background, "with" not after an opening background, "there"/"is" mid-caption, a size on a
  background).
* ``unknown word``: a word outside the world's vocabulary (a broken word piece such as "backgro").
* ``empty caption``.

Reasons from ``whole_caption_errors`` are strings ``"<category>: <detail>"`` (the detail may be empty):
``defect: <name>``, ``missing object``, ``object not in scene`` (no scene object of that colour and
shape, and nothing left to mistake it for), ``extra object`` (such objects exist, but fewer than are
named), ``colour swapped`` (two objects named with each other's colours), ``wrong colour``, ``wrong
shape``, ``wrong object`` (a named object in the place of a scene object, sharing neither colour nor
shape), ``object without colour``, ``object without shape``, ``wrong size``, ``wrong count``,
``wrong background``, ``wrong relation``. ``reason_category`` gives the part before the detail.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .scenes import BACKGROUNDS, COLORS, SHAPES, SIZES, Scene, ShapeObject, article, relation

ARTICLES = {"a": 1, "an": 1, "the": 1}
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
DETERMINERS = {**ARTICLES, **NUMBERS, "no": 0}
SHAPE_NOUNS = {**{s: (s, False) for s in SHAPES}, **{s + "s": (s, True) for s in SHAPES}}
GENERIC_NOUNS = {"shape": False, "shapes": True, "object": False, "objects": True}
RELATION_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
# colour words: the object colours and the background names ("dark" alone is read as a colour too)
COLOR_WORDS = set(COLORS) | {b for b in BACKGROUNDS if " " not in b} | {"dark"}
OTHER_WORDS = {"and", ",", "on", "with", "there", "is", "are", "to", "of", "background", "dark"}
VOCABULARY = (set(DETERMINERS) | set(SHAPE_NOUNS) | set(GENERIC_NOUNS) | set(RELATION_WORDS) | set(SIZES)
              | set(COLORS) | {w for b in BACKGROUNDS for w in b.split()} | OTHER_WORDS | {"empty"})
# a caption ending on one of these is cut off mid-phrase
DANGLING = set(DETERMINERS) | {"on", "of", "with", "to", "and", ",", "above", "below", "left", "right",
                               "there", "is", "are"}

DEFECTS = ("repeated token", "double article", "article before plural", "number before singular",
           "article mismatch", "missing article", "dangling ending", "incomplete noun phrase",
           "two colours in one phrase", "two sizes in one phrase",
           "relation without second object", "relation without first object", "broken relation phrase",
           "conjunction without object", "missing conjunction", "verb agreement", "misplaced background",
           "background named twice", "misplaced word", "unknown word", "empty caption")

_TOKEN = re.compile(r"[a-z]+|,")


def tokens(text: str) -> list[str]:
    """Lower-cased words and commas, as written (nothing collapsed)."""
    return _TOKEN.findall(text.lower())


# ---------------------------------------------------------------------------------------------------
# chunking: noun phrases, relation phrases and the little words between them


@dataclass
class _Chunk:
    kind: str  # np (a complete noun phrase) | inc (no noun) | rel | conj | on | with | there | be | other
    word: str = ""  # the word, for single-word chunks
    det: str | None = None
    size: str | None = None
    color: str | None = None
    noun: str | None = None  # object | generic | background (np only)
    shape: str | None = None
    plural: bool = False
    first: str | None = None  # the first word after the determiner (for a/an)
    rel: str | None = None
    broken: bool = False
    at_end: bool = False  # the chunk's last word is the caption's last word
    empty: bool = False  # "empty" was said in the phrase ("an empty gray background")
    extra: list[str] = field(default_factory=list)  # stray words inside the phrase (a size on a background)
    stacked: list[str] = field(default_factory=list)  # "colour"/"size" for each second colour/size word

    @property
    def count(self) -> int:
        if self.det in DETERMINERS:
            return DETERMINERS[self.det]
        return 2 if self.plural else 1

    def is_object(self) -> bool:
        return self.kind == "np" and self.noun in ("object", "generic")

    def phrase(self) -> str:
        words = [w for w in (self.size, self.color) if w]
        if self.noun == "generic":
            words.append("shape")
        elif self.shape:
            words.append(self.shape)
        return " ".join(words)


def _relation_spans(toks: list[str]) -> dict[int, tuple[int, str, bool]]:
    """Start index -> (end index, relation, complete) of each relation phrase."""
    spans: dict[int, tuple[int, str, bool]] = {}
    for i, t in enumerate(toks):
        if t not in RELATION_WORDS:
            continue
        if t in ("above", "below"):
            spans[i] = (i + 1, RELATION_WORDS[t], True)
            continue
        start, end = i, i + 1
        if start > 0 and toks[start - 1] == "the":
            start -= 1
            if start > 0 and toks[start - 1] == "to":
                start -= 1
        elif start > 0 and toks[start - 1] == "to":
            start -= 1
        if end < len(toks) and toks[end] == "of":
            end += 1
        complete = toks[start:end] == ["to", "the", t, "of"]
        # a span may not swallow the end of an earlier one
        while any(s <= start < e for s, (e, _, _) in spans.items()):
            start += 1
        spans[start] = (end, RELATION_WORDS[t], complete)
    return spans


def _chunks(toks: list[str]) -> list[_Chunk]:
    """The caption as a sequence of chunks (``toks`` with consecutive repeats already collapsed)."""
    out: list[_Chunk] = []
    cur: _Chunk | None = None
    n = len(toks)

    def flush(at_end: bool = False) -> None:
        nonlocal cur
        if cur is not None:
            cur.kind = "inc"
            cur.at_end = at_end
            out.append(cur)
        cur = None

    def open_np() -> _Chunk:
        nonlocal cur
        if cur is None:
            cur = _Chunk("np")
        return cur

    spans = _relation_spans(toks)
    i = 0
    while i < n:
        t = toks[i]
        if i in spans:
            flush()
            end, rel, complete = spans[i]
            out.append(_Chunk("rel", word=" ".join(toks[i:end]), rel=rel, broken=not complete, at_end=end == n))
            i = end
            continue
        if t in DETERMINERS:
            if cur is not None and (cur.size or cur.color):
                flush()
            c = open_np()
            c.det, c.first = t, None  # "a two red circles": the later determiner counts
        elif t in SIZES:
            c = open_np()
            if c.size:  # "a large small circle": the size nearest the noun is the claim
                c.stacked.append("size")
            c.size = t
            c.first = c.first or t
        elif t in COLOR_WORDS:
            color = t
            if t == "dark" and i + 1 < n and toks[i + 1] == "blue":
                color, i = "dark blue", i + 1
            c = open_np()
            if c.color:  # "a pink green background": the colour nearest the noun is the claim
                c.stacked.append("colour")
            c.color = color
            c.first = c.first or color
        elif t == "empty":
            c = open_np()
            c.empty = True
            c.first = c.first or t
        elif t in SHAPE_NOUNS or t in GENERIC_NOUNS or t == "background":
            c = open_np()
            c.first = c.first or t
            if t in SHAPE_NOUNS:
                c.noun, (c.shape, c.plural) = "object", SHAPE_NOUNS[t]
            elif t in GENERIC_NOUNS:
                c.noun, c.plural = "generic", GENERIC_NOUNS[t]
            else:
                c.noun = "background"
                if c.size:
                    c.extra.append(c.size)
                    c.size = None
            if c.noun != "background" and c.empty:  # "an empty circle": emptiness is said of backgrounds
                c.extra.append("empty")
            c.at_end = i == n - 1
            out.append(c)
            cur = None
        else:
            flush()
            kind = {"and": "conj", ",": "conj", "on": "on", "with": "with", "there": "there",
                    "is": "be", "are": "be"}.get(t, "other")
            out.append(_Chunk(kind, word=t, at_end=i == n - 1))
        i += 1
    flush(at_end=True)
    return out


# ---------------------------------------------------------------------------------------------------
# defects


def _defects(raw: list[str], chunks: list[_Chunk]) -> list[str]:
    found: list[str] = []

    def add(name: str) -> None:
        if name not in found:
            found.append(name)

    if not raw:
        return ["empty caption"]
    for a, b in zip(raw, raw[1:]):
        if a == b:
            add("repeated token")
        if a in DETERMINERS and b in DETERMINERS:
            add("double article")
    if raw[-1] in DANGLING:
        add("dangling ending")

    n = len(chunks)
    backgrounds = [c for c in chunks if c.kind == "np" and c.noun == "background"]
    if len(backgrounds) > 1:
        add("background named twice")
    claimed = sum(c.count for c in chunks if c.is_object())
    for k, c in enumerate(chunks):
        prev = chunks[k - 1] if k > 0 else None
        nxt = chunks[k + 1] if k + 1 < n else None
        if c.kind in ("np", "inc"):
            if "colour" in c.stacked:
                add("two colours in one phrase")
            if "size" in c.stacked:
                add("two sizes in one phrase")
        if c.kind == "np":
            if c.det is None:
                add("missing article")
            elif c.det in ("a", "an") and c.first and c.det != article(c.first):
                add("article mismatch")
            if c.noun != "background":
                if c.plural and c.det in ("a", "an", "one"):
                    add("article before plural")
                if not c.plural and c.det in NUMBERS and NUMBERS[c.det] >= 2:
                    add("number before singular")
                if prev is not None and prev.is_object():
                    add("missing conjunction")
                if c.extra:
                    add("misplaced word")
            else:
                if c.color is None and not c.empty:
                    add("incomplete noun phrase")
                if c.extra:
                    add("misplaced word")
                # "... background with ..." opens a caption; "an empty ... background" is one on its own
                opening = k == 0 and (nxt is not None and nxt.kind == "with" or n == 1 and c.empty)
                if not (prev is not None and prev.kind == "on") and not opening:
                    add("misplaced background")
        elif c.kind == "inc":
            if not (c.at_end and not c.size and not c.color and not c.empty):  # a lone final "a" dangles
                add("incomplete noun phrase")
        elif c.kind == "rel":
            if c.broken:
                add("broken relation phrase")
            if not (prev is not None and prev.is_object()):
                add("relation without first object")
            if not (nxt is not None and nxt.is_object()):
                add("relation without second object")
        elif c.kind == "conj":
            if prev is None or not (prev.is_object() or prev.kind == "inc" or prev.noun == "background"):
                add("conjunction without object")
            elif nxt is not None and not (nxt.is_object() or nxt.kind == "inc" or nxt.noun == "background"):
                add("conjunction without object")
        elif c.kind == "on":
            if nxt is not None and not (nxt.noun == "background" or nxt.kind == "inc"):
                add("misplaced word")
        elif c.kind == "with":
            if not (k == 1 and prev.noun == "background") or (nxt is not None and not (nxt.is_object()
                                                                                     or nxt.kind == "inc")):
                add("misplaced word")
        elif c.kind == "there":
            if k != 0 or (nxt is not None and nxt.kind != "be"):
                add("misplaced word")
        elif c.kind == "be":
            if prev is None or prev.kind != "there":
                add("misplaced word")
            elif nxt is not None:
                if not (nxt.is_object() or nxt.kind == "inc"):
                    add("misplaced word")
                elif c.word == "is" and nxt.is_object() and (nxt.plural or nxt.count > 1):
                    add("verb agreement")
                elif c.word == "are" and claimed == 1 and not any(x.kind == "inc" for x in chunks):
                    add("verb agreement")
        elif c.kind == "other":
            add("unknown word" if c.word not in VOCABULARY else "misplaced word")
    return found


def _collapse(raw: list[str]) -> list[str]:
    return [t for i, t in enumerate(raw) if i == 0 or t != raw[i - 1]]


def caption_defects(text: str) -> list[str]:
    """The defects of ``text`` (names from ``DEFECTS``, each once, in order of the checks; ``[]`` if none).

    Repeats and double articles are found on the words as written; the rest of the grammar is read
    with consecutive repeats collapsed, so one stutter ("a red red circle") is one defect, not three.
    """
    raw = tokens(text)
    return _defects(raw, _chunks(_collapse(raw)))


# ---------------------------------------------------------------------------------------------------
# whole-caption correctness


@dataclass
class _Unit:
    """One object a caption names (a plural phrase names several)."""
    chunk: int
    color: str | None
    shape: str | None
    size: str | None

    def name(self) -> str:
        return " ".join(w for w in (self.size, self.color, self.shape or "shape") if w)


def _obj_name(o: ShapeObject, size: bool = False) -> str:
    return f"{o.size + ' ' if size else ''}{o.color} {o.shape}"


def _compatible(u: _Unit, o: ShapeObject) -> bool:
    return (u.shape is None or u.shape == o.shape) and (u.color is None or u.color == o.color)


def _best_assignment(units: list[_Unit], objects: list[ShapeObject],
                     relations: list[tuple[int, str, int]]) -> list[int | None]:
    """Each unit's scene object (an index, or None), one-to-one, chosen to maximise (compatible pairs,
    right sizes among them, true relations, pairs, shared attributes of the incompatible pairs, colour
    swaps among them: of two equally close readings, the one that names the error as a swap)."""
    best: tuple | None = None
    best_assign: list[int | None] = [None] * len(units)
    assign: list[int | None] = [None] * len(units)
    used = [False] * len(objects)

    def score() -> tuple:
        compat = size_ok = pairs = shared = 0
        wrong = []
        for u, j in zip(units, assign):
            if j is None:
                continue
            pairs += 1
            o = objects[j]
            if _compatible(u, o):
                compat += 1
                size_ok += u.size is None or u.size == o.size
            else:
                shared += (u.color == o.color) + (u.shape == o.shape)
                wrong.append((u, o))
        rel_ok = sum(_relation_holds(units, objects, assign, r) is True for r in relations)
        swaps = sum(_swapped(*wrong[a], *wrong[b]) for a in range(len(wrong)) for b in range(a + 1, len(wrong)))
        return compat, size_ok, rel_ok, pairs, shared, swaps

    def rec(k: int) -> None:
        nonlocal best, best_assign
        if k == len(units):
            s = score()
            if best is None or s > best:
                best, best_assign = s, list(assign)
            return
        for j in range(len(objects)):
            if not used[j]:
                used[j], assign[k] = True, j
                rec(k + 1)
                used[j], assign[k] = False, None
        rec(k + 1)

    rec(0)
    return best_assign


def _relation_holds(units, objects, assign, rel: tuple[int, str, int]) -> bool | None:
    """Whether the relation holds between the scene objects matched to its two phrases; None when a
    side is not matched to objects it is compatible with (that error is reported on its own)."""
    left, name, right = rel
    sides = []
    for chunk in (left, right):
        objs = []
        for u, j in zip(units, assign):
            if u.chunk == chunk:
                if j is None or not _compatible(u, objects[j]):
                    return None
                objs.append(objects[j])
        if not objs:
            return None
        sides.append(objs)
    return all(a is not b and relation(a, b) == name for a in sides[0] for b in sides[1])


def _swapped(u1: _Unit, o1: ShapeObject, u2: _Unit, o2: ShapeObject) -> bool:
    if o1.color == o2.color or o1.shape == o2.shape:
        return False
    said = {(u1.color, u1.shape), (u2.color, u2.shape)}
    return said == {(o1.color, o2.shape), (o2.color, o1.shape)}


def whole_caption_errors(text: str, scene: Scene) -> list[str]:
    """Why ``text`` is not a wholly right caption of ``scene`` (``[]`` when it is; see the module doc)."""
    raw = tokens(text)
    chunks = _chunks(_collapse(raw))
    reasons = [f"defect: {d}" for d in _defects(raw, chunks)]
    objects = list(scene.objects)

    units: list[_Unit] = []
    for k, c in enumerate(chunks):
        if c.is_object():
            shape = c.shape if c.noun == "object" else None
            units += [_Unit(k, c.color, shape, c.size) for _ in range(c.count)]
            if c.noun == "object" and c.color is None:
                reasons.append(f"object without colour: {c.phrase()}")
            if c.noun == "generic" and c.color is not None:
                reasons.append(f"object without shape: {c.phrase()}")
    relations = []
    for k, c in enumerate(chunks):
        if c.kind == "rel" and 0 < k < len(chunks) - 1 and chunks[k - 1].is_object() and chunks[k + 1].is_object():
            relations.append((k - 1, c.rel, k + 1))

    says_empty = claims_empty(chunks)
    if says_empty and units:
        reasons.append(f"wrong count: says there is nothing and names {len(units)}")
    elif says_empty and objects:
        reasons.append(f"wrong count: says there is nothing, scene has {len(objects)}")
    elif len(units) != len(objects):
        reasons.append(f"wrong count: says {len(units)}, scene has {len(objects)}")
    assign = _best_assignment(units, objects, relations)

    # named objects against the scene objects they were matched to
    bad = [(u, j) for u, j in zip(units, assign) if j is not None and not _compatible(u, objects[j])]
    done: set[int] = set()
    for a in range(len(bad)):
        for b in range(a + 1, len(bad)):
            if a in done or b in done:
                continue
            (u1, j1), (u2, j2) = bad[a], bad[b]
            if _swapped(u1, objects[j1], u2, objects[j2]):
                reasons.append(f"colour swapped: says {u1.name()} and {u2.name()}, scene has "
                               f"{_obj_name(objects[j1])} and {_obj_name(objects[j2])}")
                done |= {a, b}
    for a, (u, j) in enumerate(bad):
        if a in done:
            continue
        o = objects[j]
        kind = ("wrong colour" if u.shape in (None, o.shape) else
                "wrong shape" if u.color in (None, o.color) else "wrong object")
        reasons.append(f"{kind}: says {u.name()}, scene has {_obj_name(o)}")
    for u, j in zip(units, assign):
        if j is not None and _compatible(u, objects[j]) and u.size is not None and u.size != objects[j].size:
            reasons.append(f"wrong size: says {u.name()}, scene has {_obj_name(objects[j], size=True)}")
    for u, j in zip(units, assign):
        if j is None:
            there = any(_compatible(u, o) for o in objects)
            reasons.append(f"{'extra object' if there else 'object not in scene'}: {u.name()}")
    matched = {j for j in assign if j is not None}
    for j, o in enumerate(objects):
        if j not in matched:
            reasons.append(f"missing object: {_obj_name(o)}")

    for rel in relations:
        if _relation_holds(units, objects, assign, rel) is False:
            left, name, right = rel
            reasons.append(f"wrong relation: says {chunks[left].phrase()} {name} {chunks[right].phrase()}")
    for c in chunks:
        if c.kind == "np" and c.noun == "background" and c.color is not None and c.color != scene.background:
            reasons.append(f"wrong background: says {c.color}, scene has {scene.background}")
    return reasons


def claims_empty(chunks: list[_Chunk]) -> bool:
    """Whether the caption says the scene holds no object: "an empty ... background", "no shapes"."""
    return any(c.kind == "np" and (c.noun == "background" and c.empty or c.noun == "generic" and c.det == "no")
               for c in chunks)


def is_vague(text: str) -> bool:
    """Whether ``text`` names objects by number only ("two shapes on a gray background"): at least one
    object phrase, each a generic noun ("shapes", "objects") without a colour."""
    objs = [c for c in _chunks(_collapse(tokens(text))) if c.is_object()]
    return bool(objs) and all(c.noun == "generic" and c.color is None and c.count > 0 for c in objs)


def reason_category(reason: str) -> str:
    """``"wrong colour"`` for ``"wrong colour: says ..."``; ``"defect: repeated token"`` for a defect."""
    if reason.startswith("defect: "):
        return reason
    return reason.split(":", 1)[0]


def whole_caption_report(captions: list[str], scenes: list[Scene]) -> dict:
    """Whole-caption correctness and defects over a set of captions, each of its own scene.

    Returns ``{"n", "whole", "vague", "n_0obj", "whole_0obj", "vague_0obj", ... "whole_3obj", "vague_3obj",
    "defect_rate", "reasons", "defects"}``: ``whole`` is the share of wholly right captions (``whole_Kobj``
    over the scenes of K objects, None when there is none); ``vague`` the share of captions that are
    wholly right by the world's one vague phrasing, "<n> shapes on a ... background" (``is_vague``), so
    ``whole - vague`` is the share wholly right and naming every object; ``defect_rate`` the share of
    captions with at least one defect; ``reasons`` how many captions have each reason category
    (``reason_category``, defects included), ``defects`` how many have each defect; both sorted by count.
    """
    if len(captions) != len(scenes):
        raise ValueError(f"got {len(captions)} captions for {len(scenes)} scenes")
    by_n: dict[int, list[bool]] = {0: [], 1: [], 2: [], 3: []}
    vague_n: dict[int, list[bool]] = {0: [], 1: [], 2: [], 3: []}
    right: list[bool] = []
    vague: list[bool] = []
    defective = 0
    reasons: dict[str, int] = {}
    defects: dict[str, int] = {}
    for text, scene in zip(captions, scenes):
        errs = whole_caption_errors(text, scene)
        ok = not errs
        right.append(ok)
        by_n.setdefault(len(scene.objects), []).append(ok)
        vague.append(ok and is_vague(text))
        vague_n.setdefault(len(scene.objects), []).append(vague[-1])
        for cat in dict.fromkeys(reason_category(e) for e in errs):
            reasons[cat] = reasons.get(cat, 0) + 1
        ds = [e[len("defect: "):] for e in errs if e.startswith("defect: ")]
        defective += bool(ds)
        for d in ds:
            defects[d] = defects.get(d, 0) + 1
    share = (lambda vals: sum(vals) / len(vals) if vals else None)
    out: dict = {"n": len(right), "whole": share(right), "vague": share(vague)}
    for k in (0, 1, 2, 3):  # 0: the empty scenes
        out[f"n_{k}obj"] = len(by_n[k])
        out[f"whole_{k}obj"] = share(by_n[k])
        out[f"vague_{k}obj"] = share(vague_n[k])
    out["defect_rate"] = defective / len(right) if right else None
    out["reasons"] = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    out["defects"] = dict(sorted(defects.items(), key=lambda kv: (-kv[1], kv[0])))
    return out
