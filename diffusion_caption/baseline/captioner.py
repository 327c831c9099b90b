"""The autoregressive baseline: ClipCap (Mokady et al. 2021), a CLIP prefix for a GPT-2 language model.

The frozen CLIP image feature goes through a mapping network (``mapping.py``) to ``prefix_len`` input
embeddings; GPT-2 (``transformers``' GPT2LMHeadModel) reads them, then ``BOS caption EOS`` token by
token, and is trained with next-token cross-entropy on the caption. Captions are decoded greedily or by
beam search with the KV cache (``decoding.py``), and every generated token keeps its probability.

    cap = BaselineCaptioner.from_pretrained("assets/checkpoints/shapes-baseline")
    out = cap.caption("scene.png", beam=3)
    out.text, out.tokens, out.confidence

Checkpoints have the diffusion captioner's layout: config.json (format ``diffusion-caption-baseline/1``),
model.safetensors, tokenizer files, and the CLIP in ``clip/`` when it is a local one.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import checkpoint as ckpt
from .decoding import beam_search, greedy
from ..confidence import SPECIAL, Calibrator
from ..config import ConfigDict
from ..image_encoder import ImageEncoder
from ..pretrained import PretrainedCaptioner
from .mapping import MAPPERS, build_mapper
from ..tokenizer import CaptionTokenizer

FORMAT = "diffusion-caption-baseline/1"
TOKENIZER_KINDS = ("wordpiece", "gpt2")
MAX_BEAM = 16
GPT_CONFIG_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
                   "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range",
                   "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                   "bos_token_id", "eos_token_id", "tie_word_embeddings")


# ------------------------------------------------------------------------------------------------ config
@dataclass
class BaselineConfig(ConfigDict):
    SECTION = "baseline config"
    # text
    vocab_size: int = 512
    max_len: int = 24  # caption positions BOS ... EOS, as the diffusion model's seq_len
    tokenizer_kind: str = "wordpiece"  # "wordpiece": the shapes/DistilBERT tokenizer; "gpt2": GPT-2's BPE
    bos_id: int = 2  # [CLS] of the wordpiece tokenizer (GPT-2: <|endoftext|>)
    eos_id: int = 3  # [SEP] of the wordpiece tokenizer (GPT-2: <|endoftext|>)
    # image feature -> prefix
    cond_dim: int = 128
    mapper: str = "mlp"  # "mlp" or "transformer" (ClipCap's two mapping networks)
    prefix_len: int = 10  # ClipCap: 10 for the MLP, 40 for the transformer
    mapper_hidden: int = 256  # MLP hidden width; 0 = ClipCap's prefix_len * n_embd / 2
    clip_len: int = 10  # transformer mapper: tokens the CLIP feature is projected to
    mapper_layers: int = 8  # transformer mapper depth and heads
    mapper_heads: int = 8
    # GPT-2
    gpt: str = "tiny"  # "tiny": built from the fields below, trained from scratch; else a GPT-2 hub id or path
    n_embd: int = 192
    n_layer: int = 4
    n_head: int = 4
    dropout: float = 0.1
    freeze_gpt: bool = False  # ClipCap's transformer variant trains the mapper only
    # decoding defaults
    beam: int = 1
    length_penalty: float = 1.0
    extra: dict = field(default_factory=dict)  # free-form provenance (training data, commands)

    def __post_init__(self):
        if self.mapper not in MAPPERS:
            raise ValueError(f"mapper must be one of {MAPPERS}, got {self.mapper!r}")
        if self.tokenizer_kind not in TOKENIZER_KINDS:
            raise ValueError(f"tokenizer_kind must be one of {TOKENIZER_KINDS}, got {self.tokenizer_kind!r}")
        for name in ("prefix_len", "clip_len", "mapper_layers", "mapper_heads", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2 (BOS and at least one token), got {self.max_len}")
        if self.mapper_hidden < 0:
            raise ValueError(f"mapper_hidden must be >= 0 (0: ClipCap's width), got {self.mapper_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 1 <= self.beam <= MAX_BEAM:
            raise ValueError(f"beam must be from 1 to {MAX_BEAM}, got {self.beam}")



BASELINE_PRESETS = {
    # a 4-layer GPT-2 trained from scratch with the shapes tokenizer, MLP mapper, prefix 10 (ClipCap's MLP)
    "shapes": dict(),
    # ClipCap's MLP setting: pretrained gpt2 fine-tuned, CLIP ViT-B/32 (512-d), prefix 10, ClipCap's MLP width.
    # ClipCap's other setting is --mapper transformer --prefix-len 40 --freeze-gpt true.
    "base": dict(vocab_size=50257, max_len=40, tokenizer_kind="gpt2", bos_id=50256, eos_id=50256, cond_dim=512,
                 mapper_hidden=0, gpt="gpt2", n_embd=768, n_layer=12, n_head=12, dropout=0.1),
    # a few-second model for tests
    "tiny": dict(max_len=16, prefix_len=4, mapper_hidden=64, clip_len=4, mapper_layers=1, mapper_heads=2,
                 n_embd=32, n_layer=2, n_head=2, dropout=0.0),
}


def baseline_preset(name: str, **overrides) -> BaselineConfig:
    if name not in BASELINE_PRESETS:
        raise ValueError(f"unknown baseline preset {name!r}; expected one of {sorted(BASELINE_PRESETS)}")
    return BaselineConfig(**{**BASELINE_PRESETS[name], **overrides})


# ------------------------------------------------------------------------------------------------ tokenizers
class GPT2CaptionTokenizer:
    """GPT-2's byte-level BPE with ``CaptionTokenizer``'s interface; ``<|endoftext|>`` is BOS, EOS and padding."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        eos = hf_tokenizer.eos_token_id
        if eos is None:
            raise ValueError("this GPT-2 tokenizer has no end-of-text token")
        self.sep_id = eos
        self.cls_id = hf_tokenizer.bos_token_id if hf_tokenizer.bos_token_id is not None else eos
        self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else eos
        self.special_ids = set(hf_tokenizer.all_special_ids)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @classmethod
    def from_pretrained(cls, path: str) -> "GPT2CaptionTokenizer":
        from transformers import GPT2TokenizerFast

        from .. import hub

        hub.require([hub.Need(path, "GPT-2 tokenizer", "--tokenizer DIR", files=("tokenizer.json", "vocab.json"))])
        return cls(GPT2TokenizerFast.from_pretrained(path))

    def save_pretrained(self, path: str) -> None:
        self.hf.save_pretrained(path)

    def encode(self, captions: list[str], length: int) -> torch.Tensor:
        """[N, length] token ids: BOS caption EOS then padding; too long captions are truncated."""
        rows = []
        for ids in self.hf(list(captions), add_special_tokens=False)["input_ids"]:
            row = [self.cls_id] + list(ids)[: length - 2] + [self.sep_id]
            rows.append(row + [self.pad_id] * (length - len(row)))
        return torch.tensor(rows, dtype=torch.long)

    def token_strings(self, ids: list[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(list(ids))

    def decode(self, ids: list[int]) -> str:
        ids = list(ids)
        if ids and ids[0] == self.cls_id:
            ids = ids[1:]
        if self.sep_id in ids:
            ids = ids[: ids.index(self.sep_id)]
        ids = [i for i in ids if i not in self.special_ids]
        return self.hf.decode(ids, clean_up_tokenization_spaces=False).strip()


def load_tokenizer(kind: str, path: str):
    """The caption tokenizer of ``kind`` ("wordpiece" or "gpt2") from a folder or hub id."""
    if kind == "wordpiece":
        return CaptionTokenizer.from_pretrained(path)
    if kind == "gpt2":
        return GPT2CaptionTokenizer.from_pretrained(path)
    raise ValueError(f"tokenizer kind must be one of {TOKENIZER_KINDS}, got {kind!r}")


# ------------------------------------------------------------------------------------------------ model
def build_gpt(cfg: BaselineConfig, gpt_config: dict | None = None):
    """A GPT2LMHeadModel: rebuilt from a stored ``gpt_config`` (no download), built from the config fields
    ("tiny"), or loaded with ``from_pretrained`` from a hub id or a local folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if gpt_config is not None:
        return GPT2LMHeadModel(GPT2Config(**gpt_config))
    if cfg.gpt == "tiny":
        return GPT2LMHeadModel(GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=max(64, cfg.prefix_len + cfg.max_len), n_embd=cfg.n_embd,
            n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id))
    from .. import hub

    hub.require([hub.Need(cfg.gpt, "GPT-2", "--gpt DIR (a folder saved with save_pretrained)")])
    try:
        return GPT2LMHeadModel.from_pretrained(cfg.gpt)
    except OSError as e:
        raise OSError(f"could not load GPT-2 weights {cfg.gpt!r} (a hub id needs a connection; a local directory "
                      f"saved with save_pretrained works offline): {e}") from None


def pretrained_architecture(cfg: BaselineConfig) -> BaselineConfig:
    """``cfg`` with the width, depth, heads and vocabulary of the pretrained GPT-2 it names (unchanged for "tiny")."""
    if cfg.gpt == "tiny":
        return cfg
    from transformers import GPT2Config

    from .. import hub

    hub.require([hub.Need(cfg.gpt, "GPT-2", "--gpt DIR (a folder saved with save_pretrained)")])
    try:
        g = GPT2Config.from_pretrained(cfg.gpt)
    except OSError as e:
        raise OSError(f"could not read the GPT-2 config of {cfg.gpt!r} (a hub id needs a connection; a local "
                      f"directory saved with save_pretrained works offline): {e}") from None
    return dataclasses.replace(cfg, n_embd=g.n_embd, n_layer=g.n_layer, n_head=g.n_head, vocab_size=g.vocab_size)


def _cache_argument() -> str:
    from transformers import GPT2LMHeadModel

    params = inspect.signature(GPT2LMHeadModel.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class PrefixCaptioner(nn.Module):
    """The mapping network and GPT-2. ``forward(features, ids)`` gives the training loss."""

    def __init__(self, cfg: BaselineConfig, gpt_config: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.gpt = build_gpt(cfg, gpt_config)
        g = self.gpt.config
        if (g.n_embd, g.n_layer, g.n_head) != (cfg.n_embd, cfg.n_layer, cfg.n_head):
            raise ValueError(f"GPT-2 {cfg.gpt!r} has n_embd={g.n_embd}, n_layer={g.n_layer}, n_head={g.n_head}, "
                             f"but the config says {cfg.n_embd}, {cfg.n_layer}, {cfg.n_head}")
        if g.vocab_size < cfg.vocab_size:
            raise ValueError(f"GPT-2 {cfg.gpt!r} has {g.vocab_size} tokens, fewer than the tokenizer's {cfg.vocab_size}")
        if cfg.prefix_len + cfg.max_len > g.n_positions:
            raise ValueError(f"prefix_len + max_len = {cfg.prefix_len + cfg.max_len} exceeds GPT-2's "
                             f"{g.n_positions} positions")
        self.mapper = build_mapper(cfg.mapper, cfg.cond_dim, cfg.n_embd, cfg.prefix_len, cfg.mapper_hidden,
                                   cfg.clip_len, cfg.mapper_layers, cfg.mapper_heads)
        if cfg.freeze_gpt:
            self.gpt.requires_grad_(False)
        self._cache_arg = _cache_argument()
        self.register_load_state_dict_post_hook(PrefixCaptioner._tied_head_is_not_missing)

    # ---------------------------------------------------------------------------------------- weights
    @property
    def gpt_config(self) -> dict:
        """The GPT-2 architecture, stored in checkpoints so that loading needs no download."""
        d = self.gpt.config.to_dict()
        return {k: d[k] for k in GPT_CONFIG_KEYS if k in d}

    @property
    def tied(self) -> bool:
        return self.gpt.lm_head.weight is self.gpt.transformer.wte.weight

    def state_dict(self, *args, **kwargs):
        """The weights, without GPT-2's output matrix when it is the input embedding (safetensors refuses
        tensors that share memory)."""
        sd = super().state_dict(*args, **kwargs)
        if self.tied:
            prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
            sd.pop(prefix + "gpt.lm_head.weight", None)
        return sd

    @staticmethod
    def _tied_head_is_not_missing(module, incompatible) -> None:
        if module.tied:
            for k in [k for k in incompatible.missing_keys if k.endswith("gpt.lm_head.weight")]:
                incompatible.missing_keys.remove(k)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.freeze_gpt:
            self.gpt.eval()  # a frozen GPT-2 keeps its dropout off, as in ClipCap
        return self

    # ---------------------------------------------------------------------------------------- pieces
    def prefix(self, features: torch.Tensor) -> torch.Tensor:
        """[B, cond_dim] image features -> [B, prefix_len, n_embd] GPT-2 input embeddings."""
        return self.mapper(features.to(self.gpt.transformer.wte.weight.dtype))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.gpt.transformer.wte(ids)

    def next_logits(self, embeds: torch.Tensor, cache=None, use_cache: bool = True):
        """(logits [B, V] at the last position, the KV cache) for input embeddings after ``cache``."""
        kw = {self._cache_arg: cache} if cache is not None else {}
        out = self.gpt(inputs_embeds=embeds, use_cache=use_cache, logits_to_keep=1, **kw)
        if not use_cache:
            return out.logits[:, -1], None
        return out.logits[:, -1], getattr(out, self._cache_arg)

    def forward(self, features: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Next-token loss on ``ids`` ([B, L]: BOS caption EOS padding) after the image prefix.

        Returns ``loss`` (mean cross-entropy over the caption tokens and the first EOS; padding is
        ignored) and ``token_acc`` (how often the most probable token was right).
        """
        k = self.cfg.prefix_len
        is_eos = ids[:, 1:] == self.cfg.eos_id
        mask = (torch.cumsum(is_eos.int(), dim=1) - is_eos.int()) == 0  # up to and including the first EOS
        # drop the columns that are padding in every row: attention is causal, so nothing else changes
        n = int(mask.sum(1).max())
        ids, mask = ids[:, :n + 1], mask[:, :n]
        x = torch.cat([self.prefix(features), self.embed(ids[:, :-1])], dim=1)
        logits = self.gpt(inputs_embeds=x, use_cache=False).logits[:, k:]
        labels = ids[:, 1:]
        flat, target = logits.float()[mask], labels[mask]
        loss = nn.functional.cross_entropy(flat, target)
        acc = (flat.argmax(-1) == target).float().mean()
        return {"loss": loss, "token_acc": acc.detach()}


# ------------------------------------------------------------------------------------------------ API
@dataclass
class BaselineCaption:
    text: str  # the caption, no special tokens
    tokens: list[str]  # generated tokens as strings, the end token included when produced
    confidence: list[float]  # the model's probability of each generated token, in [0, 1]
    token_ids: list[int]
    log_prob: float  # sum of the tokens' log probabilities
    settings: dict = field(default_factory=dict)  # beam, max_len, length_penalty
    seconds: float | None = None  # wall time of the batch it was decoded in, image encoding included
    # with the checkpoint's confidence.json: the calibrated probability that each word is right, and the
    # caption's (its least confident word's)
    token_confidence: list[float] | None = None
    caption_confidence: float | None = None

    def to_json(self) -> dict:
        out = {"text": self.text, "tokens": self.tokens, "confidence": self.confidence,
               "token_ids": self.token_ids, "log_prob": self.log_prob, "settings": self.settings,
               "seconds": self.seconds}
        if self.token_confidence is not None:
            out.update(token_confidence=self.token_confidence, caption_confidence=self.caption_confidence)
        return out


class BaselineCaptioner(PretrainedCaptioner):
    """A CLIP image encoder, the prefix mapper + GPT-2, and the tokenizer, with decoding settings."""
    FORMAT = FORMAT
    SECTIONS = ("baseline", "gpt_config", "image_encoder")
    KIND = "baseline"

    def __init__(self, config: BaselineConfig, model: PrefixCaptioner, image_encoder: ImageEncoder, tokenizer,
                 device: str | torch.device = "cpu"):
        self.config = config
        self.model = self.network = model.eval()
        self.calibrator: Calibrator | None = None  # token probability -> P(word right) (confidence.py)
        self.image_encoder = image_encoder
        self.tokenizer = tokenizer
        self.to(device)

    # ---------------------------------------------------------------------------------------- files
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, device: str | torch.device = "cpu",
                        clip: str | None = None) -> "BaselineCaptioner":
        """Load a checkpoint folder (or hub id); ``clip`` loads its CLIP from another copy
        (``PretrainedCaptioner.load_image_encoder``)."""
        path, cfg_file, meta = cls.read_checkpoint(path_or_hub_id)
        config = cls.read_config(BaselineConfig, meta["baseline"], cfg_file, "baseline")
        try:
            tokenizer = load_tokenizer(config.tokenizer_kind, path)
        except (OSError, ValueError) as e:
            raise ckpt.CheckpointError(f"{path}: tokenizer files unreadable: {e}") from None
        if tokenizer.vocab_size > config.vocab_size:
            raise ckpt.CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but {cfg_file} "
                                       f"says vocab_size={config.vocab_size}")
        if (tokenizer.cls_id, tokenizer.sep_id) != (config.bos_id, config.eos_id):
            raise ckpt.CheckpointError(f"{path}: the tokenizer's BOS/EOS ids are {tokenizer.cls_id}/{tokenizer.sep_id} "
                                       f"but {cfg_file} says {config.bos_id}/{config.eos_id}")
        try:
            model = PrefixCaptioner(config, gpt_config=meta["gpt_config"])
        except (TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{cfg_file}: the model it describes cannot be built: {e}") from None
        ckpt.load_into(model, os.path.join(path, ckpt.WEIGHTS_NAME))
        image_encoder = cls.load_image_encoder(meta, path, cfg_file, config.cond_dim, clip)
        cap = cls(config, model, image_encoder, tokenizer, device)
        if Calibrator.is_in(path):
            cap.calibrator = Calibrator.load(path)
        return cap

    def _sections(self) -> dict:
        return {"baseline": self.config.to_dict(), "gpt_config": self.model.gpt_config}

    # ---------------------------------------------------------------------------------------- decoding
    def settings(self, beam=None, max_len=None, length_penalty=None) -> dict:
        """Validated decoding settings, or a ValueError naming the parameter and its range."""
        beam = self.config.beam if beam is None else beam
        if isinstance(beam, bool) or not isinstance(beam, int) or not 1 <= beam <= MAX_BEAM:
            raise ValueError(f"beam must be an integer from 1 to {MAX_BEAM}, got {beam!r}")
        max_len = self.config.max_len if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 2 <= max_len <= self.config.max_len:
            raise ValueError(f"max_len must be an integer from 2 to {self.config.max_len}, got {max_len!r}")
        lp = self.config.length_penalty if length_penalty is None else length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp) or not 0 <= lp <= 5:
            raise ValueError(f"length_penalty must be a number from 0 to 5, got {lp!r}")
        return {"beam": beam, "max_len": max_len, "length_penalty": float(lp)}

    @torch.no_grad()
    def caption_batch(self, images: list | None = None, *, features: torch.Tensor | None = None,
                      beam: int | None = None, max_len: int | None = None, length_penalty: float | None = None,
                      use_cache: bool = True) -> list[BaselineCaption]:
        """One ``BaselineCaption`` per image, all decoded together. Give images or their features."""
        t0 = time.perf_counter()
        s = self.settings(beam, max_len, length_penalty)
        features = self.features_of(images, features)
        if features.ndim != 2 or features.shape[1] != self.config.cond_dim:
            raise ValueError(f"features must be [N, {self.config.cond_dim}], got {tuple(features.shape)}")
        prefix = self.model.prefix(features)
        args = (self.model, prefix, self.config.bos_id, self.config.eos_id, s["max_len"] - 1)
        if s["beam"] == 1:
            hyps = greedy(*args, use_cache=use_cache)
        else:
            hyps = beam_search(*args, beam=s["beam"], length_penalty=s["length_penalty"], use_cache=use_cache)
        seconds = time.perf_counter() - t0
        out = [BaselineCaption(text=self.tokenizer.decode(h.token_ids), tokens=self.tokenizer.token_strings(h.token_ids),
                               confidence=[round(min(max(p, 0.0), 1.0), 6) for p in h.probs],
                               token_ids=h.token_ids, log_prob=h.log_prob, settings=dict(s), seconds=seconds)
               for h in hyps]
        if self.calibrator is not None:
            for c in out:
                cal = self.calibrator(c.confidence) if c.confidence else []
                c.token_confidence = [r if t in SPECIAL else k for t, r, k in zip(c.tokens, c.confidence, cal)]
                words = [k for t, k in zip(c.tokens, cal) if t not in SPECIAL]
                c.caption_confidence = min(words) if words else None
        return out
