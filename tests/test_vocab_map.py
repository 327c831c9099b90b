"""The vocabulary map: fitting (UMAP and PCA), storage keyed by the weights' hash, and point placement."""
import json

import numpy as np
import pytest

from diffusion_caption.viz.vocab_map import (VocabMap, VocabMapError, VocabMapJob, cache_path, embedding_hash,
                                         find_vocab_map, fit_vocab_map, load_or_fit, main)


def two_clusters(n=20, d=8, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 0.3, (n, d)) + 6.0
    b = rng.normal(0, 0.3, (n, d)) - 6.0
    return np.concatenate([a, b]).astype(np.float32), [f"tok{i}" for i in range(2 * n)]


def test_umap_fit_keeps_clusters_apart():
    """The real UMAP (the slow first fit of a process: numba compiles it)."""
    E, toks = two_clusters()
    m = fit_vocab_map(E, toks, method="umap", n_neighbors=8)
    assert m.coords.shape == (40, 2) and np.isfinite(m.coords).all()
    assert m.method == "umap" and m.params["n_neighbors"] == 8
    ca, cb = m.coords[:20], m.coords[20:]
    spread = max(np.linalg.norm(ca - ca.mean(0), axis=1).max(), np.linalg.norm(cb - cb.mean(0), axis=1).max())
    assert np.linalg.norm(ca.mean(0) - cb.mean(0)) > 2 * spread


def test_pca_fit_is_deterministic_and_separates_clusters():
    E, toks = two_clusters()
    m1, m2 = fit_vocab_map(E, toks, method="pca"), fit_vocab_map(E, toks, method="pca")
    np.testing.assert_array_equal(m1.coords, m2.coords)
    sa, sb = np.sign(m1.coords[:20, 0]), np.sign(m1.coords[20:, 0])  # the first component splits the clusters
    assert abs(sa.sum()) == 20 and abs(sb.sum()) == 20 and sa[0] != sb[0]
    with pytest.raises(ValueError, match="method must be one of"):
        fit_vocab_map(E, toks, method="tsne")
    with pytest.raises(ValueError, match="do not match"):
        fit_vocab_map(E, toks[:-1], method="pca")


def test_place_sits_on_tokens_and_between_two():
    # four tokens far apart on the axes: rounding is nearly one-hot at each of them
    E = np.array([[10, 0, 0], [0, 10, 0], [-10, 0, 0], [0, -10, 0]], dtype=np.float32)
    coords = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float32)
    m = VocabMap(tokens=list("abcd"), coords=coords, embedding_hash=embedding_hash(E), method="test", embeddings=E)
    np.testing.assert_allclose(m.place(E), coords, atol=1e-5)
    # equidistant from tokens 0 and 1 (and much nearer to them than to 2 and 3): halfway on the map
    mid = m.place(np.array([5, 5, 0], dtype=np.float32))
    np.testing.assert_allclose(mid, [0.5, 0.0], atol=1e-5)
    # shapes are kept: [S, L, d] -> [S, L, 2]
    assert m.place(np.zeros((3, 5, 3), dtype=np.float32)).shape == (3, 5, 2)
    with pytest.raises(ValueError, match="dimension"):
        m.place(np.zeros((2, 4), dtype=np.float32))


def test_place_follows_the_rounding_distribution():
    """A point that rounds to token 0 with probability p sits a fraction 1-p of the way to token 1."""
    E = np.array([[0, 0], [2, 0], [50, 50], [-50, 50]], dtype=np.float32)
    coords = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=np.float32)
    m = VocabMap(tokens=list("abcd"), coords=coords, embedding_hash=embedding_hash(E), method="test", embeddings=E)
    x = np.array([0.8, 0.0], dtype=np.float32)
    logits = -np.array([0.8 ** 2, 1.2 ** 2])
    p = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(m.place(x), [10 * p[1], 0.0], atol=1e-4)


def test_save_load_and_hash_check(tmp_path):
    E, toks = two_clusters()
    m = fit_vocab_map(E, toks, method="pca")
    path = str(tmp_path / "map.json")
    m.save(path)
    data = json.loads(open(path).read())
    assert data["format"] == "diffusion-caption/vocab-map/1" and data["embedding_sha256"] == embedding_hash(E)
    back = VocabMap.load(path, E)
    np.testing.assert_allclose(back.coords, m.coords, atol=1e-4)
    assert back.tokens == toks
    other = E.copy()
    other[0, 0] += 1e-3
    with pytest.raises(VocabMapError, match="made for other weights"):
        VocabMap.load(path, other)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(VocabMapError, match="bad.json: not valid JSON"):
        VocabMap.load(str(tmp_path / "bad.json"))
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(VocabMapError, match="not a vocabulary map"):
        VocabMap.load(str(tmp_path / "other.json"))


def test_lookup_prefers_checkpoint_and_ignores_other_weights(tmp_path):
    E, toks = two_clusters()
    cache = str(tmp_path / "cache")
    assert find_vocab_map(E, None, cache) is None
    m = load_or_fit(E, toks, cache, method="pca")
    assert (tmp_path / "cache" / "vocab_maps").is_dir()
    found = find_vocab_map(E, None, cache)
    assert found is not None and found.embeddings is not None
    np.testing.assert_allclose(found.coords, m.coords, atol=1e-4)
    assert find_vocab_map(E + 1, None, cache) is None  # other weights: not this map
    assert find_vocab_map(E, None, cache, method="umap") is None  # other method: not this map
    umap_like = VocabMap(toks, m.coords * 2, embedding_hash(E), "umap")  # both methods' maps live side by side
    umap_like.save(cache_path(cache, embedding_hash(E), "umap"))
    assert find_vocab_map(E, None, cache, method="umap").method == "umap"
    assert find_vocab_map(E, None, cache, method="pca").method == "pca"
    # a map shipped in the checkpoint directory wins over the cache
    ck = tmp_path / "ck"
    ck.mkdir()
    shipped = VocabMap(toks, m.coords + 100, embedding_hash(E), "pca")
    shipped.save(str(ck / "vocab_map.json"))
    assert find_vocab_map(E, str(ck), cache).coords[0, 0] == pytest.approx(m.coords[0, 0] + 100, abs=1e-3)


def test_background_job_and_command_line(tmp_path, capsys):
    E, toks = two_clusters()
    cache = str(tmp_path / "cache")
    job = VocabMapJob(E, toks, cache_dir=cache, method="pca")
    assert job.map is None and "being computed" in job.status
    m = job.wait(120)
    assert m is not None, job.error
    assert "PCA of 40 token embeddings" in job.status
    assert cache_path(cache, embedding_hash(E), "pca").endswith("-pca.json")
    assert (tmp_path / "cache" / "vocab_maps" / cache_path(cache, embedding_hash(E), "pca").split("/")[-1]).is_file()
    assert not [f for f in (tmp_path / "cache" / "vocab_maps").iterdir() if f.suffix == ".npz"]  # input removed
    # a second job finds the stored map at once
    again = VocabMapJob(E, toks, cache_dir=cache, method="pca")
    assert again.map is not None and again.proc is None
    # the command line reports a missing checkpoint as a message
    assert main([str(tmp_path / "missing")]) == 1
    assert "not found" in capsys.readouterr().err


def test_command_line_ships_a_map_inside_a_checkpoint(tmp_path, tokenizer, clip_encoder, capsys):
    from app_server import save_tiny_checkpoint

    from diffusion_caption import Captioner

    ck = save_tiny_checkpoint(tokenizer, clip_encoder, str(tmp_path / "ckpt"))
    assert main([ck, "--method", "pca"]) == 0
    assert "wrote" in capsys.readouterr().out
    cap = Captioner.from_pretrained(ck)
    m = find_vocab_map(cap.denoiser.embeddings, checkpoint_dir=ck, cache_dir=None)
    assert m is not None and m.method == "pca" and len(m.tokens) == tokenizer.vocab_size
    assert m.tokens[:3] == tokenizer.token_strings([0, 1, 2])
