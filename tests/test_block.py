"""Block diffusion: a block attends to the clean blocks before it and never after, training sees every
block's context at once, and sampling with cached keys and values gives exactly the vectorised pass."""
import pytest
import torch

from diffusion_caption.config import preset
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
    h = net._inputs(x_t, t, cond, None)
    L = x_t.shape[1]
    with torch.no_grad():
        mine, _ = net._encode(h, torch.arange(L), torch.ones(L, L, dtype=torch.bool))
        theirs = net.encoder(inputs_embeds=h).last_hidden_state
    assert torch.allclose(mine, theirs, atol=1e-5)


@pytest.mark.parametrize("b", [1, 3, 5])
def test_cached_block_steps_equal_the_vectorised_training_pass(make_captioner, b):
    cap = make_captioner(fusion="add", block_size=b)
    net = cap.denoiser.eval()
    x_t, t, x_clean, cond = _inputs(cap)
    L = x_t.shape[1]
    with torch.no_grad():
        whole, _ = net.forward_blocks(x_t, t, x_clean, cond)
        cache, parts = None, []
        for s in range(0, L, b):
            e = min(s + b, L)
            out, cache = net.block_step(x_t[:, s:e], t[:, s:e], s, cond, cache, None if s == 0 else x_clean[:, s - b:s])
            parts.append(out)
    assert cache[0][0].shape[2] == L - (e - s)  # every block but the last is cached, once
    assert torch.allclose(torch.cat(parts, 1), whole, atol=1e-5)


def test_a_block_reads_the_clean_blocks_before_it_and_nothing_after(make_captioner):
    b = 3
    cap = make_captioner(fusion="add", block_size=b)
    net = cap.denoiser.eval()
    x_t, t, x_clean, cond = _inputs(cap)
    with torch.no_grad():
        base, _ = net.forward_blocks(x_t, t, x_clean, cond)
        later_clean = x_clean.clone()
        later_clean[:, 2 * b:] += 1.0  # change the clean copy from block 2 on
        later_noise = x_t.clone()
        later_noise[:, b:] += 1.0  # and the noise of every block after block 0
        moved, _ = net.forward_blocks(later_noise, t, later_clean, cond)
        earlier = x_clean.clone()
        earlier[:, 0] += 1.0  # the clean first position
        moved_by_earlier, _ = net.forward_blocks(x_t, t, earlier, cond)
    assert torch.allclose(base[:, :b], moved[:, :b], atol=1e-6)  # block 0 reads only its own noise
    assert not torch.allclose(base[:, b:2 * b], moved[:, b:2 * b])  # block 1 reads its own noise...
    assert torch.allclose(base[:, :b], moved_by_earlier[:, :b], atol=1e-6)  # block 0 never reads clean tokens
    assert not torch.allclose(base[:, b:], moved_by_earlier[:, b:])  # the later blocks read the clean first one


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


def test_trained_on_two_captions_it_writes_each_one_block_per_step_and_stops_at_its_end(make_captioner, tokenizer):
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
        n_steps = row.index(sep) // b + 1  # the step whose block holds [SEP] is the last
        assert len(tr.steps) == n_steps
        for i, step in enumerate(tr.steps):  # step i has written the caption's first (i + 1) blocks
            written = [v for v in step.token_ids[:(i + 1) * b]]
            assert written == row[:(i + 1) * b]
            assert all(v == tokenizer.pad_id for v in step.token_ids[(i + 1) * b:])
            assert step.t == cap.config.T - 1
        k = (n_steps - 1) * b  # the last step read the blocks before it as their tokens' clean embeddings
        assert torch.allclose(tr.steps[-1].x_t[:k], cap.denoiser.embeddings.detach()[torch.tensor(row[:k])])
    assert cap.caption_batch(features=cond, record="final")[1].text == texts[1]
