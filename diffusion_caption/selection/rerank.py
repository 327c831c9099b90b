"""Choosing among candidate captions by CLIP score: the image encoder's own image-text similarity.

A one- or two-step diffusion captioner denoises K noise draws of an image in one batch. MBR
(``diffusion_caption.selection.mbr``) keeps the caption the draws agree on; when they agree on a mistake, as
parallel decoders do when two positions each pick the likelier of two words ("a purple square and a red
square" for a purple star and a red square), consensus keeps it. Ranking by CLIP score instead keeps
the candidate whose text embedding lies nearest the image feature (cosine similarity; Hessel et al.'s
CLIPScore without its weight and clipping, which do not change the order). It needs the CLIP's text
tower and tokenizer, costs one text-tower pass per candidate, and is only as good as the CLIP at
telling the candidates apart: a CLIP that reads a caption as a bag of words cannot rank a swapped pair.
The scorer may also be a ``text_scorer.TextScorer``: a small convolutional text encoder trained against
the same image tower, which asks for the same calls at a fraction of a text tower's cost.
"""
from __future__ import annotations

import torch

from ..image_encoder import ImageEncoder
from .text_scorer import TextScorer


def clip_scores(encoder: "ImageEncoder | TextScorer", features: torch.Tensor, candidates: list[list[str]],
                token_ids: list[torch.Tensor] | None = None) -> list[list[float]]:
    """Cosine similarity of each image's candidates to its feature: ``features`` [B, D] (as ``encode``
    returns them), ``candidates`` B lists of captions (any lengths). ``token_ids``, when given, are the
    candidates already in the CLIP's token ids (one [K_b, context] tensor per image, as its tokenizer
    would encode them), which spares tokenising the text again."""
    if features.shape[0] != len(candidates):
        raise ValueError(f"got {features.shape[0]} image features for {len(candidates)} candidate lists")
    flat = [c for group in candidates for c in group]
    if token_ids is not None:
        if [t.shape[0] for t in token_ids] != [len(group) for group in candidates]:
            raise ValueError("token_ids must hold one row per candidate caption")
        ids = torch.cat(token_ids).to(encoder.device)
        text = torch.nn.functional.normalize(encoder.encode_text_ids(ids).float(), dim=-1).to(features.device)
    else:
        text = encoder.encode_text(flat).to(features.device)
    image = torch.nn.functional.normalize(features.float(), dim=-1)
    owner = torch.tensor([b for b, group in enumerate(candidates) for _ in group], device=features.device,
                         dtype=torch.long)
    sims = (text * image[owner]).sum(-1).tolist()
    out, i = [], 0
    for group in candidates:
        out.append(sims[i:i + len(group)])
        i += len(group)
    return out


def clip_select(encoder: "ImageEncoder | TextScorer", features: torch.Tensor, candidates: list[list[str]],
                token_ids: list[torch.Tensor] | None = None) -> list[int]:
    """For each image the index of its candidate with the highest CLIP score (the first of equals);
    ``token_ids`` as in ``clip_scores``."""
    if features.shape[0] != len(candidates):
        raise ValueError(f"got {features.shape[0]} image features for {len(candidates)} candidate lists")
    if any(not group for group in candidates):
        raise ValueError("CLIP selection needs at least one candidate caption per image")
    # an image with one candidate keeps it: only the others cost text-tower passes
    many = [b for b, group in enumerate(candidates) if len(group) > 1]
    chosen = [0] * len(candidates)
    if many:
        scores = clip_scores(encoder, features[many], [candidates[b] for b in many],
                             None if token_ids is None else [token_ids[b] for b in many])
        for b, s in zip(many, scores):
            chosen[b] = max(range(len(s)), key=lambda j: (s[j], -j))
    return chosen
