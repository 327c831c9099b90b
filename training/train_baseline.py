"""Train the autoregressive baseline: ClipCap's CLIP prefix + GPT-2, on the diffusion model's data and features.

    python -m training.train_baseline --preset shapes                     # the shipped default, on CPU
    python -m training.train_baseline --preset base --data flickr8k --data-dir DIR   # gpt2 + ViT-B/32, GPU
    python -m training.train_baseline --preset base --mapper transformer --prefix-len 40 --freeze-gpt true
    torchrun --nproc-per-node 8 -m training.train_baseline --preset base ...         # multi-GPU (DDP)

The same frozen CLIP, the same splits and the same cached image features as ``training.train_diffusion``.
Any baseline config field is a flag too (``--mapper``, ``--prefix-len``, ``--n-layer``, ``--gpt PATH`` ...).
Validation reports the next-token loss and, on the shapes world, the colour/shape accuracy of greedy
captions of the single-object val images. ``--resume`` continues a killed run from ``--run-dir`` with the
same data order and dropout.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import asdict, dataclass

import torch

from diffusion_caption.world.attributes import single_object_accuracy
from diffusion_caption.baseline.captioner import (BASELINE_PRESETS, BaselineCaptioner, BaselineConfig, PrefixCaptioner,
                                        baseline_preset, load_tokenizer, pretrained_architecture)
from diffusion_caption.data import caption_pairs, load_datasets
from diffusion_caption.features import image_features
from diffusion_caption.image_encoder import BASE_MODEL, BASE_PRETRAINED
from diffusion_caption.world.scenes import Scene
from training import common
from training.loop import Loop, shuffled_batches
from training.train_diffusion import load_clip


@dataclass
class BaselineTrainConfig:
    preset: str = "shapes"
    data: str = "shapes"  # shapes | flickr8k | flickr30k | coco, or a combination like flickr8k+flickr30k
    data_dir: str = "data/shapes"
    image_dir: str = ""
    clip: str = "assets/checkpoints/shapes-clip"  # a CLIP folder, or "open_clip:MODEL:TAG_OR_FILE"
    tokenizer: str = ""  # default: the CLIP folder's (wordpiece) or the GPT-2's own (gpt2)
    out: str = "assets/checkpoints/shapes-baseline"
    run_dir: str = "runs/shapes-baseline"
    cache_dir: str = "cache"
    steps: int = 2500  # about 4 epochs of the shapes world's 39k training captions; ~20 min on 2 CPU cores
    batch_size: int = 64
    lr: float = 1e-3
    lr_end: float = 5e-5
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    val_every: int = 500
    ckpt_every: int = 500
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    stop_at: int = 0  # stop after this step as if killed (checkpoints first); for testing --resume


PRESET_TRAINING = {
    "shapes": {},
    # ClipCap's optimiser (AdamW, lr 2e-5 with linear warm-up and decay to 0, batch 40) for 10 epochs of
    # Flickr8k's 30k training captions (ClipCap warmed up for 5000 steps on COCO's 10x larger epochs)
    "base": dict(data="flickr8k", clip=f"open_clip:{BASE_MODEL}:{BASE_PRETRAINED}", out="runs/base-baseline/final",
                 run_dir="runs/base-baseline", steps=7500, batch_size=40, lr=2e-5, lr_end=0.0, warmup=1000,
                 weight_decay=0.0, val_every=750, ckpt_every=750),
    "tiny": dict(steps=50, batch_size=16, val_every=25, ckpt_every=25, warmup=5),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_dataclass_args(p, BaselineTrainConfig)
    common.add_dataclass_args(p, BaselineConfig)
    return p


def configs_from_args(argv=None) -> tuple[BaselineTrainConfig, BaselineConfig]:
    args = build_parser().parse_args(argv)
    name = args.preset or "shapes"
    if name not in BASELINE_PRESETS:
        raise SystemExit(f"unknown --preset {name!r}; expected one of {sorted(BASELINE_PRESETS)}")
    base_train = BaselineTrainConfig(**{**PRESET_TRAINING.get(name, {}), "preset": name})
    tcfg = common.dataclass_from_args(BaselineTrainConfig, args, base_train)
    try:
        mcfg = common.dataclass_from_args(BaselineConfig, args, baseline_preset(name))
    except ValueError as e:
        raise SystemExit(f"bad baseline config: {e}") from None
    return tcfg, mcfg


def main(argv=None) -> None:
    tcfg, mcfg = configs_from_args(argv)
    device, rank, world = common.setup_device(tcfg.device)
    is_main = rank == 0
    if is_main:
        common.check_writable(tcfg.run_dir)
        common.check_writable(os.path.dirname(os.path.abspath(tcfg.out)))  # before the training, not after
    common.seed_everything(tcfg.seed)

    if tcfg.data == "shapes" and not os.path.isfile(os.path.join(tcfg.data_dir, "dataset_shapes.json")):
        from diffusion_caption.world.scenes import WorldConfig, write_dataset
        write_dataset(tcfg.data_dir, WorldConfig())
    if mcfg.tokenizer_kind == "gpt2":
        tok_src = tcfg.tokenizer or mcfg.gpt
    else:
        tok_src = tcfg.tokenizer or (tcfg.clip if not tcfg.clip.startswith("open_clip:") else "distilbert-base-uncased")
    from diffusion_caption.hub import Need  # before any loading: what the hub cannot give ends the run now
    common.require_models([common.clip_need(tcfg.clip), Need(tok_src, "tokenizer", "--tokenizer DIR")]
                          + ([Need(mcfg.gpt, "GPT-2", "--gpt DIR")] if mcfg.gpt != "tiny" else []))
    encoder = load_clip(tcfg.clip, device)
    tokenizer = load_tokenizer(mcfg.tokenizer_kind, tok_src)
    mcfg = dataclasses.replace(mcfg, vocab_size=tokenizer.vocab_size)
    mcfg = pretrained_architecture(mcfg)  # a pretrained GPT-2 fixes width, depth, heads and vocabulary
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise SystemExit(f"the tokenizer {tok_src} has {tokenizer.vocab_size} tokens, more than GPT-2 {mcfg.gpt}'s "
                         f"{mcfg.vocab_size}")
    mcfg = dataclasses.replace(mcfg, bos_id=tokenizer.cls_id, eos_id=tokenizer.sep_id, cond_dim=encoder.feature_dim,
                               extra={"data": tcfg.data, "clip": tcfg.clip, "train_config": asdict(tcfg)})

    image_dir = tcfg.image_dir or None
    train = load_datasets(tcfg.data, tcfg.data_dir, splits=["train"], image_dir=image_dir)
    val = load_datasets(tcfg.data, tcfg.data_dir, splits=["val"], image_dir=image_dir)
    feats = image_features(encoder, [r.image_path for r in train], tcfg.cache_dir, desc="encoding train images")
    val_feats = image_features(encoder, [r.image_path for r in val], tcfg.cache_dir, desc="encoding val images")
    pairs = caption_pairs(train)
    pair_img = torch.tensor([i for i, _ in pairs])
    pair_ids = tokenizer.encode([c for _, c in pairs], mcfg.max_len)
    val_pairs = caption_pairs(val)[:2000]
    val_img = torch.tensor([i for i, _ in val_pairs])
    val_ids = tokenizer.encode([c for _, c in val_pairs], mcfg.max_len)
    val_scenes = [Scene.from_json(r.scene) for r in val] if val and all(r.scene for r in val) else None

    net = PrefixCaptioner(mcfg).to(device)
    model = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    gen = torch.Generator().manual_seed(tcfg.seed * 7919 + rank)  # unused by the loss; kept for the state format
    step = 0
    if tcfg.resume and common.has_train_state(tcfg.run_dir):
        step = common.load_train_state(tcfg.run_dir, net, opt, gen)["step"]
        if is_main:
            print(f"resumed from {tcfg.run_dir} at step {step}")
    if is_main:
        n_params = sum(p.numel() for p in net.parameters())
        n_train = sum(p.numel() for p in params)
        print(f"{len(train)} train images, {len(pairs)} captions; GPT-2 {mcfg.gpt!r} + {mcfg.mapper} mapper: "
              f"{n_params / 1e6:.2f} M parameters ({n_train / 1e6:.2f} M trained); device {device}, world size {world}")

    batch_indices = shuffled_batches(len(pairs), tcfg.batch_size, tcfg.seed, rank, world)

    @torch.no_grad()
    def validate() -> dict:
        net.eval()
        tot = {"loss": 0.0, "token_acc": 0.0}
        n = 0
        for i in range(0, len(val_pairs), 256):
            ids = val_ids[i:i + 256].to(device)
            with common.autocast(device):
                out = net(val_feats[val_img[i:i + 256]].to(device), ids)
            for k in tot:
                tot[k] += float(out[k]) * len(ids)
            n += len(ids)
        rec = {f"val_{k}": v / max(n, 1) for k, v in tot.items()}
        if val_scenes is not None:
            cap = BaselineCaptioner(mcfg, net, encoder, tokenizer, device)
            texts = [c.text for i in range(0, len(val), 256) for c in cap.caption_batch(features=val_feats[i:i + 256])]
            acc = single_object_accuracy(texts, val_scenes)
            rec.update(val_color_acc=acc["color_acc"], val_shape_acc=acc["shape_acc"])
        net.train()
        return rec

    def save_state(step: int) -> None:
        common.save_train_state(tcfg.run_dir, net, opt, step, gen, {"config": asdict(tcfg), "model": mcfg.to_dict()})

    def loss(step: int) -> dict:
        idx = batch_indices(step)
        ids = pair_ids[idx].to(device)
        cond = feats[pair_img[idx]].to(device)
        with common.autocast(device):
            return model(cond, ids)

    t0 = time.time()
    net.train()
    loop = Loop(opt, params, loss, lambda s: common.linear_lr(s, tcfg.steps, tcfg.lr, tcfg.lr_end, tcfg.warmup),
                save_state, validate, tcfg.run_dir, tcfg.steps, tcfg.val_every, tcfg.ckpt_every, tcfg.grad_clip,
                tcfg.stop_at, is_main=is_main, desc="train_baseline", shown=("loss", "token_acc"))
    step, finished = loop.run(step)
    if not finished:
        return
    if is_main:
        with common.fail_clearly(f"save the trained baseline to {tcfg.out} (the training state in {tcfg.run_dir} "
                                 "is complete: fix this and rerun with --resume to write it)"):
            BaselineCaptioner(mcfg, net.cpu(), encoder.to("cpu"), tokenizer).save_pretrained(tcfg.out)
        print(f"saved {tcfg.out} after {step} steps ({time.time() - t0:.0f} s)")
    if world > 1:
        common.end_distributed()


if __name__ == "__main__":
    main()
