"""ClipCap's two mapping networks: a CLIP image feature in, ``prefix_len`` GPT-2 input embeddings out.

* ``MLPMapper``: feature -> Linear -> Tanh -> Linear -> [prefix_len, n_embd]. ClipCap pairs it with a
  prefix of 10 and a GPT-2 that is fine-tuned along with it.
* ``TransformerMapper``: the feature is projected to ``clip_len`` tokens, ``prefix_len`` learned
  constants are appended, a small transformer encoder mixes them, and its outputs at the constants'
  positions are the prefix. ClipCap pairs it with a prefix of 40 and a frozen GPT-2.
"""
from __future__ import annotations

import torch
from torch import nn

MAPPERS = ("mlp", "transformer")


class MLPMapper(nn.Module):
    def __init__(self, cond_dim: int, n_embd: int, prefix_len: int, hidden: int = 0):
        super().__init__()
        self.prefix_len, self.n_embd = prefix_len, n_embd
        hidden = hidden or (n_embd * prefix_len) // 2  # ClipCap's hidden width
        self.net = nn.Sequential(nn.Linear(cond_dim, hidden), nn.Tanh(), nn.Linear(hidden, n_embd * prefix_len))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """[B, cond_dim] -> [B, prefix_len, n_embd]."""
        return self.net(feature).view(feature.shape[0], self.prefix_len, self.n_embd)


class TransformerMapper(nn.Module):
    def __init__(self, cond_dim: int, n_embd: int, prefix_len: int, clip_len: int = 10, n_layers: int = 8,
                 n_heads: int = 8):
        super().__init__()
        if n_embd % n_heads:
            raise ValueError(f"the transformer mapper needs n_embd ({n_embd}) divisible by mapper_heads ({n_heads})")
        self.prefix_len, self.clip_len, self.n_embd = prefix_len, clip_len, n_embd
        self.linear = nn.Linear(cond_dim, clip_len * n_embd)
        self.prefix_const = nn.Parameter(torch.randn(prefix_len, n_embd))
        layer = nn.TransformerEncoderLayer(n_embd, n_heads, dim_feedforward=2 * n_embd, dropout=0.0,
                                           activation="relu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """[B, cond_dim] -> [B, prefix_len, n_embd]."""
        B = feature.shape[0]
        x = self.linear(feature).view(B, self.clip_len, self.n_embd)
        const = self.prefix_const.to(x.dtype).unsqueeze(0).expand(B, -1, -1)
        return self.transformer(torch.cat([x, const], dim=1))[:, self.clip_len:]


def build_mapper(kind: str, cond_dim: int, n_embd: int, prefix_len: int, hidden: int = 0, clip_len: int = 10,
                 n_layers: int = 8, n_heads: int = 8) -> nn.Module:
    if kind == "mlp":
        return MLPMapper(cond_dim, n_embd, prefix_len, hidden)
    if kind == "transformer":
        return TransformerMapper(cond_dim, n_embd, prefix_len, clip_len, n_layers, n_heads)
    raise ValueError(f"mapper must be one of {MAPPERS}, got {kind!r}")
