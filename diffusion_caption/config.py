"""The captioner's configuration in two parts, as the checkpoint stores them: the network (``CaptionerConfig``,
config.json's ``captioner`` section: denoiser, conditioning, diffusion process) and the objective it was
trained with (``ObjectiveConfig``, the ``objective`` section: loss weights, condition dropout, the timestep
curriculum, self-conditioning and block boundaries). How it samples is a third (``sampling.SamplingConfig``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FUSIONS = ("concat", "add")
PREDICTIONS = ("x0", "eps")


class ConfigDict:
    """To and from a config.json section (a dataclass's fields), refusing keys it does not know."""
    SECTION = "config"  # the section's name in messages

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config"):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown {cls.SECTION} keys {unknown}")
        return cls(**d)


@dataclass
class CaptionerConfig(ConfigDict):
    SECTION = "captioner config"
    # text
    seq_len: int = 24  # caption positions, [CLS] ... [SEP] [PAD]... (the seed paper used 16)
    vocab_size: int = 512
    emb_dim: int = 64  # token embedding size: the space diffusion runs in
    freeze_embeddings: bool = False  # keep the token embeddings fixed (the seed froze DistilBERT's)
    # DistilBERT denoiser
    encoder: str = "tiny"  # "tiny" (built from the fields below) or a DistilBERT name/path for its weights
    dim: int = 192
    n_layers: int = 4
    n_heads: int = 4
    hidden_dim: int = 768
    dropout: float = 0.1
    # conditioning on the CLIP image feature
    cond_dim: int = 128
    fusion: str = "concat"  # "concat": projected feature as prefix token(s); "add": added at every position
    n_prefix: int = 1
    # hidden width of a residual MLP from the image feature to the conditioning, beside the linear
    # projection (ClipCap's mapping network); 0 = the linear projection alone
    cond_mlp: int = 0
    predict_feature: bool = False  # an extra head predicting the image feature from the text positions
    # self-conditioning (Chen et al. 2022, "Analog Bits"): the network also reads its own previous x0 estimate
    self_cond: bool = False
    # block diffusion (Arriola et al. 2025, "Block Diffusion"): 0 = every position attends to every other;
    # b > 0 = the caption is denoised b positions at a time, each block attending to the clean blocks before
    # it and to itself, never to later ones, so the clean blocks are computed once and cached (like an
    # autoregressive model's keys and values) and training sees every block's context in every caption
    block_size: int = 0
    # diffusion
    schedule: str = "sqrt"
    T: int = 1000
    predict: str = "x0"  # what the network outputs: "x0" or "eps"
    extra: dict = field(default_factory=dict)  # free-form provenance (training data, commands)

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.predict not in PREDICTIONS:
            raise ValueError(f"predict must be one of {PREDICTIONS}, got {self.predict!r}")
        if self.cond_mlp < 0:
            raise ValueError(f"cond_mlp must be >= 0 (0: no MLP), got {self.cond_mlp}")
        if self.n_prefix < 1:
            raise ValueError(f"n_prefix must be >= 1, got {self.n_prefix}")
        if not 0 <= self.block_size <= self.seq_len:
            raise ValueError(f"block_size must be from 0 (none) to seq_len={self.seq_len}, got {self.block_size}")
        if self.block_size and (self.fusion != "add" or self.self_cond or self.predict != "x0"):
            raise ValueError("a block denoiser (block_size > 0) takes the image added at every position "
                             "(fusion='add'), predicts x0 and does not self-condition")


@dataclass
class ObjectiveConfig(ConfigDict):
    """What ``GaussianDiffusion.training_losses`` optimises: loss = x0 MSE + prior + lambda_round x rounding
    cross-entropy (+ lambda_feature x feature loss), over a batch whose timesteps and inputs the fields
    below draw."""
    SECTION = "objective config"
    lambda_round: float = 0.3
    lambda_feature: float = 0.1
    p_uncond: float = 0.1  # condition dropout, for classifier-free guidance
    # self-conditioning: a fraction p_self_cond of each batch gets an x0 estimate made by a first,
    # gradient-free pass (the network must have self_cond)
    p_self_cond: float = 0.5
    # random block boundaries (block denoisers): each fixed block of block_size positions is cut between two
    # of its positions with probability p_block_split per place, so the network also learns the shorter
    # blocks left when a sampler reveals only a block's sure leading positions; 0 = fixed blocks only
    p_block_split: float = 0.0
    # few-step training: a fraction p_focus of each batch is drawn from the focus_steps timesteps that a
    # focus_steps-step sampler with focus_spacing visits (the rest uniformly); 0 = uniform t only
    focus_steps: int = 0
    focus_spacing: str = "trailing^2"
    p_focus: float = 0.5
    # step-unrolled training: a fraction p_unroll of each batch at the focus sampler's second timestep,
    # its input made from the network's own first-step prediction (needs focus_steps >= 2); 0 = off
    p_unroll: float = 0.0

    @classmethod
    def from_dict(cls, d: dict, source: str = "config"):
        d = dict(d)
        if d.get("p_reveal", 0.0):  # reveal training and its sampler were removed on 2026-12-07
            raise ValueError(f"{source}: this checkpoint was trained for the reveal sampler (p_reveal = "
                             f"{d['p_reveal']}), which diffusion-caption no longer has; git history before "
                             "2026-12-07 samples it")
        d.pop("p_reveal", None)  # written as 0 by checkpoints before then: nothing to keep
        return super().from_dict(d, source)

    def __post_init__(self):
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")
        if self.focus_steps < 0 or not 0.0 <= self.p_focus <= 1.0:
            raise ValueError(f"focus_steps must be >= 0 and p_focus in [0, 1], got {self.focus_steps}, {self.p_focus}")
        if not 0.0 <= self.p_unroll <= 1.0 or (self.p_unroll > 0 and self.focus_steps < 2):
            raise ValueError(f"p_unroll must be in [0, 1] and needs focus_steps >= 2 (it trains the second "
                             f"step), got p_unroll={self.p_unroll}, focus_steps={self.focus_steps}")
        if self.focus_steps:  # checked here, not after the features are encoded
            from .samplers import spacing_power
            spacing_power(self.focus_spacing)
        if not 0.0 <= self.p_block_split <= 1.0:
            raise ValueError(f"p_block_split must be in [0, 1], got {self.p_block_split}")
        if not 0.0 <= self.p_self_cond <= 1.0:
            raise ValueError(f"p_self_cond must be in [0, 1], got {self.p_self_cond}")
        if self.lambda_round < 0 or self.lambda_feature < 0:
            raise ValueError("loss weights lambda_round and lambda_feature must be >= 0")

    @classmethod
    def plain(cls, **overrides) -> "ObjectiveConfig":
        """The plain objective: MSE + prior + 0.3 x rounding cross-entropy, no condition dropout, no
        feature loss, no self-conditioning pass, uniform timesteps; ``overrides`` change any of it."""
        return cls(**{"lambda_feature": 0.0, "p_uncond": 0.0, "p_self_cond": 0.0, "p_focus": 0.0, **overrides})

    def check(self, config: CaptionerConfig) -> "ObjectiveConfig":
        """This objective checked against the network it trains; returns itself."""
        if self.focus_steps > config.T:
            raise ValueError(f"focus_steps must be in [0, T={config.T}], got {self.focus_steps}")
        return self


OBJECTIVE_KEYS = tuple(f.name for f in dataclasses.fields(ObjectiveConfig))


def split_objective(captioner: dict) -> tuple[dict, dict]:
    """A captioner section with the objective's keys inside (checkpoints before the objective section)
    split into the network's keys and the objective's."""
    return ({k: v for k, v in captioner.items() if k not in OBJECTIVE_KEYS},
            {k: v for k, v in captioner.items() if k in OBJECTIVE_KEYS})


PRESETS = {
    # a small denoiser for the shapes world, trained from scratch on CPU
    "shapes": dict(),
    # the seed paper's size: DistilBERT-base weights, its 768-d word embeddings, CLIP ViT-B/32 (512-d)
    "base": dict(seq_len=24, vocab_size=30522, emb_dim=768, encoder="distilbert-base-uncased", dim=768,
                 n_layers=6, n_heads=12, hidden_dim=3072, cond_dim=512, schedule="cosine"),
    # a few-second model for tests
    "tiny": dict(seq_len=12, emb_dim=16, dim=32, n_layers=1, n_heads=2, hidden_dim=64, cond_dim=16, T=100,
                 dropout=0.0),
}


def preset(name: str, **overrides) -> CaptionerConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return CaptionerConfig(**{**PRESETS[name], **overrides})


# the objective each preset trains with when no flag says otherwise
OBJECTIVE_PRESETS = {"shapes": dict(), "base": dict(), "tiny": dict()}


def objective_preset(name: str, **overrides) -> ObjectiveConfig:
    return ObjectiveConfig(**{**OBJECTIVE_PRESETS.get(name, {}), **overrides})
