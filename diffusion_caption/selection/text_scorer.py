"""A small convolutional text encoder that ranks candidate captions against a CLIP's image features.

Ranking a one-step diffusion captioner's candidate roundings by CLIP score (``diffusion_caption.selection.rerank``)
fixes most of its colour-shape binding errors, but only with a text tower that reads binding
(``research.tune_clip_text``), and that tower's passes cost more than the captioner: a 3-block
transformer over every distinct candidate. What decides between the candidates is local: which colour
word stands before which shape word, and how many. A stack of 1-D convolutions over the token
embeddings sees exactly such n-grams; pooled over the caption (mean and max) and projected into the
image features' space, it is a text tower in CLIP's sense (Kim, 2014's convolutional sentence encoder,
trained contrastively against a frozen image tower, as LiT trains a text tower against a locked one) at
a fraction of the cost. ``research.train_text_scorer`` trains it against binding hard negatives and the
full text tower's rankings.

It reads captions as its tokenizer's ids ([CLS] words [SEP] then [PAD]) and only pairs with the image
tower it was trained against: the checkpoint records that tower's fingerprint
(``ImageEncoder.image_tower_fingerprint``) and a captioner refuses it for any other.

The scorer offers what ``rerank.clip_scores`` asks of a CLIP: ``text_tokenizer``, ``context_length``,
``device``, ``encode_text`` and ``encode_text_ids``.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .. import checkpoint as ckpt

SCORER_CONFIG = "text_scorer.json"
SCORER_WEIGHTS = "text_scorer.safetensors"


@dataclass
class TextScorerConfig:
    vocab_size: int
    context_length: int
    pad_id: int
    embed_dim: int  # the size of the image features it is compared with
    width: int = 128
    layers: int = 2
    kernel: int = 3  # each layer widens what a position sees by kernel - 1 tokens
    positional: bool = True  # add a learned position embedding; without one, the first block is table lookups
    image_tower: str = ""  # fingerprint of the image tower whose features it was trained against


class ConvBlock(nn.Module):
    """Pre-norm residual block: LayerNorm, a 1-D convolution over positions, GELU, a position-wise linear."""

    def __init__(self, width: int, kernel: int):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be odd and positive (a centred window), got {kernel}")
        self.norm = nn.LayerNorm(width)
        self.conv = nn.Conv1d(width, width, kernel, padding=kernel // 2)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, valid: bool = False) -> torch.Tensor:
        """x [N, L, W]; mask [N, L, 1]: padding is zeroed before the window reads it. ``valid``: no
        padding at the ends, the output [N, L - 2r, W] is the positions whose whole window lies in x."""
        if not valid:
            h = self.conv((self.norm(x) * mask).transpose(1, 2)).transpose(1, 2)
            return x + self.out(nn.functional.gelu(h)) * mask
        k = self.conv.kernel_size[0]
        taps = (self.norm(x) * mask).unfold(1, k, 1).flatten(2)  # [N, L - 2r, W * k]: each output's window
        h = nn.functional.linear(taps, self.conv.weight.flatten(1), self.conv.bias)  # the convolution, as one matmul
        return crop(x, k // 2) + self.out(nn.functional.gelu(h)) * crop(mask, k // 2)


def crop(x: torch.Tensor, r: int) -> torch.Tensor:
    """x [N, L, ...] without its first and last ``r`` positions."""
    return x[:, r:x.shape[1] - r]


def unique_rows(rows: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rows of an integer tensor [P, w] (ids below ``vocab_size``) and, for each row, the index
    of its distinct row (``torch.unique(rows, dim=0, return_inverse=True)``, without its order). When the
    rows fit one int64 key each (``vocab_size ** w < 2 ** 62``), the keys are uniqued instead: a sort of P
    numbers rather than of P rows."""
    w = rows.shape[1]
    if vocab_size ** w >= 2 ** 62:
        return torch.unique(rows, dim=0, return_inverse=True)
    key = (rows * vocab_size ** torch.arange(w, device=rows.device)).sum(1)  # not a matmul: CUDA has no int64 one
    keys, where = torch.unique(key, return_inverse=True)
    first = torch.empty(len(keys), dtype=torch.long, device=rows.device)
    first.scatter_(0, where, torch.arange(len(key), device=rows.device))  # one occurrence of each
    return rows[first], where


class ConvTextEncoder(nn.Module):
    def __init__(self, cfg: TextScorerConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width)) if cfg.positional else None
        self.blocks = nn.ModuleList([ConvBlock(cfg.width, cfg.kernel) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(cfg.width)
        self.projection = nn.Linear(2 * cfg.width, cfg.embed_dim, bias=False)  # [mean; max] -> image space
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))  # log(1 / 0.07), as CLIP starts
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        if self.positional_embedding is not None:
            nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[N, D] unnormalised embeddings of token ids [N, L] (L <= context_length)."""
        if ids.dim() != 2 or ids.shape[1] > self.cfg.context_length:
            raise ValueError(f"expected token ids [N, <= {self.cfg.context_length}], got {tuple(ids.shape)}")
        if self.positional_embedding is None:
            return self.forward_by_windows(ids)
        keep = ids != self.cfg.pad_id
        n = int(keep.any(0).nonzero().max()) + 1 if keep.any() else 1  # the batch's longest caption
        ids, keep = ids[:, :n], keep[:, :n]
        mask = keep.unsqueeze(-1).to(self.token_embedding.weight.dtype)
        x = (self.token_embedding(ids) + self.positional_embedding[:n]) * mask
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        count = mask.sum(1).clamp(min=1)
        mean = (x * mask).sum(1) / count
        peak = x.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(1)
        peak = torch.where(keep.any(1, keepdim=True), peak, torch.zeros_like(peak))
        return self.projection(torch.cat([mean, peak], -1))

    def forward_by_windows(self, ids: torch.Tensor) -> torch.Tensor:
        """``forward`` without position embeddings, computed once per distinct window of tokens.

        Without positions, the stack's output at a token is a function of the window of 2R + 1 tokens
        around it alone (R = layers * (kernel // 2); [PAD] beyond the caption's ends reads as the zeros a
        convolution pads with). Candidate roundings of one caption differ in a few tokens, so a batch of
        them holds far fewer distinct windows than positions (about 900 against 8,000 for 64 roundings of
        32 captions): each distinct window is run once through valid (unpadded) convolutions down to its
        centre, then the centres are gathered back to their positions and pooled per caption."""
        cfg = self.cfg
        r = cfg.kernel // 2
        keep = ids != cfg.pad_id
        windows, where, owner = self.distinct_windows(ids)
        mask = (windows != cfg.pad_id).unsqueeze(-1).to(self.token_embedding.weight.dtype)
        x = crop(self.token_embedding(windows) * mask, r) + self.first_block_by_lookup(windows, valid=True) * crop(mask, r)
        mask = crop(mask, r)
        for block in self.blocks[1:]:
            x = block(x, mask, valid=True)
            mask = crop(mask, r)
        h = self.norm(x[:, 0])[where]  # [P, W]: each real position's output
        n, width = ids.shape[0], h.shape[1]
        count = keep.sum(1, keepdim=True).clamp(min=1).to(h.dtype)
        mean = h.new_zeros(n, width).index_add(0, owner, h) / count
        peak = h.new_zeros(n, width).scatter_reduce(0, owner[:, None].expand_as(h), h, "amax", include_self=False)
        return self.projection(torch.cat([mean, peak], -1))  # a caption of [PAD] alone pools to zeros

    @torch.compiler.disable  # data-dependent sizes (unique, nonzero): always eager, should a caller compile the model
    def distinct_windows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The distinct windows [U, 2R+1] of tokens centred on the real (not [PAD]) positions of ``ids``
        [N, L], each real position's window (an index into them) and each real position's caption."""
        cfg = self.cfg
        R = cfg.layers * (cfg.kernel // 2)
        keep = ids != cfg.pad_id
        windows = nn.functional.pad(ids, (R, R), value=cfg.pad_id).unfold(1, 2 * R + 1, 1)[keep]  # [P, 2R+1]
        windows, where = unique_rows(windows, cfg.vocab_size)
        return windows, where, keep.nonzero()[:, 0]

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """``forward``, under open_clip's name for it, so code that ranks with a CLIP ranks with this too."""
        return self(ids)

    def first_block_by_lookup(self, ids: torch.Tensor, valid: bool = False) -> torch.Tensor:
        """The first block's residual branch, ``out(gelu(conv(norm(x) * mask)))`` for x the token embeddings,
        without a convolution. With no position embedding, the normalised input at a position depends on
        its token alone, so each tap j of the window is a table over the vocabulary, ``norm(E) @ W_j^T``
        ([PAD]'s row zero, as the mask makes it), and the convolution is the sum of k lookups: the
        [V, W] x [W, W] products replace a [N*L, kW] x [kW, W] one. The same arithmetic in training and
        inference (``tests/test_text_scorer.py`` compares it with the convolution). ``valid``: as
        ``ConvBlock``'s, only the positions whose whole window lies in ``ids``."""
        first, cfg = self.blocks[0], self.cfg
        r = cfg.kernel // 2
        table = first.norm(self.token_embedding.weight)
        table = table * (torch.arange(table.shape[0], device=ids.device) != cfg.pad_id).unsqueeze(-1).to(table.dtype)
        taps = torch.einsum("vi,oij->jvo", table, first.conv.weight)  # [k, V, W]: tap j's contribution per token
        padded = ids if valid else nn.functional.pad(ids, (r, r), value=cfg.pad_id)
        n = padded.shape[1] - 2 * r
        h = first.conv.bias + sum(nn.functional.embedding(padded[:, j:j + n], taps[j]) for j in range(cfg.kernel))
        return first.out(nn.functional.gelu(h))


class TextScorer:
    """A ``ConvTextEncoder`` with its tokenizer, on a device; the scorer side of ``rerank``."""

    def __init__(self, model: ConvTextEncoder, text_tokenizer, device: str | torch.device = "cpu"):
        self.model = model.eval()
        self._net = self.model  # what encode_text_ids calls: the model, or its compiled graph
        self.text_tokenizer = text_tokenizer
        self.device = torch.device(device)
        self.model.to(self.device)

    @property
    def config(self) -> TextScorerConfig:
        return self.model.cfg

    @property
    def context_length(self) -> int:
        return self.model.cfg.context_length

    @property
    def feature_dim(self) -> int:
        return self.model.cfg.embed_dim

    def to(self, device) -> "TextScorer":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def compile(self, **options) -> "TextScorer":
        """Score through ``torch.compile(model, dynamic=True, **options)``: the candidates' count and length
        change from batch to batch, so the graph is compiled for dynamic shapes. Weights stay shared.

        A scorer without position embeddings stays eager: its distinct-window path
        (``ConvTextEncoder.forward_by_windows``) is a few small matrix products around a data-dependent
        unique, and compiled it ran slower on the 2-core CPU (17.2 against 9.9 ms for a batch's 64
        roundings of 32 captions)."""
        if self.model.positional_embedding is not None:
            self._net = torch.compile(self.model, **{"dynamic": True, **options})
        return self

    @staticmethod
    def is_checkpoint(path: str) -> bool:
        return os.path.isfile(os.path.join(str(path), SCORER_CONFIG))

    @classmethod
    def from_pretrained(cls, path: str, device="cpu") -> "TextScorer":
        from ..tokenizer import CaptionTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"text scorer directory not found: {path}")
        cfg_path, weights = os.path.join(path, SCORER_CONFIG), os.path.join(path, SCORER_WEIGHTS)
        for f in (cfg_path, weights):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f}: missing from the text scorer checkpoint")
        raw = ckpt.read_json(cfg_path)
        known = {f.name for f in fields(TextScorerConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ckpt.CheckpointError(f"{cfg_path}: unknown fields {unknown}")
        try:
            cfg = TextScorerConfig(**raw)
        except TypeError as e:
            raise ckpt.CheckpointError(f"{cfg_path}: {e}") from None
        model = ckpt.build_and_load(lambda: ConvTextEncoder(cfg), weights, cfg_path)
        return cls(model, CaptionTokenizer.from_pretrained(path), device)

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        ckpt.write_json(os.path.join(path, SCORER_CONFIG), asdict(self.config))
        ckpt.save_tensors({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                          os.path.join(path, SCORER_WEIGHTS))
        self.text_tokenizer.save_pretrained(path)

    @torch.no_grad()
    def encode_text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """[N, D] unnormalised embeddings of token ids [N, context_length]."""
        return self._net(ids.to(self.device))

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 1024) -> torch.Tensor:
        """[N, D] L2-normalised embeddings of ``texts``, in the image features' space."""
        out = [nn.functional.normalize(self.encode_text_ids(self.text_tokenizer.encode(list(texts[i:i + batch_size]),
                                                                                       self.context_length)).float(),
                                       dim=-1)
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.feature_dim, device=self.device)
