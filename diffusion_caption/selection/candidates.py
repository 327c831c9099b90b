"""Candidates for one image and the choice among them, for a ``Captioner`` sampling with candidates K > 1.

Two sources (``SamplingConfig.propose``): K noise draws of the whole run, kept by consensus (``mbr``) or
by the scorer (``rerank``); or the K likeliest roundings of one draw's last x0 prediction
(``rounding.k_best_roundings``), the distinct ones ranked by the scorer. The scorer is the captioner's
own CLIP, another CLIP of the same image tower, or a ``TextScorer``. The captioner reaches this module
only when a call asks for candidates.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os

import torch

from .. import checkpoint as ckpt
from ..image_encoder import ImageEncoder
from ..rounding import k_best_roundings, top2_log_probs
from ..trace import DenoisingStep
from .mbr import mbr_select
from .rerank import clip_scores, clip_select
from .text_scorer import TextScorer

# propose="rounding": a position whose second-nearest token is e^3 (20) times less likely than its nearest
# keeps its nearest; letting every position move lets CLIP pick captions that name what is not there
ROUNDING_MAX_DELTA = 3.0


def load_scorer(cap, scorer, device) -> "ImageEncoder | TextScorer":
    """``scorer`` (a folder, an ``ImageEncoder`` or a ``TextScorer``) checked to read captions in the
    image-feature space of ``cap``: a CLIP's image tower must be the captioner's, tensor for tensor (a
    CLIP whose text tower alone was tuned, as ``research.tune_clip_text`` makes), and a text scorer must
    have been trained against it (the fingerprint it records)."""
    source = scorer
    if isinstance(scorer, (str, os.PathLike)):
        try:
            if TextScorer.is_checkpoint(str(scorer)):
                scorer = TextScorer.from_pretrained(str(scorer), device)
            else:
                scorer = ImageEncoder.from_pretrained(str(scorer), device)
        except (OSError, RuntimeError, KeyError, TypeError) as e:  # a CheckpointError passes as it is
            raise ckpt.CheckpointError(f"scorer: {e}") from None
    if not isinstance(scorer, (ImageEncoder, TextScorer)):
        raise TypeError(f"scorer must be a folder, an ImageEncoder or a TextScorer, got {type(scorer).__name__}")
    if scorer.text_tokenizer is None:
        raise ValueError(f"scorer {source}: its CLIP has no text tokenizer (tokenizer.json beside its weights), "
                         "so it cannot read captions")
    if isinstance(scorer, TextScorer):
        own = cap.image_encoder.image_tower_fingerprint()
        if scorer.config.image_tower != own:
            raise ValueError(f"scorer {source}: this text scorer was trained against the image tower "
                             f"{scorer.config.image_tower or '(not recorded)'}, and this captioner's CLIP has "
                             f"{own}; its scores would compare captions with image features of another space")
        if scorer.feature_dim != cap.image_encoder.feature_dim:
            raise ValueError(f"scorer {source}: embeds captions in {scorer.feature_dim} dimensions, the "
                             f"image features have {cap.image_encoder.feature_dim}")
        return scorer.to(device)
    own = cap.image_encoder.model.visual.state_dict()
    theirs = scorer.model.visual.state_dict()
    differ = sorted(k for k in own.keys() | theirs.keys()
                    if k not in own or k not in theirs or own[k].shape != theirs[k].shape
                    or not torch.equal(own[k].cpu(), theirs[k].cpu()))
    if differ:
        raise ValueError(f"scorer {source}: its image tower differs from this captioner's CLIP in {len(differ)} "
                         f"tensors (first: {differ[0]}); a scorer must share the image tower, since the "
                         "captioner's image features are what it scores captions against")
    return scorer.to(device)


def compiled(scorer, **options):
    """A compiled copy of a ``TextScorer`` (a copy, so that a captioner this one was copied from stays
    eager; dynamic shapes, since the candidates' count and length change from batch to batch); a CLIP as it is."""
    if isinstance(scorer, TextScorer):
        return copy.copy(scorer).compile(**{k: v for k, v in options.items() if k != "dynamic"})
    return scorer


def choose_among_draws(cap, features: torch.Tensor, groups: list[list[str]], select: str) -> list[int]:
    """For each image, which of its K sampled captions to keep: by the scorer (``clip``) or by MBR."""
    if select == "clip":
        scorer = cap.scorer
        return clip_select(scorer, features.to(scorer.device), list(groups))
    return [mbr_select(texts) for texts in groups]


def choose_rounding(cap, batch: list[DenoisingStep | None], which: list[int], features: torch.Tensor,
                    k: int) -> None:
    """Replace the last steps ``batch[b]`` (b in ``which``) by the scorer's best of their ``k`` likeliest
    roundings, each step listing its distinct candidates and their scores (an image with a single
    distinct candidate keeps it unscored: there is nothing to choose)."""
    steps = [batch[b] for b in which]
    proposals = roundings(cap, steps, k)
    many = [i for i, p in enumerate(proposals) if len(p[0]) > 1]
    scores: dict[int, list[float]] = {}
    if many:
        scorer = cap.scorer
        ids = scorer_ids(cap, [proposals[i][1] for i in many])
        feats = features[torch.tensor([which[i] for i in many], device=features.device)]
        for i, sc in zip(many, clip_scores(scorer, feats.to(scorer.device), [proposals[i][0] for i in many], ids)):
            scores[i] = [round(float(v), 6) for v in sc]
    for i, (b, st) in enumerate(zip(which, steps)):
        texts, rounds, top2 = proposals[i]
        sc = scores.get(i)
        j = 0 if sc is None else max(range(len(sc)), key=lambda q: (sc[q], -q))
        batch[b] = dataclasses.replace(rounded_step(cap, st, rounds[j], texts[j], top2),
                                       candidates=list(texts), scores=sc, chosen=j)


def roundings(cap, steps: list[DenoisingStep], k: int) -> list[tuple[list[str], list[list[int]], tuple]]:
    """For each step, the distinct captions among the ``k`` likeliest roundings of its ``x0_pred``
    (positions up to its caption's [SEP] may move), their token ids, best first, and the step's top-2
    rounding (log probabilities, ids) per position, from which a rounding's confidences are read. The
    rounding log probabilities of the whole batch come from one matrix product; two roundings whose words
    (the ids before [SEP], specials dropped) agree are one caption, so each distinct one is decoded once."""
    if not steps:
        return []
    E = cap.denoiser.embeddings.detach().cpu()
    top = top2_log_probs(torch.stack([st.x0_pred for st in steps]).cpu(), E)
    values, indices = top.values.tolist(), top.indices.tolist()
    tok = cap.tokenizer
    sep = tok.sep_id
    kept = []  # per step, its roundings with distinct words
    for b, st in enumerate(steps):
        ids = st.token_ids
        n = ids.index(sep) + 1 if sep in ids else len(ids)
        seen, mine = set(), []
        for alt, _ in k_best_roundings(values[b], indices[b], k, positions=n, max_delta=ROUNDING_MAX_DELTA):
            key = tuple(tok.words(alt))
            if key not in seen:
                seen.add(key)
                mine.append(alt)
        kept.append(mine)
    texts = iter(tok.decode_batch([r for mine in kept for r in mine]))  # one call for the batch
    out = []
    for b, mine in enumerate(kept):
        first = {}
        for j, text in enumerate([next(texts) for _ in mine]):
            first.setdefault(text, j)
        out.append((list(first), [mine[j] for j in first.values()], (values[b], indices[b])))
    return out


def scorer_ids(cap, rounds: list[list[list[int]]]) -> list[torch.Tensor] | None:
    """The candidate roundings in the scorer's token ids, when its tokenizer shares the captioner's
    vocabulary and the ids say exactly what tokenising the decoded captions would (``encode_ids``);
    otherwise None, and the captions are tokenised as text."""
    scorer = cap.scorer
    tok = scorer.text_tokenizer
    if cap._shared_vocab[0] is not tok:  # asked once per scorer
        cap._shared_vocab = (tok, cap.tokenizer.same_vocabulary(tok))
    if not cap._shared_vocab[1]:
        return None
    if not rounds:
        return []
    ids = tok.encode_ids([cap.tokenizer.words(r) for group in rounds for r in group],
                         int(scorer.context_length))  # one tensor for the batch
    return None if ids is None else list(ids.split([len(group) for group in rounds]))


def rounded_step(cap, step: DenoisingStep, ids: list[int], text: str, top2: tuple) -> DenoisingStep:
    """``step`` with its tokens replaced by the rounding ``ids`` and each one's rounding probability,
    read from ``top2`` (the step's per-position top-2 log probabilities and ids: a rounding takes each
    position's first or second token)."""
    if list(ids) == list(step.token_ids):
        return step
    values, indices = top2
    conf = [math.exp(v[0] if i == first[0] else v[1]) for i, v, first in zip(ids, values, indices)]
    return dataclasses.replace(step, token_ids=list(ids), tokens=cap.tokenizer.token_strings(ids),
                               confidence=[round(c, 6) for c in conf], text=text)
