"""Block diffusion: a block attends to the clean blocks before it and never after, training sees every
block's context at once, and sampling with cached keys and values gives exactly the vectorised pass."""
import pytest
import torch

from diffusion_caption.config import preset
from diffusion_caption.denoiser import Denoiser
from diffusion_caption.diffusion import GaussianDiffusion
from diffusion_caption.schedule import NoiseSchedule


def _inputs(cap, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    L, d = cap.config.seq_len, cap.config.emb_dim
    x_t = torch.randn(B, L, d, generator=g)
    ids = torch.randint(0, cap.config.vocab_size, (B, L), generator=g)
    cond = torch.randn(B, cap.config.cond_dim, generator=g)
    t = torch.full((B, L), cap.config.T - 1)
    return x_t, t, cap.denoiser.embeddings.detach()[ids], cond


def test_the_encoder_pass_is_distilberts_own_when_everything_may_attend(make_captioner):
    net = make_captioner(fusion="add").denoiser.eval()
    x_t, t, _, cond = _inputs(make_captioner(fusion="add"))
    h = net._inputs(x_t, t, net._conditioning(cond, None, x_t.shape[0], x_t.dtype))
    L = x_t.shape[1]
    with torch.no_grad():
        mine, _ = net._encode(h, torch.arange(L), torch.ones(L, L, dtype=torch.bool))
        theirs = net.encoder(inputs_embeds=h).last_hidden_state
    assert torch.allclose(mine, theirs, atol=1e-5)


def test_sampling_stacks_the_attention_projections_and_follows_their_changes(make_captioner):
    cap = make_captioner(fusion="add")
    net = cap.denoiser.eval()
    x_t, t, _, cond = _inputs(cap)
    h = net._inputs(x_t, t, net._conditioning(cond, None, x_t.shape[0], x_t.dtype))
    L = x_t.shape[1]
    for _ in range(2):
        with torch.no_grad():  # sampling: one stacked projection, made from the weights as they are now
            mine, _ = net._encode(h, torch.arange(L), torch.ones(L, L, dtype=torch.bool))
            theirs = net.encoder(inputs_embeds=h).last_hidden_state
            assert torch.allclose(mine, theirs, atol=1e-5)
            net.encoder.transformer.layer[0].attention.k_lin.weight.mul_(2.0)  # as a training step would


@pytest.mark.parametrize("b", [1, 3, 5])
def test_cached_block_steps_equal_the_vectorised_training_pass(make_captioner, b):
    cap = make_captioner(fusion="add", block_size=b)
    net = cap.denoiser.eval()
    x_t, t, x_clean, cond = _inputs(cap)
    L = x_t.shape[1]
    with torch.no_grad():
        whole, _ = net.forward_blocks(x_t, t, x_clean, cond)
        cache, parts, prev = None, [], None
        for s in [0] + list(range(1, L, b)):  # [CLS] alone, then blocks of b
            e = 1 if s == 0 else min(s + b, L)
            out, cache = net.block_step(x_t[:, s:e], t[:, s:e], s, cond, cache, None if s == 0 else x_clean[:, prev:s])
            parts.append(out)
            prev = s
    assert cache["kv"][0][0].shape[2] == L - (e - s)  # every block but the last is cached, once
    kept = net.keep_rows(cache, torch.tensor([True, False, True]))
    assert kept["kv"][-1][0].shape[0] == kept["c"].shape[0] == 2
    assert torch.allclose(torch.cat(parts, 1), whole, atol=1e-5)


def test_a_block_reads_the_clean_blocks_before_it_and_nothing_after(make_captioner):
    b = 3
    cap = make_captioner(fusion="add", block_size=b)
    net = cap.denoiser.eval()
    assert net.block_ids(8).tolist() == [0, 1, 1, 1, 2, 2, 2, 3]  # [CLS] alone, then blocks of 3
    x_t, t, x_clean, cond = _inputs(cap)
    one, two = slice(1, 1 + b), slice(1 + b, 1 + 2 * b)
    with torch.no_grad():
        base, _ = net.forward_blocks(x_t, t, x_clean, cond)
        later_clean = x_clean.clone()
        later_clean[:, 1:] += 1.0  # change the clean copy from block 1 on
        later_noise = x_t.clone()
        later_noise[:, two] += 1.0  # and the noise of block 2
        moved, _ = net.forward_blocks(later_noise, t, later_clean, cond)
        earlier = x_clean.clone()
        earlier[:, 0] += 1.0  # the clean [CLS]
        moved_by_earlier, _ = net.forward_blocks(x_t, t, earlier, cond)
    assert torch.allclose(base[:, one], moved[:, one], atol=1e-6)  # block 1 reads [CLS] and its own noise only
    assert not torch.allclose(base[:, two], moved[:, two])
    assert torch.allclose(base[:, :1], moved_by_earlier[:, :1], atol=1e-6)  # block 0 never reads clean tokens
    assert not torch.allclose(base[:, one], moved_by_earlier[:, one])  # block 1 reads the clean [CLS]


def test_a_block_denoiser_refuses_the_all_at_once_call_and_the_settings_it_cannot_have(make_captioner, scene_image):
    cap = make_captioner(fusion="add", block_size=3)
    x_t, t, _, cond = _inputs(cap)
    with pytest.raises(TypeError, match="block_step"):
        cap.denoiser(x_t, t, cond)
    for bad in (dict(fusion="concat"), dict(fusion="add", self_cond=True), dict(fusion="add", block_size=99)):
        with pytest.raises(ValueError, match="block"):
            preset("tiny", **{"block_size": 3, **bad})
    with pytest.raises(ValueError, match="guidance"):
        cap.caption(scene_image, sampler="block", steps=4, guidance=2)
    with pytest.raises(ValueError, match="'block' sampler only"):
        cap.caption(scene_image, sampler="ddim", steps=4)
    committing = make_captioner(fusion="add", block_size=3, sampling="block:6:1:commit0.9")
    with pytest.raises(ValueError, match="'block' sampler only"):  # not "commit is the block sampler's setting"
        committing.caption(scene_image, sampler="ddim", steps=4)
    with pytest.raises(ValueError, match="block_size > 0"):
        make_captioner(fusion="add").caption(scene_image, sampler="block", steps=4)


def test_trained_on_two_captions_it_writes_each_one_block_per_step_and_stops_at_its_end(make_captioner, tokenizer,
                                                                                         world_dir):
    torch.manual_seed(0)
    b = 2
    cap = make_captioner(fusion="add", block_size=b, sampling="block:6:1")
    texts = ["a red circle", "a blue square and a green star"]
    ids = tokenizer.encode(texts, cap.config.seq_len)
    cond = torch.randn(2, cap.config.cond_dim, generator=torch.Generator().manual_seed(3))
    diff = GaussianDiffusion(NoiseSchedule(cap.config.schedule, cap.config.T), cap.config.predict)
    net = cap.denoiser.train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = None
    for step in range(300):
        loss = diff.training_losses(net, ids.repeat(8, 1), cond.repeat(8, 1), lambda_round=1.0)["loss"]
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first / 5
    net.eval()
    traces = cap.caption_batch(features=cond)
    assert [tr.text for tr in traces] == texts
    sep = tokenizer.sep_id
    for tr, row in zip(traces, ids.tolist()):
        n_steps = (row.index(sep) - 1) // b + 1  # after the given [CLS], the step whose block holds [SEP] is the last
        assert len(tr.steps) == n_steps
        for i, step in enumerate(tr.steps):  # step i has written [CLS] and the caption's next (i + 1) blocks
            written = 1 + (i + 1) * b
            assert step.token_ids[:written] == row[:written]
            assert all(v == tokenizer.pad_id for v in step.token_ids[written:])
            assert step.t == cap.config.T - 1
        k = 1 + (n_steps - 1) * b  # the last step read the blocks before it as their tokens' clean embeddings
        assert torch.allclose(tr.steps[-1].x_t[:k], cap.denoiser.embeddings.detach()[torch.tensor(row[:k])])
    assert cap.caption_batch(features=cond, record="final")[1].text == texts[1]
    # the per-step report holds a caption that ended early at its last step, and says how many still run
    from diffusion_caption.data import load_datasets
    from diffusion_caption.eval.step_report import step_report

    records = load_datasets("shapes", world_dir, splits=["test"])[:2]
    rows = step_report(cap, records, {"seed": 0}, features=cond)
    lengths = [len(tr.steps) for tr in traces]
    assert len(rows) == max(lengths)
    assert [r["running"] for r in rows] == [sum(n > k for n in lengths) / 2 for k in range(max(lengths))]
    assert rows[-1]["changed"] == pytest.approx(b / 2)  # the longer caption's last block; the other holds still


def test_random_block_boundaries_cut_the_fixed_blocks_and_never_straddle_two(make_captioner):
    b = 3
    net = make_captioner(fusion="add", block_size=b).denoiser
    L = 40
    ids = net.random_block_ids(64, L, 0.4, torch.Generator().manual_seed(0))
    fixed = net.block_ids(L).tolist()
    assert torch.equal(net.random_block_ids(5, L, 0.0), net.block_ids(L).expand(5, L))  # no cuts: the fixed blocks
    sizes = set()
    for row in ids.tolist():
        assert row[:2] == [0, 1]  # [CLS] alone, then block 1
        assert all(0 <= q - p <= 1 for p, q in zip(row, row[1:]))  # consecutive blocks
        for k in set(row):
            assert len({fixed[j] for j in range(L) if row[j] == k}) == 1  # inside one fixed block
        assert all(row[j] != row[j - 1] for j in range(1, L) if fixed[j] != fixed[j - 1])  # the fixed cuts stay
        sizes |= {row.count(k) for k in set(row[:-1]) - {0}}  # (the last block may be cut by the end)
    assert sizes == {1, 2, 3}
    starts = {(row.index(k) - 1) % b for row in ids.tolist() for k in set(row) - {0}}
    assert starts == {0, 1, 2}  # cut short, blocks start at every place of a fixed block


def test_cached_steps_at_each_rows_own_pace_equal_the_training_pass_on_random_boundaries(make_captioner):
    """What the sampler with ``commit`` does (each row reveals 1 to b positions a step; its next block starts
    right after them and ends where the fixed block does) is what training on blocks cut short taught: the
    same predictions."""
    b = 3
    cap = make_captioner(fusion="add", block_size=b)
    net = cap.denoiser.eval()
    x_t, t, x_clean, cond = _inputs(cap, B=4)
    B, L, d = x_t.shape
    blocks = net.random_block_ids(B, L, 0.5, torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole, _ = net.forward_blocks(x_t, t, x_clean, cond, blocks=blocks)
        n = int(blocks[:, -1].min()) - 1  # blocks every row has whole
        got, seen = torch.zeros_like(whole), torch.zeros(B, L, dtype=torch.bool)
        cache, clean, clean_start, clean_valid = None, x_clean[:, :1], torch.zeros(B, dtype=torch.long), None
        offs = torch.arange(b)
        for i in range(1, n + 1):
            start = torch.tensor([row.index(i) for row in blocks.tolist()])
            valid = offs[None] < (blocks == i).sum(1)[:, None]
            win = (start[:, None] + offs).clamp(max=L - 1)
            pick = lambda v: v.gather(1, win[..., None].expand(-1, -1, d))  # noqa: E731
            out, cache = net.block_step(pick(x_t), cap.config.T - 1, start, cond, cache, clean,
                                        clean_start=clean_start, clean_valid=clean_valid, valid=valid)
            for r in range(B):
                k = int(valid[r].sum())
                got[r, win[r, :k]] = out[r, :k]
                seen[r, win[r, :k]] = True
            clean, clean_start, clean_valid = pick(x_clean), start, valid
    assert int(seen.sum()) > B * n  # rows moved at different paces
    assert torch.allclose(got[seen], whole[seen], atol=1e-5)


def _trained_on(cap, tokenizer, texts, steps=400, **objective):
    """``cap``'s denoiser trained on ``texts``, all of one image (random features, returned)."""
    ids = tokenizer.encode(texts, cap.config.seq_len)
    cond = torch.randn(1, cap.config.cond_dim, generator=torch.Generator().manual_seed(3)).repeat(len(texts), 1)
    diff = GaussianDiffusion(NoiseSchedule(cap.config.schedule, cap.config.T), cap.config.predict)
    net = cap.denoiser.train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(steps):
        loss = diff.training_losses(net, ids.repeat(8, 1), cond.repeat(8, 1), lambda_round=1.0, **objective)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return cond[:1]


def test_with_commit_two_positions_that_depend_on_each_other_are_not_decided_apart(make_captioner, tokenizer):
    """One image, two captions that differ from their first block on ("a red ..." / "an orange ..."): blocks of
    two decided at once may mix them ("a orange"); revealing only the sure positions writes one of them whole."""
    torch.manual_seed(0)
    b = 2
    cap = make_captioner(fusion="add", block_size=b, sampling="block:12:1:commit0.9")
    texts = ["a red circle on a black background", "an orange square on a black background"]
    features = _trained_on(cap, tokenizer, texts, p_block_split=0.5).repeat(16, 1)
    traces = cap.caption_batch(features=features, seed=1)
    assert all(tr.text in texts for tr in traces)
    assert len({tr.text for tr in traces}) == 2  # the noise picks one or the other
    # the first step revealed the article and only guessed the colour, which the next block decided given it
    assert any(tr.steps[0].token_ids[2] != tr.steps[-1].token_ids[2] for tr in traces)
    whole_blocks = [tr.text for tr in cap.caption_batch(features=features, seed=1, commit=0.0)]
    assert any(text not in texts for text in whole_blocks)  # the same network revealing whole blocks: "an red ..."
    assert cap.caption_batch(features=features, seed=1, record="final")[0].text == traces[0].text


def test_with_commit_an_unsure_position_after_sure_ones_is_revealed_with_them(make_captioner, tokenizer):
    """"a red ..." / "a blue ...": the article is sure, so nothing about the colour waits on it; the first block
    is revealed whole, and each caption takes one step a block."""
    torch.manual_seed(0)
    b = 2
    cap = make_captioner(fusion="add", block_size=b, sampling="block:12:1:commit0.9")
    texts = ["a red circle on a black background", "a blue circle on a black background"]
    cond = _trained_on(cap, tokenizer, texts, p_block_split=0.5)
    traces = cap.caption_batch(features=cond.repeat(16, 1), seed=1)
    assert all(tr.text in texts for tr in traces) and len({tr.text for tr in traces}) == 2
    assert max(tr.steps[0].confidence[2] for tr in traces) < 0.9  # the colour was unsure at the first step...
    n = int((tokenizer.encode(texts[:1], cap.config.seq_len) != tokenizer.pad_id).sum()) - 1  # words and [SEP]
    assert {len(tr.steps) for tr in traces} == {-(-n // b)}  # ...and still revealed with its article


def test_a_second_row_given_a_guess_predicts_what_the_next_step_would(make_captioner):
    """``clean_blocks``: a row of the step that finishes a block cut short (position 1 revealed, 2 not) reads
    positions 1 and 2 as two blocks of their own, 2 as guessed, and predicts the block 3-4: what the step after,
    given 2 revealed as guessed, predicts; its cache then serves the step after that as well. (Two layers: the
    first layer's keys are the inputs', whatever the clean blocks.)"""
    cap = make_captioner(fusion="add", block_size=2, n_layers=2)
    net = cap.denoiser.eval()
    with torch.no_grad():  # weights far from their small initial ones, so that what a position reads shows
        for name, w in net.named_parameters():
            if name.startswith("encoder") and w.dim() == 2:
                w.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    x_t, t, x_clean, cond = _inputs(cap, B=3)
    T = cap.config.T - 1
    B = x_t.shape[0]
    ones, tf = torch.ones(B, 2, dtype=torch.bool), torch.tensor([[True, False]]).expand(B, 2)
    at = lambda p: torch.full((B,), p)  # noqa: E731
    with torch.no_grad():
        _, c1 = net.block_step(x_t[:, 1:3], T, at(1), cond, None, x_clean[:, :1], clean_start=at(0), valid=ones)
        keep = Denoiser.keep_rows
        # one step at a time: 2 alone (1 revealed before it), then 3-4 given 2, then 5-6 given 3-4
        _, c2 = net.block_step(x_t[:, 2:4], T, at(2), cond, keep(c1, torch.arange(B)), x_clean[:, 1:3],
                               clean_start=at(1), clean_valid=tf, valid=tf)
        want3, c3 = net.block_step(x_t[:, 3:5], T, at(3), cond, c2, x_clean[:, 2:4], clean_start=at(2),
                                   clean_valid=tf, valid=ones)
        want5, _ = net.block_step(x_t[:, 5:7], T, at(5), cond, c3, x_clean[:, 3:5], clean_start=at(3),
                                  clean_valid=ones, valid=ones)
        # 2 and, in a second row, 3-4 given 2 as guessed (x_clean's), in one call
        rows = torch.cat([torch.arange(B), torch.arange(B)])
        both, cb = net.block_step(torch.cat([x_t[:, 2:4], x_t[:, 3:5]]), T, torch.cat([at(2), at(3)]), cond,
                                  keep(c1, rows), x_clean[:, 1:3].repeat(2, 1, 1), clean_start=at(1).repeat(2),
                                  clean_valid=torch.cat([tf, ones]), valid=torch.cat([tf, ones]),
                                  clean_blocks=torch.tensor([[0, 0]] * B + [[0, 1]] * B))
        got5, _ = net.block_step(x_t[:, 5:7], T, at(5), cond, keep(cb, torch.arange(B, 2 * B)), x_clean[:, 3:5],
                                 clean_start=at(3), clean_valid=ones, valid=ones)
        one_block, _ = net.block_step(x_t[:, 3:5], T, at(3), cond, keep(c1, torch.arange(B)), x_clean[:, 1:3],
                                      clean_start=at(1), clean_valid=ones, valid=ones)
    assert torch.allclose(both[B:], want3, atol=1e-5) and torch.allclose(got5, want5, atol=1e-5)
    assert not torch.allclose(one_block, want3, atol=1e-3)  # 1 and 2 read as one block: not the same


def test_verified_guesses_give_the_same_captions_in_fewer_steps(make_captioner, tokenizer, monkeypatch):
    """With ``BlockSampler.VERIFY`` a caption that cut a block short takes the next block a step early where the
    held-back position is decided as guessed: the same captions, token for token, and fewer steps."""
    from diffusion_caption.samplers import BlockSampler

    torch.manual_seed(0)
    b = 2
    cap = make_captioner(fusion="add", block_size=b, seq_len=16, sampling="block:16:1:commit0.9")
    texts = ["a red star and a large blue circle on a black background",  # the shape follows the colour, so
             "an orange circle and a large blue star on a black background"]  # a wrong guess would show
    cond = _trained_on(cap, tokenizer, texts, p_block_split=0.5)
    features = torch.cat([cond.repeat(24, 1), torch.randn(8, cond.shape[1], generator=torch.Generator().manual_seed(5))])
    runs = {}
    for verify in (False, True):
        monkeypatch.setattr(BlockSampler, "VERIFY", verify)
        runs[verify] = cap.caption_batch(features=features, seed=1)
    assert [tr.final.token_ids for tr in runs[True]] == [tr.final.token_ids for tr in runs[False]]
    assert any(tr.text in texts for tr in runs[True])
    steps = {v: [len(tr.steps) for tr in runs[v]] for v in runs}
    assert all(a <= b_ for a, b_ in zip(steps[True], steps[False])) and sum(steps[True]) < sum(steps[False])
    for tr in runs[True]:  # each step still reveals at least one position more than the one before
        revealed = [sum(i != tokenizer.pad_id for i in st.token_ids) for st in tr.steps]
        assert all(q >= p for p, q in zip(revealed, revealed[1:]))
    # a network of large random weights is unsure everywhere and its guesses often change once the position
    # before is revealed: those are not taken, and the captions are still the same
    wild = make_captioner(fusion="add", block_size=b, n_layers=2, sampling="block:16:1:commit0.99")
    with torch.no_grad():
        for name, w in wild.denoiser.named_parameters():
            if name.startswith("encoder") and w.dim() == 2:
                w.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    monkeypatch.setattr(BlockSampler, "MAX_SHORT", 10**6)
    noise = torch.randn(16, cond.shape[1], generator=torch.Generator().manual_seed(6))
    for verify in (False, True):
        monkeypatch.setattr(BlockSampler, "VERIFY", verify)
        runs[verify] = wild.caption_batch(features=noise, seed=2)
    assert [tr.final.token_ids for tr in runs[True]] == [tr.final.token_ids for tr in runs[False]]
    assert sum(len(tr.steps) for tr in runs[True]) < sum(len(tr.steps) for tr in runs[False])


def test_a_caption_reveals_at_most_max_short_blocks_short(make_captioner, monkeypatch):
    """An untrained network is sure of nothing, so under a high commit threshold every block would be revealed
    one position at a time; a caption cuts a block short at most ``MAX_SHORT`` times, then reveals whole
    blocks: it takes at most its blocks plus ``MAX_SHORT`` steps (counted without ``VERIFY``, which takes a
    confirmed guess's next block in the same step)."""
    from diffusion_caption.samplers import BlockSampler

    monkeypatch.setattr(BlockSampler, "VERIFY", False)

    b = 2
    cap = make_captioner(fusion="add", block_size=b, sampling="block:40:1:commit0.99")
    features = torch.randn(6, cap.config.cond_dim, generator=torch.Generator().manual_seed(0))

    def extra_steps():  # each caption's steps beyond its blocks
        out = []
        for tr in cap.caption_batch(features=features, seed=2):
            ids = tr.final.token_ids
            end = ids.index(cap.tokenizer.sep_id) + 1 if cap.tokenizer.sep_id in ids else len(ids)
            out.append(len(tr.steps) - -(-(end - 1) // b))
        return out
    cap_at = BlockSampler.MAX_SHORT
    assert max(extra_steps()) == cap_at
    monkeypatch.setattr(BlockSampler, "MAX_SHORT", 10**6)
    assert max(extra_steps()) > cap_at  # uncapped, the same captions cut more blocks short


def test_the_sampling_path_computes_what_the_training_path_does(make_captioner):
    """Under no_grad the denoiser runs its own sampling path (prepacked products, fused activations and residual
    sums, attention as plain products); with gradients, transformers' modules and SDPA. The same network in eval
    mode gives the same predictions both ways, on random block boundaries (per-row attention masks)."""
    cap = make_captioner(fusion="add", block_size=2)
    net = cap.denoiser.eval()
    x_t, t, x_clean, cond = _inputs(cap, B=4)
    blocks = net.random_block_ids(4, x_t.shape[1], 0.5, torch.Generator().manual_seed(2))
    trained, _ = net.forward_blocks(x_t, t, x_clean, cond, blocks=blocks)  # gradients on: the training path
    assert trained.requires_grad
    with torch.no_grad():
        sampled, _ = net.forward_blocks(x_t, t, x_clean, cond, blocks=blocks)
    assert torch.allclose(sampled, trained.detach(), atol=1e-5)
