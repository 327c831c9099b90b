"""Speed: diffusion captioning against the autoregressive baseline, measured side by side in one run.

    python -m training.benchmark                                  # shapes checkpoints + base-size models
    python -m training.benchmark --suites shapes --repeats 3      # the shipped checkpoints only
    python -m training.benchmark --suites base --devices cuda     # base size on a GPU, bf16

Suites: ``shapes`` is the shipped checkpoints (``--diffusion``, ``--baseline``, and the few-step
``--distilled`` diffusion checkpoint, trained on the baseline's captions); ``base`` is the
seed paper's size with random weights (CLIP ViT-B/32, a DistilBERT-base denoiser over its 30522-token
table, ClipCap's MLP prefix and GPT-2 small; ``--base-length`` caption positions); ``tiny`` is a
seconds-long smoke size. For each suite and device, with precomputed image features, it times

* the diffusion captioner at every ``--steps`` count (DDIM, the fast path ``record="final"``), with early
  stopping (``--early-stop`` patience values), and with the full per-step trace at ``--trace-batch``,
* each distilled diffusion checkpoint (``--distilled``, comma-separated) at each ``--distilled-steps`` count
  (with its own sampler, guidance, clamping and spacing) or ``--distilled-settings``, eager and compiled;
  its quality the mean over noise draws (``--distilled-seeds``, ten by default),
* the baseline with greedy and beam-3 decoding (``--beams``),
* the image encoder alone (and image preprocessing, per image),

at batch 1 (latency) and batch 32 (throughput; also 256 on a GPU): ``--warmup`` untimed calls, then
``--repeats`` timed ones, reported as median, min and max. A separate untimed call per setting counts
its FLOPs (``torch.utils.flop_counter``) and its peak tensor memory, and the run measures the machine's
matrix-multiply rate, so every setting's achieved FLOP/s is also a fraction of what the machine does.

Caption quality per setting comes from the evaluation protocol (``diffusion_caption.eval.evaluation``) on the
shapes test split, or for the diffusion step counts from a ``training.sweep`` JSON (``--sweep``). Writes
``--out`` (markdown: tables, targets, plot), ``--json`` (every figure) and ``--plot`` (quality against
latency, with the Pareto front of both models). Text between ``<!-- notes -->`` and ``<!-- /notes -->``
in an existing ``--out`` is kept.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import functools
import glob
import json
import os
import platform
import statistics
import tempfile
import time
import weakref
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from tqdm import tqdm  # noqa: E402

from diffusion_caption.eval.evaluation import evaluate, load_model, markdown_table, summary_row  # noqa: E402
from diffusion_caption.features import encoder_fingerprint, image_features  # noqa: E402
from diffusion_caption.images import load_image  # noqa: E402
from diffusion_caption.eval.metrics import bleu, caption_metrics  # noqa: E402

SUITES = ("shapes", "base", "tiny")
QUALITY_KEYS = ("BLEU-4", "CIDEr", "1-obj colour", "1-obj shape", "color", "shape")
TABLE_QUALITY = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "1-obj colour", "1-obj shape", "color", "shape",
                 "size", "count", "hallucination")
TARGET_KEYS = ("BLEU-4", "1-obj colour", "1-obj shape")  # "at equal or better colour/shape accuracy and BLEU-4"
# The issue names colour/shape accuracy without saying over which objects, so each target is judged twice: on
# single-object scenes, and over every object of every scene ("color", "shape": multi-object scenes included).
READINGS = (("single-object colour and shape", TARGET_KEYS),
            ("colour and shape over all objects", ("BLEU-4", "color", "shape")))
PER_DRAW_KEYS = TARGET_KEYS + ("color", "shape")
NOTES_START, NOTES_END = "<!-- notes -->", "<!-- /notes -->"
GPT2_SMALL = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, activation_function="gelu_new",
                  resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5, initializer_range=0.02)
DISTILBERT_BASE = dict(vocab_size=30522, max_position_embeddings=512, sinusoidal_pos_embds=False, n_layers=6,
                       n_heads=12, dim=768, hidden_dim=3072, dropout=0.1, attention_dropout=0.1, activation="gelu",
                       initializer_range=0.02)


def ints(s: str) -> list[int]:
    return [int(x) for x in str(s).split(",") if x.strip()]


def strs(s: str) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


# ------------------------------------------------------------------------------------------------ models
@dataclass
class Suite:
    """The two captioners of one size, the features they caption, and what quality is measured on."""
    name: str
    label: str
    diffusion: object | None
    baseline: object | None
    features: dict = field(default_factory=dict)  # model kind -> [N, D] image features to time with
    image_paths: list[str] = field(default_factory=list)  # for the preprocessing time
    records: list | None = None  # quality split (trained checkpoints only)
    notes: list[str] = field(default_factory=list)
    # more diffusion checkpoints, distilled for few steps (shapes suite): (tag, model); the tag names the
    # checkpoint in setting names when there are several, and is "" when there is one
    distilled: list = field(default_factory=list)


def synthetic_tokenizer(vocab_size: int):
    """A WordPiece tokenizer of ``vocab_size`` made-up tokens (specials first), for random-weight models:
    the benchmark only needs ids to decode, and this needs no download."""
    from transformers import DistilBertTokenizerFast

    from diffusion_caption.tokenizer import SPECIAL_TOKENS, CaptionTokenizer

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vocab.txt")
        with open(path, "w") as f:
            f.write("\n".join(SPECIAL_TOKENS + [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]) + "\n")
        return CaptionTokenizer(DistilBertTokenizerFast(vocab=path))


def random_suite(name: str, length: int, n_features: int) -> Suite:
    """Randomly initialised models with the real architectures: ``base`` (ViT-B/32, DistilBERT-base, GPT-2
    small) or ``tiny``; ``length`` caption positions for the diffusion model, tokens for the baseline."""
    import open_clip

    from diffusion_caption.baseline.captioner import BaselineCaptioner, PrefixCaptioner, baseline_preset
    from diffusion_caption.captioner import Captioner
    from diffusion_caption.config import preset
    from diffusion_caption.denoiser import Denoiser
    from diffusion_caption.image_encoder import ImageEncoder

    torch.manual_seed(0)
    if name == "base":
        clip_model = open_clip.create_model("ViT-B-32", pretrained=None)
        size = clip_model.visual.image_size
        preprocess = open_clip.image_transform(size[0] if isinstance(size, (tuple, list)) else size, is_train=False)
        encoder = ImageEncoder(clip_model, preprocess, {"kind": "open_clip", "model_name": "ViT-B-32",
                                                        "pretrained": None})
        dtok = synthetic_tokenizer(DISTILBERT_BASE["vocab_size"])
        cfg = preset("base", seq_len=length, cond_dim=encoder.feature_dim)
        denoiser = Denoiser(cfg, encoder_config=DISTILBERT_BASE)
        btok = synthetic_tokenizer(GPT2_SMALL["vocab_size"])
        bcfg = baseline_preset("base", max_len=length, tokenizer_kind="wordpiece", bos_id=btok.cls_id,
                               eos_id=btok.sep_id, cond_dim=encoder.feature_dim)
        gpt_config = dict(GPT2_SMALL, bos_token_id=btok.cls_id, eos_token_id=btok.sep_id)
        label = (f"base size, random weights: CLIP ViT-B/32, DistilBERT-base denoiser ({length} positions), "
                 f"ClipCap MLP + GPT-2 small ({length - 1} tokens)")
    elif name == "tiny":
        dtok = btok = synthetic_tokenizer(64)
        encoder = ImageEncoder.create_shapes(dtok.vocab_size, eos_id=dtok.sep_id, pad_id=dtok.pad_id)
        cfg = preset("tiny", seq_len=length, vocab_size=dtok.vocab_size, cond_dim=encoder.feature_dim)
        denoiser = Denoiser(cfg)
        bcfg = baseline_preset("tiny", max_len=length, vocab_size=btok.vocab_size, bos_id=btok.cls_id,
                               eos_id=btok.sep_id, cond_dim=encoder.feature_dim)
        gpt_config = None
        label = "tiny, random weights (a smoke test of the command)"
    else:
        raise ValueError(f"unknown random suite {name!r}")
    diffusion = Captioner(cfg, denoiser, encoder, dtok)
    baseline = BaselineCaptioner(bcfg, PrefixCaptioner(bcfg, gpt_config=gpt_config), encoder, btok)
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(n_features, encoder.feature_dim, generator=g), dim=-1)
    examples = sorted(glob.glob(os.path.join("assets", "examples", "photo_*.jpg")))
    return Suite(name, label, diffusion, baseline, {"diffusion": feats, "baseline": feats}, examples,
                 notes=["random weights: no caption quality, and no early stopping (it needs a model whose "
                        "tokens settle); a random GPT-2 rarely ends a caption, so the baseline decodes all "
                        f"{length - 1} tokens"])


def trained_suite(args, n_features: int) -> Suite:
    """The trained checkpoints, their features of the first images of the quality split."""
    from training.evaluate import load_records

    notes, models = [], {}
    for kind, path in (("diffusion", args.diffusion), ("baseline", args.baseline)):
        if path and os.path.isfile(os.path.join(path, "config.json")):
            models[kind] = load_model(path)
        else:
            models[kind] = None
            notes.append(f"{kind} checkpoint {path!r} not found: not measured")
    kd_paths = [x.strip() for x in getattr(args, "distilled", "").split(",") if x.strip()]
    distilled = []
    for path in kd_paths:
        if os.path.isfile(os.path.join(path, "config.json")):
            m = load_model(path)
            if getattr(args, "distilled_scorer", ""):
                try:
                    m.use_scorer(args.distilled_scorer)
                except ValueError as e:
                    raise SystemExit(f"--distilled-scorer: {e}") from None
            distilled.append((distilled_tag(path) if len(kd_paths) > 1 else "", path, m))
        else:
            notes.append(f"distilled checkpoint {path!r} not found: not measured")
    for j, (_, _, m) in enumerate(distilled):
        models[f"distilled{j}"] = m
    records = load_records(argparse.Namespace(data=args.data, data_dir=args.data_dir, image_dir=args.image_dir,
                                              split=args.split, limit=args.quality_limit))
    paths = [r.image_path for r in records]
    while len(paths) < n_features:  # a small split (tests): repeat its images
        paths = paths + paths
    feats = {k: image_features(m.image_encoder, paths[:n_features], args.cache_dir, desc=f"{k} features")
             for k, m in models.items() if m is not None}
    label = f"trained checkpoints: {args.diffusion} and {args.baseline}" + (
        f", distilled: {', '.join(p for _, p, _ in distilled)}" if distilled else "")
    if models["diffusion"] is not None:
        cfg = models["diffusion"].config
        notes.append(f"diffusion timestep spacing: `{cfg.sample_spacing}`, the checkpoint's own, in every diffusion "
                     "row (it changes which timesteps the steps visit, so the quality, not the work per step)")
    if distilled and getattr(args, "distilled_scorer", ""):
        from diffusion_caption.selection.text_scorer import TextScorer

        if TextScorer.is_checkpoint(args.distilled_scorer):
            notes.append(f"distilled rows that choose by CLIP score rank their candidates with the text scorer "
                         f"{args.distilled_scorer} (`--distilled-scorer`: a convolutional text encoder trained by "
                         "`training.train_text_scorer` against the checkpoints' image tower)")
        else:
            notes.append(f"distilled rows that choose by CLIP score rank their candidates with the text tower of "
                         f"{args.distilled_scorer} (`--distilled-scorer`; its image tower is the checkpoints' own)")
    custom = bool(getattr(args, "distilled_settings", ""))
    for tag, path, m in distilled:
        notes.append(f"distilled rows{f' ({tag}: {path})' if tag else ''}: {distilled_description(m, custom)}")
    return Suite("shapes", label, models["diffusion"], models["baseline"], feats, paths[:8], records, notes,
                 distilled=[(tag, m) for tag, _, m in distilled])


def distilled_tag(path: str) -> str:
    """A distilled checkpoint's short name in setting names: its folder's name."""
    return os.path.basename(os.path.normpath(path))


def distilled_description(model, custom: bool = False) -> str:
    cfg = model.config
    kd = cfg.extra.get("distilled", {})
    teacher = (f"trained on the captions of {kd['teacher']} (beam {kd.get('decoding', {}).get('beam', '?')}) for "
               f"its training images (sequence-level distillation, `training.distill_captions`)" if kd else
               "a second diffusion checkpoint")
    if kd and "--select typical" in kd.get("command", ""):
        teacher += ", each caption the most typical phrasing among the teacher's near-best beam hypotheses"
    if cfg.extra.get("init"):
        teacher += f"; fine-tuned from {cfg.extra['init']['checkpoint']}"
    teacher += f"; denoiser of {cfg.n_layers} layer{'s' if cfg.n_layers != 1 else ''} of width {cfg.dim}"
    if custom:
        return f"{teacher}; sampled with the settings each row names (`--distilled-settings`)"
    return (f"{teacher}; sampled by {cfg.sampler.upper()} with the checkpoint's guidance {cfg.sample_guidance:g}"
            + (", clamping" if cfg.sample_clamp else "") + f" and `{cfg.sample_spacing}` spacing")


# ------------------------------------------------------------------------------------------------ measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def time_call(fn, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median, min and max wall time (ms) of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
        sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "runs_ms": [round(t, 3) for t in times]}


class PeakTensorMemory(TorchDispatchMode):
    """The peak bytes of tensors created while it is active (activations, caches, temporaries), on any
    device: every op's outputs are tracked until the last tensor on their storage is freed. Storages that
    existed before (weights, inputs) are not counted. Allocator overheads are not included."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict = {}
        self.sizes: dict = {}
        self.external: set = set()

    @staticmethod
    def _key(t: torch.Tensor):
        try:
            return t.device, t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # tensors without storage
            return None

    def _release(self, key) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                key = self._key(t)
                if key is not None and key not in self.refs:
                    self.external.add(key)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = self._key(t)
                if key is None or key in self.external:
                    continue
                if key not in self.refs:
                    self.refs[key] = 0
                    self.sizes[key] = t.untyped_storage().nbytes()
                    self.live += self.sizes[key]
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out


def count_call(fn, device: torch.device) -> dict:
    """FLOPs and peak tensor memory of one call (an untimed pass), and the CUDA allocator's peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    mem = PeakTensorMemory()
    with FlopCounterMode(display=False) as flops, mem:
        result = fn()
    out = {"flops": int(flops.get_total_flops()), "peak_tensor_bytes": int(mem.peak)}
    if device.type == "cuda":
        sync(device)
        out["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device) - base)
    return out, result


def matmul_rate(device: torch.device, dtype: str, n: int, repeats: int = 10) -> dict:
    """The best rate (GFLOP/s) of an n x n by n x n matrix product on ``device``: the machine's practical peak."""
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    a = torch.randn(n, n, device=device, dtype=tdtype)
    b = torch.randn(n, n, device=device, dtype=tdtype)
    t = time_call(lambda: a @ b, device, warmup=2, repeats=repeats)
    return {"n": n, "dtype": dtype, "gflops": 2 * n ** 3 / (t["min_ms"] / 1000) / 1e9,
            "median_gflops": 2 * n ** 3 / (t["median_ms"] / 1000) / 1e9}


def param_bytes(*modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------------ plan
def setting_name(steps: int, guidance: float = 1.0, early_stop: int = 0, extra: str = "") -> str:
    """"DDIM 5", "DDIM 5, guidance 5", "DDIM 5, guidance 5, early stop 2", ... (+ ", full trace" / ", compiled")."""
    name = f"DDIM {steps}" + (f", guidance {guidance:g}" if guidance != 1.0 else "")
    name += f", early stop {early_stop}" if early_stop else ""
    return name + (f", {extra}" if extra else "")


def guidances(model, wanted: list[str]) -> list[float]:
    """The guidance scales to run: numbers, and "default" for the checkpoint's own ``sample_guidance``."""
    out = []
    for g in wanted:
        v = float(getattr(model.config, "sample_guidance", 1.0)) if g == "default" else float(g)
        if v not in out:
            out.append(v)
    return out


def checkpoint_default(model) -> dict | None:
    """The checkpoint's own sampling defaults as one more setting, when they are not a plain DDIM one."""
    cfg = getattr(model, "config", None)
    if cfg is None or (cfg.sampler == "ddim" and not getattr(cfg, "sample_clamp", False)):
        return None
    name = (f"default: {cfg.sampler.upper()} {cfg.sample_steps}"
            + (f", guidance {cfg.sample_guidance:g}" if cfg.sample_guidance != 1.0 else "")
            + (", clamp" if getattr(cfg, "sample_clamp", False) else "")
            + (f", {cfg.sample_spacing}" if getattr(cfg, "sample_spacing", "linspace") != "linspace" else ""))
    return dict(setting=name, steps=cfg.sample_steps, sampler=cfg.sampler, guidance=float(cfg.sample_guidance),
                clamp=bool(getattr(cfg, "sample_clamp", False)), early_stop=0, record="final")


def mbr_name(setting: str, k: int) -> str:
    return f"{setting}, MBR {k}"


def diffusion_plan(args, batch_sizes: list[int], scales: list[float], compiled: bool = False,
                   early_stop: bool = True, default: dict | None = None) -> list[dict]:
    plan = [dict(default, batch=B) for B in batch_sizes] if default else []
    if default:  # the default again with MBR over K samples per image (K rows per image in every call)
        plan += [dict(default, setting=mbr_name(default["setting"], k), candidates=k, select="mbr", batch=B)
                 for k in args.mbr for B in batch_sizes]
    for g in scales:
        for steps in args.steps:
            base = dict(steps=steps, guidance=g, early_stop=0, record="final")
            plan += [dict(base, setting=setting_name(steps, g), batch=B) for B in batch_sizes]
            for k in (args.early_stop if early_stop else []):
                if steps > k:
                    plan += [dict(base, setting=setting_name(steps, g, k), early_stop=k, batch=B)
                             for B in batch_sizes]
            plan += [dict(base, setting=setting_name(steps, g, extra="full trace"), record="all", batch=B)
                     for B in args.trace_batch]
    if compiled:  # the fast path again, through torch.compile
        plan += [dict(setting=setting_name(steps, g, extra="compiled"), steps=steps, guidance=g, early_stop=0,
                      record="final", batch=B, compiled=True)
                 for g in scales for steps in args.steps for B in batch_sizes]
    return plan


def distilled_name(sampler: str, steps: int, extra: str = "", tag: str = "") -> str:
    return f"distilled{f' {tag}' if tag else ''}: {sampler.upper()} {steps}" + (f", {extra}" if extra else "")


def distilled_specs(args, model) -> list[dict]:
    """The distilled checkpoint's settings: ``--distilled-settings`` when given, else its own sampler,
    guidance, clamping and spacing at each ``--distilled-steps`` count."""
    cfg = model.config
    if getattr(args, "distilled_settings", ""):
        from training.choose_sampling import parse_setting
        try:
            return [parse_setting(x) for x in args.distilled_settings.split(",") if x.strip()]
        except SystemExit as e:  # parse_setting names its own command's flag
            raise SystemExit(str(e).replace("--settings", "--distilled-settings", 1)) from None
    return [dict(sampler=cfg.sampler, steps=k, guidance=float(cfg.sample_guidance), clamp=bool(cfg.sample_clamp),
                 spacing=cfg.sample_spacing, candidates=cfg.sample_candidates, select=cfg.sample_select,
                 propose=cfg.sample_propose, own=True)
            for k in args.distilled_steps]


def distilled_setting_name(spec: dict, compiled: bool = False, tag: str = "", scorer: str = "") -> str:
    extras = [] if spec.get("own") else (
        ([f"guidance {spec['guidance']:g}"] if spec["guidance"] != 1 else []) + (["clamp"] if spec["clamp"] else [])
        + ([spec["spacing"]] if spec["spacing"] != "linspace" else []))
    if spec.get("candidates", 1) > 1:  # named even for a checkpoint's own default: it multiplies the work
        what = "roundings" if spec.get("propose") == "rounding" else "candidates"
        by = spec.get("select", "mbr")
        named = f" ({distilled_tag(scorer)})" if by == "clip" and scorer else ""
        extras.append(f"{spec['candidates']} {what} by {by.upper()}{named}")
    return distilled_name(spec["sampler"], spec["steps"], ", ".join(extras + (["compiled"] if compiled else [])), tag)


def distilled_plan(args, batch_sizes: list[int], model, compiled: bool = False, tag: str = "",
                   index: int = 0) -> list[dict]:
    """A distilled checkpoint (the ``index``-th of ``--distilled``, named ``tag``) at each of its settings
    (``distilled_specs``), eager and, with ``compiled``, through torch.compile."""
    plan = []
    for variant in ([False, True] if compiled else [False]):
        for spec in distilled_specs(args, model):
            row = dict(sampler=spec["sampler"], steps=spec["steps"], guidance=spec["guidance"], clamp=spec["clamp"],
                       spacing=spec["spacing"], candidates=spec.get("candidates", 1), select=spec.get("select", "mbr"),
                       propose=spec.get("propose", "noise"), early_stop=0, record="final", distilled=True,
                       setting=distilled_setting_name(spec, variant, tag, getattr(args, "distilled_scorer", "")),
                       distilled_index=index,
                       **({"distilled_tag": tag} if tag else {}))
            plan += [dict(row, batch=B, **({"compiled": True} if variant else {})) for B in batch_sizes]
    return plan


def baseline_plan(args, batch_sizes: list[int]) -> list[dict]:
    return [dict(setting="greedy" if beam == 1 else f"beam {beam}", beam=beam, batch=B)
            for beam in args.beams for B in batch_sizes]


def take(features: torch.Tensor, B: int) -> torch.Tensor:
    reps = -(-B // features.shape[0])
    return features.repeat(reps, 1)[:B] if reps > 1 else features[:B]


def measure_suite(suite: Suite, device: torch.device, dtype: str, args, batch_sizes: list[int],
                  peak: dict, repeats: int) -> list[dict]:
    """Every timing row of one suite on one device."""
    rows: list[dict] = []
    models = [m for m in (suite.diffusion, suite.baseline, *(m for _, m in suite.distilled)) if m is not None]
    for m in models:
        m.to(device)
    jobs = []
    compiled = None
    if suite.diffusion is not None:
        scales = guidances(suite.diffusion, args.guidance) if suite.records is not None else [1.0]
        jobs += [("diffusion", p) for p in diffusion_plan(args, batch_sizes, scales, suite.name in args.compile,
                                                          early_stop=suite.records is not None,
                                                          default=(checkpoint_default(suite.diffusion)
                                                                   if suite.records is not None else None))]
        if suite.name in args.compile:
            compiled = copy.copy(suite.diffusion).compile(dynamic=False)  # same weights, own compiled graph
    compiled_kd = {}  # distilled index -> its compiled copy
    for j, (tag, m) in enumerate(suite.distilled):
        jobs += [("distilled", p) for p in distilled_plan(args, batch_sizes, m, suite.name in args.compile, tag, j)]
        if suite.name in args.compile:
            compiled_kd[j] = copy.copy(m).compile(dynamic=False)
    if suite.baseline is not None:
        jobs += [("baseline", p) for p in baseline_plan(args, batch_sizes)]
    for kind, p in tqdm(jobs, desc=f"{suite.name} on {device.type}", leave=False):
        model = suite.distilled[p["distilled_index"]][1] if kind == "distilled" else \
            suite.diffusion if kind == "diffusion" else suite.baseline
        B = p["batch"]
        # batch 1 is the latency of one image, averaged over several (a caption's length varies with its
        # image, and so does the baseline's time): each timed call captions them one after another
        n_calls = args.latency_images if B == 1 and suite.records is not None else 1
        feats = take(suite.features[f"distilled{p['distilled_index']}" if kind == "distilled" else kind],
                     B * n_calls).to(device)
        chunks = [feats[i * B:(i + 1) * B] for i in range(n_calls)]
        if kind in ("diffusion", "distilled"):
            kw = dict(steps=p["steps"], sampler=p.get("sampler", "ddim"), guidance=p["guidance"], seed=args.seed,
                      clamp=p.get("clamp", False), early_stop=p["early_stop"], record=p["record"],
                      candidates=p.get("candidates", 1), select=p.get("select"), spacing=p.get("spacing"),
                      propose=p.get("propose"))
        else:
            kw = dict(beam=p["beam"])

        def call(model=model, chunks=chunks, kw=kw):
            with autocast(device, dtype):
                return [o for f in chunks for o in model.caption_batch(features=f, **kw)]

        counts, outs = count_call(call, device)  # FLOPs and memory of the eager model, also for compiled rows
        first = None
        if p.get("compiled"):
            call = functools.partial(call, model=compiled_kd[p["distilled_index"]] if kind == "distilled" else compiled)
            t0 = time.perf_counter()
            call()  # compiles, at this batch size
            sync(device)
            first = time.perf_counter() - t0
        t = time_call(call, device, args.warmup, repeats)
        t = {k: ([x / n_calls for x in v] if isinstance(v, list) else v / n_calls) for k, v in t.items()}
        row = {"suite": suite.name, "device": device.type, "dtype": dtype,
               "model": "diffusion" if kind == "distilled" else kind, **p, **t, **counts,
               "images_averaged": B * n_calls, "ms_per_image": t["median_ms"] / B,
               "images_per_s": 1000 * B / t["median_ms"], "flops_per_caption": counts["flops"] / (B * n_calls),
               "gflops_per_s": counts["flops"] / n_calls / (t["median_ms"] / 1000) / 1e9}
        row["matmul_fraction"] = row["gflops_per_s"] / peak["gflops"]
        if first is not None:
            row["first_call_s"] = first
        if kind in ("diffusion", "distilled"):
            used = [o.final.index + 1 for o in outs]
            row["steps_used"] = sum(used) / len(used)
            row["stopped_early"] = sum(u < p["steps"] for u in used) / len(used)
        else:
            row["tokens"] = sum(len(o.token_ids) for o in outs) / len(outs)
        rows.append(row)
    # the image encoder alone, on preprocessed pixels; preprocessing per image on its own
    encoders = []
    for kind, m in (("diffusion", suite.diffusion), ("baseline", suite.baseline),
                    *((f"distilled {tag}" if tag else "distilled", m) for tag, m in suite.distilled)):
        if m is not None and all(m.image_encoder is not e and encoder_fingerprint(m.image_encoder) != encoder_fingerprint(e)
                                 for _, e in encoders):
            encoders.append((kind, m.image_encoder))
    images = [load_image(p) for p in suite.image_paths] if suite.image_paths else []
    for kind, enc in encoders:
        if images:
            pre = time_call(lambda enc=enc: enc.pixels(images), torch.device("cpu"), 1, repeats)
            rows.append({"suite": suite.name, "device": "cpu", "dtype": "fp32", "model": "image encoder",
                         "setting": f"preprocessing ({kind}'s CLIP)", "batch": len(images), **pre,
                         "ms_per_image": pre["median_ms"] / len(images),
                         "images_per_s": 1000 * len(images) / pre["median_ms"]})
        size = enc.image_size
        for B in batch_sizes:
            pixels = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(B)).to(device)

            def call(enc=enc, pixels=pixels):
                with autocast(device, dtype):
                    return enc.encode_pixels(pixels)

            counts, _ = count_call(call, device)
            t = time_call(call, device, args.warmup, repeats)
            row = {"suite": suite.name, "device": device.type, "dtype": dtype, "model": "image encoder",
                   "setting": f"{kind}'s CLIP ({size} px)", "batch": B, **t, **counts,
                   "ms_per_image": t["median_ms"] / B, "images_per_s": 1000 * B / t["median_ms"],
                   "flops_per_caption": counts["flops"] / B,
                   "gflops_per_s": counts["flops"] / (t["median_ms"] / 1000) / 1e9}
            row["matmul_fraction"] = row["gflops_per_s"] / peak["gflops"]
            rows.append(row)
    for m in models:
        m.to("cpu")
    return rows


# ------------------------------------------------------------------------------------------------ quality
def score(model, kind: str, kw: dict, seed: int, args, suite: Suite, cpu_dtype: str) -> dict:
    """One setting's captions of the quality split (noise seed ``seed``), scored: an ``evaluate`` result."""
    settings = dict(kw)
    if kind == "diffusion":
        settings = model.check_settings(kw["steps"], kw.get("sampler", "ddim"), kw["guidance"], seed,
                                        kw.get("clamp", False), kw["early_stop"],
                                        candidates=kw.get("candidates", 1), spacing=kw.get("spacing"),
                                        select=kw.get("select"), propose=kw.get("propose"))
        settings["record"] = "final"  # the same captions as the full trace, without it
    with autocast(torch.device("cpu"), cpu_dtype):  # the captions of the precision that is timed
        res = evaluate(model, suite.records, settings, args.quality_batch, args.cache_dir, metrics=False)
    hyps = {c["image_id"]: c["caption"] for c in res["captions"]}
    refs = {c["image_id"]: c["references"] for c in res["captions"]}
    if args.bleu_only:  # BLEU alone, in Python: no Java
        res["metrics"] = bleu(hyps, refs, tokenizer="simple")
    else:  # the COCO protocol; METEOR (a Java run per setting) only when asked
        res["metrics"] = caption_metrics(hyps, refs, tokenizer=args.tokenizer, meteor=args.meteor)
    return res


def quality(suite: Suite, args) -> dict:
    """Caption quality per setting (key: model kind and setting name), and early-stopping statistics."""
    out: dict = {}
    if suite.records is None:
        return out
    sweep = {}
    if args.sweep:
        with open(args.sweep) as f:
            for r in json.load(f)["results"]:
                st = r["settings"]
                spacing = suite.diffusion.config.sample_spacing if suite.diffusion is not None else "linspace"
                if st.get("sampler") == "ddim" and not st.get("clamp") and not st.get("early_stop") \
                        and st.get("spacing", "linspace") == spacing:
                    sweep[(int(st["steps"]), float(st.get("guidance", 1.0)))] = r
    jobs = []
    if suite.diffusion is not None:
        for g in guidances(suite.diffusion, args.guidance):
            for steps in args.steps:
                jobs.append(("diffusion", setting_name(steps, g), dict(steps=steps, guidance=g, early_stop=0)))
                jobs += [("diffusion", setting_name(steps, g, k), dict(steps=steps, guidance=g, early_stop=k))
                         for k in args.early_stop if steps > k]
        d = checkpoint_default(suite.diffusion)
        if d is not None:
            dkw = {k: d[k] for k in ("steps", "sampler", "guidance", "clamp", "early_stop")}
            jobs.append(("diffusion", d["setting"], dkw))
            jobs += [("diffusion", mbr_name(d["setting"], k), dict(dkw, candidates=k, select="mbr")) for k in args.mbr]
    for j, (tag, m) in enumerate(suite.distilled):
        for p in distilled_plan(args, [1], m, tag=tag, index=j):
            jobs.append(("distilled", p["setting"], {k: p[k] for k in ("steps", "sampler", "guidance", "clamp",
                                                                       "early_stop", "spacing", "distilled_index",
                                                                       "candidates", "select", "propose")}))
    if suite.baseline is not None:
        jobs += [("baseline", "greedy" if b == 1 else f"beam {b}", dict(beam=b)) for b in args.beams]
    eager: dict = {}  # steps -> the captions without early stopping
    cpu_dtype = getattr(args, "cpu_dtype", "fp32")  # quality is measured on the CPU, in the CPU timing's precision
    for kind, name, kw in tqdm(jobs, desc="quality", leave=False):
        model = suite.diffusion if kind == "diffusion" else suite.baseline
        if kind == "distilled":  # scored as a diffusion setting; the name says which checkpoint
            model = suite.distilled[kw["distilled_index"]][1]
            kind = "diffusion"
            kw = {**{k: v for k, v in kw.items() if k != "distilled_index"}, "distilled": True}
        if kind == "diffusion" and kw["early_stop"] == 0 and not kw.get("distilled") and (kw["steps"], kw["guidance"]) in sweep \
                and kw.get("sampler", "ddim") == "ddim" and not kw.get("clamp") and kw.get("candidates", 1) == 1:
            res = sweep[(kw["steps"], kw["guidance"])]
            draws = [res]
            source = f"sweep {args.sweep}"
        else:
            # a distilled setting may be scored over several noise draws (--distilled-seeds): its quality is
            # their mean, and each draw's target metrics are kept
            seeds = (getattr(args, "distilled_seeds", None) or [args.seed]) if kw.get("distilled") else [args.seed]
            draws = [score(model, kind, kw, seed, args, suite, cpu_dtype) for seed in seeds]
            res = draws[0]
            source = "evaluate" + (" (BLEU only, simple tokenizer)" if args.bleu_only else
                                   f" ({args.tokenizer} tokenizer{', METEOR' if args.meteor else ', no METEOR'})") \
                + (f", {cpu_dtype} autocast" if cpu_dtype != "fp32" else "")
            if len(draws) > 1:
                source += f", mean of {len(draws)} draws (seeds {', '.join(map(str, seeds))})"
        per_draw = [summary_row(d) for d in draws]
        q = {}
        for k in per_draw[0]:
            vals = [r.get(k) for r in per_draw]
            q[k] = sum(vals) / len(vals) if all(isinstance(v, (int, float)) for v in vals) else vals[0]
        if len(per_draw) > 1:
            q["per_draw"] = {k: [r[k] for r in per_draw] for k in PER_DRAW_KEYS
                             if all(isinstance(r.get(k), (int, float)) for r in per_draw)}
        q["source"] = source
        q["n_images"] = res["n_images"]
        if kind == "diffusion" and not kw["early_stop"] and "captions" in res and kw.get("sampler", "ddim") == "ddim" \
                and not kw.get("clamp") and kw.get("candidates", 1) == 1 and not kw.get("distilled"):
            eager[(kw["steps"], kw["guidance"])] = [c["caption"] for c in res["captions"]]
        if kind == "diffusion" and kw["early_stop"]:
            with autocast(torch.device("cpu"), cpu_dtype):
                q.update(early_stop_stats(model, suite, kw["steps"], kw["guidance"], kw["early_stop"], args,
                                          eager.get((kw["steps"], kw["guidance"]))))
        out[f"{kind}|{name}"] = q
        tqdm.write(f"quality {kind} {name}: " + ", ".join(f"{k}={q[k]:.3f}" for k in QUALITY_KEYS
                                                          if isinstance(q.get(k), float)))
    return out


def early_stop_stats(model, suite: Suite, steps: int, guidance: float, patience: int, args,
                     without: list[str] | None) -> dict:
    """How often early stopping fires on the quality split, how many steps it runs, and how often the
    caption equals the one without it (``without``, or computed here), batches seeded as in evaluation."""
    feats = image_features(model.image_encoder, [r.image_path for r in suite.records], args.cache_dir)
    used, texts, ref = [], [], []
    for i in range(0, feats.shape[0], args.quality_batch):
        f = feats[i:i + args.quality_batch]
        seed = args.seed + i  # as evaluation.generate seeds each batch
        out = model.caption_batch(features=f, steps=steps, sampler="ddim", guidance=guidance, seed=seed,
                                  clamp=False, early_stop=patience, record="final")
        used += [t.final.index + 1 for t in out]
        texts += [t.text for t in out]
        if without is None:
            ref += [t.text for t in model.caption_batch(features=f, steps=steps, sampler="ddim", guidance=guidance,
                                                        seed=seed, clamp=False, record="final")]
    ref = ref if without is None else without
    return {"stopped_early": sum(u < steps for u in used) / len(used), "mean_steps": sum(used) / len(used),
            "same_caption": sum(a == b for a, b in zip(texts, ref)) / len(used)}


# ------------------------------------------------------------------------------------------------ report
def busy_processes(seconds: float = 2.0, threshold: float = 0.1) -> list[str]:
    """Other processes that used more than ``threshold`` of a core over ``seconds`` (Linux /proc)."""
    def ticks() -> dict:
        out = {}
        for d in glob.glob("/proc/[0-9]*"):
            try:
                with open(os.path.join(d, "stat")) as f:
                    parts = f.read().rsplit(")", 1)[1].split()
                out[int(os.path.basename(d))] = int(parts[11]) + int(parts[12])  # utime + stime
            except (OSError, ValueError, IndexError):
                pass
        return out

    try:
        hz = os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return []
    a = ticks()
    time.sleep(seconds)
    b = ticks()
    busy = []
    for pid, t in b.items():
        if pid == os.getpid() or pid not in a:
            continue
        share = (t - a[pid]) / hz / seconds
        if share > threshold:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:100]
            except OSError:
                cmd = "?"
            busy.append(f"{share:.0%} of a core: {cmd or pid}")
    return busy


def machine_info(threads: int) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def contention() -> dict:
    """The load and the other busy processes, sampled when the timing starts and again when it ends."""
    out = {"busy": busy_processes()}
    try:
        out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return out


def join_quality(rows: list[dict], qual: dict) -> None:
    for r in rows:
        if r["model"] in ("diffusion", "baseline"):
            name = r["setting"].replace(", full trace", "").replace(", compiled", "")  # the same captions
            q = qual.get(f"{r['model']}|{name}")
            if q:
                r["quality"] = {k: q[k] for k in QUALITY_KEYS if k in q}
                if "per_draw" in q:  # scored over several noise draws: the mean above, each draw here
                    r["quality"]["per_draw"] = q["per_draw"]


def variant_of(row: dict) -> str:
    if row.get("distilled"):
        tag = f" {row['distilled_tag']}" if row.get("distilled_tag") else ""
        return f"distilled{tag}, compiled" if row.get("compiled") else f"distilled{tag}"
    if row.get("candidates", 1) > 1:
        return "checkpoint default, MBR"
    if row.get("sampler", "ddim") != "ddim" or row.get("clamp"):
        return "checkpoint default"
    v = "compiled" if row.get("compiled") else "early stop" if row.get("early_stop") else "eager"
    g = row.get("guidance", 1.0)
    return v if g == 1.0 else f"{v}, guidance {g:g}"


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both lower time and higher quality, by time."""
    front, best = [], float("-inf")
    for x, y, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y, name))
            best = y
    return front


def plot(rows: list[dict], path: str, metrics: list[str], title: str) -> bool:
    """Quality against latency (batch 1) and against time per image (largest batch), one row per metric;
    each model's Pareto front dashed in its colour, the front of both together ringed in black."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    rows = [r for r in rows if r["model"] in ("diffusion", "baseline") and r.get("record", "final") == "final"
            and r.get("quality")]
    metrics = [m for m in metrics if any(r["quality"].get(m) is not None for r in rows)]
    if not rows or not metrics:
        return False
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(metrics), len(batches), figsize=(5.8 * len(batches), 4.2 * len(metrics)),
                             squeeze=False)
    series = [("baseline", "eager", "baseline ClipCap + GPT-2 (greedy, beam)", dict(marker="s", color="tab:red"))]
    palette = {"eager": (["tab:blue", "tab:purple", "navy"], dict(marker="o")),
               "compiled": (["tab:green", "tab:olive", "darkgreen"], dict(marker="^")),
               "early stop": (["tab:cyan", "tab:pink", "teal"], dict(marker="x", ls=""))}
    scales = sorted({r.get("guidance", 1.0) for r in rows if r["model"] == "diffusion"})
    series.append(("diffusion", "checkpoint default", next(
        (f"diffusion, checkpoint {r['setting']}" for r in rows if variant_of(r) == "checkpoint default"), ""),
        dict(marker="*", color="black", ls="")))
    series.append(("diffusion", "checkpoint default, MBR", "diffusion, checkpoint default + MBR over K samples",
                   dict(marker="P", color="darkorange", ls=":")))
    tags = sorted({r.get("distilled_tag", "") for r in rows if r.get("distilled")})
    for i, tag in enumerate(tags):  # one pair of series per distilled checkpoint
        eager_c, compiled_c = [("tab:brown", "peru"), ("darkslategray", "mediumaquamarine"),
                               ("maroon", "salmon")][i % 3]
        name = f"distilled {tag}" if tag else "distilled"
        series.append(("diffusion", name, (f"{name} diffusion" if tag else
                                           "distilled diffusion (trained on the baseline's captions)") +
                       ", by steps and candidates",
                       dict(marker="D", color=eager_c)))
        series.append(("diffusion", f"{name}, compiled", f"{name} diffusion, torch.compile",
                       dict(marker="d", color=compiled_c, ls="-.")))
    for kind, (colors, style) in palette.items():
        for i, g in enumerate(scales):
            label = "diffusion" + ("" if kind == "eager" else ", torch.compile" if kind == "compiled" else
                                   ", early stop (steps/patience)") + (f", guidance {g:g}" if g != 1.0 else "")
            series.append(("diffusion", kind if g == 1.0 else f"{kind}, guidance {g:g}", label,
                           dict(style, color=colors[i % len(colors)])))
    for i, metric in enumerate(metrics):
        for ax, B in zip(axes[i], batches):
            pts = [r for r in rows if r["batch"] == B and r["quality"].get(metric) is not None]
            every = []
            for kind, variant, label, style in series:
                sel = sorted((r for r in pts if r["model"] == kind and variant_of(r) == variant),
                             key=lambda r: (r.get("steps", 0), r.get("beam", 0), r.get("early_stop", 0),
                                            r.get("candidates", 1)))
                if not sel:
                    continue
                xs, ys = [r["ms_per_image"] for r in sel], [r["quality"][metric] for r in sel]
                ax.plot(xs, ys, label=label, ms=6, lw=1.2, **style)
                for r, x, y in zip(sel, xs, ys):
                    name = str(r.get("steps", "")) + (f"/{r['early_stop']}" if r.get("early_stop") else "") \
                        if r["model"] == "diffusion" else r["setting"]
                    if variant.startswith("distilled"):
                        if variant.endswith("compiled"):  # the eager point beside it carries the label
                            continue
                        name = f"KD {r['steps']}" + (
                            f" x{r['candidates']} {'rounding ' if r.get('propose') == 'rounding' else ''}"
                            f"{r.get('select', 'mbr')}" if r.get("candidates", 1) > 1 else "")
                    elif variant == "checkpoint default":
                        name = "default"
                    elif variant == "checkpoint default, MBR":
                        name = f"MBR {r['candidates']}"
                    ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
                every += [(x, y, kind) for x, y in zip(xs, ys)]
            for kind, color in (("diffusion", "tab:blue"), ("baseline", "tab:red")):
                front = pareto([p for p in every if p[2] == kind])
                if len(front) > 1:
                    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=color, ls="--",
                            lw=0.8, alpha=0.7)
            front = pareto(every)
            ax.plot([p[0] for p in front], [p[1] for p in front], "o", mfc="none", mec="black", ms=11, mew=1.2,
                    label="Pareto front of both models")
            ax.set_xscale("log")
            # labels at 1, 2, 5 x 10^k only: every minor tick labelled overlaps on a wide range
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(f"ms per image at batch {B}" + (" (latency)" if B == 1 else " (1 / throughput)"))
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3, which="both")
    # one legend for all panels, below them, so that no panel's points are hidden behind it
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    ncol = 2 if max(map(len, labels), default=0) > 48 else 3  # long labels: two columns, none cut off
    fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.03 + 0.022 * -(-len(labels) // ncol) * 2 / len(metrics), 1, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")  # whatever the legend's width, nothing is clipped
    plt.close(fig)
    return True


def _ms(r: dict) -> str:
    return f"{r['median_ms']:.1f} ({r['min_ms']:.1f}-{r['max_ms']:.1f})"


def _g(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def timing_table(rows: list[dict]) -> str:
    lines = ["| model | setting | batch | median ms (min-max) | ms / image | images / s | GFLOP / caption | "
             "achieved GFLOP/s | of matmul rate | peak tensor MiB | steps used / tokens | BLEU-4 | CIDEr | "
             "1-obj colour | 1-obj shape |", "|" + "---|" * 15]
    for r in rows:
        q = r.get("quality", {})
        used = r.get("steps_used", r.get("tokens"))
        lines.append("| " + " | ".join([
            r["model"], r["setting"], str(r["batch"]), _ms(r), f"{r['ms_per_image']:.2f}", f"{r['images_per_s']:.1f}",
            _g(r.get("flops_per_caption") and r["flops_per_caption"] / 1e9, "{:.3g}"),
            _g(r.get("gflops_per_s"), "{:.1f}"), _g(r.get("matmul_fraction"), "{:.0%}"),
            _g(r.get("peak_tensor_bytes") and r["peak_tensor_bytes"] / 2**20, "{:.1f}"),
            _g(used, "{:.1f}"), _g(q.get("BLEU-4")), _g(q.get("CIDEr")), _g(q.get("1-obj colour")),
            _g(q.get("1-obj shape"))]) + " |")
    return "\n".join(lines) + "\n"


def draws_note(row: dict, keys=TARGET_KEYS) -> str:
    """The " (means of N noise draws; per draw: ...)" suffix of a row scored over several draws, else "".

    Only the metrics among ``keys`` that were kept per draw are listed (older runs kept fewer)."""
    per = {k: v for k, v in (row["quality"].get("per_draw") or {}).items() if k in keys}
    if not per:
        return ""
    n = len(next(iter(per.values())))
    return (f" (means of {n} noise draws; per draw: "
            + "; ".join(f"{k} {min(v):.3f}-{max(v):.3f}" for k, v in per.items()) + ")")


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets on the trained checkpoints, CPU: at quality >= the baseline's greedy, diffusion
    batch-1 latency <= greedy's and throughput at the largest batch (32 by default) >= 2x greedy's.

    Quality is BLEU-4 with colour and shape accuracy, read two ways (``READINGS``): on single-object scenes,
    and over all objects; each target gets one verdict per reading."""
    out = []
    cpu = [r for r in rows if r["suite"] == "shapes" and r["device"] == "cpu" and r.get("quality")]
    big = max((r["batch"] for r in cpu), default=32)
    for B, goal, what in ((1, 1.0, "batch-1 latency"), (big, 2.0, f"batch-{big} throughput")):
        greedy = next((r for r in cpu if r["model"] == "baseline" and r["setting"] == "greedy" and r["batch"] == B),
                      None)
        if greedy is None:
            out.append(f"- {what}: not measured (no baseline greedy row with quality at batch {B})")
            continue
        diff = [r for r in cpu if r["model"] == "diffusion" and r["batch"] == B and r.get("record") == "final"]
        for reading, keys in READINGS:
            missing = [k for k in keys if not isinstance(greedy["quality"].get(k), (int, float))]
            if missing:  # e.g. a split whose captions name no colour of a multi-object scene
                out.append(f"- {what}, at {reading}: not measured (greedy decoding has no "
                           f"{', '.join(missing)} score on this split)")
                continue
            out.append(verdict(f"{what}, at {reading}", greedy, diff, goal, B, list(keys)))
    return out


def verdict(what: str, greedy: dict, diff: list[dict], goal: float, B: int, keys: list[str]) -> str:
    """One target line: the fastest diffusion row at least as good as greedy on every one of ``keys``."""
    def num(r, k):  # a metric the split cannot score (no multi-object scene, say) is None
        v = r["quality"].get(k)
        return v if isinstance(v, (int, float)) else float("-inf")

    def qual(r):
        return ", ".join(f"{k} {num(r, k):.3f}" for k in keys if num(r, k) > float("-inf")) + draws_note(r, keys)

    def rank(r):
        return tuple(num(r, k) for k in keys)

    gq = ", ".join(f"{k} {greedy['quality'][k]:.3f}" for k in keys)
    ok_q = [r for r in diff if all(num(r, k) >= greedy["quality"][k] for k in keys)]
    if not ok_q:
        top = max(diff, key=rank, default=None)
        fast = [r for r in diff if greedy["ms_per_image"] / r["ms_per_image"] >= goal]
        line = f"- {what}: **not met** - no diffusion setting reaches the baseline's greedy quality ({gq})"
        if top is not None:
            line += (f"; the best diffusion setting by {keys[0]} ({top['setting']}: {qual(top)}) takes "
                     f"{top['ms_per_image']:.2f} ms per image against greedy's {greedy['ms_per_image']:.2f} ms "
                     f"({greedy['ms_per_image'] / top['ms_per_image']:.2f}x greedy's speed)")
        if fast:
            q = max(fast, key=rank)
            line += (f"; on speed alone {len(fast)} diffusion settings meet it, the best of them by {keys[0]} "
                     f"{q['setting']} ({greedy['ms_per_image'] / q['ms_per_image']:.2f}x greedy's speed; {qual(q)})")
        else:
            line += "; no diffusion setting meets it on speed alone either"
        return line
    best = min(ok_q, key=lambda r: r["ms_per_image"])
    ratio = greedy["ms_per_image"] / best["ms_per_image"]
    if B == 1:
        detail = (f"diffusion {best['setting']} {best['ms_per_image']:.2f} ms against greedy "
                  f"{greedy['ms_per_image']:.2f} ms ({ratio:.2f}x faster; target >= 1x)")
    else:
        detail = (f"diffusion {best['setting']} {best['images_per_s']:.0f} images/s against greedy "
                  f"{greedy['images_per_s']:.0f} images/s ({ratio:.2f}x; target >= 2x)")
    return f"- {what}: **{'met' if ratio >= goal else 'not met'}** - {detail}; quality {qual(best)} against greedy {gq}"


def early_stop_table(qual: dict) -> str:
    rows = [(k.split("|")[-1], q) for k, q in qual.items() if "early stop" in k]
    if not rows:
        return ""
    lines = ["| setting | images stopped early | mean steps run | same caption as without | BLEU-4 | "
             "1-obj colour | 1-obj shape |", "|---|---|---|---|---|---|---|"]
    for name, q in rows:
        lines.append(f"| {name} | {q['stopped_early']:.1%} | {q['mean_steps']:.2f} | {q['same_caption']:.1%} | "
                     f"{_g(q.get('BLEU-4'))} | {_g(q.get('1-obj colour'))} | {_g(q.get('1-obj shape'))} |")
    return "\n".join(lines) + "\n"


def _key(r: dict) -> tuple:
    return r["suite"], r["device"], r.get("steps"), r.get("guidance", 1.0), r["batch"]


def speedup_table(rows: list[dict]) -> str:
    """The fast path, early stopping and torch.compile against the full trace, per setting and batch."""
    diff = [r for r in rows if r["model"] == "diffusion" and not r.get("distilled")]
    eager = {_key(r): r for r in diff if variant_of(r).startswith("eager") and r["record"] == "final"}
    lines = ["| suite | device | steps | guidance | batch | full trace ms | fast path ms | fast path, early stop ms "
             "(patience: steps run) | compiled fast path ms (first call s) |", "|---|---|---|---|---|---|---|---|---|"]
    for k, r in eager.items():
        trace = next((x for x in diff if _key(x) == k and x["record"] == "all"), None)
        es = [x for x in diff if _key(x) == k and x.get("early_stop")]
        comp = next((x for x in diff if _key(x) == k and x.get("compiled")), None)
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]:g} | {k[4]} | "
                     + (f"{trace['median_ms']:.1f}" if trace else "-") + f" | {r['median_ms']:.1f} | "
                     + (", ".join(f"{x['median_ms']:.1f} ({x['early_stop']}: {x['steps_used']:.2f})" for x in es)
                        or "-") + " | "
                     + (f"{comp['median_ms']:.1f} ({comp['first_call_s']:.1f})" if comp else "-") + " |")
    return "\n".join(lines) + "\n" if eager else ""


def write_markdown(path: str, report: dict, plot_path: str | None) -> None:
    notes = ""
    if os.path.isfile(path):
        with open(path) as f:
            old = f.read()
        if NOTES_START in old and NOTES_END in old:
            notes = old[old.index(NOTES_START) + len(NOTES_START):old.index(NOTES_END)].strip("\n")
    m = report["machine"]
    lines = ["# Benchmarks: diffusion against autoregressive captioning", "",
             f"Written by `{report['command']}` on {m['date']}. Every figure below comes from that one run"
             + (", except the suites marked as carried over from an earlier one." if any(
                 r.get("carried_over") for r in report["rows"]) else "."), "",
             f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} threads"
             + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU (CUDA figures not measured)") + "."]
    for when, c in report["contention"].items():
        busy = c.get("busy", [])
        lines.append(f"At the {when} of the timing: load average {c.get('load_average')}; "
                     + (f"**other busy processes** ({len(busy)}): " + "; ".join(f"`{b}`" for b in busy)
                        if busy else "no other busy process") + ".")
    if any(c.get("busy") for c in report["contention"].values()):
        lines.append("**Contention:** other processes shared the CPU during the timing; the times are slower and "
                     "noisier than an idle machine's.")
    for dev, p in report["matmul"].items():
        lines.append(f"Matrix-multiply rate on {dev} ({p['dtype']}, {p['n']} x {p['n']}): {p['gflops']:.1f} GFLOP/s "
                     f"(best of the repeats; median {p['median_gflops']:.1f}).")
    lines += ["", f"Timing: {report['settings']['warmup']} warm-up calls, then {report['settings']['repeats']} timed "
              "calls per setting (base size: " f"{report['settings']['base_repeats']}); median (min-max). Batch 1 of the "
              f"trained checkpoints is the mean latency over {report['settings'].get('latency_images', 1)} test "
              "images captioned one at a time (the baseline's time depends on each caption's length); the random-weight "
              "suites caption one input. Image features "
              "are precomputed: the captioning times exclude the image encoder, which is timed on its own. Diffusion "
              "runs the fast path (`record=\"final\"`) unless the setting says full trace. FLOPs are counted by "
              "`torch.utils.flop_counter` (matrix products, convolutions, attention) in a separate untimed call; peak "
              "tensor MiB is the most memory held at once by tensors created during the call (weights excluded).", ""]
    lines += ["## Targets (shapes checkpoints, CPU)", ""] + (report["targets"] or ["- not measured"]) + [""]
    if notes:
        lines += [NOTES_START, notes, NOTES_END, ""]
    else:
        lines += [NOTES_START, NOTES_END, ""]
    if plot_path:
        lines += ["## Quality against latency", "",
                  f"![quality against latency]({os.path.relpath(plot_path, os.path.dirname(os.path.abspath(path)))})", ""]
    for suite in report["suites"]:
        lines += [f"## {suite['name']}: {suite['label']}", ""]
        lines += [f"- {n}" for n in suite["notes"]] + ([""] if suite["notes"] else [])
        for dev in sorted({r["device"] for r in report["rows"] if r["suite"] == suite["name"]}):
            rows = [r for r in report["rows"] if r["suite"] == suite["name"] and r["device"] == dev]
            lines += [f"### {dev}" + (f" ({rows[0]['dtype']})" if rows else ""), "", timing_table(rows)]
        if suite.get("param_mib"):
            lines += ["Weights: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in suite["param_mib"].items()) + ".", ""]
    sp = speedup_table(report["rows"])
    if sp:
        lines += ["## Full trace, fast path, early stopping, torch.compile", "",
                  "Median ms per call. The full trace keeps every step (tensors copied, tokens decoded); the fast path "
                  "(`record=\"final\"`) only the last. Early stopping: patience, then the mean steps run per image. "
                  "Compiled: the first call at a batch size compiles (inductor, C++ on CPU), later calls reuse the "
                  "graph; same captions (tests check it).", "", sp]
    es = early_stop_table(report["quality"])
    if es:
        lines += ["## Early stopping on the quality split", "",
                  "An image stops once the rounded token of every position has stayed the same for `patience` "
                  "steps; its caption is that step's.", "", es]
    if report["quality_rows"]:
        lines += ["## Caption quality per setting", "", report["quality_rows"]]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", type=strs, default=strs("shapes,base"), help=f"any of {SUITES}")
    p.add_argument("--devices", type=strs, default=None, help="cpu and/or cuda (default: cpu, and cuda when present)")
    p.add_argument("--diffusion", default="assets/checkpoints/shapes-diffusion")
    p.add_argument("--baseline", default="assets/checkpoints/shapes-baseline")
    p.add_argument("--distilled", default="assets/checkpoints/shapes-diffusion-fast-small",
                   help="few-step diffusion checkpoints to time beside the others, comma-separated ('' or a "
                        "missing path: none)")
    p.add_argument("--distilled-steps", type=ints, default=ints("1,2,3"), help="step counts of --distilled (with its own sampler)")
    p.add_argument("--distilled-scorer", default="", metavar="DIR",
                   help="rank the distilled rows' candidates (select clip) with this CLIP's text tower, e.g. "
                        "assets/checkpoints/shapes-clip-binding (its image tower must be the checkpoints' own), or "
                        "with a text scorer trained against that image tower (training.train_text_scorer)")
    p.add_argument("--distilled-settings", default="",
                   help="instead of --distilled-steps: comma-separated SAMPLER:STEPS:GUIDANCE[:clamp][:SPACING] "
                        "settings of --distilled (e.g. ddim:1:1,ddpm:2:1:clamp:trailing^2)")
    p.add_argument("--distilled-seeds", type=ints, default=ints("0,1,2,3,4,5,6,7,8,9"),
                   help="score each distilled setting's quality over these noise seeds (their mean; each draw's "
                        "colour, shape and BLEU-4 kept), so that a target is not read off one lucky draw: a "
                        "few-step caption depends on its draw ('' scores --seed alone)")
    p.add_argument("--steps", type=ints, default=ints("1,2,5,10,20,50"), help="DDIM step counts")
    p.add_argument("--guidance", type=strs, default=strs("1,default"),
                   help="guidance scales of the trained diffusion model ('default': its config's sample_guidance)")
    p.add_argument("--early-stop", type=ints, default=ints("1,2"), help="early-stopping patience values (none: '')")
    p.add_argument("--mbr", type=ints, default=ints("4,8"),
                   help="MBR sample counts K timed and scored with the checkpoint's default setting (none: '')")
    p.add_argument("--trace-batch", type=ints, default=ints("1"), help="batch sizes to time the full trace at")
    p.add_argument("--beams", type=ints, default=ints("1,3"), help="baseline beam sizes (1 = greedy)")
    p.add_argument("--batch-sizes", type=ints, default=ints("1,32"))
    p.add_argument("--cuda-batch-sizes", type=ints, default=ints("1,32,256"))
    p.add_argument("--latency-images", type=int, default=8,
                   help="batch-1 latency of the trained suite: the mean over this many images, each alone")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones (the counting "
                   "call comes first as well)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--base-repeats", type=int, default=3, help="timed calls per setting for the base size")
    p.add_argument("--base-length", type=int, default=20, help="caption length of the base-size models")
    p.add_argument("--tiny-length", type=int, default=12)
    p.add_argument("--compile", type=strs, default=strs("shapes"),
                   help="suites whose diffusion fast path is also timed through torch.compile ('' for none)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cpu-dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--cuda-dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--matmul-n", type=int, default=1024, help="matrix size of the CPU matmul-rate measurement")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("quality (shapes suite)")
    g.add_argument("--data", default="shapes")
    g.add_argument("--data-dir", default="data/shapes")
    g.add_argument("--image-dir", default=None)
    g.add_argument("--split", default="test")
    g.add_argument("--quality-limit", type=int, default=0, help="first N images of the split (0: all)")
    g.add_argument("--quality-batch", type=int, default=250)
    g.add_argument("--sweep", default="", help="a training.sweep JSON to read the diffusion step counts' quality from")
    g.add_argument("--tokenizer", default="ptb", choices=["ptb", "simple"])
    g.add_argument("--meteor", action="store_true", help="also METEOR (a Java run per setting)")
    g.add_argument("--bleu-only", action="store_true", help="BLEU in pure Python instead of the full COCO metrics")
    g.add_argument("--no-quality", action="store_true")
    g.add_argument("--plot-metrics", type=strs, default=strs("BLEU-4,1-obj colour,1-obj shape"),
                   help="quality metrics of the plot's rows")
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--out", default="docs/BENCHMARKS.md")
    p.add_argument("--json", default="", help="default: docs/benchmark.json beside --out")
    p.add_argument("--plot", default="", help="default: docs/benchmark.png beside --out")
    p.add_argument("--render", default="", help="only rewrite --out and the plot from this saved JSON (no timing)")
    p.add_argument("--keep-from", default="", metavar="JSON",
                   help="carry over, from this earlier benchmark JSON, the suites this run does not measure (they "
                        "are labelled with that run's date, machine and command)")
    return p


def main(argv=None) -> dict:
    import sys

    args = build_parser().parse_args(argv)
    if args.render:
        return render(args)
    bad = [s for s in args.suites if s not in SUITES]
    if bad:
        raise SystemExit(f"unknown suites {bad}; expected some of {SUITES}")
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for d in devices:
        if d not in ("cpu", "cuda"):
            raise SystemExit(f"unknown device {d!r}; expected cpu or cuda")
        if d == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--devices cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    json_path = args.json or os.path.join(out_dir, "benchmark.json")
    plot_path = args.plot or os.path.join(out_dir, "benchmark.png")
    machine = machine_info(torch.get_num_threads())
    report: dict = {"command": "python -m training.benchmark " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "machine": machine, "settings": vars(args), "matmul": {}, "suites": [], "rows": [],
                    "quality": {}, "contention": {}}
    report["command"] = report["command"].strip()
    for name in args.suites:
        sizes = {d: (args.batch_sizes if d == "cpu" else args.cuda_batch_sizes) for d in devices}
        n_feat = max(max(v) for v in sizes.values())
        if name == "shapes":
            suite = trained_suite(args, n_feat)
        else:
            suite = random_suite(name, args.base_length if name == "base" else args.tiny_length, n_feat)
        qual = {} if args.no_quality else quality(suite, args)
        report["quality"].update({f"{name}|{k}": v for k, v in qual.items()})
        rows = []
        for d in devices:
            dtype = args.cpu_dtype if d == "cpu" else args.cuda_dtype
            if d not in report["matmul"]:  # measured here, after the quality runs: timing starts now
                report["contention"]["start"] = report["contention"].get("start") or contention()
                report["matmul"][d] = matmul_rate(torch.device(d), dtype, args.matmul_n if d == "cpu" else 8192)
                tqdm.write(f"matmul rate on {d}: {report['matmul'][d]['gflops']:.1f} GFLOP/s ({dtype})")
            repeats = args.base_repeats if name == "base" else args.repeats
            rows += measure_suite(suite, torch.device(d), dtype, args, sizes[d], report["matmul"][d], repeats)
        join_quality(rows, qual)
        report["rows"] += rows
        pm = {}
        if suite.diffusion is not None:
            pm["diffusion denoiser"] = param_bytes(suite.diffusion.denoiser) / 2**20
        for tag, m in suite.distilled:
            pm[f"distilled{f' {tag}' if tag else ''} denoiser"] = param_bytes(m.denoiser) / 2**20
        if suite.baseline is not None:
            pm["baseline mapper + GPT-2"] = param_bytes(suite.baseline.model) / 2**20
        enc = (suite.diffusion or suite.baseline)
        if enc is not None:
            pm["CLIP image tower"] = param_bytes(enc.image_encoder.model.visual) / 2**20
        report["suites"].append({"name": name, "label": suite.label, "notes": suite.notes, "param_mib": pm})
        if qual:
            qrows = [{"model": k.split("|")[0], "setting": k.split("|")[1],
                      **{kk: q[kk] for kk in TABLE_QUALITY if isinstance(q.get(kk), float)},
                      **({"1-obj colour per draw": " ".join(f"{v:.3f}" for v in q["per_draw"]["1-obj colour"])}
                         if "1-obj colour" in q.get("per_draw", {}) else {})} for k, q in qual.items()]
            report["quality_rows"] = report.get("quality_rows", "") + markdown_table(qrows)
        del suite
    report["contention"]["end"] = contention()
    report.setdefault("quality_rows", "")
    if args.keep_from:
        carry_over(report, args.keep_from)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    return write_report(report, args.out, json_path, plot_path, args.plot_metrics)


CARRIED = "**carried over from an earlier run**"


def carry_over(report: dict, path: str) -> None:
    """Append the suites of an earlier report (``path``) that this one did not measure, with their rows,
    each suite noting when, where and by what command it was measured."""
    with open(path) as f:
        old = json.load(f)
    have = {s["name"] for s in report["suites"]}
    m = old["machine"]
    for suite in old["suites"]:
        if suite["name"] in have:
            continue
        suite = dict(suite)
        # a suite the earlier report itself carried over keeps the note of the run that measured it
        if not any(n.startswith(CARRIED) for n in suite["notes"]):
            suite["notes"] = [f"{CARRIED}: measured on {m['date']} by `{old['command']}` "
                              f"({m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']}, {m['torch_threads']} threads; "
                              f"matmul rate then {old['matmul'].get('cpu', {}).get('gflops', float('nan')):.1f} GFLOP/s, "
                              f"load average {old['contention'].get('start', {}).get('load_average')})"] + suite["notes"]
        report["suites"].append(suite)
        report["rows"] += [dict(r, carried_over=r.get("carried_over") or m["date"]) for r in old["rows"]
                           if r["suite"] == suite["name"]]
        report["quality"].update({k: v for k, v in old["quality"].items() if k.startswith(suite["name"] + "|")})


def write_report(report: dict, out: str, json_path: str, plot_path: str, metrics: list[str]) -> dict:
    """Targets, plot and markdown from the measured rows (also what ``--render`` redoes from the JSON)."""
    report["targets"] = targets(report["rows"])
    os.makedirs(os.path.dirname(os.path.abspath(plot_path)), exist_ok=True)
    dtypes = sorted({r.get("dtype", "fp32") for r in report["rows"] if r["suite"] == "shapes" and r["device"] == "cpu"})
    title = ("caption quality against time per image (shapes checkpoints, CPU, "
             f"{report['machine']['torch_threads']} threads" + "".join(f", {d}" for d in dtypes if d != "fp32") + ")")
    has_plot = plot([r for r in report["rows"] if r["suite"] == "shapes" and r["device"] == "cpu"], plot_path,
                    metrics, title)
    write_markdown(out, report, plot_path if has_plot else None)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print("\n".join(report["targets"]))
    print(f"wrote {out}, {json_path}" + (f", {plot_path}" if has_plot else ""))
    return report


def render(args) -> dict:
    """Rewrite the markdown and the plot from a saved JSON, measuring nothing."""
    with open(args.render) as f:
        report = json.load(f)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    return write_report(report, args.out, args.json or args.render,
                        args.plot or os.path.join(out_dir, "benchmark.png"), args.plot_metrics)


if __name__ == "__main__":
    main()
