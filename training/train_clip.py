"""Train the shapes-preset CLIP (image and text towers) contrastively on the shapes world.

    python -m training.train_clip --data-dir data/shapes --out assets/checkpoints/shapes-clip

Trains the shapes WordPiece tokenizer on the training captions first; the CLIP folder written to
``--out`` holds the open_clip config and weights and that tokenizer, which the diffusion model and the
baseline reuse. Killed runs continue with ``--resume`` from ``--run-dir``.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from diffusion_caption.data import load_karpathy
from diffusion_caption.image_encoder import ImageEncoder
from diffusion_caption.images import load_image
from diffusion_caption.tokenizer import CaptionTokenizer
from training import common


@dataclass
class ClipTrainConfig:
    data_dir: str = "data/shapes"
    out: str = "assets/checkpoints/shapes-clip"
    run_dir: str = "runs/shapes-clip"
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    lr_end: float = 1e-5
    warmup: int = 100
    weight_decay: float = 0.1
    vocab_size: int = 512
    context_length: int = 24
    val_every: int = 250
    ckpt_every: int = 250
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    make_world: bool = True  # render the shapes world into data_dir first if it is not there


def load_split(encoder: ImageEncoder, data_dir: str, split: str, desc: str):
    records = load_karpathy("shapes", data_dir, splits=[split])
    pixels = torch.stack([encoder.preprocess(load_image(r.image_path))
                          for r in tqdm(records, desc=desc, leave=False)])
    return records, pixels


def caption_table(tok: CaptionTokenizer, records, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K, length] ids of every caption of every image, and the count of captions per image."""
    k = max(len(r.captions) for r in records)
    ids = torch.zeros(len(records), k, length, dtype=torch.long)
    counts = torch.tensor([len(r.captions) for r in records])
    for i, r in enumerate(records):
        ids[i, : len(r.captions)] = tok.encode(r.captions, length)
    return ids, counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_dataclass_args(p, ClipTrainConfig)
    cfg = common.dataclass_from_args(ClipTrainConfig, p.parse_args(argv))
    device, rank, world = common.setup_device(cfg.device)
    common.check_writable(cfg.run_dir)
    common.seed_everything(cfg.seed)
    if not os.path.isfile(os.path.join(cfg.data_dir, "dataset_shapes.json")) and cfg.make_world:
        from diffusion_caption.world import WorldConfig, write_dataset
        write_dataset(cfg.data_dir, WorldConfig())

    tok_dir = os.path.join(cfg.run_dir, "tokenizer")
    if cfg.resume and os.path.isdir(tok_dir):
        tok = CaptionTokenizer.from_pretrained(tok_dir)
    else:
        train_caps = [c for r in load_karpathy("shapes", cfg.data_dir, splits=["train"]) for c in r.captions]
        tok = CaptionTokenizer.train(train_caps, vocab_size=cfg.vocab_size)
        tok.save_pretrained(tok_dir)
    enc = ImageEncoder.create_shapes(tok.vocab_size, eos_id=tok.sep_id, pad_id=tok.pad_id,
                                     context_length=cfg.context_length, device=device)
    model = enc.model.train().requires_grad_(True)
    tr_records, tr_pix = load_split(enc, cfg.data_dir, "train", "preprocessing train images")
    va_records, va_pix = load_split(enc, cfg.data_dir, "val", "preprocessing val images")
    tr_ids, tr_counts = caption_table(tok, tr_records, cfg.context_length)
    va_ids = tok.encode([r.captions[0] for r in va_records], cfg.context_length)

    from open_clip.loss import ClipLoss
    loss_fn = ClipLoss()
    decay = [p_ for n, p_ in model.named_parameters() if p_.ndim >= 2 and "embedding" not in n]
    no_decay = [p_ for n, p_ in model.named_parameters() if not (p_.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if cfg.resume and common.has_train_state(cfg.run_dir):
        step = common.load_train_state(cfg.run_dir, model, opt, gen)["step"]
        print(f"resumed from {cfg.run_dir} at step {step}")

    N = len(tr_records)
    per_epoch = N // cfg.batch_size

    def batch_indices(s: int) -> torch.Tensor:
        epoch, j = divmod(s, per_epoch)
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        return perm[j * cfg.batch_size:(j + 1) * cfg.batch_size]

    @torch.no_grad()
    def validate() -> dict:
        model.eval()
        img = torch.nn.functional.normalize(model.encode_image(va_pix.to(device)), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(va_ids.to(device)), dim=-1)
        sims = img @ txt.T
        # retrieval among captions that differ: compare each image's caption to all others
        acc = (sims.argmax(1) == torch.arange(len(sims), device=device)).float().mean().item()
        loss = loss_fn(img, txt, model.logit_scale.exp()).item()
        model.train()
        return {"val_loss": loss, "val_i2t_acc": acc}

    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="train_clip")
    while step < cfg.steps:
        idx = batch_indices(step)
        k = (torch.rand(len(idx), generator=gen) * tr_counts[idx]).long()
        text = tr_ids[idx, k].to(device)
        pix = tr_pix[idx].to(device)
        for g in opt.param_groups:
            g["lr"] = common.linear_lr(step, cfg.steps, cfg.lr, cfg.lr_end, cfg.warmup)
        with common.autocast(device):
            img_f, txt_f, scale = model(pix, text)
            loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.val_every == 0 or step == cfg.steps:
            rec = {"step": step, "loss": loss.item(), **validate(), "elapsed_s": time.time() - t0}
            tqdm.write(str(rec))
            common.write_log(cfg.run_dir, rec)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            common.save_train_state(cfg.run_dir, model, opt, step, gen, {"config": asdict(cfg)})
    bar.close()
    model.eval()
    from diffusion_caption import checkpoint as ckpt
    with ckpt.atomic_directory(cfg.out) as tmp:
        enc.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    print(f"saved {cfg.out} after {step} steps ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
