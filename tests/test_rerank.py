"""Choosing candidates by CLIP score: the scores are the CLIP's cosine similarities, the captioner keeps
the best-scoring sample, and a CLIP without its text tokenizer is refused with a reason."""
import os

import pytest
import torch

from diffusion_caption.image_encoder import ImageEncoder
from diffusion_caption.sampling import SamplingConfig
from diffusion_caption.selection import candidates
from diffusion_caption.selection.rerank import clip_scores, clip_select


@pytest.fixture
def clip_with_text(clip_encoder, tokenizer):
    enc = ImageEncoder(clip_encoder.model, clip_encoder.preprocess, clip_encoder.source, text_tokenizer=tokenizer)
    return enc


def test_scores_are_cosine_similarities_of_the_clip_embeddings(clip_with_text, scene_image, tokenizer):
    feats = clip_with_text.encode([scene_image, scene_image])
    groups = [["a red circle", "a blue star on a black background"], ["two green squares"]]
    scores = clip_scores(clip_with_text, feats, groups)
    assert [len(s) for s in scores] == [2, 1]
    # by hand: the text tower on the CLIP tokenizer's ids, normalised, dotted with the image feature
    ids = tokenizer.encode(["a blue star on a black background"], int(clip_with_text.model.context_length))
    with torch.no_grad():
        t = torch.nn.functional.normalize(clip_with_text.model.encode_text(ids).float(), dim=-1)[0]
    assert scores[0][1] == pytest.approx(float(t @ feats[0]), abs=1e-5)
    assert all(-1.0 <= v <= 1.0 for s in scores for v in s)
    # the best of each group, the first of equals
    best = clip_select(clip_with_text, feats, groups)
    assert best == [max(range(2), key=lambda j: scores[0][j]), 0]
    assert clip_select(clip_with_text, feats[:1], [["a red circle"] * 3]) == [0]
    with pytest.raises(ValueError, match="at least one candidate"):
        clip_select(clip_with_text, feats[:1], [[]])
    with pytest.raises(ValueError, match="2 image features for 1"):
        clip_scores(clip_with_text, feats, groups[:1])


def test_the_text_tokenizer_travels_with_the_clip_folder(clip_with_text, clip_encoder, tmp_path):
    path = str(tmp_path / "clip")
    clip_with_text.save_pretrained(path)
    assert os.path.isfile(os.path.join(path, "tokenizer.json"))
    again = ImageEncoder.from_pretrained(path)
    texts = ["a red circle", "a small white star on a pink background"]
    assert torch.allclose(again.encode_text(texts), clip_with_text.encode_text(texts), atol=1e-6)
    bare = str(tmp_path / "bare")
    clip_encoder.save_pretrained(bare)  # a CLIP saved without a tokenizer cannot score text
    with pytest.raises(ValueError, match="no text tokenizer"):
        ImageEncoder.from_pretrained(bare).encode_text(texts)


def test_captioner_keeps_the_candidate_with_the_best_clip_score(make_captioner, clip_with_text, scene_image):
    cap = make_captioner(sampling=dict(steps=2))
    with pytest.raises(ValueError, match="no text tokenizer"):  # the fixture's CLIP was built without one
        cap.caption(scene_image, candidates=4, select="clip")
    cap.image_encoder = clip_with_text
    tr = cap.caption(scene_image, candidates=6, seed=3, sampler="ddpm", select="clip")
    assert tr.settings["select"] == "clip" and len(tr.candidates) == 6
    feats = cap.encode_images([scene_image])
    scores = clip_scores(clip_with_text, feats, [tr.candidates])[0]
    assert tr.text == tr.candidates[tr.chosen] and scores[tr.chosen] == max(scores)
    # the same samples as MBR draws: only the rule differs
    mbr = cap.caption(scene_image, candidates=6, seed=3, sampler="ddpm", select="mbr")
    assert mbr.candidates == tr.candidates and mbr.settings["select"] == "mbr"
    with pytest.raises(ValueError, match="select must be one of"):
        cap.caption(scene_image, candidates=2, select="longest")
    cap.sampling = cap.sampling.replace(select="clip")  # a checkpoint's default, used when a call does not say
    assert cap.caption(scene_image, candidates=6, seed=3, sampler="ddpm").chosen == tr.chosen


def test_rounding_proposals_are_one_draws_likeliest_roundings_kept_by_clip(make_captioner, clip_with_text,
                                                                            scene_image):
    from diffusion_caption.rounding import likeliest_roundings, token_logits

    cap = make_captioner(sampling=dict(steps=2))
    cap.image_encoder = clip_with_text
    plain = cap.caption(scene_image, seed=3)
    tr = cap.caption(scene_image, candidates=8, seed=3, select="clip", propose="rounding")
    assert tr.settings["propose"] == "rounding" and 1 < len(tr.candidates) <= 8
    assert len(set(tr.candidates)) == len(tr.candidates) and tr.candidates[0] == plain.text
    # the one draw's steps, its last x0 unchanged; only the rounding of the last step is the chosen one
    assert len(tr.steps) == len(plain.steps)
    assert all(torch.equal(a.x0_pred, b.x0_pred) and a.text == b.text for a, b in zip(tr.steps[:-1], plain.steps[:-1]))
    assert torch.equal(tr.final.x0_pred, plain.final.x0_pred)
    scores = clip_scores(clip_with_text, cap.encode_images([scene_image]), [tr.candidates])[0]
    assert tr.text == tr.candidates[tr.chosen] and scores[tr.chosen] == max(scores)
    assert cap.tokenizer.decode(tr.final.token_ids) == tr.text
    E = cap.denoiser.embeddings.detach()
    probs = token_logits(tr.final.x0_pred, E).softmax(-1)
    top2 = probs.topk(2, -1).indices
    assert all(i in top2[q].tolist() for q, i in enumerate(tr.final.token_ids))  # nearest or second-nearest
    assert tr.final.confidence == pytest.approx(probs.gather(-1, torch.tensor(tr.final.token_ids)[:, None])[:, 0].tolist(),
                                                abs=1e-5)
    # the candidates are those roundings' distinct captions, in order
    texts = []
    for ids, _ in likeliest_roundings(plain.final.x0_pred, E, 8, positions=plain.final.token_ids.index(cap.tokenizer.sep_id) + 1
                                      if cap.tokenizer.sep_id in plain.final.token_ids else None, max_delta=3.0):
        if cap.tokenizer.decode(ids) not in texts:
            texts.append(cap.tokenizer.decode(ids))
    assert tr.candidates == texts
    # the scorer shares the captioner's vocabulary, so roundings of whole words are scored from their ids, exactly
    # as their re-tokenised text would be; with a continuation piece among them the text is tokenised instead
    texts = ["a red circle on a gray background", "two green squares and a blue star"]
    rows = [r + [cap.tokenizer.pad_id] * 3 for r in cap.tokenizer.encode(texts, 16).tolist()]
    ids = candidates.scorer_ids(cap, [rows])
    assert ids is not None and torch.equal(ids[0], clip_with_text.text_tokenizer.encode(texts, 24))
    pieces = [i for t, i in cap.tokenizer.hf.get_vocab().items() if t.startswith("##")]
    if pieces:
        assert candidates.scorer_ids(cap, [[rows[0][:3] + pieces[:1] + rows[0][3:]]]) is None
    route = candidates.scorer_ids
    candidates.scorer_ids = lambda cap, roundings: None  # always the text
    try:
        assert cap.caption(scene_image, candidates=8, seed=3, select="clip", propose="rounding").chosen == tr.chosen
    finally:
        candidates.scorer_ids = route
    # batched, each image its own: the same as one at a time
    two = cap.caption_batch([scene_image, scene_image], candidates=8, seed=3, select="clip", propose="rounding")
    assert two[0].candidates == tr.candidates and two[0].text == tr.text
    # the last step lists the candidates with their scores; streamed, the steps are the same
    assert tr.final.candidates == tr.candidates and tr.final.chosen == tr.chosen
    assert tr.scores == pytest.approx(scores, abs=1e-5) and tr.to_json()["steps"][-1]["scores"] == tr.scores
    streamed = list(cap.iter_caption(scene_image, candidates=8, seed=3, select="clip", propose="rounding"))
    assert [st.text for st in streamed] == [st.text for st in tr.steps] and streamed[-1].scores == tr.scores
    fast = cap.caption(scene_image, candidates=8, seed=3, select="clip", propose="rounding", record="final")
    assert len(fast.steps) == 1 and fast.text == tr.text and fast.candidates == tr.candidates
    with pytest.raises(ValueError, match="cannot stream"):  # K noise draws: only finished captions are compared
        next(cap.iter_caption(scene_image, candidates=8, select="clip", propose="noise"))
    with pytest.raises(ValueError, match="select='clip'"):  # consensus among one draw's roundings is the draw
        cap.caption(scene_image, candidates=8, propose="rounding", select="mbr")
    with pytest.raises(ValueError, match="propose must be one of"):
        cap.caption(scene_image, candidates=8, select="clip", propose="beam")


def test_config_rejects_an_unknown_selection():
    with pytest.raises(ValueError, match="select must be one of"):
        SamplingConfig(select="random")
    with pytest.raises(ValueError, match="propose must be one of"):
        SamplingConfig(propose="beam")


def test_the_text_pass_stops_at_the_batchs_longest_caption_and_agrees_with_open_clip(clip_with_text, tokenizer):
    import open_clip

    texts = ["a red circle", "a small white star and a blue square on a pink background", "a"]
    ids = tokenizer.encode(texts, int(clip_with_text.model.context_length))
    with torch.no_grad():
        full = clip_with_text.model.encode_text(ids)  # every position of the context
    assert clip_with_text.model.text_pool_type == "eos"
    assert torch.allclose(clip_with_text.encode_text_ids(ids), full, atol=1e-5)
    # OpenAI-style pooling at the highest token id (open_clip's default), with its own tokenizer's ids
    torch.manual_seed(0)
    m = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                       text_cfg={"context_length": 20, "vocab_size": 50, "width": 32, "heads": 2, "layers": 2}).eval()
    assert m.text_pool_type == "argmax"
    argmax_ids = torch.zeros(3, 20, dtype=torch.long)
    for row, n in enumerate((4, 9, 2)):
        argmax_ids[row, :n] = torch.randint(1, 40, (n,))
        argmax_ids[row, n] = 49  # the end-of-text token, the largest id
    enc = ImageEncoder(m, None, {"kind": "test"})
    with torch.no_grad():
        assert torch.allclose(enc.encode_text_ids(argmax_ids), m.encode_text(argmax_ids), atol=1e-5)
    # a tower whose pooling reads every position is run whole
    m.text_pool_type = "last"
    with torch.no_grad():
        assert torch.allclose(enc.encode_text_ids(argmax_ids), m.encode_text(argmax_ids), atol=1e-6)


def test_an_image_with_one_candidate_costs_no_text_pass(clip_with_text, scene_image):
    feats = clip_with_text.encode([scene_image] * 3)
    groups = [["a red circle"], ["a blue star", "a red star", "a blue square"], ["two green squares"]]
    seen = []
    real = clip_with_text.encode_text

    def recording(texts, *a, **kw):
        seen.extend(texts)
        return real(texts, *a, **kw)

    clip_with_text.encode_text = recording
    try:
        chosen = clip_select(clip_with_text, feats, groups)
    finally:
        del clip_with_text.encode_text
    assert seen == groups[1]
    scores = clip_scores(clip_with_text, feats[1:2], groups[1:2])[0]
    assert chosen == [0, max(range(3), key=lambda j: (scores[j], -j)), 0]
    # the same from the captions' CLIP token ids
    ids = [clip_with_text.text_tokenizer.encode(g, int(clip_with_text.model.context_length)) for g in groups]
    assert clip_select(clip_with_text, feats, groups, ids) == chosen
    for a, b in zip(clip_scores(clip_with_text, feats, groups, ids), clip_scores(clip_with_text, feats, groups)):
        assert a == pytest.approx(b, abs=1e-5)
    with pytest.raises(ValueError, match="one row per candidate"):
        clip_scores(clip_with_text, feats, groups, ids[1:] + ids[:1])


def _with_changed(clip, prefix: str) -> ImageEncoder:
    """A copy of ``clip`` whose tensors under ``prefix`` (e.g. "visual." or "transformer.") are perturbed."""
    import copy

    model = copy.deepcopy(clip.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefix):
                p.add_(0.05 * torch.randn_like(p))
    return ImageEncoder(model, clip.preprocess, clip.source, text_tokenizer=clip.text_tokenizer)


def test_a_scorer_with_the_same_image_tower_ranks_the_candidates(make_captioner, clip_with_text, clip_encoder,
                                                                   scene_image, tmp_path):
    cap = make_captioner(sampling=dict(steps=2))
    cap.image_encoder = clip_with_text
    assert cap.scorer is clip_with_text  # by default the captioner's own CLIP
    torch.manual_seed(1)
    tuned = _with_changed(clip_with_text, "transformer.")  # another text tower, the same image tower
    own = cap.caption(scene_image, candidates=8, seed=3, select="clip", propose="rounding")
    assert cap.use_scorer(tuned) is cap and cap.scorer is tuned
    tr = cap.caption(scene_image, candidates=8, seed=3, select="clip", propose="rounding")
    assert tr.candidates == own.candidates  # the same proposals; only the ranking is the scorer's
    scores = clip_scores(tuned, cap.encode_images([scene_image]), [tr.candidates])[0]
    assert tr.chosen == max(range(len(scores)), key=lambda j: (scores[j], -j))
    # from a folder, as the command line gives it
    path = str(tmp_path / "scorer")
    tuned.save_pretrained(path)
    cap.use_scorer(path)
    assert cap.caption(scene_image, candidates=8, seed=3, select="clip", propose="rounding").chosen == tr.chosen
    cap.use_scorer(None)
    assert cap.scorer is clip_with_text
    # refused: another image tower (its scores would be against features the captioner never made), no tokenizer
    with pytest.raises(ValueError, match="image tower differs"):
        cap.use_scorer(_with_changed(clip_with_text, "visual."))
    with pytest.raises(ValueError, match="no text tokenizer"):
        cap.use_scorer(clip_encoder)
    with pytest.raises(ValueError, match="not found|No such|does not exist"):
        cap.use_scorer(str(tmp_path / "missing"))
    assert cap.scorer is clip_with_text  # a refused scorer changes nothing
