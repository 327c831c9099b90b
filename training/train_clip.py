"""Train the shapes-preset CLIP (image and text towers) contrastively on the shapes world.

    python -m training.train_clip --data-dir data/shapes --out assets/checkpoints/shapes-clip

Trains the shapes WordPiece tokenizer on the captioning training captions first. CLIP itself is
pre-trained on its own corpus of freshly rendered world scenes without the training split's
background/shape correlation (``--corpus-size 0`` uses the training split instead), with hard-negative
captions whose shape and colour words are swapped. The CLIP folder written to ``--out`` holds the
open_clip config and weights and the tokenizer, which the diffusion model and the baseline reuse.
Killed runs continue with ``--resume`` from ``--run-dir``.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from diffusion_caption.world import scenes as world
from diffusion_caption.data import ImageRecord, load_karpathy
from diffusion_caption.image_encoder import ImageEncoder
from diffusion_caption.images import load_image
from diffusion_caption.tokenizer import CaptionTokenizer
from diffusion_caption.world.scenes import COLORS, SHAPES, article
from training import common
from training.loop import Loop, shuffled_batches


@dataclass
class ClipTrainConfig:
    data_dir: str = "data/shapes"
    out: str = "assets/checkpoints/shapes-clip"
    run_dir: str = "runs/shapes-clip"
    steps: int = 2000
    batch_size: int = 128
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
    # CLIP's own pre-training corpus: scenes drawn from the world without the captioning split's
    # background/shape correlation (as real CLIP is pre-trained on other data than the captioner's);
    # 0 trains on the captioning train split instead
    corpus_size: int = 8000
    corpus_p_corr: float = 0.0
    corpus_seed: int = 1000
    hard_negatives: bool = True  # also rank each image against its caption with shape/colour words swapped
    make_world: bool = True  # render the shapes world into data_dir first if it is not there


def load_split(encoder: ImageEncoder, data_dir: str, split: str, desc: str):
    records = load_karpathy("shapes", data_dir, splits=[split])
    pixels = torch.stack([encoder.preprocess(load_image(r.image_path))
                          for r in tqdm(records, desc=desc, leave=False)])
    return records, pixels


def render_corpus(encoder: ImageEncoder, n: int, p_corr: float, seed: int):
    """``n`` freshly rendered world scenes with their captions, preprocessed (no files written)."""
    records, pixels = [], []
    for i in tqdm(range(n), desc="rendering CLIP corpus", leave=False):
        scene, rng = world.scene_for(seed, "train", i, p_corr)
        records.append(ImageRecord("", world.sample_captions(scene, rng), "train", f"corpus:{i}", "shapes",
                                   scene.to_json()))
        pixels.append(encoder.preprocess(world.render_scene(scene)))
    return records, torch.stack(pixels)


def caption_table(tok: CaptionTokenizer, records, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K, length] ids of every caption of every image, and the count of captions per image."""
    k = max(len(r.captions) for r in records)
    ids = torch.zeros(len(records), k, length, dtype=torch.long)
    counts = torch.tensor([len(r.captions) for r in records])
    for i, r in enumerate(records):
        ids[i, : len(r.captions)] = tok.encode(r.captions, length)
    return ids, counts


def swap_table(tok: CaptionTokenizer) -> list[torch.Tensor]:
    """Groups of single-token words that can replace each other: shapes, plural shapes, colours."""
    groups = [list(SHAPES), [s + "s" for s in SHAPES], list(COLORS)]
    table = []
    for words in groups:
        ids = [tok.hf.convert_tokens_to_ids(w) for w in words]
        table.append(torch.tensor([i for i in ids if i != tok.hf.unk_token_id]))
    return table


def swap_words(text: torch.Tensor, table: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """Hard negatives: each caption with every shape and colour word replaced by a different one of its kind.

    The training split's backgrounds predict shapes, and colour alone separates most captions in a batch,
    so plain contrastive training learns colour at once but reads shape off the background; a caption that
    differs only in its shape words can only be told apart by looking at the shape.
    """
    out = text.clone()
    for ids in table:
        n = len(ids)
        if n < 2:
            continue
        pos = (text[..., None] == ids).nonzero()
        if len(pos) == 0:
            continue
        cur = (text[pos[:, 0], pos[:, 1], None] == ids).float().argmax(-1)
        shift = torch.randint(1, n, (len(pos),), generator=gen)
        out[pos[:, 0], pos[:, 1]] = ids[(cur + shift) % n]
    return out


def contrastive_loss(model, pixels, text, negatives=None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP); image-to-text also ranks against the hard-negative captions."""
    img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
    txt = torch.nn.functional.normalize(model.encode_text(text if negatives is None else torch.cat([text, negatives])), dim=-1)
    return common.clip_loss(model.logit_scale.exp(), img, txt)[0]


def main(argv=None) -> None:
    cfg, device, rank, world = common.start_command(ClipTrainConfig, argv, __doc__)
    if not os.path.isfile(os.path.join(cfg.data_dir, "dataset_shapes.json")) and cfg.make_world:
        from diffusion_caption.world.scenes import WorldConfig, write_dataset
        write_dataset(cfg.data_dir, WorldConfig())

    tok_dir = os.path.join(cfg.run_dir, "tokenizer")
    if cfg.resume and os.path.isdir(tok_dir):
        tok = CaptionTokenizer.from_pretrained(tok_dir)
    else:
        train_caps = [c for r in load_karpathy("shapes", cfg.data_dir, splits=["train"]) for c in r.captions]
        tok = CaptionTokenizer.train(train_caps, vocab_size=cfg.vocab_size)
        tok.save_pretrained(tok_dir)
    enc = ImageEncoder.create_shapes(tok.vocab_size, eos_id=tok.sep_id, pad_id=tok.pad_id,
                                     context_length=cfg.context_length, device=device, text_tokenizer=tok)
    model = enc.model.train().requires_grad_(True)
    if cfg.corpus_size > 0:
        tr_records, tr_pix = render_corpus(enc, cfg.corpus_size, cfg.corpus_p_corr, cfg.corpus_seed)
    else:
        tr_records, tr_pix = load_split(enc, cfg.data_dir, "train", "preprocessing train images")
    va_records, va_pix = load_split(enc, cfg.data_dir, "val", "preprocessing val images")
    tr_ids, tr_counts = caption_table(tok, tr_records, cfg.context_length)
    va_ids = tok.encode([r.captions[0] for r in va_records], cfg.context_length)

    swaps = swap_table(tok)
    decay = [p_ for n, p_ in model.named_parameters() if p_.ndim >= 2 and "embedding" not in n]
    no_decay = [p_ for n, p_ in model.named_parameters() if not (p_.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if cfg.resume and common.has_train_state(cfg.run_dir):
        step = common.load_train_state(cfg.run_dir, model, opt, gen)["step"]
        print(f"resumed from {cfg.run_dir} at step {step}")

    batch_indices = shuffled_batches(len(tr_records), cfg.batch_size, cfg.seed)

    # zero-shot probe: single-object val images (uncorrelated backgrounds) against "a {colour} {shape}"
    combos = [(c, s) for c in COLORS for s in SHAPES]
    probe_ids = tok.encode([f"{article(c)} {c} {s}" for c, s in combos], cfg.context_length)
    single = [i for i, r in enumerate(va_records) if r.scene and len(r.scene["objects"]) == 1]
    truth = [(va_records[i].scene["objects"][0]["color"], va_records[i].scene["objects"][0]["shape"]) for i in single]

    @torch.no_grad()
    def validate() -> dict:
        model.eval()
        img = torch.nn.functional.normalize(model.encode_image(va_pix.to(device)), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(va_ids.to(device)), dim=-1)
        loss = contrastive_loss(model, va_pix.to(device), va_ids.to(device)).item()
        out = {"val_loss": loss}
        if single:
            probe = torch.nn.functional.normalize(model.encode_text(probe_ids.to(device)), dim=-1)
            pred = (img[single] @ probe.T).argmax(1).tolist()
            out["zeroshot_color_acc"] = sum(combos[p_][0] == t[0] for p_, t in zip(pred, truth)) / len(single)
            out["zeroshot_shape_acc"] = sum(combos[p_][1] == t[1] for p_, t in zip(pred, truth)) / len(single)
        model.train()
        return out

    def loss(step: int) -> dict:
        idx = batch_indices(step)
        k = (torch.rand(len(idx), generator=gen) * tr_counts[idx]).long()
        text = tr_ids[idx, k].to(device)
        pix = tr_pix[idx].to(device)
        negatives = swap_words(text, swaps, gen) if cfg.hard_negatives else None
        with common.autocast(device):
            return {"loss": contrastive_loss(model, pix, text, negatives)}

    def clamp_scale() -> None:
        model.logit_scale.clamp_(0, 4.6052)

    t0 = time.time()
    loop = Loop(opt, list(model.parameters()), loss,
                lambda s: common.linear_lr(s, cfg.steps, cfg.lr, cfg.lr_end, cfg.warmup),
                lambda s: common.save_train_state(cfg.run_dir, model, opt, s, gen, {"config": asdict(cfg)}),
                validate, cfg.run_dir, cfg.steps, cfg.val_every, cfg.ckpt_every, after_step=clamp_scale,
                desc="train_clip")
    step, _ = loop.run(step)
    model.eval()
    from diffusion_caption import checkpoint as ckpt
    with ckpt.atomic_directory(cfg.out) as tmp:
        enc.save_pretrained(tmp)  # with its text tokenizer
    print(f"saved {cfg.out} after {step} steps ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
