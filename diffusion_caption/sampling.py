"""How a caption is sampled: one typed, validated ``SamplingConfig``, stored as its own section of a checkpoint.

As diffusers keeps ``scheduler_config.json`` apart from the model's config, a checkpoint's sampling
defaults live in ``config.json["sampling"]``, apart from the network (``CaptionerConfig``). A call
overrides any of them by name: ``cap.caption(image, steps=4, guidance=3)``. One text form names a
setting everywhere (command lines, tables, sweeps)::

    SAMPLER:STEPS:GUIDANCE[:clamp][:SPACING][:kK[:clip|:mbr][:rounding]][:bf16|:auto][:commitC]
    ddim:20:5   ddpm:10:5:clamp:trailing^2   ddim:1:1:k8:clip:rounding   block:16:1:auto:commit0.95

``SamplingConfig.parse(text)`` reads it and ``config.spec`` writes it; ``config.describe()`` is the
human name ("DDIM 20, guidance 5, clamp").
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .config import ConfigDict
from .samplers import SAMPLERS, spacing_power

SELECTIONS = ("mbr", "clip")  # how one of several candidates is kept: consensus, or CLIP score
# where the candidates come from: K noise draws, or the K likeliest roundings of one draw's final x0
PROPOSALS = ("noise", "rounding")
MAX_GUIDANCE = 20.0
# the network's arithmetic: float32, bfloat16 (a bfloat16 copy of the network), or "auto" (bfloat16 for batches large
# enough to gain where the device multiplies it natively: a CUDA GPU that supports it, a CPU with AVX512-BF16 or
# AMX; float32 elsewhere). The sampler's steps and the rounding stay float32.
PRECISIONS = ("float32", "bfloat16", "auto")
PRECISION_FLAGS = {"bf16": "bfloat16", "auto": "auto"}
MAX_CANDIDATES = 64  # samples per image to choose among (each is one more row in every network call)
SPEC_FORM = "SAMPLER:STEPS:GUIDANCE[:clamp][:SPACING][:kK[:clip|:mbr][:rounding]][:bf16|:auto][:commitC]"


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and float(v).is_integer()


@dataclass(frozen=True)
class SamplingConfig(ConfigDict):
    """Every setting of one sampling run but the seed. Validated when made; ``replace`` makes a new one."""
    SECTION = "sampling"
    steps: int = 20  # network calls (of T diffusion steps); checked against T by the captioner
    sampler: str = "ddim"  # one of samplers.SAMPLERS
    spacing: str = "linspace"  # which timesteps a few-step sampler keeps (samplers.spaced_timesteps)
    guidance: float = 1.0  # classifier-free guidance scale (1 = none; each other value doubles the calls)
    clamp: bool = False  # clamp each predicted x0 to its nearest token embeddings
    early_stop: int = 0  # stop an image once its rounding held for this many steps (0 = off)
    candidates: int = 1  # samples per image to choose among (1 = none)
    select: str = "mbr"  # how one is kept: "mbr" (selection.mbr) or "clip" (selection.rerank)
    propose: str = "noise"  # from what: "noise" (K draws) or "rounding" (K roundings of one draw)
    # what ranks candidates under select="clip": "" (the captioner's own CLIP) or a scorer folder, relative
    # to the checkpoint's folder ("../shapes-text-scorer"); a loading setting, not a per-call one
    scorer: str = ""
    precision: str = "float32"  # one of PRECISIONS: the network's arithmetic (``native_bf16`` decides "auto")
    # the block sampler's threshold: a block is revealed up to its second position rounded with probability
    # below this, the rest predicted again in the next block (0 = whole blocks)
    commit: float = 0.0

    def __post_init__(self):
        if not _is_int(self.steps) or self.steps < 1:
            raise ValueError(f"steps must be an integer from 1, got {self.steps!r}")
        object.__setattr__(self, "steps", int(self.steps))
        sampler = str(self.sampler).strip().lower()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        object.__setattr__(self, "sampler", sampler)
        if not isinstance(self.spacing, str):
            raise ValueError(f"spacing must be 'linspace', 'trailing' or 'trailing^k', got {self.spacing!r}")
        spacing_power(self.spacing)  # raises with the accepted forms
        object.__setattr__(self, "spacing", self.spacing.strip().lower())
        g = self.guidance
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or not 0 <= g <= MAX_GUIDANCE:
            raise ValueError(f"guidance must be a number from 0 to {MAX_GUIDANCE} (1 = no guidance), got {g!r}")
        object.__setattr__(self, "guidance", float(g))
        if not isinstance(self.clamp, (bool, int)) or self.clamp not in (0, 1):
            raise ValueError(f"clamp must be true or false, got {self.clamp!r}")
        object.__setattr__(self, "clamp", bool(self.clamp))
        if not _is_int(self.early_stop) or self.early_stop < 0:
            raise ValueError(f"early_stop must be a non-negative integer (0 = off), got {self.early_stop!r}")
        object.__setattr__(self, "early_stop", int(self.early_stop))
        if not _is_int(self.candidates) or not 1 <= self.candidates <= MAX_CANDIDATES:
            raise ValueError(f"candidates must be an integer from 1 (none) to {MAX_CANDIDATES}, got {self.candidates!r}")
        object.__setattr__(self, "candidates", int(self.candidates))
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {SELECTIONS} (how one of several candidates is kept), "
                             f"got {self.select!r}")
        if self.propose not in PROPOSALS:
            raise ValueError(f"propose must be one of {PROPOSALS} (where the candidates come from), got {self.propose!r}")
        if self.propose == "rounding" and self.candidates > 1 and self.select != "clip":
            raise ValueError("propose='rounding' varies one draw's rounding, and the consensus of those variants "
                             "is the draw itself: choose among them with select='clip'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        cm = self.commit
        if isinstance(cm, bool) or not isinstance(cm, (int, float)) or not 0.0 <= cm < 1.0:
            raise ValueError(f"commit must be a number in [0, 1) (0: whole blocks), got {cm!r}")
        if cm and self.sampler != "block":
            raise ValueError(f"commit is the block sampler's setting; the {self.sampler} sampler has none")
        object.__setattr__(self, "commit", float(cm))
        if not isinstance(self.scorer, str):
            raise ValueError(f"scorer must be a folder name or '', got {self.scorer!r}")

    # ------------------------------------------------------------------------------------ forms
    def replace(self, **overrides) -> "SamplingConfig":
        """A copy with some settings changed (None leaves one as it is); unknown names are refused."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown sampling settings {unknown}; expected some of "
                            f"{[f.name for f in dataclasses.fields(self)]}")
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def calls(self) -> int:
        """Network calls per image (guidance doubles each step's call), before candidates."""
        return self.steps * (1 if self.guidance == 1.0 else 2)

    @property
    def spec(self) -> str:
        """The one text form (``SPEC_FORM``); ``SamplingConfig.parse(c.spec)`` gives ``c`` back (but scorer)."""
        parts = [self.sampler, str(self.steps), f"{self.guidance:g}"]
        if self.clamp:
            parts.append("clamp")
        if self.spacing != "linspace":
            parts.append(self.spacing)
        if self.candidates > 1:
            parts += [f"k{self.candidates}", self.select] + (["rounding"] if self.propose == "rounding" else [])
        if self.early_stop:
            parts.append(f"stop{self.early_stop}")
        if self.precision != "float32":
            parts.append({v: k for k, v in PRECISION_FLAGS.items()}[self.precision])
        if self.commit:
            parts.append(f"commit{self.commit:g}")
        return ":".join(parts)

    def describe(self) -> str:
        """A person's name for the setting: "DDIM 20, guidance 5, clamp, 8 roundings by CLIP"."""
        s = f"{self.sampler.upper()} {self.steps}, guidance {self.guidance:g}" + (", clamp" if self.clamp else "")
        if self.spacing != "linspace":
            s += f", {self.spacing}"
        if self.candidates > 1:
            kind = "roundings" if self.propose == "rounding" else "candidates"
            s += f", {self.candidates} {kind} by {self.select.upper()}"
        if self.precision != "float32":
            s += ", bfloat16" if self.precision == "bfloat16" else ", bfloat16 where native"
        if self.commit:
            s += f", blocks cut short at p < {self.commit:g}"
        return s

    @classmethod
    def parse(cls, text: str, base: "SamplingConfig | None" = None) -> "SamplingConfig":
        """Read ``SPEC_FORM``; settings it does not name come from ``base`` (default: the defaults, with no
        clamp, linspace spacing and one candidate). A ValueError names what is wrong."""
        parts = [p.strip() for p in str(text).strip().split(":")]
        flags = [p.lower() for p in parts[3:]]
        ks = [f for f in flags if len(f) > 1 and f[0] == "k" and f[1:].isdigit()]
        stops = [f for f in flags if f.startswith("stop") and f[4:].isdigit()]
        selects = [f for f in flags if f in SELECTIONS]
        proposes = [f for f in flags if f in PROPOSALS]
        precisions = [f for f in flags if f in PRECISION_FLAGS]
        commits = [f for f in flags if f.startswith("commit") and _is_number(f[6:])]
        spacings = [f for f in flags if f != "clamp" and f not in ks + stops + selects + proposes + precisions + commits]
        if (len(parts) < 3 or flags.count("clamp") > 1 or len(spacings) > 1 or len(ks) > 1 or len(selects) > 1
                or len(proposes) > 1 or len(stops) > 1 or len(precisions) > 1 or ((selects or proposes) and not ks)
                or len(commits) > 1):
            raise ValueError(f"{text!r} is not {SPEC_FORM} (e.g. ddpm:50:5:clamp, ddpm:10:5:clamp:trailing^2, "
                             "ddpm:2:1:clamp:trailing^2:k8:clip or ddim:1:1:k8:clip:rounding)")
        try:
            steps, guidance = int(parts[1]), float(parts[2])
        except ValueError:
            raise ValueError(f"{text!r}: steps must be an integer and guidance a number") from None
        base = base or cls()
        return base.replace(sampler=parts[0].lower(), steps=steps, guidance=guidance, clamp="clamp" in flags,
                            spacing=spacings[0] if spacings else "linspace",
                            candidates=int(ks[0][1:]) if ks else 1, select=selects[0] if selects else "mbr",
                            propose=proposes[0] if proposes else "noise",
                            early_stop=int(stops[0][4:]) if stops else 0,
                            precision=PRECISION_FLAGS[precisions[0]] if precisions else "float32",
                            commit=float(commits[0][6:]) if commits else 0.0)


# the CaptionerConfig fields a checkpoint written before the sampling section had, and their new names
LEGACY_KEYS = {"sample_steps": "steps", "sampler": "sampler", "sample_spacing": "spacing",
               "sample_guidance": "guidance", "sample_clamp": "clamp", "sample_candidates": "candidates",
               "sample_select": "select", "sample_propose": "propose", "sample_scorer": "scorer"}


def split_legacy(captioner: dict) -> tuple[dict, dict]:
    """A captioner section with sampling keys inside (checkpoints before the sampling section) split into
    the network's keys and the sampling section."""
    net = {k: v for k, v in captioner.items() if k not in LEGACY_KEYS}
    sampling = {LEGACY_KEYS[k]: v for k, v in captioner.items() if k in LEGACY_KEYS}
    return net, sampling


def native_bf16(device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively: a CUDA GPU that supports it, or (on Linux) a CPU whose
    flags list AVX512-BF16 or AMX-BF16. Elsewhere bfloat16 products are emulated and slower than float32."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return _cpu_has_bf16()


_CPU_BF16: list[bool] = []


def _cpu_has_bf16() -> bool:
    if not _CPU_BF16:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            flags = []
        _CPU_BF16.append("avx512_bf16" in flags or "amx_bf16" in flags)
    return _CPU_BF16[0]
