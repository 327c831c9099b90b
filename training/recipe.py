"""The real-photo model in one command: CLIP ViT-B/32 features, a DistilBERT diffusion captioner, a GPT-2 ClipCap.

    python -m training.recipe --data flickr8k --data-dir DIR --out runs/flickr8k
    python -m training.recipe --data flickr8k+flickr30k --data-dir DIR --out runs/f8k30k --eval-coco COCO_DIR
    torchrun --nproc-per-node 8 -m training.recipe --data flickr8k --data-dir DIR --out runs/flickr8k
    python -m training.recipe ... --push-to-hub USER/NAME          # then: python app.py --checkpoint USER/NAME --baseline USER/NAME-baseline
    python -m training.recipe --benchmark-step [--device cuda]   # one training step of the real sizes: steps/s, memory, projected time

Offline, give local copies: ``--clip open_clip:ViT-B-32-quickgelu:FILE`` (an open_clip weights file),
``--encoder DIR --tokenizer DIR`` (DistilBERT and its tokenizer, saved with ``save_pretrained``), ``--gpt2 DIR``
(GPT-2 and its tokenizer). A model the hub cannot give ends the run at once, naming the flag.

The stages, each skipped when its output is complete (rerun the same command to resume a killed run;
a training stage continues from its last training state, as ``train_diffusion --resume`` does):

1. **features**: the frozen CLIP's image features of every split, cached in ``OUT/cache``.
2. **diffusion**: ``training.train_diffusion`` with the seed paper's choices where they were its best
   (caption length 16, x0 prediction, rounding loss 0.3, condition dropout 0.2, concat fusion, cosine
   noise, DistilBERT's weights and word embeddings) plus what the shapes default proved (self-conditioning,
   training focused on a few-step sampler's timesteps) -> ``OUT/diffusion``.
3. **baseline**: ``training.train_baseline``, ClipCap's MLP + fine-tuned GPT-2, on the same features
   -> ``OUT/baseline``.
4. **sampling**: a small grid of sampling settings on the val split, scored by CIDEr; the best (the
   cheapest among near ties) becomes the checkpoint's default, as ``research.choose_sampling --write`` does.
5. **evaluate**: the Karpathy test split of each dataset by the COCO protocol (PTB tokenisation, corpus
   BLEU/METEOR/ROUGE-L/CIDEr against every reference), and COCO's Karpathy test split zero-shot with
   ``--eval-coco`` -> ``OUT/eval/*.json``.
6. **cards**: a model card (``README.md``) with those numbers beside each checkpoint.
7. **push** (``--push-to-hub``): each checkpoint's safetensors, config, tokenizer and card to the hub, the
   CLIP referred to by its open_clip name and tag, not copied.

bf16 autocast on CUDA (training and sampling); under torchrun the training stages run on every rank with
DDP, the rest on rank 0. Before each stage the time left is estimated from one timed training step of
each model at the run's sizes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from diffusion_caption import checkpoint as ckpt
from diffusion_caption import hub
from diffusion_caption.data import caption_pairs, load_datasets
from diffusion_caption.image_encoder import BASE_MODEL, BASE_PRETRAINED
from diffusion_caption.sampling import SamplingConfig
from training import common

DEFAULT_CLIP = f"open_clip:{BASE_MODEL}:{BASE_PRETRAINED}"
DEFAULT_GRID = ("ddim:4:1:trailing^2,ddim:4:1:clamp:trailing^2,ddim:8:1:trailing^2,ddim:20:1,"
                "ddim:4:1.3:trailing^2")
# the recipe's diffusion captioner: the seed paper's choices where they were its best, and self-conditioning
# with few-step training, which the shapes default proved (flags of training.train_diffusion, on --preset base)
RECIPE_DIFFUSION = {"seq_len": 16, "predict": "x0", "lambda_round": 0.3, "p_uncond": 0.2, "fusion": "concat",
                    "schedule": "cosine", "self_cond": True, "p_self_cond": 0.5, "focus_steps": 4,
                    "focus_spacing": "trailing^2", "p_focus": 0.5}
RECIPE_SAMPLING = "ddim:4:1:trailing^2"  # its sampling until the grid on val chooses (SamplingConfig.parse's form)
# dataset sizes (Karpathy splits) for projections: training images x 5 captions
TRAIN_CAPTIONS = {"flickr8k": 6000 * 5, "flickr30k": 29000 * 5, "flickr8k+flickr30k": (6000 + 29000) * 5}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json")
PUBLISHED = ("config.json", "model.safetensors", "README.md", "vocab_map.json") + TOKENIZER_FILES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="flickr8k", help="flickr8k | flickr30k | flickr8k+flickr30k (Karpathy splits)")
    p.add_argument("--data-dir", help="the folder with dataset_<name>.json and the image folders (or <name>/ under it)")
    p.add_argument("--out", help="everything goes here: cache/, runs/, diffusion/, baseline/, eval/")
    p.add_argument("--eval-coco", default="", metavar="DIR", help="also evaluate zero-shot on COCO's Karpathy test split "
                   "(DIR with dataset_coco.json, train2014/ and val2014/)")
    g = p.add_argument_group("models (hub names, or local copies for offline use)")
    g.add_argument("--clip", default=DEFAULT_CLIP, help="open_clip:MODEL:TAG or open_clip:MODEL:FILE (a local weights "
                   f"file), or a CLIP folder (default {DEFAULT_CLIP}, the seed paper's)")
    g.add_argument("--encoder", default="distilbert-base-uncased", help="DistilBERT hub id or save_pretrained folder")
    g.add_argument("--tokenizer", default="", help="DistilBERT's tokenizer (default: --encoder when it is a hub id; "
                   "required with --encoder DIR)")
    g.add_argument("--gpt2", default="gpt2", help="GPT-2 hub id or save_pretrained folder (its tokenizer beside it)")
    g = p.add_argument_group("training")
    g.add_argument("--device", default="auto", help="cuda | cpu | auto")
    g.add_argument("--diffusion-epochs", type=float, default=25.0,
                   help="passes over the training captions (the seed's 100k steps of batch 8 are 27 on Flickr8k)")
    g.add_argument("--diffusion-batch", type=int, default=32)
    g.add_argument("--diffusion-steps", type=int, default=0, help="steps (overrides --diffusion-epochs)")
    g.add_argument("--diffusion-lr", type=float, default=1e-4, help="peak lr, decayed linearly to 5e-5 (the seed's)")
    g.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=False,
                   help="keep DistilBERT's word embeddings frozen, as the seed did (default: learned; docs/REAL_DATA.md)")
    g.add_argument("--baseline-epochs", type=float, default=10.0, help="ClipCap's 10 epochs")
    g.add_argument("--baseline-batch", type=int, default=40, help="ClipCap's batch 40")
    g.add_argument("--baseline-steps", type=int, default=0, help="steps (overrides --baseline-epochs)")
    g = p.add_argument_group("choosing the sampling, evaluating")
    g.add_argument("--sampling-grid", default=DEFAULT_GRID,
                   help="comma-separated sampling settings in SamplingConfig.parse's form, SAMPLER:STEPS:GUIDANCE[:clamp][:SPACING]")
    g.add_argument("--sampling-limit", type=int, default=500, help="val images the grid is scored on (0: all)")
    g.add_argument("--sampling-tie", type=float, default=0.02, help="CIDEr within this of the best counts as equal; "
                   "the setting with fewest network calls wins")
    g.add_argument("--baseline-beams", default="1,5", help="the baseline is evaluated at each of these beam sizes")
    g.add_argument("--eval-limit", type=int, default=0, help="evaluate the first N test images only (0: all)")
    g.add_argument("--batch-size", type=int, default=128, help="captioning batch size")
    g.add_argument("--metrics-tokenizer", default="ptb", choices=["ptb", "simple"],
                   help="ptb: the COCO protocol (needs Java); simple: pure Python")
    g.add_argument("--meteor", action=argparse.BooleanOptionalAction, default=True,
                   help="score METEOR on the test sets (--no-meteor: skip it; it starts a Java process per evaluation)")
    g = p.add_argument_group("publishing")
    g.add_argument("--push-to-hub", default="", metavar="REPO", help="upload the diffusion checkpoint to REPO and "
                   "the baseline to REPO-baseline (huggingface_hub; needs a token: huggingface-cli login)")
    g.add_argument("--hub-clip", default="", metavar="MODEL:TAG", help="the open_clip name a pushed checkpoint refers "
                   "to when --clip is a local weights file (e.g. ViT-B-32-quickgelu:openai for OpenAI's weights)")
    g.add_argument("--private", action="store_true", help="create the hub repositories private")
    g = p.add_argument_group("benchmark (--benchmark-step)")
    g.add_argument("--benchmark-step", action="store_true", help="time training steps of both models at the real "
                   "sizes on random features, print steps/s, peak memory and the projected wall times, and exit")
    g.add_argument("--bench-steps", type=int, default=3, help="timed steps (after one warm-up step)")
    g.add_argument("--bench-layers", type=int, default=0, help="run DistilBERT and GPT-2 at this depth instead of "
                   "their own 6 and 12 (a reduced size, for CPUs); the projection then says so")
    g.add_argument("--bench-width", type=int, default=0, help="run both at this width instead of 768 (reduced size)")
    return p


# ------------------------------------------------------------------------------------------------ set-up
@dataclasses.dataclass(frozen=True)
class Paths:
    """Where the recipe writes, all under ``out``."""

    out: str

    @property
    def cache(self) -> str:
        return os.path.join(self.out, "cache")

    @property
    def diffusion(self) -> str:
        return os.path.join(self.out, "diffusion")

    @property
    def baseline(self) -> str:
        return os.path.join(self.out, "baseline")

    @property
    def eval(self) -> str:
        return os.path.join(self.out, "eval")

    @property
    def diffusion_run(self) -> str:
        return os.path.join(self.out, "runs", "diffusion")

    @property
    def baseline_run(self) -> str:
        return os.path.join(self.out, "runs", "baseline")


def is_hub_name(name: str) -> bool:
    return not hub.is_local(name) and not hub.looks_like_path(name)


def check_args(args) -> None:
    """Refuse what would fail hours later or silently: a local DistilBERT without its tokenizer, a local GPT-2
    without tokenizer files, a local CLIP file to be pushed without a hub name, models the hub cannot give."""
    if args.data.startswith("shapes") or "coco" in args.data.split("+"):
        raise SystemExit(f"--data {args.data}: the recipe trains on flickr8k, flickr30k or flickr8k+flickr30k "
                         "(COCO is evaluated zero-shot with --eval-coco; the shapes world has its own commands)")
    if not args.data_dir or not args.out:
        raise SystemExit("--data-dir and --out are needed (or --benchmark-step)")
    if not args.tokenizer:
        if not is_hub_name(args.encoder):
            raise SystemExit(f"--encoder {args.encoder} is a local DistilBERT: give its tokenizer too, --tokenizer DIR "
                             "(a folder with tokenizer.json or vocab.txt; the same folder if it was saved there)")
        args.tokenizer = args.encoder
    if os.path.isdir(args.gpt2) and not any(os.path.isfile(os.path.join(args.gpt2, f))
                                             for f in ("tokenizer.json", "vocab.json")):
        raise SystemExit(f"--gpt2 {args.gpt2}: no GPT-2 tokenizer in it (tokenizer.json or vocab.json + merges.txt); "
                         "save the tokenizer beside the weights with save_pretrained")
    if args.push_to_hub:
        if args.push_to_hub.count("/") != 1:
            raise SystemExit(f"--push-to-hub {args.push_to_hub}: expected a hub repository id, USER/NAME")
        if hub_clip_source(args) is None:
            raise SystemExit(f"--clip {args.clip} is a local weights file: a pushed checkpoint must refer to its CLIP by "
                             "name; give --hub-clip MODEL:TAG (the open_clip tag whose weights the file holds)")
    for d in filter(None, [args.data_dir, args.eval_coco]):
        if not os.path.isdir(d):
            raise SystemExit(f"data folder {d} not found")
    common.require_models([common.clip_need(args.clip),
                           hub.Need(args.encoder, "DistilBERT", "--encoder DIR"),
                           hub.Need(args.tokenizer, "DistilBERT tokenizer", "--tokenizer DIR",
                                    files=("tokenizer.json", "vocab.txt")),
                           hub.Need(args.gpt2, "GPT-2", "--gpt2 DIR")])


def hub_clip_source(args) -> dict | None:
    """The ``image_encoder`` entry a published checkpoint carries: the open_clip name and tag (None when
    --clip is a local file and no --hub-clip names its tag)."""
    spec = args.hub_clip or args.clip.removeprefix("open_clip:")
    if not args.clip.startswith("open_clip:"):
        raise SystemExit(f"--push-to-hub needs an open_clip CLIP (--clip open_clip:MODEL:TAG), not the folder {args.clip}")
    model, _, tag = spec.partition(":")
    if not tag or hub.is_local(tag) or hub.looks_like_path(tag):
        return None
    trained_model = args.clip.split(":")[1]
    if model != trained_model:
        raise SystemExit(f"--hub-clip {args.hub_clip}: the checkpoint was trained on open_clip {trained_model!r} "
                         f"features, not {model!r}")
    return {"kind": "open_clip", "model_name": model, "pretrained": tag}


def diffusion_architecture(encoder: str) -> dict:
    """The denoiser's width and depth flags: those of the DistilBERT it starts from (its word embeddings, too)."""
    from transformers import DistilBertConfig

    c = DistilBertConfig.from_pretrained(encoder)
    return {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "hidden_dim": c.hidden_dim, "emb_dim": c.dim}


def flags(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        out += [f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def steps_for(epochs: float, captions: int, batch: int) -> int:
    return max(1, math.ceil(epochs * captions / batch))


def diffusion_argv(args, paths: Paths, steps: int) -> list[str]:
    every = max(1, min(1000, steps // 10))
    return ["--preset", "base", "--data", args.data, "--data-dir", args.data_dir, "--clip", args.clip,
            "--tokenizer", args.tokenizer, "--encoder", args.encoder, "--out", paths.diffusion,
            "--run-dir", paths.diffusion_run, "--cache-dir", paths.cache, "--steps", str(steps),
            "--batch-size", str(args.diffusion_batch), "--lr", str(args.diffusion_lr), "--lr-end", "5e-5",
            "--warmup", str(min(500, steps // 10)), "--val-every", str(every), "--ckpt-every", str(every),
            "--device", args.device, "--resume", "true",
            "--freeze-embeddings", str(args.freeze_embeddings).lower(), "--sampling", RECIPE_SAMPLING] + \
        flags({**RECIPE_DIFFUSION, **diffusion_architecture(args.encoder)})


def baseline_argv(args, paths: Paths, steps: int) -> list[str]:
    every = max(1, min(750, steps // 10))
    return ["--preset", "base", "--data", args.data, "--data-dir", args.data_dir, "--clip", args.clip,
            "--gpt", args.gpt2, "--tokenizer", args.gpt2, "--out", paths.baseline, "--run-dir", paths.baseline_run,
            "--cache-dir", paths.cache, "--steps", str(steps), "--batch-size", str(args.baseline_batch),
            "--warmup", str(min(1000, steps // 10)), "--val-every", str(every), "--ckpt-every", str(every),
            "--device", args.device, "--resume", "true"]


def trained_steps(path: str) -> int | None:
    """The step count a finished checkpoint was trained for (None: no complete checkpoint there)."""
    try:
        meta = ckpt.read_json(os.path.join(path, ckpt.CONFIG_NAME))
    except ckpt.CheckpointError:
        return None
    if not os.path.isfile(os.path.join(path, ckpt.WEIGHTS_NAME)):
        return None
    section = meta.get("captioner") or meta.get("baseline") or {}
    return (section.get("extra") or {}).get("train_config", {}).get("steps")


def state_step(run_dir: str) -> int:
    try:
        return int(ckpt.read_json(os.path.join(run_dir, common.STATE_DIR, "state.json"))["step"])
    except (ckpt.CheckpointError, KeyError, ValueError, TypeError):
        return 0


# ------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA tensors, peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process RSS, peak"


def time_steps(step, device: torch.device, steps: int = 3) -> float:
    """Seconds per call of ``step`` (after one warm-up call), the device synchronised."""
    step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def diffusion_step(mcfg, encoder_config: dict, batch: int, device: torch.device):
    """One training step of the denoiser as ``train_diffusion`` takes it (losses, AdamW, clipping, EMA), on
    random features and tokens; the denoiser built from ``encoder_config`` with random weights."""
    import copy

    from diffusion_caption.denoiser import Denoiser
    from diffusion_caption.diffusion import GaussianDiffusion
    from diffusion_caption.config import ObjectiveConfig, split_objective
    from diffusion_caption.schedule import NoiseSchedule

    objective = ObjectiveConfig(**split_objective(RECIPE_DIFFUSION)[1])
    net = Denoiser(mcfg, encoder_config=encoder_config).to(device).train()
    ema = copy.deepcopy(net).requires_grad_(False)
    diffusion = GaussianDiffusion(NoiseSchedule(mcfg.schedule, mcfg.T), mcfg.predict, mcfg.self_cond)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(5, mcfg.vocab_size, (batch, mcfg.seq_len), device=device)
    cond = torch.nn.functional.normalize(torch.randn(batch, mcfg.cond_dim, device=device), dim=-1)

    def step():
        with common.autocast(device):
            losses = diffusion.training_losses(net, ids, cond, objective, gen, pad_id=0)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pm, 1e-3)

    return step, sum(p.numel() for p in net.parameters())


def baseline_step(bcfg, gpt_config: dict, batch: int, device: torch.device, caption_len: int = 20):
    """One training step of the ClipCap baseline as ``train_baseline`` takes it, on random features and
    captions of ``caption_len`` tokens (BOS ... EOS; a Flickr caption is about that long in GPT-2 tokens)."""
    from diffusion_caption.baseline.captioner import PrefixCaptioner

    net = PrefixCaptioner(bcfg, gpt_config=gpt_config).to(device).train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5)
    ids = torch.full((batch, bcfg.max_len), bcfg.eos_id, device=device)
    ids[:, 1:caption_len - 1] = torch.randint(0, bcfg.vocab_size - 1, (batch, caption_len - 2), device=device)
    ids[:, 0] = bcfg.bos_id
    cond = torch.nn.functional.normalize(torch.randn(batch, bcfg.cond_dim, device=device), dim=-1)

    def step():
        with common.autocast(device):
            loss = net(cond, ids)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step, sum(p.numel() for p in net.parameters())


def real_size_configs(args, vocab: int | None = None, gpt_vocab: int | None = None, cond_dim: int = 512,
                      encoder_config: dict | None = None, gpt_config: dict | None = None):
    """The recipe's two models at the real sizes (DistilBERT-base's and GPT-2 small's own configurations,
    which are transformers' defaults, unless given), optionally reduced by --bench-layers / --bench-width."""
    from transformers import DistilBertConfig, GPT2Config

    from diffusion_caption.baseline.captioner import GPT_CONFIG_KEYS, baseline_preset
    from diffusion_caption.config import preset, split_objective

    enc = encoder_config or {k: v for k, v in DistilBertConfig().to_dict().items()
                             if k in ("vocab_size", "max_position_embeddings", "sinusoidal_pos_embds", "n_layers",
                                      "n_heads", "dim", "hidden_dim", "dropout", "attention_dropout", "activation",
                                      "initializer_range")}
    gpt = gpt_config or {k: v for k, v in GPT2Config().to_dict().items() if k in GPT_CONFIG_KEYS}
    if args.bench_layers:
        enc, gpt = {**enc, "n_layers": args.bench_layers}, {**gpt, "n_layer": args.bench_layers}
    if args.bench_width:
        w = args.bench_width
        enc = {**enc, "dim": w, "hidden_dim": 4 * w, "n_heads": max(1, w // 64)}
        gpt = {**gpt, "n_embd": w, "n_head": max(1, w // 64)}
    mcfg = preset("base", **{**split_objective(RECIPE_DIFFUSION)[0], "vocab_size": vocab or enc["vocab_size"], "cond_dim": cond_dim,
                             "dim": enc["dim"], "emb_dim": enc["dim"], "n_layers": enc["n_layers"],
                             "n_heads": enc["n_heads"], "hidden_dim": enc["hidden_dim"]})
    bcfg = baseline_preset("base", cond_dim=cond_dim, vocab_size=gpt_vocab or gpt["vocab_size"], n_embd=gpt["n_embd"],
                           n_layer=gpt["n_layer"], n_head=gpt["n_head"], bos_id=gpt.get("bos_token_id", 50256),
                           eos_id=gpt.get("eos_token_id", 50256))
    return (mcfg, enc), (bcfg, gpt)


def measure_training(args, device: torch.device, diffusion_batch: int, baseline_batch: int, **sizes) -> dict:
    """Seconds per training step, parameters and peak memory of both models at the run's sizes."""
    (mcfg, enc), (bcfg, gpt) = real_size_configs(args, **sizes)
    out = {}
    for name, build, cfg, arch, batch in (("diffusion", diffusion_step, mcfg, enc, diffusion_batch),
                                          ("baseline", baseline_step, bcfg, gpt, baseline_batch)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        step, n_params = build(cfg, arch, batch, device)
        s = time_steps(step, device, args.bench_steps)
        mem, what = peak_memory_mib(device)
        out[name] = {"s_per_step": s, "steps_per_s": 1 / s, "params_m": n_params / 1e6, "batch": batch,
                     "peak_mib": mem, "memory": what,
                     "layers": arch.get("n_layers", arch.get("n_layer")), "width": arch.get("dim", arch.get("n_embd"))}
        del step
    return out


def fmt_time(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def benchmark(args) -> dict:
    """``--benchmark-step``: one training step of each model at the real sizes, and the projected wall times."""
    device, _, _ = common.setup_device(args.device)
    res = measure_training(args, device, args.diffusion_batch, args.baseline_batch)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    reduced = " (reduced size: --bench-layers/--bench-width)" if args.bench_layers or args.bench_width else ""
    print(f"device: {name}; torch {torch.__version__}; bf16 autocast: {device.type == 'cuda'}{reduced}")
    print("| model | layers x width | parameters | batch | s/step | steps/s | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for k, label in (("diffusion", "diffusion (DistilBERT denoiser)"), ("baseline", "ClipCap (GPT-2 + MLP)")):
        r = res[k]
        print(f"| {label} | {r['layers']} x {r['width']} | {r['params_m']:.1f} M | {r['batch']} | {r['s_per_step']:.3f} | "
              f"{r['steps_per_s']:.2f} | {r['peak_mib']:.0f} MiB ({r['memory']}) |")
    print(f"\nprojected training time at {args.diffusion_epochs:g} diffusion epochs (batch {args.diffusion_batch}) and "
          f"{args.baseline_epochs:g} baseline epochs (batch {args.baseline_batch}), training steps only:")
    print("| data | training captions | diffusion steps | diffusion | baseline steps | baseline | both |")
    print("|---|---|---|---|---|---|---|")
    proj = {}
    for data, n in TRAIN_CAPTIONS.items():
        sd = steps_for(args.diffusion_epochs, n, args.diffusion_batch)
        sb = steps_for(args.baseline_epochs, n, args.baseline_batch)
        td, tb = sd * res["diffusion"]["s_per_step"], sb * res["baseline"]["s_per_step"]
        proj[data] = {"captions": n, "diffusion_steps": sd, "baseline_steps": sb, "diffusion_s": td, "baseline_s": tb}
        print(f"| {data} | {n:,} | {sd:,} | {fmt_time(td)} | {sb:,} | {fmt_time(tb)} | {fmt_time(td + tb)} |")
    return {"device": name, "reduced": bool(reduced), "steps": res, "projected": proj}


class Plan:
    """The stages still to run and a rough estimate of each; ``start(stage)`` prints the time left."""

    def __init__(self, estimates: dict[str, float]):
        self.estimates = dict(estimates)
        self.t0 = time.time()
        self.started: dict[str, float] = {}
        self.taken: dict[str, float] = {}

    def start(self, stage: str) -> None:
        self.started[stage] = time.time()
        left = sum(v for k, v in self.estimates.items() if k not in self.taken)
        parts = ", ".join(f"{k} ~{fmt_time(v)}" for k, v in self.estimates.items() if k not in self.taken and v > 0)
        tqdm.write(f"[recipe] stage {stage}: estimated time left {fmt_time(left)} ({parts or 'nothing left'}); "
                   f"{fmt_time(time.time() - self.t0)} so far")

    def done(self, stage: str, skipped: bool = False) -> None:
        self.taken[stage] = 0.0 if skipped else time.time() - self.started.get(stage, time.time())
        if skipped:
            tqdm.write(f"[recipe] stage {stage}: already complete, skipped")


# ------------------------------------------------------------------------------------------------ stages
def features_stage(encoder, paths: Paths, records: dict) -> None:
    from diffusion_caption.features import image_features

    for name, recs in records.items():
        image_features(encoder, [r.image_path for r in recs], paths.cache, desc=f"encoding {name} images")


def choose_sampling_stage(args, paths: Paths, val, device) -> dict:
    """Caption ``val`` with every setting of the grid, score CIDEr, and store the best as the checkpoint's defaults."""
    from diffusion_caption.eval.evaluation import generate, load_model
    from diffusion_caption.eval.metrics import caption_metrics
    from diffusion_caption.features import image_features

    try:
        settings = [SamplingConfig.parse(x) for x in args.sampling_grid.split(",") if x.strip()]
    except ValueError as e:
        raise SystemExit(f"--sampling-grid: {e}") from None
    model = load_model(paths.diffusion, device=device)
    for s in settings:
        try:
            model.resolve(s)
        except ValueError as e:
            raise SystemExit(f"--sampling-grid {s.spec}: {e}") from None
    recs = val[: args.sampling_limit] if args.sampling_limit else val
    feats = image_features(model.image_encoder, [r.image_path for r in recs], paths.cache)
    refs = {r.image_id: r.captions for r in recs}
    rows = []
    for s in tqdm(settings, desc="sampling settings on val"):
        t0 = time.time()
        with common.autocast(torch.device(device)):
            texts = generate(model, feats, model.settings(0, s), args.batch_size)
        seconds = time.time() - t0
        m = caption_metrics({r.image_id: t for r, t in zip(recs, texts)}, refs, tokenizer=args.metrics_tokenizer,
                            meteor=False)
        row = {"setting": s.describe(), "spec": s.spec, "calls": s.calls, "score": m["CIDEr"], "BLEU-4": m["BLEU-4"],
               "CIDEr": m["CIDEr"], "ms_per_image": 1000 * seconds / max(len(recs), 1)}
        rows.append(row)
        tqdm.write(f"  {row['setting']}: CIDEr {m['CIDEr']:.3f}, BLEU-4 {m['BLEU-4']:.3f}")
    best = common.cheapest_near_best(rows, args.sampling_tie)
    path = os.path.join(paths.diffusion, ckpt.CONFIG_NAME)
    meta = ckpt.read_json(path)
    meta["sampling"] = SamplingConfig.parse(best["spec"]).to_dict()
    c = meta["captioner"]
    c.setdefault("extra", {})["sampling_choice"] = {
        "command": "python -m training.recipe (sampling stage)", "grid": args.sampling_grid, "split": "val",
        "n_images": len(recs), "seeds": [0], "score": "CIDEr", "tie": args.sampling_tie, "chosen": best["setting"],
        "rows": [{k: r[k] for k in ("setting", "calls", "BLEU-4", "CIDEr", "ms_per_image")} for r in rows]}
    ckpt.write_json(path, meta)
    tqdm.write(f"[recipe] sampling: chose {best['setting']} (CIDEr {best['CIDEr']:.3f} on {len(recs)} val images)")
    return c["extra"]["sampling_choice"]


def eval_jobs(args, paths: Paths, test_sets: dict) -> list[tuple[str, str, str, dict]]:
    """(label, checkpoint, test set name, overrides) for every evaluation the recipe reports."""
    jobs = [("diffusion", paths.diffusion, name, {}) for name in test_sets]
    for beam in [int(b) for b in args.baseline_beams.split(",") if b.strip()]:
        jobs += [(f"baseline-beam{beam}", paths.baseline, name, {"beam": beam}) for name in test_sets]
    return jobs


def evaluate_stage(args, paths: Paths, test_sets: dict, device) -> dict:
    from diffusion_caption.eval.evaluation import evaluate, load_model, model_kind

    results, models = {}, {}
    os.makedirs(paths.eval, exist_ok=True)
    for label, path, set_name, override in eval_jobs(args, paths, test_sets):
        out = os.path.join(paths.eval, f"{label}-{set_name}.json")
        if path not in models:
            models[path] = load_model(path, device=device)
        model = models[path]
        if model_kind(model) == "diffusion":
            settings = model.settings(0)
        else:
            settings = model.settings(**override)
        steps = trained_steps(path)
        if os.path.isfile(out):
            with open(out) as f:
                old = json.load(f)
            if old.get("settings") == json.loads(json.dumps(settings)) and old.get("train_steps") == steps:
                results[(label, set_name)] = old
                continue
        recs = test_sets[set_name][: args.eval_limit] if args.eval_limit else test_sets[set_name]
        with common.autocast(torch.device(device)):
            res = evaluate(model, recs, settings, args.batch_size, paths.cache, tokenizer=args.metrics_tokenizer,
                           meteor=args.meteor)
        res.update(checkpoint=path, data=set_name, split="test", train_steps=steps, label=label)
        ckpt.write_json(out, res)
        m = res["metrics"]
        tqdm.write(f"[recipe] {label} on {set_name} test ({len(recs)} images): BLEU-4 {m['BLEU-4']:.3f}, "
                   f"CIDEr {m['CIDEr']:.3f}")
        results[(label, set_name)] = res
    return results


METRICS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def metrics_table(results: dict, labels: list[str]) -> str:
    lines = ["| model | test set | images | " + " | ".join(METRICS) + " |", "|---" * (3 + len(METRICS)) + "|"]
    for (label, set_name), res in results.items():
        if label not in labels:
            continue
        m = res["metrics"]
        cells = [f"{m[k]:.3f}" if isinstance(m.get(k), float) else "-" for k in METRICS]
        lines.append(f"| {label} | {set_name} (Karpathy test{', zero-shot' if set_name == 'coco' else ''}) | "
                     f"{res['n_images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def model_card(kind: str, args, results: dict, data_sizes: dict, sampling: dict | None, repo: str = "") -> str:
    """The README.md beside a checkpoint: what it is, how it was made, its test numbers, how to load it."""
    diffusion = kind == "diffusion"
    labels = ["diffusion"] if diffusion else [lbl for lbl, _ in results if lbl.startswith("baseline")]
    base = args.encoder if diffusion else args.gpt2
    clip = args.hub_clip or args.clip.removeprefix("open_clip:")
    front = ["---", "pipeline_tag: image-to-text", "tags:", "- image-captioning",
             "- diffusion" if diffusion else "- clipcap", "- clip"]
    if is_hub_name(base):
        front.append(f"base_model: {base}")
    front.append("---")
    other = f"{repo}-baseline" if diffusion else repo.removesuffix("-baseline")
    load = repo or "DIR"
    if diffusion:
        what = (f"A CLIP-conditioned continuous-diffusion captioner (Diffusion-LM style): a DistilBERT denoiser "
                f"({base}) over {RECIPE_DIFFUSION['seq_len']} caption positions, conditioned on frozen open_clip "
                f"`{clip}` image features by concatenation, trained to predict x0 with a rounding loss (0.3), condition "
                f"dropout 0.2, self-conditioning and few-step training.")
        use = (f"```python\nfrom diffusion_caption import Captioner\ncap = Captioner.from_pretrained(\"{load}\")\n"
               f"print(cap.caption(\"photo.jpg\").text)\n```\n\n`python app.py --checkpoint {load}"
               + (f" --baseline {other}`" if repo else " --baseline BASELINE_DIR`"))
    else:
        what = (f"The ClipCap baseline (Mokady et al. 2021): open_clip `{clip}` image features through an MLP to a "
                f"10-token prefix for a fine-tuned GPT-2 ({base}), trained on the same features as the diffusion "
                f"captioner" + (f" (`{other}`)." if repo else "."))
        use = (f"```python\nfrom diffusion_caption.baseline import BaselineCaptioner\n"
               f"cap = BaselineCaptioner.from_pretrained(\"{load}\")\nprint(cap.caption(\"photo.jpg\", beam=5).text)\n```")
    lines = front + ["", f"# {os.path.basename(os.path.normpath(args.out))}: {'diffusion captioner' if diffusion else 'ClipCap baseline'} "
                     f"trained on {args.data}", "", what, "",
                     f"Made by `python -m training.recipe` of [diffusion-caption] on {args.data} "
                     f"({data_sizes['train']:,} training images, {data_sizes['captions']:,} captions). The CLIP is not "
                     "part of this repository: it is referred to by its open_clip name and tag and loaded from there.",
                     "", "## Test numbers", "",
                     "The COCO caption protocol: Karpathy test split, every reference of an image, PTB tokenisation, "
                     "corpus-level metrics (pycocoevalcap)." + (" COCO is zero-shot (never trained on)." if args.eval_coco else ""),
                     "", metrics_table(results, labels)]
    if diffusion and sampling:
        lines += [f"Sampling: {sampling['chosen']} (the default of this checkpoint), chosen on {sampling['n_images']} "
                  f"val images by CIDEr among:", "", "| setting | network calls | BLEU-4 | CIDEr | ms per image |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['setting']} | {r['calls']} | {r['BLEU-4']:.3f} | {r['CIDEr']:.3f} | {r['ms_per_image']:.1f} |"
                  for r in sampling["rows"]]
        lines.append("")
    lines += ["## Use", "", use, ""]
    return "\n".join(lines)


def write_cards(args, paths: Paths, results: dict, data_sizes: dict) -> None:
    sampling = ckpt.read_json(os.path.join(paths.diffusion, ckpt.CONFIG_NAME))["captioner"]["extra"].get("sampling_choice")
    for kind, path in (("diffusion", paths.diffusion), ("baseline", paths.baseline)):
        repo = (args.push_to_hub if kind == "diffusion" else f"{args.push_to_hub}-baseline") if args.push_to_hub else ""
        text = model_card(kind, args, results, data_sizes, sampling, repo)
        with common.fail_clearly(f"write the model card {path}/README.md"):
            with open(os.path.join(path, "README.md"), "w", encoding="utf-8") as f:
                f.write(text)


def stage_for_upload(checkpoint: str, dest: str, clip_source: dict | None) -> list[str]:
    """Copy into ``dest`` what a published checkpoint holds (weights, config, tokenizer, model card), with its
    CLIP referred to by ``clip_source`` (an open_clip name and tag) instead of a local path; returns the files."""
    os.makedirs(dest, exist_ok=True)
    names = sorted(f for f in os.listdir(checkpoint) if f in PUBLISHED and os.path.isfile(os.path.join(checkpoint, f)))
    for required in ("config.json", "model.safetensors", "README.md"):
        if required not in names:
            raise SystemExit(f"cannot publish {checkpoint}: {required} is missing")
    for f in names:
        shutil.copyfile(os.path.join(checkpoint, f), os.path.join(dest, f))
    meta = ckpt.read_json(os.path.join(dest, ckpt.CONFIG_NAME))
    src = meta.get("image_encoder", {})
    if src.get("kind") != "open_clip":
        raise SystemExit(f"cannot publish {checkpoint}: its CLIP is a local folder ({src}); the recipe publishes "
                         "checkpoints whose CLIP is an open_clip model")
    if clip_source is not None:
        meta["image_encoder"] = clip_source
    if hub.is_local(meta["image_encoder"].get("pretrained", "")):
        raise SystemExit(f"cannot publish {checkpoint}: its CLIP is the local file {meta['image_encoder']['pretrained']}")
    ckpt.write_json(os.path.join(dest, ckpt.CONFIG_NAME), meta)
    return names


def push(args, paths: Paths, api=None) -> list[str]:
    """Upload both checkpoints (``api``: a ``huggingface_hub.HfApi``, made here when None). Returns the repo ids."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    clip_source = hub_clip_source(args)
    repos = []
    for path, repo in ((paths.diffusion, args.push_to_hub), (paths.baseline, f"{args.push_to_hub}-baseline")):
        with tempfile.TemporaryDirectory(prefix="recipe-push-") as stage:
            files = stage_for_upload(path, stage, clip_source)
            api.create_repo(repo_id=repo, repo_type="model", private=args.private, exist_ok=True)
            api.upload_folder(repo_id=repo, repo_type="model", folder_path=stage,
                              commit_message=f"diffusion-caption recipe: {os.path.basename(path)} trained on {args.data}")
        tqdm.write(f"[recipe] pushed {path} to {repo} ({', '.join(files)})")
        repos.append(repo)
    return repos


# ------------------------------------------------------------------------------------------------ main
def estimates(args, paths: Paths, device, encoder, sample_images: list[str], n_images: int, n_val: int, n_test: int,
              steps_d: int, steps_b: int, world: int) -> dict[str, float]:
    """Rough seconds per stage still to run, from timed training steps of each model at the run's sizes and
    the CLIP encoding a few of the run's images (sampling and evaluation: a forward pass taken as a third
    of a training step)."""
    from transformers import DistilBertConfig, GPT2Config

    from diffusion_caption.baseline.captioner import GPT_CONFIG_KEYS

    left_d = max(steps_d - state_step(paths.diffusion_run), 0) if trained_steps(paths.diffusion) != steps_d else 0
    left_b = max(steps_b - state_step(paths.baseline_run), 0) if trained_steps(paths.baseline) != steps_b else 0
    enc = {k: v for k, v in DistilBertConfig.from_pretrained(args.encoder).to_dict().items()
           if k in ("vocab_size", "max_position_embeddings", "n_layers", "n_heads", "dim", "hidden_dim", "dropout",
                    "attention_dropout", "activation")}
    gpt = {k: v for k, v in GPT2Config.from_pretrained(args.gpt2).to_dict().items() if k in GPT_CONFIG_KEYS}
    ns = argparse.Namespace(bench_layers=0, bench_width=0, bench_steps=2)
    r = measure_training(ns, device, max(args.diffusion_batch // world, 1), max(args.baseline_batch // world, 1),
                         encoder_config=enc, gpt_config=gpt)
    # a forward pass is about a third of a training step; per image at the training batch
    fwd_d = r["diffusion"]["s_per_step"] / 3 / max(args.diffusion_batch // world, 1)
    fwd_b = r["baseline"]["s_per_step"] / 3 / max(args.baseline_batch // world, 1)
    grid = [x for x in args.sampling_grid.split(",") if x.strip()]
    grid_calls = sum(int(x.split(":")[1]) * (1 if float(x.split(":")[2]) == 1 else 2) for x in grid)
    n_choose = min(n_val, args.sampling_limit) if args.sampling_limit else n_val
    beams = [int(b) for b in args.baseline_beams.split(",") if b.strip()]
    encode = time_steps(lambda: encoder.encode(sample_images), device, 1) / max(len(sample_images), 1)
    return {"features": n_images * encode,
            "diffusion": left_d * r["diffusion"]["s_per_step"],
            "baseline": left_b * r["baseline"]["s_per_step"],
            "sampling": n_choose * grid_calls * fwd_d,
            "evaluate": n_test * (SamplingConfig.parse(RECIPE_SAMPLING).steps * fwd_d + sum(20 * b for b in beams) * fwd_b)}


def main(argv=None, hub_api=None) -> dict | None:
    """Run the recipe (``hub_api``: the ``huggingface_hub.HfApi`` to push with; made here when None)."""
    args = build_parser().parse_args(argv)
    if args.benchmark_step:
        return benchmark(args)
    check_args(args)
    paths = Paths(os.path.abspath(args.out))
    args.out = paths.out
    # under torchrun: one process group for both trainers (each joins it), ended after the training stages
    device, rank, world = common.setup_device(args.device)
    is_main = rank == 0
    if is_main:
        common.check_writable(paths.out)
    names = args.data.split("+")
    records = {s: load_datasets(args.data, args.data_dir, splits=[s]) for s in ("train", "val")}
    if not records["train"] or not records["val"]:
        raise SystemExit(f"{args.data} at {args.data_dir}: the train and val splits must not be empty")
    test_sets = {n: load_datasets(n, args.data_dir, splits=["test"]) for n in names}
    if args.eval_coco:
        test_sets["coco"] = load_datasets("coco", args.eval_coco, splits=["test"])
    for n, recs in test_sets.items():
        if not recs:
            raise SystemExit(f"{n}: its test split is empty")
    every = records["train"] + records["val"] + [r for recs in test_sets.values() for r in recs]
    missing = [r.image_path for r in every if not os.path.isfile(r.image_path)]
    if missing:  # before hours of training, not at the evaluation
        raise SystemExit(f"{len(missing)} of the {len(every)} images of {args.data}"
                         f"{' and coco' if args.eval_coco else ''} not found, e.g. {missing[0]}")
    n_captions = len(caption_pairs(records["train"]))
    data_sizes = {"train": len(records["train"]), "captions": n_captions}
    steps_d = args.diffusion_steps or steps_for(args.diffusion_epochs, n_captions, args.diffusion_batch)
    steps_b = args.baseline_steps or steps_for(args.baseline_epochs, n_captions, args.baseline_batch)
    n_images = sum(len(v) for v in records.values()) + sum(len(v) for v in test_sets.values())
    n_test = sum(min(len(v), args.eval_limit) if args.eval_limit else len(v) for v in test_sets.values())
    if is_main:
        print(f"[recipe] {args.data}: {data_sizes['train']:,} training images, {n_captions:,} captions; "
              f"{len(records['val']):,} val; test: {', '.join(f'{k} {len(v):,}' for k, v in test_sets.items())}; "
              f"diffusion {steps_d:,} steps of batch {args.diffusion_batch}, baseline {steps_b:,} of batch "
              f"{args.baseline_batch}; device {device}, world size {world}", flush=True)
    from training.train_diffusion import load_clip

    encoder = load_clip(args.clip, device)
    plan = Plan(estimates(args, paths, device, encoder, [r.image_path for r in records["train"][:8]], n_images,
                          len(records["val"]), n_test, steps_d, steps_b, world))
    t_start = time.time()
    plan.start("features")
    features_stage(encoder, paths, {**records, **{f"{k} test": v for k, v in test_sets.items()}})
    del encoder
    plan.done("features")
    for stage, path, steps, run, argv_of in (
            ("diffusion", paths.diffusion, steps_d, "train_diffusion", diffusion_argv),
            ("baseline", paths.baseline, steps_b, "train_baseline", baseline_argv)):
        plan.start(stage)
        if trained_steps(path) == steps:
            plan.done(stage, skipped=True)
            continue
        mod = __import__(f"training.{run}", fromlist=["main"])
        mod.main(argv_of(args, paths, steps))
        plan.done(stage)
    if world > 1:
        common.end_distributed()  # every rank past training, rank 0's checkpoints written
    if not is_main:  # the rest runs once
        return None
    plan.start("sampling")
    cfg = ckpt.read_json(os.path.join(paths.diffusion, ckpt.CONFIG_NAME))["captioner"]
    choice = cfg.get("extra", {}).get("sampling_choice", {})
    if choice.get("grid") == args.sampling_grid and choice.get("n_images") == (
            min(len(records["val"]), args.sampling_limit) if args.sampling_limit else len(records["val"])):
        plan.done("sampling", skipped=True)
    else:
        choose_sampling_stage(args, paths, records["val"], str(device))
        plan.done("sampling")
    plan.start("evaluate")
    results = evaluate_stage(args, paths, test_sets, str(device))
    plan.done("evaluate")
    write_cards(args, paths, results, data_sizes)
    summary = {"command": "python -m training.recipe " + " ".join(argv if argv is not None else sys.argv[1:]),
               "data": args.data, "sizes": data_sizes, "steps": {"diffusion": steps_d, "baseline": steps_b},
               "seconds": round(time.time() - t_start, 1), "stage_seconds": {k: round(v, 1) for k, v in plan.taken.items()},
               "results": {f"{lbl}/{name}": {k: r["metrics"].get(k) for k in METRICS} for (lbl, name), r in results.items()}}
    if args.push_to_hub:
        plan.start("push")
        summary["pushed"] = push(args, paths, hub_api)
        plan.done("push")
    ckpt.write_json(os.path.join(paths.out, "recipe.json"), summary)
    print(f"[recipe] done in {fmt_time(time.time() - t_start)}:\n" + metrics_table(results, [lbl for lbl, _ in results]))
    print(f"[recipe] try it: python app.py --checkpoint {paths.diffusion} --baseline {paths.baseline}")
    return summary


if __name__ == "__main__":
    main()
