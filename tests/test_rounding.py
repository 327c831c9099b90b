import torch

from diffusion_caption.rounding import clamp_to_embeddings, round_to_tokens, token_logits


def test_logits_are_negative_squared_distances():
    E, x = torch.randn(10, 4), torch.randn(3, 4)
    expected = -((x[:, None, :] - E[None]) ** 2).sum(-1)
    assert torch.allclose(token_logits(x, E), expected, atol=1e-5)


def test_rounding_recovers_tokens_from_clean_embeddings_with_high_confidence():
    g = torch.Generator().manual_seed(0)
    E = 3.0 * torch.randn(50, 16, generator=g)  # well-separated, as a trained table is
    ids = torch.randint(0, 50, (4, 12), generator=g)
    got, conf = round_to_tokens(E[ids], E)
    assert torch.equal(got, ids)
    assert conf.min() > 0.99
    # far from every embedding, confidence drops
    _, conf_noisy = round_to_tokens(E[ids] + 3.0 * torch.randn(4, 12, 16, generator=g), E)
    assert conf_noisy.mean() < conf.mean()


def test_clamp_maps_to_nearest_embedding():
    E = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.tensor([[[1.0, 1.0], [9.0, 2.0], [-1.0, 7.0]]])
    assert torch.equal(clamp_to_embeddings(x, E), E[torch.tensor([[0, 1, 2]])])
