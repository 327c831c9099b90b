"""The reveal sampler and its training: timesteps per position, the most confident positions revealed."""
import pytest
import torch

from diffusion_caption.config import ObjectiveConfig

from diffusion_caption.diffusion import GaussianDiffusion
from diffusion_caption.samplers import RevealSampler, make_sampler
from diffusion_caption.schedule import NoiseSchedule


class Spy(torch.nn.Module):
    def __init__(self, denoiser):
        super().__init__()
        self.inner = denoiser
        self.calls = []

    @property
    def embeddings(self):
        return self.inner.embeddings

    def forward(self, x_t, t, cond, drop=None, x_self_cond=None):
        out = self.inner(x_t, t, cond, drop, x_self_cond)
        self.calls.append((x_t.clone(), t.clone(), None if x_self_cond is None else x_self_cond.clone(), out[0].clone()))
        return out


def test_a_timestep_per_position_equals_the_rows_timestep_when_all_agree(make_captioner):
    cap = make_captioner()
    net = cap.denoiser.eval()
    x_t, cond = torch.randn(2, cap.config.seq_len, cap.config.emb_dim), torch.randn(2, cap.config.cond_dim)
    t = torch.tensor([5, 50])
    with torch.no_grad():
        row = net(x_t, t, cond)[0]
        assert torch.allclose(row, net(x_t, t[:, None].expand(2, cap.config.seq_len), cond)[0], atol=1e-6)
        mixed = t[:, None].expand(2, cap.config.seq_len).clone()
        mixed[:, 0] = 0
        assert not torch.allclose(row, net(x_t, mixed, cond)[0])


def test_each_step_reveals_a_left_prefix_of_the_predicted_caption_and_renoises_the_rest(make_captioner, scene_image):
    cap = make_captioner(self_cond=True)
    torch.nn.init.normal_(cap.denoiser.self_cond_proj.weight, std=0.5)
    spy = Spy(cap.denoiser)
    cap._net = spy
    n, L, T = 4, cap.config.seq_len, cap.config.T
    trace = cap.caption(scene_image, steps=n, sampler="reveal", seed=2)
    assert len(trace.steps) == n == len(spy.calls)
    E = cap.denoiser.embeddings.detach()
    sampler = make_sampler("reveal", cap.schedule, n, sep_id=cap.tokenizer.sep_id)
    assert isinstance(sampler, RevealSampler) and sampler.timesteps == [T - 1] * n
    assert spy.calls[0][1].unique().tolist() == [T - 1] and spy.calls[0][2] is None
    for i in range(1, n):
        x, t, sc, _ = spy.calls[i]
        prev = trace.steps[i - 1]
        ids = prev.token_ids
        length = ids.index(cap.tokenizer.sep_id) + 1 if cap.tokenizer.sep_id in ids else L
        k = round(length * i / n)
        assert (t[0] == 0).tolist() == [q < k for q in range(L)]  # the first k positions, the rest at T-1
        assert set(t[0].unique().tolist()) <= {0, T - 1}
        assert torch.allclose(x[0][:k], E[torch.tensor(ids[:k])])  # set to their rounded tokens' embeddings
        assert torch.allclose(sc[0], prev.x0_pred)  # the previous step's estimate, self-conditioning
    lengths = torch.tensor([5, 12])
    assert sampler.revealed_count(n - 1, lengths).tolist() == [5, 12]  # the whole caption by the last step
    assert sampler.caption_length(torch.tensor([[1, 7, cap.tokenizer.sep_id, 0], [1, 7, 8, 9]])).tolist() == [3, 4]
    cap._net = cap.denoiser
    assert cap.caption(scene_image, steps=n, sampler="reveal", seed=2).text == trace.text  # deterministic per seed
    with pytest.raises(ValueError, match="early_stop"):
        cap.caption(scene_image, steps=n, sampler="reveal", early_stop=1)


def test_reveal_training_draws_clean_and_pure_noise_positions_and_scores_the_noisy_ones(make_captioner, tokenizer):
    cap = make_captioner()
    T = cap.config.T
    spy = Spy(cap.denoiser.eval())
    ids = tokenizer.encode(["a red circle"] * 300, cap.config.seq_len)
    cond = torch.randn(300, cap.config.cond_dim, generator=torch.Generator().manual_seed(1))
    diff = GaussianDiffusion(NoiseSchedule(cap.config.schedule, T), cap.config.predict)
    with torch.no_grad():
        losses = diff.training_losses(spy, ids, cond, lambda_round=1.0, generator=torch.Generator().manual_seed(0),
                                      p_reveal=0.7, pad_id=tokenizer.pad_id)
    x_t, t, _, out = spy.calls[0]
    assert t.shape == ids.shape
    reveal_rows = (t == T - 1).any(1) | (t == 0).any(1)
    assert 0.6 < reveal_rows.float().mean() < 0.8  # about p_reveal of the rows (others: one uniform t per row)
    mixed = reveal_rows & (t == 0).any(1) & (t == T - 1).any(1)
    assert mixed.sum() > 100
    other = ~reveal_rows
    assert all(len(set(row.tolist())) == 1 for row in t[other])
    # revealed rows: a prefix at t = 0, of any length from none to the caption's (never its padding)
    length = int((ids[0] != tokenizer.pad_id).sum())
    ks = set()
    for row in t[reveal_rows]:
        k = int((row == 0).sum())
        assert (row[:k] == 0).all() and (row[k:] == T - 1).all() and k <= length
        ks.add(k)
    assert ks == set(range(length + 1))
    # revealed positions hold the clean embedding up to q(x_0 | w)'s jitter; the others are pure noise
    E = cap.denoiser.embeddings.detach()
    a0 = float(diff.schedule.alphas_cumprod[0])
    zero, noisy = t == 0, t == T - 1
    jitter = (a0 * (1 - a0) + (1 - a0)) ** 0.5  # the x_0 jitter, scaled, plus q(x_t | x_0)'s noise at t = 0
    assert (x_t[zero] - a0 ** 0.5 * E[ids][zero]).std() == pytest.approx(jitter, rel=0.05)
    assert (x_t[noisy] - E[ids][noisy]).std() > 1.2
    # the loss is the noisy positions' alone
    w = (t != 0).float()
    mse = ((out - E[ids]).pow(2).mean(-1) * w).sum() / w.sum()
    assert losses["mse"] == pytest.approx(float(mse), rel=1e-5)
    with pytest.raises(ValueError, match="p_reveal"):
        ObjectiveConfig(p_reveal=2.0)


def test_each_distinct_timestep_is_embedded_once_and_every_position_gets_its_own(make_captioner, monkeypatch):
    """The denoiser embeds a batch's distinct timesteps once (the reveal sampler's are 0 and T-1 only); the
    prediction is the one of embedding every position's timestep on its own."""
    from diffusion_caption import denoiser

    cap = make_captioner()
    net = cap.denoiser.eval()
    L = cap.config.seq_len
    t = torch.tensor([[0] * 3 + [999] * (L - 3), [7] * L])
    x_t, cond = torch.randn(2, L, cap.config.emb_dim), torch.randn(2, cap.config.cond_dim)
    seen = []
    hook = net.time_embed.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad():
        fast = net(x_t, t, cond)[0]
        assert seen == [3]  # 0, 7 and 999, not 2 x L positions
        # every position embedded on its own: "unique" made the identity
        monkeypatch.setattr(denoiser.torch, "unique", lambda v, return_inverse: (v, torch.arange(v.numel())))
        slow = net(x_t, t, cond)[0]
    hook.remove()
    assert seen == [3, 2 * L]
    assert torch.allclose(fast, slow, atol=1e-5)
