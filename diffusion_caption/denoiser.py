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
from .packed import PackedLinear


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
    def block_size(self) -> int:
        """Positions denoised per step by a block denoiser; 0 for one that denoises all at once."""
        return self.cfg.block_size

    @property
    def embeddings(self) -> torch.Tensor:
        """The token embedding table E, [V, emb_dim]; rounding is tied to it."""
        return self.token_embedding.weight

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                drop_cond: torch.Tensor | None = None,
                x_self_cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cfg.block_size:
            raise TypeError("a block denoiser (block_size > 0) is called through forward_blocks (training) and "
                            "block_step (sampling, the 'block' sampler), which say which positions are clean")
        return self._forward_full(x_t, t, cond, drop_cond, x_self_cond)

    # ------------------------------------------------------------------------------ block diffusion
    def _image_projection(self, cond: torch.Tensor | None, drop_cond: torch.Tensor | None, B: int,
                          dtype: torch.dtype) -> torch.Tensor:
        """The projected image feature [B, n_cond * H]: ``cond`` [B, cond_dim], the learned null condition
        where ``drop_cond`` [B] is True or everywhere when ``cond`` is None."""
        null = self.null_cond.to(dtype).expand(B, -1)
        if cond is None:
            cond = null
        elif drop_cond is not None:
            cond = torch.where(drop_cond[:, None], null, cond.to(dtype))
        cond = cond.to(dtype)
        return self.cond_proj(cond) if self.cond_mlp is None else self.cond_proj(cond) + self.cond_mlp(cond)

    def _timestep_term(self, t: torch.Tensor | int, dtype: torch.dtype, device) -> torch.Tensor:
        """The timestep embedding, shaped ``t.shape + [H]`` (an int: [1, H]). Its MLP is as wide as an encoder
        layer's feed-forward block and a batch holds few distinct timesteps (one per sampling step, two in a
        block step): each distinct one is embedded once."""
        if isinstance(t, int):
            return self.time_embed(timestep_embedding(torch.tensor([t], device=device), self.cfg.dim).to(dtype))
        t_unique, where = torch.unique(t.reshape(-1), return_inverse=True)
        return self.time_embed(timestep_embedding(t_unique, self.cfg.dim).to(dtype))[where].view(*t.shape, -1)

    def _conditioning(self, cond: torch.Tensor | None, drop_cond: torch.Tensor | None, B: int,
                      dtype: torch.dtype) -> torch.Tensor:
        """The image's term of every caption position's input under ``fusion="add"`` [B, H]."""
        return self._image_projection(cond, drop_cond, B, dtype) + self.segment_embedding.weight[0].to(dtype)

    def _inputs(self, x: torch.Tensor, t: torch.Tensor | int, c: torch.Tensor) -> torch.Tensor:
        """Encoder inputs before the position embedding: lifted x, its timesteps ([B, N], or one int for all)
        and the image term ``c`` [B, H] of ``_conditioning``."""
        return self.input_up_proj(x) + self._timestep_term(t, x.dtype, x.device) + c[:, None]

    def _encode(self, h: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
                past: list[tuple[torch.Tensor, torch.Tensor]] | None = None, last: int | None = None,
                packed: dict | None = None):
        """DistilBERT's layers over ``h`` [B, N, H] at ``positions`` ([N], or [B, N] per row) under an attention
        pattern ``allowed`` ([N, M + N], or [B, 1, N, M + N] per row; True: query may attend to key), the keys
        being ``past``'s M cached positions per layer, then these N. Returns (hidden [B, N, H], each layer's
        (keys, values) of the M + N positions). With ``last`` = n only the last n positions' hidden states come
        out: the top layer reads the others' keys and values but computes nothing else for them (a block step
        needs the revealed positions' keys and values, not their outputs)."""
        import torch.nn.functional as F

        emb = self.encoder.embeddings
        train = self.training
        pe = emb.position_embeddings(positions)
        h = emb.LayerNorm(h + (pe if pe.dim() == 3 else pe[None]).to(h.dtype))
        if train:
            h = emb.dropout(h)
        B, N, H = h.shape
        kv = []
        layers = self.encoder.transformer.layer
        if not (train or torch.is_grad_enabled()):
            return self._encode_sampling(h, allowed, past, last, packed or self._packed())
        for i, layer in enumerate(layers):
            att = layer.attention
            nh = att.n_heads
            q, k, v = (lin(h).view(B, N, nh, H // nh).transpose(1, 2) for lin in (att.q_lin, att.k_lin, att.v_lin))
            if past is not None:
                k = torch.cat([past[i][0], k], dim=2)
                v = torch.cat([past[i][1], v], dim=2)
            kv.append((k, v))
            if last is not None and i == len(layers) - 1 and last < N:
                q, h, allowed, N = q[:, :, N - last:], h[:, N - last:], allowed[..., N - last:, :], last
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=att.dropout.p if train else 0.0)
            h = layer.sa_layer_norm(att.out_lin(a.transpose(1, 2).reshape(B, N, H)) + h)
            ffn = layer.ffn  # its lin1, activation, lin2 and dropout, without transformers' chunking wrapper
            f = ffn.lin2(ffn.activation(ffn.lin1(h)))
            h = layer.output_layer_norm((ffn.dropout(f) if train else f) + h)
        return h, kv

    def _encode_sampling(self, h, allowed, past, last, packed):
        """``_encode``'s layers as sampling runs them (no gradients): the prepacked products of ``_packed``
        (queries, keys and values in one; GELU and the residual sums inside the products), and attention as
        plain float32 products (a few queries over a few keys, where the fused attention kernel's setup costs
        more than the products, and bfloat16's costs more than float32's); the keys and values it returns, and
        so a sampling cache, are float32."""
        import torch.nn.functional as F

        B, N, H = h.shape
        kv, blocked = [], ~allowed  # the keys a query may not read
        top = len(packed["layers"]) - 1
        for i, (qkv, out, lin1, lin2, norm1, norm2, nh, act) in enumerate(packed["layers"]):
            q, k, v = (z.view(B, N, nh, H // nh).transpose(1, 2) for z in qkv(h).float().split(H, -1))
            if past is not None:
                k = torch.cat([past[i][0], k], dim=2)
                v = torch.cat([past[i][1], v], dim=2)
            kv.append((k, v))
            if last is not None and i == top and last < N:
                q, h, blocked, N = q[:, :, N - last:], h[:, N - last:], blocked[..., N - last:, :], last
            scores = (q @ k.transpose(-1, -2)).masked_fill_(blocked, float("-inf"))  # q is scaled already
            a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, H).to(h.dtype)
            h = F.layer_norm(out(a, add=h), *norm1)
            h = F.layer_norm(lin2(lin1(h, "gelu") if act is None else act(lin1(h)), add=h), *norm2)
        return h, kv

    def __getstate__(self) -> dict:  # copies and pickles leave the prepacked layers behind (made again on use)
        state = dict(self.__dict__)
        state.pop("_packed_memo", None)
        return state

    def _packed(self) -> dict:
        """The layers sampling multiplies by, prepacked (``packed.PackedLinear``): each encoder layer's query,
        key and value projections stacked into one ("qkv0", "qkv1", ...; the queries scaled by 1/sqrt(d_head),
        the attention's scale), its output and feed-forward layers, and the input and output MLPs; "layers"
        lists each encoder layer's as ``_encode_sampling`` reads them. Made again only when a weight has changed
        since (training steps, ``load_state_dict``, a cast)."""
        params = list(self.parameters())
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        memo = self.__dict__.get("_packed_memo")
        if memo is None or memo[0] != key:
            layers = {"up0": self.input_up_proj[0], "up2": self.input_up_proj[2],
                      "down0": self.output_down_proj[0], "down2": self.output_down_proj[2]}
            for i, layer in enumerate(self.encoder.transformer.layer):
                layers.update({f"out{i}": layer.attention.out_lin, f"lin1_{i}": layer.ffn.lin1,
                               f"lin2_{i}": layer.ffn.lin2})
            packed = {k: PackedLinear.of(v) for k, v in layers.items()}
            for i, layer in enumerate(self.encoder.transformer.layer):
                att = layer.attention
                scale = (att.dim // att.n_heads) ** -0.5  # the attention's 1/sqrt(d_head), folded into the queries
                packed[f"qkv{i}"] = PackedLinear(
                    torch.cat([att.q_lin.weight * scale, att.k_lin.weight, att.v_lin.weight]).detach(),
                    torch.cat([att.q_lin.bias * scale, att.k_lin.bias, att.v_lin.bias]).detach())
            gelu = self.encoder.config.activation == "gelu"  # transformers' exact GELU, which oneDNN's matches
            packed["layers"] = [(packed[f"qkv{i}"], packed[f"out{i}"], packed[f"lin1_{i}"], packed[f"lin2_{i}"],
                                 *[(n.normalized_shape, n.weight, n.bias, n.eps)
                                   for n in (layer.sa_layer_norm, layer.output_layer_norm)], layer.attention.n_heads,
                                 None if gelu else layer.ffn.activation)
                                for i, layer in enumerate(self.encoder.transformer.layer)]
            memo = self.__dict__["_packed_memo"] = (key, packed)
        return memo[1]

    def block_ids(self, L: int, device=None) -> torch.Tensor:
        """The block of each of ``L`` positions [L]: the caption's [CLS] alone in block 0 (sampling gives it, as
        an autoregressive model is given its first token), then ``block_size`` positions a block."""
        b = self.cfg.block_size
        return (torch.arange(L, device=device) + b - 1) // b

    def random_block_ids(self, B: int, L: int, p_split: float, generator: torch.Generator | None = None,
                         device=None) -> torch.Tensor:
        """Random block boundaries [B, L] inside the fixed ones (``block_ids``): [CLS] alone in block 0, then
        each fixed block cut between two of its positions with probability ``p_split`` per place, so blocks
        of 1 to ``block_size`` positions that never straddle two fixed blocks."""
        b = self.cfg.block_size
        j = torch.arange(L, device=device)
        fixed = ((j - 1) % b == 0) & (j > 0)  # where a fixed block starts
        cut = torch.rand((B, L), generator=generator, device=device) < p_split
        start = fixed[None] | (cut & (j > 1)[None])
        return start.long().cumsum(1)

    def forward_blocks(self, x_t: torch.Tensor, t: torch.Tensor, x_clean: torch.Tensor, cond: torch.Tensor | None,
                       drop_cond: torch.Tensor | None = None,
                       blocks: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """Every block's x0 prediction in one pass (Block Diffusion's vectorised training): the noisy
        caption ``x_t`` [B, L, d] at timesteps ``t`` [B, L] beside its clean copy ``x_clean`` [B, L, d]; a noisy
        position attends to the noisy positions of its own block and to the clean positions of the blocks
        before it, a clean position to the clean positions of its own block and those before. ``blocks``
        ([L] or [B, L], e.g. ``random_block_ids``) overrides the fixed ``block_ids``."""
        B, L, _ = x_t.shape
        blk = self.block_ids(L, x_t.device) if blocks is None else blocks.to(x_t.device)
        same, before = blk[..., :, None] == blk[..., None, :], blk[..., :, None] > blk[..., None, :]
        allowed = torch.cat([torch.cat([same, before], -1),
                             torch.cat([torch.zeros_like(same), same | before], -1)], -2)
        if allowed.dim() == 3:
            allowed = allowed[:, None]  # one pattern per caption, shared by the heads
        c = self._conditioning(cond, drop_cond, B, x_t.dtype)
        h = torch.cat([self._inputs(x_t, t, c), self._inputs(x_clean, 0, c)], 1)
        pos = torch.arange(L, device=x_t.device)
        out, _ = self._encode(h, torch.cat([pos, pos]), allowed)
        return self.output_down_proj(out[:, :L]), None

    def block_step(self, x_t: torch.Tensor, t: torch.Tensor | int, start: int | torch.Tensor, cond: torch.Tensor | None,
                   cache: dict | None = None, x_clean: torch.Tensor | None = None, *,
                   clean_start: torch.Tensor | None = None, clean_valid: torch.Tensor | None = None,
                   valid: torch.Tensor | None = None, clean_blocks: torch.Tensor | None = None):
        """One sampling step: the x0 prediction of the block at positions ``start`` ... (``x_t`` [B, b, d] at
        timesteps ``t``, [B, b] or one int), given the blocks before it: the ``cache`` of earlier steps (None at
        the first) and the block just revealed, ``x_clean`` [B, b', d] at the positions right before ``start``.
        Returns (x0 [B, b, d], the cache: the image's term, then each layer's keys and values of every
        revealed position). ``keep_rows(cache, rows)`` drops finished captions from it.

        Rows at different places (a sampler that commits a varying number of a block's positions): ``start``
        [B], the revealed positions from ``clean_start`` [B] on with ``clean_valid`` [B, b'] marking the ones
        that were revealed (the rest are padding), and ``valid`` [B, b] the block's positions inside the
        caption. Padding is never read (each padded position reads itself only), and the cache keeps which of
        its keys are real. ``clean_blocks`` [B, b'] (non-decreasing) splits the revealed positions into blocks
        of their own: each reads its block and the ones before (default: one block, all read each other)."""
        B, n, _ = x_t.shape
        m = 0 if x_clean is None else x_clean.shape[1]
        dev, dtype = x_t.device, x_t.dtype
        cache = dict(cache or {})
        if "c" not in cache:
            cache["c"] = self._conditioning(cond, None, B, dtype)
        kv_past = cache.get("kv")
        M = 0 if kv_past is None else kv_past[0][0].shape[2]
        shared = cache.setdefault("t", {})  # what every row shares, made once per caption batch
        x = x_t if not m else torch.cat([x_clean, x_t], 1)
        lin = None
        if not (self.training or torch.is_grad_enabled()):  # sampling: the prepacked layers, made once a batch
            lin = shared["packed"] if "packed" in shared else shared.setdefault("packed", self._packed())
        x = self.input_up_proj(x) if lin is None else lin["up2"](lin["up0"](x, "tanh"))
        if isinstance(t, int):  # the revealed positions at t = 0, the block at t
            if (m, n, t) not in shared:
                terms = [self._timestep_term(v, dtype, dev) for v in (0, t)]
                shared[m, n, t] = torch.cat([terms[0].expand(m, -1), terms[1].expand(n, -1)])
            h = x + (cache["c"][:, None] + shared[m, n, t])
        else:
            t_all = t if not m else torch.cat([t.new_zeros(B, m), t.expand(B, n)], 1)
            h = x + self._timestep_term(t_all, dtype, dev) + cache["c"][:, None]
        ragged = (torch.is_tensor(start) or clean_valid is not None or valid is not None or "valid" in cache
                  or clean_blocks is not None)
        if (m, n) not in shared:  # among these positions: clean ones never read the noisy block; each reads itself
            allowed = torch.ones(m + n, m + n, dtype=torch.bool, device=dev)
            allowed[:m, m:] = False
            offs = torch.cat([torch.arange(m), torch.arange(n)]).to(dev)
            shared[m, n] = (allowed, torch.eye(m + n, dtype=torch.bool, device=dev), offs,
                            torch.tensor([0] * m + [1] * n, device=dev))
        allowed, own, offs, which = shared[m, n]
        if not ragged:
            pos = torch.arange(start - m, start + n, device=dev)
            allowed = torch.cat([allowed.new_ones(m + n, M), allowed], 1) if M else allowed
        else:
            start = torch.as_tensor(start, device=dev).expand(B)
            first = start - m if clean_start is None else torch.as_tensor(clean_start, device=dev).expand(B)
            pos = torch.stack([first, start], 1)[:, which] + offs
            pos = pos.clamp_(0, self.encoder.config.max_position_embeddings - 1)
            ones = lambda k: torch.ones(B, k, dtype=torch.bool, device=dev)  # noqa: E731
            real = torch.cat([ones(m) if clean_valid is None else clean_valid, ones(n) if valid is None else valid], 1)
            allowed = (allowed & real[:, None, :]) | own  # [B, m + n, m + n]; a padded position reads itself alone
            if clean_blocks is not None:
                cb = torch.as_tensor(clean_blocks, device=dev)
                allowed[:, :m, :m] &= cb[:, None, :] <= cb[:, :, None]
            past = cache["valid"] if "valid" in cache else ones(M)  # [B, M]: which cached keys are real
            if M:
                allowed = torch.cat([past[:, None, :].expand(-1, m + n, -1), allowed], 2)
            allowed = allowed[:, None]
            cache["valid"] = torch.cat([past, real[:, :m]], 1) if M else real[:, :m]
        out, kv = self._encode(h, pos, allowed, kv_past, last=n, packed=lin)
        if m:
            cache["kv"] = [(k[:, :, :M + m], v[:, :, :M + m]) for k, v in kv]
        return (self.output_down_proj(out) if lin is None else lin["down2"](lin["down0"](out, "tanh"))), cache

    @staticmethod
    def keep_rows(cache: dict, rows: torch.Tensor) -> dict:
        """A block sampling cache with only ``rows`` (a bool mask or indices of the batch) kept."""
        out = {"c": cache["c"][rows], "t": cache.get("t", {})}
        if "valid" in cache:
            out["valid"] = cache["valid"][rows]
        if cache.get("kv") is not None:
            out["kv"] = [(k[rows], v[rows]) for k, v in cache["kv"]]
        return out

    def _forward_full(self, x_t, t, cond, drop_cond=None, x_self_cond=None):
        """Predict x0 (or eps) for ``x_t`` at timesteps ``t`` given image features ``cond`` [B, cond_dim].

        ``drop_cond`` [B] (bool) replaces the feature by the learned null condition where True; ``cond``
        None drops it everywhere. ``x_self_cond`` [B, L, emb_dim] is the previous x0 estimate of a
        self-conditioned network (None: zeros, the first step's input); other networks ignore it.
        Returns (prediction [B, L, emb_dim], predicted image feature or None).
        """
        B, L, _ = x_t.shape
        H = self.cfg.dim
        if self.self_cond_proj is None or x_self_cond is None:
            h = self.input_up_proj(x_t)
        else:
            first, act, second = self.input_up_proj
            h = second(act(first(x_t) + self.self_cond_proj(x_self_cond.to(x_t.dtype))))
        # a timestep per row [B], or per position [B, L]
        te = self._timestep_term(t, x_t.dtype, x_t.device)
        h = h + (te[:, None] if t.dim() == 1 else te)
        c = self._image_projection(cond, drop_cond, B, x_t.dtype)
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
