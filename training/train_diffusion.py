"""Train the CLIP-conditioned diffusion captioner.

    python -m training.train_diffusion --preset shapes                       # the shipped default, on CPU
    python -m training.train_diffusion --preset base --data flickr8k --data-dir DIR   # GPU + internet
    torchrun --nproc-per-node 8 -m training.train_diffusion --preset base ...        # multi-GPU (DDP)

Image features come from the frozen CLIP once and are cached. Any captioner config field is a flag
too (``--fusion add``, ``--lambda-round 0``, ``--schedule cosine`` ...). ``--resume`` continues a killed
run from ``--run-dir`` with the same data order and noise.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass

import torch

from diffusion_caption.captioner import Captioner
from diffusion_caption.config import PRESETS, CaptionerConfig, ObjectiveConfig, objective_preset, preset, split_objective
from diffusion_caption.sampling import SamplingConfig, split_legacy
from diffusion_caption.data import caption_pairs, load_datasets
from diffusion_caption.denoiser import Denoiser
from diffusion_caption.diffusion import GaussianDiffusion
from diffusion_caption.features import image_features
from diffusion_caption.image_encoder import BASE_MODEL, BASE_PRETRAINED, ImageEncoder
from diffusion_caption.schedule import NoiseSchedule
from diffusion_caption.tokenizer import SPECIAL_TOKENS, CaptionTokenizer
from training import common
from training.loop import Loop, shuffled_batches


@dataclass
class DiffusionTrainConfig:
    preset: str = "shapes"
    data: str = "shapes"  # shapes | flickr8k | flickr30k | coco, or a combination like flickr8k+flickr30k
    data_dir: str = "data/shapes"
    image_dir: str = ""
    clip: str = "assets/checkpoints/shapes-clip"  # a CLIP folder, or "open_clip:MODEL:TAG_OR_FILE"
    tokenizer: str = ""  # default: the CLIP folder's (shapes) or distilbert-base-uncased (base)
    out: str = "assets/checkpoints/shapes-diffusion"
    run_dir: str = "runs/shapes-diffusion"
    cache_dir: str = "cache"
    steps: int = 12000
    batch_size: int = 64
    lr: float = 1e-3
    lr_end: float = 5e-5
    warmup: int = 500
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | adam | sgd (Nesterov momentum 0.9)
    lr_schedule: str = "linear"  # after warm-up, lr -> lr_end: linear | constant | cosine | log
    train_limit: int = 0  # train on the first N training images only (0: all); for data-scaling ablations
    grad_clip: float = 1.0
    ema: float = 0.999
    val_every: int = 1000
    ckpt_every: int = 1000
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    stop_at: int = 0  # stop after this step as if killed (checkpoints first); for testing --resume
    init: str = ""  # start from this captioner checkpoint's weights (fine-tuning); its config is the base
    # keep only these transformer layers of the --init checkpoint, in order (e.g. "0,3" of 4): a shallower
    # student initialised from its teacher's layers, as DistilBERT was from every other layer of BERT
    init_layers: str = ""
    # the saved checkpoint's sampling defaults, in SamplingConfig.parse's form ("reveal:6:1:trailing^2");
    # default: the --init checkpoint's, else DDIM 20 without guidance
    sampling: str = ""


# the fields that fix the denoiser's tensors: a fine-tune (--init) may not change them
ARCHITECTURE_FIELDS = ("seq_len", "vocab_size", "emb_dim", "encoder", "dim", "n_layers", "n_heads", "hidden_dim",
                       "cond_dim", "fusion", "n_prefix", "predict_feature", "cond_mlp", "self_cond", "block_size")
# ...except these: a fine-tune may add the conditioning MLP or the self-conditioning input to a start without
# them (both start at zero, so the fine-tune starts from the checkpoint's own function)
GROWABLE_FIELDS = ("cond_mlp", "self_cond")
GROWN_PREFIXES = ("cond_mlp.", "self_cond_proj.")


PRESET_TRAINING = {
    "shapes": {},
    # the seed paper's recipe: batch 8, AdamW, lr decaying linearly 1e-4 -> 5e-5
    "base": dict(data="flickr8k", clip=f"open_clip:{BASE_MODEL}:{BASE_PRETRAINED}", tokenizer="distilbert-base-uncased",
                 out="runs/base-diffusion/final", run_dir="runs/base-diffusion", steps=100000, batch_size=8,
                 lr=1e-4, lr_end=5e-5, warmup=0),
    "tiny": dict(steps=50, batch_size=16, val_every=25, ckpt_every=25, warmup=5),
}


def load_clip(spec: str, device) -> ImageEncoder:
    return ImageEncoder.from_spec(spec, device=device)


def distillation_of(data: str, data_dir: str) -> dict | None:
    """The ``"distilled"`` record of a dataset file written by ``training.distill_captions`` (else None)."""
    if "+" in data:
        return None
    path = os.path.join(data_dir, f"dataset_{data}.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        kd = json.load(f).get("distilled")
    return {k: kd[k] for k in ("teacher", "decoding", "selection", "splits", "command") if k in kd} if kd else None


def init_config(path: str) -> tuple[CaptionerConfig, ObjectiveConfig]:
    """The network and objective configs of the checkpoint a fine-tune starts from (``--init``), with a clear error."""
    from diffusion_caption import checkpoint as ckpt
    try:
        meta = ckpt.read_json(os.path.join(ckpt.resolve(path), ckpt.CONFIG_NAME))
        net, objective = split_objective(split_legacy(meta["captioner"])[0])
        return (CaptionerConfig.from_dict(net, source=path),
                ObjectiveConfig.from_dict({**objective, **meta.get("objective", {})}, source=path))
    except (ckpt.CheckpointError, OSError, KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"--init {path}: not a readable diffusion-caption checkpoint ({type(e).__name__}: {e})") from None


def parse_init_layers(spec: str, n_layers: int) -> list[int]:
    """The layer indices of ``--init-layers`` ("0,3"), checked against the --init checkpoint's depth."""
    try:
        keep = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--init-layers {spec!r}: expected comma-separated layer indices such as 0,3") from None
    if not keep:
        raise SystemExit(f"--init-layers {spec!r}: names no layer")
    if any(not 0 <= i < n_layers for i in keep):
        raise SystemExit(f"--init-layers {spec!r}: the --init checkpoint has layers 0-{n_layers - 1}")
    if keep != sorted(set(keep)):
        raise SystemExit(f"--init-layers {spec!r}: give each layer once, in increasing order")
    return keep


def keep_layers(state: dict, keep: list[int], prefix: str = "encoder.transformer.layer.") -> dict:
    """A denoiser state dict with only the transformer layers ``keep``, renumbered 0, 1, ..."""
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for k, v in state.items():
        if k.startswith(prefix):
            old, rest = k[len(prefix):].split(".", 1)
            if int(old) not in new_index:
                continue
            k = f"{prefix}{new_index[int(old)]}.{rest}"
        out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_dataclass_args(p, DiffusionTrainConfig)
    common.add_dataclass_args(p, CaptionerConfig)
    common.add_dataclass_args(p, ObjectiveConfig)
    return p


def configs_from_args(argv=None) -> tuple[DiffusionTrainConfig, CaptionerConfig, ObjectiveConfig]:
    """The run's training, network and objective configs: the preset's (or the --init checkpoint's),
    changed by the flags given."""
    args = build_parser().parse_args(argv)
    name = args.preset or "shapes"
    if name not in PRESETS:
        raise SystemExit(f"unknown --preset {name!r}; expected one of {sorted(PRESETS)}")
    base_train = DiffusionTrainConfig(**{**PRESET_TRAINING.get(name, {}), "preset": name})
    tcfg = common.dataclass_from_args(DiffusionTrainConfig, args, base_train)
    base_model, base_objective = preset(name), objective_preset(name)
    if tcfg.init:  # a fine-tune: the starting checkpoint's configs, changed only by the flags given
        base_model, base_objective = init_config(tcfg.init)
        base_model = dataclasses.replace(base_model, extra={})
        if tcfg.init_layers:
            keep = parse_init_layers(tcfg.init_layers, base_model.n_layers)
            base_model = dataclasses.replace(base_model, n_layers=len(keep))
        changed = [f"--{k.replace('_', '-')}" for k in ARCHITECTURE_FIELDS
                   if getattr(args, k, None) is not None and getattr(args, k) != getattr(base_model, k)
                   and not (k in GROWABLE_FIELDS and not getattr(base_model, k))]
        if changed:
            raise SystemExit(f"--init {tcfg.init}: {', '.join(changed)} would change the shape of its denoiser; "
                             "a fine-tune keeps the architecture (drop those flags, or train from scratch)"
                             + ("; its depth is set by --init-layers" if tcfg.init_layers else ""))
    elif tcfg.init_layers:
        raise SystemExit("--init-layers selects layers of the --init checkpoint; give --init too")
    mcfg = common.dataclass_from_args(CaptionerConfig, args, base_model)
    try:
        ocfg = common.dataclass_from_args(ObjectiveConfig, args, base_objective).check(mcfg)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if tcfg.sampling:
        try:
            SamplingConfig.parse(tcfg.sampling)
        except ValueError as e:
            raise SystemExit(f"--sampling: {e}") from None
    tok_src = tcfg.tokenizer or (tcfg.clip if not tcfg.clip.startswith("open_clip:") else "distilbert-base-uncased")
    if mcfg.encoder != "tiny" and os.path.isdir(mcfg.encoder) and not os.path.isdir(tok_src):
        raise SystemExit(f"--encoder {mcfg.encoder} is a local DistilBERT but its tokenizer would be {tok_src!r}: give "
                         "the tokenizer too, --tokenizer DIR (a folder with tokenizer.json or vocab.txt; the same folder "
                         "if the tokenizer was saved there), so that captions are tokenized by its own vocabulary")
    if tcfg.optimizer not in common.OPTIMIZERS:
        raise SystemExit(f"unknown --optimizer {tcfg.optimizer!r}; expected one of {common.OPTIMIZERS}")
    if tcfg.lr_schedule not in common.LR_SCHEDULES:
        raise SystemExit(f"unknown --lr-schedule {tcfg.lr_schedule!r}; expected one of {common.LR_SCHEDULES}")
    if tcfg.lr_schedule == "log" and not (tcfg.lr > 0 and tcfg.lr_end > 0):
        raise SystemExit("--lr-schedule log needs --lr and --lr-end > 0")
    return tcfg, mcfg, ocfg


def main(argv=None) -> None:
    tcfg, mcfg, ocfg = configs_from_args(argv)
    device, rank, world = common.setup_device(tcfg.device)
    is_main = rank == 0
    if is_main:
        common.check_writable(tcfg.run_dir)
        common.check_writable(os.path.dirname(os.path.abspath(tcfg.out)))  # before hours of training, not after
    common.seed_everything(tcfg.seed)

    if tcfg.data == "shapes" and not os.path.isfile(os.path.join(tcfg.data_dir, "dataset_shapes.json")):
        from diffusion_caption.world.scenes import WorldConfig, write_dataset
        write_dataset(tcfg.data_dir, WorldConfig())
    tok_src = tcfg.tokenizer or (tcfg.clip if not tcfg.clip.startswith("open_clip:") else "distilbert-base-uncased")
    if not tcfg.init:  # before any loading: a model the hub cannot give ends the run now, naming its flag
        from diffusion_caption.hub import Need
        common.require_models([common.clip_need(tcfg.clip), Need(tok_src, "tokenizer", "--tokenizer DIR")]
                              + ([Need(mcfg.encoder, "DistilBERT", "--encoder DIR")] if mcfg.encoder != "tiny" else []))
    encoder = load_clip(tcfg.clip, device)
    tokenizer = CaptionTokenizer.from_pretrained(tok_src)
    if tokenizer.vocab_size <= len(SPECIAL_TOKENS):  # transformers' empty tokenizer: every word would be [UNK]
        raise SystemExit(f"the tokenizer of {tok_src} has {tokenizer.vocab_size} tokens, only special ones; give a "
                         "real one with --tokenizer DIR")
    extra = {"data": tcfg.data, "clip": tcfg.clip, "train_config": asdict(tcfg)}
    kd = distillation_of(tcfg.data, tcfg.data_dir)
    if kd:  # trained on a teacher's captions (training.distill_captions): the checkpoint says so
        extra["distilled"] = kd
    start = None
    if tcfg.init:
        start = Captioner.from_pretrained(tcfg.init)
        if start.tokenizer.hf.get_vocab() != tokenizer.hf.get_vocab():
            raise SystemExit(f"--init {tcfg.init}: its tokenizer differs from {tok_src}'s; a fine-tune needs the same tokens")
        init_extra = start.config.extra
        if init_extra.get("clip") and init_extra["clip"] != tcfg.clip:
            raise SystemExit(f"--init {tcfg.init} was trained on image features of {init_extra['clip']}, not --clip "
                             f"{tcfg.clip}; a fine-tune needs the same image encoder")
        extra["init"] = {"checkpoint": tcfg.init,
                         "steps": init_extra.get("train_config", {}).get("steps"),
                         **({"layers": parse_init_layers(tcfg.init_layers, start.config.n_layers)}
                            if tcfg.init_layers else {}),
                         **({"distilled": init_extra["distilled"]} if "distilled" in init_extra else {}),
                         # the start's own start, and so on: the whole lineage stays readable
                         **({"init": init_extra["init"]} if "init" in init_extra else {})}
    mcfg = dataclasses.replace(mcfg, vocab_size=tokenizer.vocab_size, cond_dim=encoder.feature_dim, extra=extra)

    image_dir = tcfg.image_dir or None
    train = load_datasets(tcfg.data, tcfg.data_dir, splits=["train"], image_dir=image_dir)
    val = load_datasets(tcfg.data, tcfg.data_dir, splits=["val"], image_dir=image_dir)
    feats = image_features(encoder, [r.image_path for r in train], tcfg.cache_dir, desc="encoding train images")
    val_feats = image_features(encoder, [r.image_path for r in val], tcfg.cache_dir, desc="encoding val images")
    if tcfg.train_limit:  # after encoding, so the full split's feature cache is reused
        train, feats = train[:tcfg.train_limit], feats[:tcfg.train_limit]
    pairs = caption_pairs(train)
    pair_img = torch.tensor([i for i, _ in pairs])
    pair_ids = tokenizer.encode([c for _, c in pairs], mcfg.seq_len)
    val_pairs = caption_pairs(val)[:2000]
    val_img = torch.tensor([i for i, _ in val_pairs])
    val_ids = tokenizer.encode([c for _, c in val_pairs], mcfg.seq_len)

    # a fine-tune builds the encoder from the checkpoint's own encoder config (no DistilBERT download: the
    # pretrained weights would be overwritten anyway); the architecture fields are the checkpoint's, so
    # the tensors match exactly
    start_state, encoder_config, start_sampling = None, None, None
    if start is not None:
        start_sampling = start.sampling
        start_state, encoder_config = start.denoiser.state_dict(), start.denoiser.encoder_config
        if tcfg.init_layers:
            keep = extra["init"]["layers"]
            start_state = keep_layers(start_state, keep)
            encoder_config = {**encoder_config, "n_layers": len(keep)}
        del start
    denoiser = Denoiser(mcfg, encoder_config=encoder_config).to(device)
    if start_state is not None:
        missing, unexpected = denoiser.load_state_dict(start_state, strict=False)
        added = [k for k in missing if k.startswith(GROWN_PREFIXES)]  # grown onto the start, from zero
        if unexpected or len(added) != len(missing):
            raise SystemExit(f"--init {tcfg.init}: its weights do not fit the denoiser (missing "
                             f"{sorted(set(missing) - set(added))}, unexpected {sorted(unexpected)})")
    ema = copy.deepcopy(denoiser).requires_grad_(False)
    model = denoiser
    if world > 1:
        # without condition dropout the null condition gets no gradient, and DDP must be told
        model = torch.nn.parallel.DistributedDataParallel(denoiser, device_ids=[device.index] if device.type == "cuda" else None,
                                                          find_unused_parameters=ocfg.p_uncond == 0)
    diffusion = GaussianDiffusion(NoiseSchedule(mcfg.schedule, mcfg.T), mcfg.predict, mcfg.self_cond)
    # validation: the same objective at uniform timesteps, without condition dropout or step unrolling
    val_objective = dataclasses.replace(ocfg, p_uncond=0.0, focus_steps=0, p_unroll=0.0)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    opt = common.make_optimizer(tcfg.optimizer, params, tcfg.lr, tcfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed(tcfg.seed * 7919 + rank)
    step = 0
    if tcfg.resume and common.has_train_state(tcfg.run_dir):
        step = common.load_train_state(tcfg.run_dir, denoiser, opt, gen, extra_modules={"ema": ema})["step"]
        if is_main:
            print(f"resumed from {tcfg.run_dir} at step {step}")
    if is_main:
        n_params = sum(p.numel() for p in denoiser.parameters())
        print(f"{len(train)} train images, {len(pairs)} captions; denoiser {n_params / 1e6:.2f} M parameters; "
              f"device {device}, world size {world}")

    batch_indices = shuffled_batches(len(pairs), tcfg.batch_size, tcfg.seed, rank, world)

    @torch.no_grad()
    def validate() -> dict:
        ema.eval()
        g = torch.Generator(device=device).manual_seed(1234)
        tot: dict[str, float] = {}
        n = 0
        for i in range(0, len(val_pairs), 256):
            ids = val_ids[i:i + 256].to(device)
            cond = val_feats[val_img[i:i + 256]].to(device)
            with common.autocast(device):
                losses = diffusion.training_losses(ema, ids, cond, val_objective, g, pad_id=tokenizer.pad_id)
            for k, v in losses.items():
                tot[k] = tot.get(k, 0.0) + float(v) * len(ids)
            n += len(ids)
        return {f"val_{k}": v / n for k, v in tot.items()}

    def save_state(step: int) -> None:
        common.save_train_state(tcfg.run_dir, denoiser, opt, step, gen, {"config": asdict(tcfg), "model": mcfg.to_dict(),
                                                                  "objective": ocfg.to_dict()},
                                extra_modules={"ema": ema})

    def loss(step: int) -> dict:
        idx = batch_indices(step)
        ids = pair_ids[idx].to(device)
        cond = feats[pair_img[idx]].to(device)
        with common.autocast(device):
            return diffusion.training_losses(model, ids, cond, ocfg, gen, pad_id=tokenizer.pad_id)

    def update_ema() -> None:
        for pe, pm in zip(ema.parameters(), denoiser.parameters()):
            pe.lerp_(pm, 1 - tcfg.ema)

    t0 = time.time()
    denoiser.train()
    loop = Loop(opt, params, loss, lambda s: common.scheduled_lr(tcfg.lr_schedule, s, tcfg.steps, tcfg.lr, tcfg.lr_end,
                                                                 tcfg.warmup),
                save_state, validate, tcfg.run_dir, tcfg.steps, tcfg.val_every, tcfg.ckpt_every, tcfg.grad_clip,
                tcfg.stop_at, after_step=update_ema, is_main=is_main, desc="train_diffusion",
                shown=("loss", "mse", "round", "token_acc"))
    step, finished = loop.run(step)
    if not finished:
        return
    if is_main:
        with common.fail_clearly(f"save the trained captioner to {tcfg.out} (the training state in {tcfg.run_dir} "
                                 "is complete: fix this and rerun with --resume to write it)"):
            sampling = (SamplingConfig.parse(tcfg.sampling) if tcfg.sampling
                        else start_sampling)
            Captioner(mcfg, ema.cpu(), encoder.to("cpu"), tokenizer, sampling=sampling,
                      objective=ocfg).save_pretrained(tcfg.out)
        print(f"saved {tcfg.out} after {step} steps ({time.time() - t0:.0f} s)")
    if world > 1:
        common.end_distributed()


if __name__ == "__main__":
    main()
