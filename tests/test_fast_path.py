"""The captioner's speed options: the fast path (``record="final"``) and early stopping."""
import pytest
import torch

from diffusion_caption.diffusion import GaussianDiffusion
from diffusion_caption.schedule import NoiseSchedule

CAPTIONS = ["a red circle", "two blue squares", "a small green star on a black background", "a white diamond"]


@pytest.fixture(scope="module")
def feats(clip_encoder):
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(4, clip_encoder.feature_dim, generator=g), dim=-1)


def _overfit(cap, tokenizer, cond, steps=300):
    ids = tokenizer.encode(CAPTIONS, cap.config.seq_len)
    diff = GaussianDiffusion(NoiseSchedule(cap.config.schedule, cap.config.T), cap.config.predict)
    model = cap.denoiser.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = diff.training_losses(model, ids, cond, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("sampler,guidance,clamp", [("ddim", 1.0, False), ("ddpm", 1.0, False), ("ddim", 2.0, True)])
def test_fast_path_gives_the_final_step_of_the_full_trace(make_captioner, feats, sampler, guidance, clamp):
    cap = make_captioner()
    full = cap.caption_batch(features=feats, steps=7, sampler=sampler, guidance=guidance, clamp=clamp, seed=4)
    fast = cap.caption_batch(features=feats, steps=7, sampler=sampler, guidance=guidance, clamp=clamp, seed=4,
                             record="final")
    for a, b in zip(full, fast):
        assert len(b) == 1 and b.settings["record"] == "final" and "record" not in a.settings
        f = b.final
        assert (f.index, f.t) == (a.final.index, a.final.t) == (6, 0)
        assert f.text == a.text and f.token_ids == a.final.token_ids and f.tokens == a.final.tokens
        assert f.confidence == pytest.approx(a.final.confidence, abs=1e-5)
        assert torch.allclose(f.x0_pred, a.final.x0_pred, atol=1e-5) and torch.allclose(f.x_t, a.final.x_t, atol=1e-5)
    # streaming the fast path yields one list, the last step of every image
    batches = list(cap.iter_caption_batch(features=feats, steps=7, sampler=sampler, guidance=guidance, clamp=clamp,
                                          seed=4, record="final"))
    assert len(batches) == 1 and [s.text for s in batches[0]] == [t.text for t in full]


def test_early_stop_off_changes_nothing(make_captioner, feats):
    cap = make_captioner()
    a = cap.caption_batch(features=feats, steps=6, seed=1)
    b = cap.caption_batch(features=feats, steps=6, seed=1, early_stop=0)
    assert [t.text for t in a] == [t.text for t in b]
    assert all(torch.equal(x.x0_preds(), y.x0_preds()) for x, y in zip(a, b))
    assert a[0].settings["early_stop"] == 0


def test_early_stop_truncates_each_trace_where_its_tokens_stopped_changing(make_captioner, feats):
    cap = make_captioner()
    steps, k = 30, 2
    full = cap.caption_batch(features=feats, steps=steps, seed=2)
    early = cap.caption_batch(features=feats, steps=steps, seed=2, early_stop=k)
    fast = cap.caption_batch(features=feats, steps=steps, seed=2, early_stop=k, record="final")
    for f, e, q in zip(full, early, fast):
        ids = [s.token_ids for s in f.steps]
        # the first step whose tokens equal those of the k steps before it, or the last step
        stop = next((i for i in range(k, steps) if all(ids[i - j] == ids[i] for j in range(1, k + 1))), steps - 1)
        assert len(e) == stop + 1
        assert [s.text for s in e.steps] == [s.text for s in f.steps[:stop + 1]]
        assert torch.allclose(e.x0_preds(), f.x0_preds()[:stop + 1], atol=1e-4)
        assert q.final.index == stop and q.text == e.text == f.steps[stop].text
    # a streamed batch keeps its shape: images that have stopped are None
    for batch in cap.iter_caption_batch(features=feats, steps=steps, seed=2, early_stop=k):
        assert len(batch) == len(feats)


def test_early_stop_keeps_the_caption_of_a_converged_model(make_captioner, tokenizer, feats):
    cap = make_captioner()
    _overfit(cap, tokenizer, feats)
    full = cap.caption_batch(features=feats, steps=50, seed=0, record="final")
    early = cap.caption_batch(features=feats, steps=50, seed=0, early_stop=3, record="final")
    assert [t.text for t in early] == [t.text for t in full]
    assert sum(t.text == c for t, c in zip(full, CAPTIONS)) >= 2
    used = [t.final.index + 1 for t in early]
    assert min(used) < 50, used  # it did stop early


def test_bad_options_fail_loudly(make_captioner, feats):
    cap = make_captioner()
    with pytest.raises(ValueError, match="record"):
        cap.caption_batch(features=feats, record="some")
    for bad in (-1, 1.5, True, cap.config.T + 1):
        with pytest.raises(ValueError, match="early_stop"):
            cap.caption_batch(features=feats, early_stop=bad)


def test_compiled_denoiser_gives_the_same_captions(make_captioner, feats):
    cap = make_captioner()
    eager = cap.caption_batch(features=feats, steps=3, seed=5)
    cap.compile()
    compiled = cap.caption_batch(features=feats, steps=3, seed=5)
    for a, b in zip(eager, compiled):
        assert a.text == b.text and torch.allclose(a.x0_preds(), b.x0_preds(), atol=1e-4)
    assert cap.denoiser is not cap._net and cap._net.embeddings is cap.denoiser.embeddings
