"""The convolutional text scorer: padding-exact, saved and loaded through safetensors and JSON, used by a
captioner to rank its candidates, refused for another image tower, and trained by its command."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from diffusion_caption import checkpoint as ckpt
from diffusion_caption.selection.text_scorer import ConvTextEncoder, TextScorer, TextScorerConfig

CAPTIONS = ["a red circle", "a blue star and a red square on a pink background", "two green triangles"]


def make_scorer(tokenizer, clip_encoder, **kw) -> TextScorer:
    torch.manual_seed(0)
    cfg = TextScorerConfig(vocab_size=tokenizer.vocab_size, context_length=24, pad_id=tokenizer.pad_id,
                           embed_dim=clip_encoder.feature_dim, width=32, layers=2,
                           image_tower=clip_encoder.image_tower_fingerprint(), **kw)
    return TextScorer(ConvTextEncoder(cfg), tokenizer)


def test_padding_changes_nothing_and_a_row_does_not_depend_on_its_batch(tokenizer, clip_encoder):
    s = make_scorer(tokenizer, clip_encoder)
    ids = tokenizer.encode(CAPTIONS, 24)
    whole = s.encode_text_ids(ids)
    assert whole.shape == (3, clip_encoder.feature_dim)
    longest = int((ids != tokenizer.pad_id).sum(1).max())
    assert torch.allclose(s.encode_text_ids(ids[:, :longest]), whole, atol=1e-6)
    for i in range(3):  # alone, its own padding is trimmed further: the same embedding
        assert torch.allclose(s.encode_text_ids(ids[i:i + 1]), whole[i:i + 1], atol=1e-5)
    assert not torch.allclose(whole[0], whole[1])
    text = s.encode_text(CAPTIONS)
    assert torch.allclose(text, torch.nn.functional.normalize(whole, dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="expected token ids"):
        s.encode_text_ids(torch.zeros(2, 25, dtype=torch.long))


def test_without_positions_the_first_block_is_lookups_equal_to_its_convolution(tokenizer, clip_encoder):
    s = make_scorer(tokenizer, clip_encoder, positional=False, kernel=5)
    assert s.model.positional_embedding is None
    ids = tokenizer.encode(CAPTIONS, 24)
    keep = ids != tokenizer.pad_id
    n = int(keep.sum(1).max())
    ids, mask = ids[:, :n], keep[:, :n].unsqueeze(-1).float()
    with torch.no_grad():
        x = s.model.token_embedding(ids) * mask
        by_conv = s.model.blocks[0](x, mask)  # the block as written: LayerNorm, convolution, GELU, linear
        by_lookup = x + s.model.first_block_by_lookup(ids) * mask
    assert torch.allclose(by_lookup, by_conv, atol=1e-5)
    # and the whole encoder is the blocks applied in turn, then the pooled projection
    for block in s.model.blocks[1:]:
        by_conv = block(by_conv, mask)
    h = s.model.norm(by_conv)
    pooled = torch.cat([(h * mask).sum(1) / mask.sum(1), h.masked_fill(mask == 0, float("-inf")).amax(1)], -1)
    assert torch.allclose(s.encode_text_ids(ids), s.model.projection(pooled), atol=1e-5)


def test_binding_is_visible_to_the_scorer(tokenizer, clip_encoder):
    """Swapped colours are the same bag of words; the convolution windows tell them apart."""
    s = make_scorer(tokenizer, clip_encoder)
    a, b = s.encode_text(["a red star and a blue square", "a blue star and a red square"])
    assert not torch.allclose(a, b, atol=1e-4)


def test_save_and_load_round_trip(tmp_path, tokenizer, clip_encoder):
    s = make_scorer(tokenizer, clip_encoder, kernel=5)
    s.save_pretrained(str(tmp_path / "s"))
    assert sorted(os.listdir(tmp_path / "s")) >= ["text_scorer.json", "text_scorer.safetensors", "tokenizer.json"]
    back = TextScorer.from_pretrained(str(tmp_path / "s"))
    assert back.config == s.config
    assert torch.equal(back.encode_text(CAPTIONS), s.encode_text(CAPTIONS))
    assert TextScorer.is_checkpoint(str(tmp_path / "s")) and not TextScorer.is_checkpoint(str(tmp_path))


def test_damaged_checkpoints_are_named(tmp_path, tokenizer, clip_encoder):
    d = tmp_path / "s"
    make_scorer(tokenizer, clip_encoder).save_pretrained(str(d))
    cfg = json.loads((d / "text_scorer.json").read_text())
    (d / "text_scorer.json").write_text(json.dumps(dict(cfg, width=64)))
    with pytest.raises(ckpt.CheckpointError, match="text_scorer"):
        TextScorer.from_pretrained(str(d))
    (d / "text_scorer.json").write_text(json.dumps(dict(cfg, colour="red")))
    with pytest.raises(ckpt.CheckpointError, match="unknown fields"):
        TextScorer.from_pretrained(str(d))
    (d / "text_scorer.json").write_text(json.dumps(cfg))
    (d / "text_scorer.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ckpt.CheckpointError):
        TextScorer.from_pretrained(str(d))
    os.remove(d / "text_scorer.safetensors")
    with pytest.raises(FileNotFoundError, match="text_scorer.safetensors"):
        TextScorer.from_pretrained(str(d))


def test_a_captioner_ranks_its_roundings_with_a_text_scorer(tmp_path, make_captioner, tokenizer, clip_encoder,
                                                             scene_image):
    s = make_scorer(tokenizer, clip_encoder)
    s.save_pretrained(str(tmp_path / "s"))
    cap = make_captioner().use_scorer(str(tmp_path / "s"))
    assert isinstance(cap.scorer, TextScorer)
    feats = cap.encode_images([scene_image, scene_image])
    traces = cap.caption_batch(features=feats, steps=2, sampler="ddim", guidance=1.0, seed=0, record="final",
                               candidates=8, select="clip", propose="rounding")
    several = [t for t in traces if len(t.candidates) > 1]
    assert several, "the random captioner should leave several roundings to rank"
    for b, t in enumerate(traces):
        sims = cap.scorer.encode_text(t.candidates) @ feats[b].float()
        assert t.chosen == int(sims.argmax()), (t.candidates, sims)
        assert t.text == t.candidates[t.chosen]
    cap.use_scorer(None)
    assert cap.scorer is cap.image_encoder


def test_compiling_the_captioner_compiles_a_copy_of_its_text_scorer(make_captioner, tokenizer, clip_encoder,
                                                                       scene_image):
    import copy

    cap = make_captioner().use_scorer(make_scorer(tokenizer, clip_encoder))
    fast = copy.copy(cap).compile(backend="eager")  # the wiring, without minutes of code generation
    assert fast.scorer is not cap.scorer and fast.scorer.model is cap.scorer.model
    assert cap.scorer._net is cap.scorer.model and fast.scorer._net is not fast.scorer.model
    windows = make_scorer(tokenizer, clip_encoder, positional=False).compile(backend="eager")
    assert windows._net is windows.model  # the distinct-window path stays eager (it measured faster)
    kw = dict(steps=2, sampler="ddim", guidance=1.0, seed=0, record="final", candidates=8, select="clip",
              propose="rounding")
    a, b = cap.caption_batch([scene_image], **kw)[0], fast.caption_batch([scene_image], **kw)[0]
    assert (a.candidates, a.chosen, a.text) == (b.candidates, b.chosen, b.text)


def test_a_text_scorer_of_another_image_tower_is_refused(tmp_path, make_captioner, tokenizer, clip_encoder):
    s = make_scorer(tokenizer, clip_encoder)
    s.model.cfg.image_tower = "0123456789abcdef"
    with pytest.raises(ValueError, match="trained against the image tower 0123456789abcdef"):
        make_captioner().use_scorer(s)
    with pytest.raises(ckpt.CheckpointError, match="scorer: .*text_scorer.safetensors"):
        d = tmp_path / "half"
        make_scorer(tokenizer, clip_encoder).save_pretrained(str(d))
        os.remove(d / "text_scorer.safetensors")
        make_captioner().use_scorer(str(d))


def _train(args: list[str]) -> None:
    from research import train_text_scorer

    train_text_scorer.main(args)


def test_training_learns_resumes_exactly_and_the_result_serves_the_captioner(tmp_path, world_dir, make_captioner,
                                                                               tokenizer, clip_encoder):
    clip = str(tmp_path / "clip")
    clip_encoder.save_pretrained(clip)
    tokenizer.save_pretrained(clip)
    cap = make_captioner()
    cap.save_pretrained(str(tmp_path / "cap"))
    common = ["--teacher", clip, "--candidates-from", str(tmp_path / "cap"), "--candidate-setting",
              "ddim:2:1:k6:clip:rounding", "--candidate-seeds", "1", "--candidate-batch", "4", "--data-dir", world_dir,
              "--cache-dir", str(tmp_path / "cache"), "--batch-size", "8", "--negatives", "2", "--width", "16",
              "--val-every", "2", "--ckpt-every", "1", "--warmup", "1", "--device", "cpu"]
    _train(common + ["--steps", "4", "--out", str(tmp_path / "a"), "--run-dir", str(tmp_path / "run-a")])
    _train(common + ["--steps", "2", "--out", str(tmp_path / "b0"), "--run-dir", str(tmp_path / "run-b")])
    _train(common + ["--steps", "4", "--out", str(tmp_path / "b"), "--run-dir", str(tmp_path / "run-b"),
                     "--resume", "true"])
    a = load_file(str(tmp_path / "a" / "text_scorer.safetensors"))
    b = load_file(str(tmp_path / "b" / "text_scorer.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(str(tmp_path / "b0" / "text_scorer.safetensors"))
    assert any(not torch.equal(a[k], first[k]) for k in a)  # the last two steps changed it

    log = [json.loads(line) for line in (tmp_path / "run-a" / "log.jsonl").read_text().splitlines()]
    assert "teacher" in log[0] and "val_swap" in log[0]
    assert [r["step"] for r in log[1:]] == [0, 2, 4]
    assert {"labels", "distill", "candidates", "val_swap", "val_teacher_agreement"} <= set(log[-1])
    scorer = TextScorer.from_pretrained(str(tmp_path / "a"))
    assert scorer.config.image_tower == clip_encoder.image_tower_fingerprint() and scorer.config.width == 16
    assert isinstance(make_captioner().use_scorer(str(tmp_path / "a")).scorer, TextScorer)

    with pytest.raises(SystemExit, match="K >= 2"):
        _train(common[:5] + ["ddim:1:1", "--data-dir", world_dir, "--out", str(tmp_path / "c"),
                             "--run-dir", str(tmp_path / "run-c"), "--device", "cpu"])


def _by_convolution(model, ids):
    """The encoder without positions as first written: every position of the padded batch through the
    blocks' padded convolutions, then pooled; what ``forward_by_windows`` must equal."""
    keep = ids != model.cfg.pad_id
    mask = keep.unsqueeze(-1).float()
    x = model.token_embedding(ids) * mask
    for block in model.blocks:
        x = block(x, mask)
    h = model.norm(x)
    pooled = torch.cat([(h * mask).sum(1) / mask.sum(1).clamp(min=1), h.masked_fill(mask == 0, float("-inf")).amax(1)], -1)
    return model.projection(pooled)


@pytest.mark.parametrize("layers,kernel", [(2, 3), (3, 3), (1, 5)])
def test_distinct_windows_give_the_convolutions_output_and_gradients(tokenizer, clip_encoder, layers, kernel):
    s = make_scorer(tokenizer, clip_encoder, positional=False, kernel=kernel)
    if layers != 2:
        s = TextScorer(ConvTextEncoder(TextScorerConfig(**{**s.config.__dict__, "layers": layers})), tokenizer)
    # candidate roundings of one caption: most windows repeat, as they do at test time
    texts = CAPTIONS + ["a blue star and a red square on a green background", "a blue star and a red circle on a pink background",
                        "a blue star and a blue square on a pink background"]
    ids = tokenizer.encode(texts, 24)
    model = s.model.train()
    R = layers * (kernel // 2)
    windows = torch.nn.functional.pad(ids, (R, R), value=tokenizer.pad_id).unfold(1, 2 * R + 1, 1)[ids != tokenizer.pad_id]
    assert len(torch.unique(windows, dim=0)) < len(windows)  # the saving is real here
    a = model(ids)
    b = _by_convolution(model, ids)
    assert torch.allclose(a, b, atol=1e-5)
    blank = model(torch.full((2, 6), tokenizer.pad_id))  # captions of [PAD] alone: no windows, pooled zeros
    assert torch.equal(blank, torch.zeros_like(blank))
    ga = torch.autograd.grad(a.square().sum(), list(model.parameters()), allow_unused=True)
    gb = torch.autograd.grad(_by_convolution(model, ids).square().sum(), list(model.parameters()), allow_unused=True)
    for (name, _), x, y in zip(model.named_parameters(), ga, gb):
        if y is not None:
            assert x is not None, name
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-4 * float(y.abs().max())), name


def test_unique_rows_by_keys_and_by_rows_agree():
    from diffusion_caption.selection.text_scorer import unique_rows

    rows = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 2, 3], [0, 0, 7], [4, 5, 6]])
    for vocab in (8, 10 ** 7):  # keys fit an int64 / they do not: torch.unique over rows
        distinct, where = unique_rows(rows, vocab)
        assert len(distinct) == 3 and torch.equal(distinct[where], rows)
