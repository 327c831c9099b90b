"""A 2-D map of the vocabulary's token embeddings, and denoising trajectories placed on that same map.

The map is a UMAP projection (``method="umap"``; ``"pca"`` is the instant alternative) of the token
embedding table E [V, d] that rounding is tied to. It is fitted once per checkpoint and stored as JSON
(tokens, 2-D coordinates, method and the SHA-256 of E), looked up by that hash: first as
``<checkpoint>/vocab_map.json`` (ship it there with ``python -m diffusion_caption.viz.vocab_map CHECKPOINT``),
then in ``<cache_dir>/vocab_maps/<hash>-<method>.json``. A map whose hash does not match the weights is ignored.

Placing a point (a predicted x0 or a noisy x_t) needs no UMAP call at all: ``VocabMap.place`` puts it
at the barycentre of its ``k`` nearest tokens' map coordinates, weighted by the rounding distribution
restricted to them (the same ``softmax(-||x - E_v||^2)`` that gives a token's confidence),

    pos(x) = sum_i p_i c_i,   p_i = softmax_i(-||x - E_i||^2)   over the k nearest tokens i,

so a position that rounds to a token with confidence 0.95 sits (95 %) on that token, a position torn
between two tokens sits between them, and the map agrees with the confidence heatmap. It costs one
[N, V] distance matrix: milliseconds, no just-in-time compilation, nothing to warm up.

Fitting UMAP is slow the first time in a process (numba compiles for tens of seconds on 2 cores), so
``VocabMapJob`` fits it in a separate process and a UI polls it, never blocking a request on it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

FORMAT = "diffusion-caption/vocab-map/1"
METHODS = ("umap", "pca")
MAP_NAME = "vocab_map.json"


class VocabMapError(ValueError):
    """A vocabulary map file that is unreadable, malformed, or belongs to other weights."""


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().float().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def embedding_hash(embeddings) -> str:
    """SHA-256 of the embedding table (float32, C order) and its shape: the key of a stored map."""
    e = _as_numpy(embeddings)
    h = hashlib.sha256(f"{e.shape[0]}x{e.shape[1]}:".encode())
    h.update(e.tobytes())
    return h.hexdigest()


@dataclass
class VocabMap:
    tokens: list[str]
    coords: np.ndarray  # [V, 2] float32, one point per token
    embedding_hash: str
    method: str
    params: dict = field(default_factory=dict)
    seconds: float | None = None  # time the fit took
    embeddings: np.ndarray | None = field(default=None, repr=False)  # [V, d]; needed by place(), not stored

    def __post_init__(self):
        self.coords = np.asarray(self.coords, dtype=np.float32)
        if self.coords.ndim != 2 or self.coords.shape[1] != 2 or self.coords.shape[0] != len(self.tokens):
            raise VocabMapError(f"coords of shape {self.coords.shape} do not match {len(self.tokens)} tokens")

    # ------------------------------------------------------------------------------------ placement
    def place(self, points, k: int = 8) -> np.ndarray:
        """Map coordinates [..., 2] of embedding-space points [..., d]: rounding-weighted barycentres."""
        if self.embeddings is None:
            raise VocabMapError("this map has no embeddings attached; load it with the weights' embeddings")
        x = _as_numpy(points)
        E = self.embeddings
        if x.shape[-1] != E.shape[1]:
            raise ValueError(f"points have dimension {x.shape[-1]} but the embeddings have {E.shape[1]}")
        flat = x.reshape(-1, E.shape[1]).astype(np.float64)
        Ed = E.astype(np.float64)
        d2 = (flat ** 2).sum(1, keepdims=True) - 2.0 * flat @ Ed.T + (Ed ** 2).sum(1)[None]
        d2 = np.maximum(d2, 0.0)
        k = max(1, min(k, E.shape[0]))
        nn = np.argpartition(d2, k - 1, axis=1)[:, :k]  # [N, k] nearest tokens (unordered)
        nd2 = np.take_along_axis(d2, nn, axis=1)
        logits = -(nd2 - nd2.min(1, keepdims=True))
        w = np.exp(logits)
        w = w / w.sum(1, keepdims=True)
        out = (w[..., None] * self.coords[nn].astype(np.float64)).sum(1)
        return out.reshape(*x.shape[:-1], 2).astype(np.float32)

    # ------------------------------------------------------------------------------------ files
    def to_json(self) -> dict:
        return {"format": FORMAT, "embedding_sha256": self.embedding_hash, "method": self.method,
                "params": self.params, "seconds": self.seconds, "tokens": list(self.tokens),
                "coords": [[round(float(a), 5), round(float(b), 5)] for a, b in self.coords]}

    def save(self, path: str) -> None:
        """Write the map as JSON, atomically (a half-written file is never seen by a reader)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, embeddings=None) -> "VocabMap":
        """Read a map; with ``embeddings`` it must belong to them (same hash) and they are attached."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except OSError as e:
            raise VocabMapError(f"{path}: cannot read the vocabulary map: {e.strerror or e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VocabMapError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise VocabMapError(f"{path}: not a vocabulary map (format {d.get('format') if isinstance(d, dict) else None!r}, "
                                f"expected {FORMAT!r})")
        for key in ("embedding_sha256", "method", "tokens", "coords"):
            if key not in d:
                raise VocabMapError(f"{path}: missing {key!r}")
        m = cls(tokens=list(d["tokens"]), coords=np.asarray(d["coords"], dtype=np.float32),
                embedding_hash=d["embedding_sha256"], method=d["method"], params=d.get("params") or {},
                seconds=d.get("seconds"))
        if embeddings is not None:
            m.attach(embeddings, source=path)
        return m

    def attach(self, embeddings, source: str = "map") -> "VocabMap":
        E = _as_numpy(embeddings)
        h = embedding_hash(E)
        if h != self.embedding_hash:
            raise VocabMapError(f"{source}: made for other weights (embedding hash {self.embedding_hash[:12]}..., "
                                f"these weights have {h[:12]}...)")
        self.embeddings = E
        return self


# ---------------------------------------------------------------------------------------------- fitting
def fit_vocab_map(embeddings, tokens: list[str], method: str = "umap", n_neighbors: int = 15,
                  min_dist: float = 0.1, seed: int = 0) -> VocabMap:
    """Project the embedding table to 2-D. UMAP is deterministic for a given seed (single-threaded)."""
    E = _as_numpy(embeddings)
    if E.ndim != 2 or E.shape[0] != len(tokens):
        raise ValueError(f"embeddings of shape {E.shape} do not match {len(tokens)} tokens")
    if E.shape[0] < 4:
        raise ValueError(f"a vocabulary map needs at least 4 tokens, got {E.shape[0]}")
    method = method.lower()
    t0 = time.perf_counter()
    if method == "umap":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by random_state": wanted, for determinism
            import umap

            nn = int(max(2, min(n_neighbors, E.shape[0] - 1)))
            params = {"n_neighbors": nn, "min_dist": min_dist, "seed": seed, "metric": "euclidean"}
            coords = umap.UMAP(n_neighbors=nn, min_dist=min_dist, random_state=seed, n_components=2,
                               init="spectral" if E.shape[0] > nn + 2 else "random").fit_transform(E)
    elif method == "pca":
        centred = E - E.mean(0, keepdims=True)
        _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
        coords = centred @ vt[:2].T
        coords = coords * np.sign(vt[:2].sum(1) + 1e-12)[None]  # fix the sign for reproducibility
        params = {}
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return VocabMap(tokens=list(tokens), coords=np.asarray(coords, dtype=np.float32), embedding_hash=embedding_hash(E),
                    method=method, params=params, seconds=round(time.perf_counter() - t0, 3), embeddings=E)


def cache_path(cache_dir: str, digest: str, method: str = "umap") -> str:
    return os.path.join(cache_dir, "vocab_maps", f"{digest[:24]}-{method}.json")


def find_vocab_map(embeddings, checkpoint_dir: str | None = None, cache_dir: str | None = None,
                   method: str | None = None) -> VocabMap | None:
    """A stored map for these weights (checkpoint's own first, then the cache), or None."""
    E = _as_numpy(embeddings)
    digest = embedding_hash(E)
    candidates = []
    if checkpoint_dir:
        candidates.append(os.path.join(checkpoint_dir, MAP_NAME))
    if cache_dir:
        candidates += [cache_path(cache_dir, digest, m) for m in ([method] if method else METHODS)]
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            m = VocabMap.load(path)
        except VocabMapError:
            continue
        if m.embedding_hash == digest and (method is None or m.method == method):
            m.embeddings = E
            return m
    return None


def load_or_fit(embeddings, tokens: list[str], cache_dir: str, checkpoint_dir: str | None = None,
                method: str = "umap") -> VocabMap:
    """The stored map for these weights, or a new fit written to the cache."""
    m = find_vocab_map(embeddings, checkpoint_dir, cache_dir, method)
    if m is None:
        m = fit_vocab_map(embeddings, tokens, method=method)
        m.save(cache_path(cache_dir, m.embedding_hash, method))
    return m


class VocabMapJob:
    """Get the map for some weights without blocking: a stored one at once, or a fit in a child process.

    ``poll()`` returns the map once it is there (None before); ``status`` says what is going on, for UIs.
    """

    def __init__(self, embeddings, tokens: list[str], cache_dir: str, checkpoint_dir: str | None = None,
                 method: str = "umap"):
        self.E = _as_numpy(embeddings)
        self.tokens = list(tokens)
        self.cache_dir, self.checkpoint_dir, self.method = cache_dir, checkpoint_dir, method
        self.map: VocabMap | None = find_vocab_map(self.E, checkpoint_dir, cache_dir, method)
        self.error: str | None = None
        self.proc: subprocess.Popen | None = None
        self.started = time.perf_counter()
        self._npz: str | None = None
        if self.map is None:
            self._start()

    def _start(self) -> None:
        os.makedirs(os.path.join(self.cache_dir, "vocab_maps"), exist_ok=True)
        fd, self._npz = tempfile.mkstemp(suffix=".npz", dir=os.path.join(self.cache_dir, "vocab_maps"))
        os.close(fd)
        np.savez(self._npz, embeddings=self.E, tokens=np.array(self.tokens, dtype=str))
        out = cache_path(self.cache_dir, embedding_hash(self.E), self.method)
        env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "diffusion_caption.viz.vocab_map", "--from-npz", self._npz,
                                      "--out", out, "--method", self.method], stdout=self._log, stderr=self._log,
                                     env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

    def poll(self) -> VocabMap | None:
        if self.map is not None or self.proc is None or self.error:
            return self.map
        rc = self.proc.poll()
        if rc is None:
            return None
        self._cleanup()
        if rc == 0:
            self.map = find_vocab_map(self.E, None, self.cache_dir, self.method)
        if self.map is None:
            self._log.seek(0)
            tail = self._log.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            self.error = f"computing the vocabulary map failed (exit code {rc}): {tail[0]}"
        return self.map

    def wait(self, timeout: float | None = None) -> VocabMap | None:
        if self.proc is not None and self.map is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        return self.poll()

    @property
    def status(self) -> str:
        if self.poll() is not None:
            return f"vocabulary map: {self.map.method.upper()} of {len(self.map.tokens)} token embeddings"
        if self.error:
            return self.error
        return (f"the vocabulary map ({self.method.upper()} of {len(self.tokens)} token embeddings) is being computed "
                f"for the first time for these weights ({time.perf_counter() - self.started:.0f} s so far; "
                "about a minute on 2 CPU cores); trajectories appear as soon as it is ready")

    def _cleanup(self) -> None:
        if self._npz and os.path.exists(self._npz):
            os.remove(self._npz)
        self._npz = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self._cleanup()


# ---------------------------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusion_caption.viz.vocab_map",
                                description="Fit and store the 2-D vocabulary map of a diffusion-caption checkpoint.")
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory (default output: CHECKPOINT/vocab_map.json)")
    p.add_argument("--out", help="where to write the map (JSON)")
    p.add_argument("--method", default="umap", choices=METHODS)
    p.add_argument("--from-npz", help=argparse.SUPPRESS)  # embeddings + tokens written by VocabMapJob
    args = p.parse_args(argv)
    try:
        if args.from_npz:
            with np.load(args.from_npz, allow_pickle=False) as z:
                E, tokens = z["embeddings"], [str(t) for t in z["tokens"]]
            os.remove(args.from_npz)  # the job's hand-over file: read once, then gone
            out = args.out
        elif args.checkpoint:
            from ..captioner import Captioner

            cap = Captioner.from_pretrained(args.checkpoint)
            E = cap.denoiser.embeddings
            tokens = cap.tokenizer.token_strings(list(range(cap.tokenizer.vocab_size)))
            out = args.out or os.path.join(args.checkpoint, MAP_NAME)
        else:
            p.error("give a checkpoint directory")
            return 2
        if not out:
            p.error("--out is required with --from-npz")
        m = fit_vocab_map(E, tokens, method=args.method)
        m.save(out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {m.method} map of {len(m.tokens)} tokens in {m.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
