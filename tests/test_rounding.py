import torch

import itertools

import pytest

from diffusion_caption.rounding import clamp_to_embeddings, likeliest_roundings, round_to_tokens, token_logits


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


def _brute_force(x, E, positions):
    """Every sequence of nearest / second-nearest tokens over ``positions``, by joint log probability."""
    logp = token_logits(x, E).log_softmax(-1)
    top = logp.topk(2, -1).indices
    out = []
    for choice in itertools.product([0, 1], repeat=len(positions)):
        ids = top[:, 0].tolist()
        for q, c in zip(positions, choice):
            ids[q] = int(top[q, c])
        out.append((sum(float(logp[q, i]) for q, i in enumerate(ids)), ids))
    return sorted(out, key=lambda r: -r[0])


def test_likeliest_roundings_are_the_k_best_sequences_in_order():
    g = torch.Generator().manual_seed(0)
    E, x = torch.randn(9, 4, generator=g), torch.randn(6, 4, generator=g)
    got = likeliest_roundings(x, E, 20)
    want = _brute_force(x, E, range(6))[:20]
    assert [ids for ids, _ in got] == [ids for _, ids in want]
    assert [lp for _, lp in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)
    assert got[0][0] == round_to_tokens(x, E)[0].tolist()  # the first is the plain rounding
    assert len({tuple(ids) for ids, _ in likeliest_roundings(x, E, 64)}) == 64  # all 2^6, none twice
    assert len(likeliest_roundings(x, E, 100)) == 64

    # only the first `positions` may move, and only where the second token is within e^max_delta of the first
    assert [ids for ids, _ in likeliest_roundings(x, E, 8, positions=3)] == \
        [ids for _, ids in _brute_force(x, E, range(3))]
    logp = token_logits(x, E).log_softmax(-1).topk(2, -1).values
    delta = (logp[:, 0] - logp[:, 1]).tolist()
    limit = sorted(delta)[2]  # the three least certain positions
    free = [q for q in range(6) if delta[q] <= limit]
    assert [ids for ids, _ in likeliest_roundings(x, E, 64, max_delta=limit)] == \
        [ids for _, ids in _brute_force(x, E, free)]
    assert likeliest_roundings(x, E, 5, max_delta=-1.0) == [got[0]]  # nothing may move
    with pytest.raises(ValueError, match="one prediction"):
        likeliest_roundings(x[None], E, 3)
    with pytest.raises(ValueError, match="k must be"):
        likeliest_roundings(x, E, 0)


def test_a_batch_of_roundings_from_one_matrix_product_matches_each_prediction_alone():
    from diffusion_caption.rounding import k_best_roundings, top2_log_probs

    g = torch.Generator().manual_seed(1)
    E, xs = torch.randn(11, 4, generator=g), torch.randn(3, 7, 4, generator=g)
    top = top2_log_probs(xs, E)
    assert top.values.shape == (3, 7, 2) and top.indices.shape == (3, 7, 2)
    for b in range(3):
        got = k_best_roundings(top.values[b].tolist(), top.indices[b].tolist(), 10, positions=5, max_delta=2.0)
        want = likeliest_roundings(xs[b], E, 10, positions=5, max_delta=2.0)
        assert [ids for ids, _ in got] == [ids for ids, _ in want]
        assert [lp for _, lp in got] == pytest.approx([lp for _, lp in want], abs=1e-4)
    with pytest.raises(ValueError, match="k must be"):
        k_best_roundings(top.values[0].tolist(), top.indices[0].tolist(), 0)
