"""Self-conditioning: the network reads its own previous x0 estimate, in training and in sampling."""
import pytest
import torch

from diffusion_caption.config import ObjectiveConfig

from diffusion_caption import Captioner
from diffusion_caption.diffusion import GaussianDiffusion
from diffusion_caption.schedule import NoiseSchedule


class Spy(torch.nn.Module):
    """The denoiser, recording the self-conditioning input of every call."""

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


def test_self_cond_input_starts_at_zero_and_then_changes_the_prediction(make_captioner):
    cap = make_captioner(self_cond=True)
    net = cap.denoiser.eval()
    assert net.self_cond_proj is not None and net.self_cond_proj.weight.abs().sum() == 0
    x_t, t, cond = torch.randn(2, cap.config.seq_len, cap.config.emb_dim), torch.tensor([5, 50]), torch.randn(2, cap.config.cond_dim)
    sc = torch.randn_like(x_t)
    with torch.no_grad():
        plain = net(x_t, t, cond)[0]
        assert torch.equal(plain, net(x_t, t, cond, None, sc)[0])  # zero-initialised: no effect yet
        torch.nn.init.normal_(net.self_cond_proj.weight)
        assert torch.equal(plain, net(x_t, t, cond, None, torch.zeros_like(x_t))[0])  # zeros = no estimate
        assert not torch.allclose(plain, net(x_t, t, cond, None, sc)[0])
    # a network without self-conditioning has no such input and ignores the argument
    other = make_captioner().denoiser.eval()
    assert other.self_cond_proj is None
    with torch.no_grad():
        assert torch.equal(other(x_t, t, cond)[0], other(x_t, t, cond, None, sc)[0])
    with pytest.raises(ValueError, match="p_self_cond"):
        ObjectiveConfig(p_self_cond=1.5)


def test_training_feeds_a_fraction_of_the_batch_its_own_estimate(make_captioner, tokenizer):
    cap = make_captioner(self_cond=True)
    spy = Spy(cap.denoiser.eval())
    ids = tokenizer.encode(["a red circle"] * 200, cap.config.seq_len)
    cond = torch.randn(200, cap.config.cond_dim, generator=torch.Generator().manual_seed(1))
    diff = GaussianDiffusion(NoiseSchedule(cap.config.schedule, cap.config.T), cap.config.predict, self_cond=True)
    with torch.no_grad():
        diff.training_losses(spy, ids, cond, generator=torch.Generator().manual_seed(0), p_self_cond=0.5)
    (x_first, t_first, sc_first, out_first), (x_t, t, sc, _) = spy.calls  # the gradient-free pass, then the loss's
    assert sc_first is None  # the first pass sees no estimate, as a sampler's first step
    fed = sc.abs().sum((1, 2)) > 0
    assert 70 < int(fed.sum()) < 130 and x_first.shape[0] == int(fed.sum())  # about half the batch
    assert torch.equal(x_first, x_t[fed]) and torch.equal(t_first, t[fed])  # same x_t and t
    assert torch.allclose(sc[fed], out_first)  # fed exactly the first pass's x0
    # p_self_cond 0: one call, all zeros
    spy.calls.clear()
    with torch.no_grad():
        diff.training_losses(spy, ids, cond, generator=torch.Generator().manual_seed(0), p_self_cond=0.0)
    assert len(spy.calls) == 1 and spy.calls[0][2].abs().sum() == 0


def test_unrolled_rows_get_the_first_steps_estimate(make_captioner, tokenizer):
    from diffusion_caption.samplers import spaced_timesteps

    cap = make_captioner(self_cond=True)
    T = cap.config.T
    t_focus = spaced_timesteps(T, 2, "trailing^2")
    spy = Spy(cap.denoiser.eval())
    ids = tokenizer.encode(["a red circle"] * 64, cap.config.seq_len)
    cond = torch.randn(64, cap.config.cond_dim, generator=torch.Generator().manual_seed(1))
    diff = GaussianDiffusion(NoiseSchedule(cap.config.schedule, T), cap.config.predict, self_cond=True)
    with torch.no_grad():
        diff.training_losses(spy, ids, cond, generator=torch.Generator().manual_seed(0), t_focus=t_focus,
                             p_unroll=0.5, focus_spacing="trailing^2", p_self_cond=0.0, focus_steps=2)
    (_, t_draft, _, draft), (_, t, sc, _) = spy.calls
    unrolled = t == t_focus[1]
    assert set(t_draft.tolist()) == {t_focus[0]} and int(unrolled.sum()) == draft.shape[0]
    assert torch.allclose(sc[unrolled], draft) and sc[~unrolled].abs().sum() == 0


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampling_feeds_each_step_the_previous_steps_estimate(make_captioner, scene_image, guidance):
    cap = make_captioner(self_cond=True)
    torch.nn.init.normal_(cap.denoiser.self_cond_proj.weight, std=0.5)
    spy = Spy(cap.denoiser)
    cap._net = spy
    trace = cap.caption(scene_image, steps=4, sampler="ddim", guidance=guidance, clamp=True)
    assert len(spy.calls) == 4 and spy.calls[0][2] is None
    for i in range(1, 4):
        sc = spy.calls[i][2]
        B = sc.shape[0]
        # the previous step's x0 (after guidance, before clamping), given to both guidance passes
        assert torch.allclose(sc[:1], trace.steps[i - 1].x0_pred[None])
        if guidance != 1.0:
            assert B == 2 and torch.equal(sc[0], sc[1])
    # the record says the same as a plain call; a fresh captioner without the spy gives the same caption
    cap._net = cap.denoiser
    assert cap.caption(scene_image, steps=4, sampler="ddim", guidance=guidance, clamp=True).text == trace.text


