"""The denoising network: a DistilBERT encoder over noisy token embeddings, told the timestep and the image.

Input x_t has shape [B, L, emb_dim]. It is lifted to the encoder width, given a timestep embedding
(added at every position) and the CLIP image feature, either as ``n_prefix`` extra tokens in front of the
caption with their own segment embedding (``concat``, the seed paper's best) or added at every caption
position (``add``); the projection is linear, with an optional residual MLP beside it (``cond_mlp``,
ClipCap's mapping network). The encoder's output at the caption positions is projected back to ``emb_dim``: the
prediction of x0 (or of the noise, with ``predict="eps"``). The token embedding table lives here too: it
makes x0 from captions in training, and rounding is tied to it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import CaptionerConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, [B] -> [B, dim] (as in improved-diffusion)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def build_encoder(cfg: CaptionerConfig, encoder_config: dict | None = None):
    """A transformers DistilBertModel.

    With ``encoder_config`` (as stored in a checkpoint) the architecture is rebuilt without weights and
    without any download; otherwise "tiny" builds it from the config fields, and any other name or path
    loads pretrained DistilBERT weights through ``from_pretrained``.
    """
    from transformers import DistilBertConfig, DistilBertModel

    if encoder_config is not None:
        return DistilBertModel(DistilBertConfig(**encoder_config))
    if cfg.encoder == "tiny":
        n_positions = cfg.seq_len + cfg.n_prefix
        return DistilBertModel(DistilBertConfig(
            vocab_size=1, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, hidden_dim=cfg.hidden_dim,
            dropout=cfg.dropout, attention_dropout=cfg.dropout, max_position_embeddings=max(64, n_positions)))
    from . import hub

    hub.require([hub.Need(cfg.encoder, "DistilBERT", "--encoder DIR (a folder saved with save_pretrained)")])
    try:
        model = DistilBertModel.from_pretrained(cfg.encoder)
    except OSError as e:
        raise OSError(f"could not load DistilBERT weights {cfg.encoder!r} (a hub id needs a connection; "
                      f"a local directory saved with save_pretrained works offline): {e}") from None
    if model.config.dim != cfg.dim:
        raise ValueError(f"{cfg.encoder} has width {model.config.dim}, but the config says dim={cfg.dim}")
    return model


class Denoiser(nn.Module):
    def __init__(self, cfg: CaptionerConfig, encoder_config: dict | None = None):
        super().__init__()
        self.cfg = cfg
        H = cfg.dim
        self.encoder = build_encoder(cfg, encoder_config)
        pretrained = cfg.encoder != "tiny" and encoder_config is None
        if pretrained and cfg.emb_dim == H and cfg.vocab_size == self.encoder.config.vocab_size:
            # the seed paper's setting: start from DistilBERT's own word embeddings
            word = self.encoder.embeddings.word_embeddings.weight.detach().clone()
            self.token_embedding = nn.Embedding.from_pretrained(word, freeze=cfg.freeze_embeddings)
        else:
            self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
            nn.init.normal_(self.token_embedding.weight, std=1.0)
            self.token_embedding.weight.requires_grad_(not cfg.freeze_embeddings)
        # the encoder never sees token ids: its own word table is replaced by a stub to save memory
        self.encoder.embeddings.word_embeddings = nn.Embedding(1, H).requires_grad_(False)
        self.encoder.config.vocab_size = 1
        self.input_up_proj = nn.Sequential(nn.Linear(cfg.emb_dim, H), nn.Tanh(), nn.Linear(H, H))
        self.self_cond_proj = None
        if cfg.self_cond:  # the previous x0 estimate joins x_t before the input MLP's first activation, as if
            # the two were concatenated; it starts at zero, so a checkpoint without it can be fine-tuned into it
            self.self_cond_proj = nn.Linear(cfg.emb_dim, H, bias=False)
            nn.init.zeros_(self.self_cond_proj.weight)
        self.time_embed = nn.Sequential(nn.Linear(H, 4 * H), nn.SiLU(), nn.Linear(4 * H, H))
        n_cond = cfg.n_prefix if cfg.fusion == "concat" else 1
        self.cond_proj = nn.Linear(cfg.cond_dim, n_cond * H)
        self.cond_mlp = None
        if cfg.cond_mlp:  # residual: its last layer starts at zero, so it starts as the linear projection alone
            self.cond_mlp = nn.Sequential(nn.Linear(cfg.cond_dim, cfg.cond_mlp), nn.GELU(),
                                          nn.Linear(cfg.cond_mlp, n_cond * H))
            nn.init.zeros_(self.cond_mlp[-1].weight)
            nn.init.zeros_(self.cond_mlp[-1].bias)
        self.segment_embedding = nn.Embedding(2, H)  # 0: caption positions, 1: image prefix
        self.null_cond = nn.Parameter(torch.zeros(cfg.cond_dim))  # the "no image" input for guidance
        self.output_down_proj = nn.Sequential(nn.Linear(H, H), nn.Tanh(), nn.Linear(H, cfg.emb_dim))
        self.feature_head = nn.Linear(H, cfg.cond_dim) if cfg.predict_feature else None

    @property
    def encoder_config(self) -> dict:
        """The DistilBERT architecture, stored in checkpoints so that loading needs no download."""
        d = self.encoder.config.to_dict()
        return {k: d[k] for k in ("vocab_size", "max_position_embeddings", "sinusoidal_pos_embds", "n_layers",
                                  "n_heads", "dim", "hidden_dim", "dropout", "attention_dropout", "activation",
                                  "initializer_range", "qa_dropout", "seq_classif_dropout") if k in d}

    @property
    def embeddings(self) -> torch.Tensor:
        """The token embedding table E, [V, emb_dim]; rounding is tied to it."""
        return self.token_embedding.weight

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                drop_cond: torch.Tensor | None = None,
                x_self_cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predict x0 (or eps) for ``x_t`` at timesteps ``t`` given image features ``cond`` [B, cond_dim].

        ``drop_cond`` [B] (bool) replaces the feature by the learned null condition where True; ``cond``
        None drops it everywhere. ``x_self_cond`` [B, L, emb_dim] is the previous x0 estimate of a
        self-conditioned network (None: zeros, the first step's input); other networks ignore it.
        Returns (prediction [B, L, emb_dim], predicted image feature or None).
        """
        B, L, _ = x_t.shape
        H = self.cfg.dim
        null = self.null_cond.to(x_t.dtype).expand(B, -1)
        if cond is None:
            cond = null
        elif drop_cond is not None:
            cond = torch.where(drop_cond[:, None], null, cond.to(x_t.dtype))
        if self.self_cond_proj is None or x_self_cond is None:
            h = self.input_up_proj(x_t)
        else:
            first, act, second = self.input_up_proj
            h = second(act(first(x_t) + self.self_cond_proj(x_self_cond.to(x_t.dtype))))
        # a timestep per row [B], or per position [B, L] (a network trained with revealed positions)
        # its MLP is as wide as an encoder layer's feed-forward block, and a batch holds few distinct timesteps
        # (one per sampling step; two, 0 and T-1, under the reveal sampler): embed each distinct one once
        t_unique, where = torch.unique(t.reshape(-1), return_inverse=True)
        te = self.time_embed(timestep_embedding(t_unique, H).to(x_t.dtype))[where].view(*t.shape, H)
        h = h + (te[:, None] if t.dim() == 1 else te)
        cond = cond.to(x_t.dtype)
        c = self.cond_proj(cond) if self.cond_mlp is None else self.cond_proj(cond) + self.cond_mlp(cond)
        seg = self.segment_embedding.weight
        if self.cfg.fusion == "concat":
            prefix = c.view(B, self.cfg.n_prefix, H) + seg[1]
            h = torch.cat([prefix, h + seg[0]], dim=1)
        else:
            h = h + c[:, None] + seg[0]
        out = self.encoder(inputs_embeds=h).last_hidden_state
        out = out[:, -L:]
        feature = self.feature_head(out.mean(1)) if self.feature_head is not None else None
        return self.output_down_proj(out), feature
