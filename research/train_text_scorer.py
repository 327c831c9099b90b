"""Train a small convolutional text scorer (``diffusion_caption.selection.text_scorer``) to rank candidate captions
as a binding-aware CLIP text tower does, at a fraction of its cost.

    python -m research.train_text_scorer --teacher assets/checkpoints/shapes-clip-binding \
        --candidates-from assets/checkpoints/shapes-diffusion-fast-small --data-dir data/shapes-aug \
        --out runs/text-scorer/final --run-dir runs/text-scorer

The teacher is a CLIP whose text tower reads binding (``research.tune_clip_text``). Its image tower is
frozen and shared: the scorer learns a text embedding in that tower's feature space, so a captioner with
the same image tower can use it (``Captioner.use_scorer``). Each step has three terms:

* **labels**: each training image against its caption, the batch's other captions and captions of the
  same scene changed in one way (``diffusion_caption.world.negatives``), both directions, as in
  ``tune_clip_text``;
* **the teacher's rankings of those captions** (KL to its softmax over them, weight ``--distill``);
* **the teacher's rankings of real candidate sets** (weight ``--candidate-weight``): a captioner
  (``--candidates-from``) proposes its candidate roundings of training images
  (``--candidate-setting``, several noise seeds), and the scorer matches the teacher's softmax over each
  image's set. These are the captions it will rank at test time, malformed ones included (a truncated
  caption, "an blue star"), which the scene negatives never show.

Validation reports the pairwise accuracy on fixed val negatives of each kind, as ``tune_clip_text``
does, and how often the scorer picks the teacher's choice from the captioner's val candidate sets.
Image features are computed once (cached under ``--cache-dir``). Killed runs continue with
``--resume`` from ``--run-dir`` and draw the same batches.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from diffusion_caption import checkpoint as ckpt
from diffusion_caption.selection.text_scorer import ConvTextEncoder, TextScorer, TextScorerConfig
from training import common
from training.loop import Loop
from research.tune_clip_text import binding_batch, binding_data, load_text_clip, ranking_accuracy


@dataclass
class TrainTextScorerConfig:
    teacher: str = "assets/checkpoints/shapes-clip-binding"
    candidates_from: str = ""  # a captioner whose candidate roundings of train images are distilled ("": none)
    candidate_setting: str = "ddim:1:1:k32:clip:rounding"  # SAMPLER:STEPS:GUIDANCE[...]:kK[:rounding]
    candidate_seeds: int = 2  # noise draws per image for the candidate sets
    candidate_images: int = 8000  # training images whose candidate sets are made
    candidate_batch: int = 64  # candidate sets per step
    candidate_weight: float = 1.0
    data_dir: str = "data/shapes-aug"
    out: str = "runs/text-scorer/final"
    run_dir: str = "runs/text-scorer"
    cache_dir: str = "cache"
    width: int = 128
    layers: int = 2
    kernel: int = 3
    positional: bool = True  # a learned position embedding (without: the first block runs as table lookups)
    steps: int = 3000
    batch_size: int = 128
    negatives: int = 4  # per image, besides the batch's other captions
    distill: float = 1.0  # weight of the teacher's rankings of the batch's captions and negatives
    lr: float = 2e-3
    lr_end: float = 5e-5
    warmup: int = 100
    weight_decay: float = 0.01
    val_every: int = 500
    ckpt_every: int = 500
    val_images: int = 500
    seed: int = 0
    device: str = "auto"
    resume: bool = False


def candidate_sets(captioner, setting: dict, features: torch.Tensor, seeds: int,
                   desc: str) -> list[tuple[int, list[str]]]:
    """(row of ``features``, its distinct candidate captions) for every image with more than one
    candidate, over noise seeds 0..``seeds``-1 of the captioner's ``setting`` on precomputed features."""
    s = dict(setting, select="clip")  # proposals ranked by the captioner's scorer; only the proposals are kept
    out = []
    for seed in range(seeds):
        for i in tqdm(range(0, features.shape[0], 256), desc=f"{desc} (seed {seed})", leave=False):
            for j, tr in enumerate(captioner.caption_batch(features=features[i:i + 256], seed=seed,
                                                           record="final", **s)):
                if len(tr.candidates) > 1:
                    out.append((i + j, list(tr.candidates)))
    return out


@torch.no_grad()
def encode(model, tok, length: int, texts: list[str], device, batch: int = 2048) -> torch.Tensor:
    """[N, D] L2-normalised embeddings by ``model`` (a ConvTextEncoder, or a CLIP ``ImageEncoder``)."""
    fn = model.encode_text_ids if hasattr(model, "encode_text_ids") else model
    out = [torch.nn.functional.normalize(fn(tok.encode(texts[i:i + batch], length).to(device)).float(), dim=-1).cpu()
           for i in range(0, len(texts), batch)]
    return torch.cat(out) if out else torch.zeros(0)


def choices(model, tok, length, features, sets_with_image, device) -> list[int]:
    """The index of each set's best candidate by cosine similarity to its image's feature."""
    flat = [c for _, s in sets_with_image for c in s]
    emb = encode(model, tok, length, flat, device)
    out, i = [], 0
    for b, s in sets_with_image:
        sims = emb[i:i + len(s)] @ features[b].float()
        out.append(int(sims.argmax()))
        i += len(s)
    return out


def main(argv=None) -> None:
    cfg, device, _, _ = common.start_command(TrainTextScorerConfig, argv, __doc__)
    teacher = load_text_clip(cfg.teacher, "--teacher", device)
    tok = teacher.text_tokenizer
    teacher.model.eval().requires_grad_(False)
    length = int(teacher.model.context_length)
    t_scale = teacher.model.logit_scale.exp().item()

    data = binding_data(teacher, cfg.data_dir, cfg.cache_dir, cfg.val_images, cfg.seed)
    train, tr_feats, va_feats, va_rows = data.train, data.train_features, data.val_features, data.val_rows

    # the teacher's rankings of real candidate sets: made once, scored once (the teacher is frozen)
    tr_sets, tr_soft, va_sets, va_teacher = [], [], [], []
    if cfg.candidates_from:
        from diffusion_caption.captioner import Captioner
        from diffusion_caption.sampling import SamplingConfig

        try:
            setting = SamplingConfig.parse(cfg.candidate_setting).to_dict()
        except ValueError as e:
            raise SystemExit(f"--candidate-setting: {e}") from None
        setting.pop("scorer")
        if setting["candidates"] < 2:
            raise SystemExit(f"--candidate-setting {cfg.candidate_setting!r}: give kK with K >= 2 candidates")
        try:
            captioner = Captioner.from_pretrained(cfg.candidates_from, device=device)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise SystemExit(f"--candidates-from {cfg.candidates_from}: {e}") from None
        if setting["propose"] == "rounding":  # roundings need a selector that is not their consensus
            captioner.use_scorer(teacher)
        if captioner.image_encoder.image_tower_fingerprint() != teacher.image_tower_fingerprint():
            raise SystemExit(f"--candidates-from {cfg.candidates_from}: its CLIP's image tower is not the teacher's, "
                             "so its candidates would be ranked against other image features")
        n = min(cfg.candidate_images, len(train))
        pick = np.random.default_rng(cfg.seed).choice(len(train), n, replace=False)
        made = [(int(pick[j]), c) for j, c in candidate_sets(captioner, setting, tr_feats[torch.as_tensor(pick)],
                                                              cfg.candidate_seeds, "train candidate sets")]
        flat = [c for _, s in made for c in s]
        t_emb = encode(teacher, tok, length, flat, device)
        i = 0
        for b, s in made:
            tr_sets.append((b, s))
            tr_soft.append((t_scale * t_emb[i:i + len(s)] @ tr_feats[b].float()).log_softmax(-1))
            i += len(s)
        va_sets = candidate_sets(captioner, setting, va_feats, 1, "val candidate sets")
        va_teacher = choices(teacher, tok, length, va_feats, va_sets, device)
        print(f"candidate sets: {len(tr_sets)} train ({sum(len(s) for _, s in tr_sets) / max(len(tr_sets), 1):.1f} "
              f"captions each), {len(va_sets)} val")

    scfg = TextScorerConfig(vocab_size=len(tok.hf.get_vocab()), context_length=length, pad_id=tok.pad_id,
                            embed_dim=teacher.feature_dim, width=cfg.width, layers=cfg.layers, kernel=cfg.kernel,
                            positional=cfg.positional,
                            image_tower=teacher.image_tower_fingerprint())
    model = ConvTextEncoder(scfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if cfg.resume and common.has_train_state(cfg.run_dir):
        step = common.load_train_state(cfg.run_dir, model, opt, gen)["step"]
        print(f"resumed from {cfg.run_dir} at step {step}")

    def validate() -> dict:
        model.eval()
        rec = ranking_accuracy(model, tok, length, va_feats, va_rows, device)
        if va_sets:
            picked = choices(model, tok, length, va_feats, va_sets, device)
            rec["val_teacher_agreement"] = round(float(np.mean([a == b for a, b in zip(picked, va_teacher)])), 4)
        model.train()
        return rec

    if step == 0:
        ref = ranking_accuracy(teacher.model, tok, length, va_feats, va_rows, device)
        common.write_log(cfg.run_dir, {"teacher": cfg.teacher, **ref})
        tqdm.write(f"teacher: {ref}")
    rec = {"step": step, **validate()}
    tqdm.write(str(rec))
    common.write_log(cfg.run_dir, rec)
    kl = torch.nn.functional.kl_div
    def loss(step: int) -> dict:
        rng = np.random.default_rng([cfg.seed, step])  # per step, so a resumed run draws what it would have
        idx, texts = binding_batch(data.train_scenes, rng, cfg.batch_size, cfg.negatives)
        ids = tok.encode(texts, length).to(device)
        scale = model.logit_scale.clamp(max=4.6052).exp()  # at most 100, as CLIP clamps
        txt = torch.nn.functional.normalize(model(ids), dim=-1).float()
        img = tr_feats[torch.as_tensor(idx)].float().to(device)
        total, i2t = common.clip_loss(scale, img, txt)
        parts = {"labels": total.detach()}
        if cfg.distill > 0:
            with torch.no_grad():
                t_txt = torch.nn.functional.normalize(teacher.encode_text_ids(ids), dim=-1).float()
                soft = (t_scale * img @ t_txt.T).log_softmax(-1)
            d = kl(i2t.log_softmax(-1), soft, log_target=True, reduction="batchmean")
            parts["distill"] = d.detach()
            total = total + cfg.distill * d
        if tr_sets and cfg.candidate_weight > 0:
            pick = rng.choice(len(tr_sets), min(cfg.candidate_batch, len(tr_sets)), replace=False)
            texts = [c for j in pick for c in tr_sets[j][1]]
            emb = torch.nn.functional.normalize(model(tok.encode(texts, length).to(device)), dim=-1).float()
            sizes = torch.tensor([len(tr_sets[j][1]) for j in pick])
            owner = torch.repeat_interleave(torch.arange(len(pick)), sizes)
            slot = torch.cat([torch.arange(int(n)) for n in sizes])
            imgs = tr_feats[torch.as_tensor([tr_sets[j][0] for j in pick])].float().to(device)
            sims = (emb * imgs[owner.to(device)]).sum(-1)
            logits = torch.full((len(pick), int(sizes.max())), float("-inf"), device=device)
            logits[owner, slot] = scale * sims  # each set's candidates in one padded row
            target = torch.full_like(logits, float("-inf"))
            target[owner, slot] = torch.cat([tr_soft[j] for j in pick]).to(device)
            live = torch.isfinite(target)
            log_p = logits.log_softmax(-1)
            c_loss = (target.exp() * (target - log_p)).where(live, torch.zeros_like(log_p)).sum() / len(pick)
            parts["candidates"] = c_loss.detach()
            total = total + cfg.candidate_weight * c_loss
        return {"loss": total, **parts}

    t0 = time.time()
    model.train()
    loop = Loop(opt, list(model.parameters()), loss,
                lambda s: common.linear_lr(s, cfg.steps, cfg.lr, cfg.lr_end, cfg.warmup),
                lambda s: common.save_train_state(cfg.run_dir, model, opt, s, gen, {"config": asdict(cfg)}),
                validate, cfg.run_dir, cfg.steps, cfg.val_every, cfg.ckpt_every, desc="train_text_scorer")
    step, _ = loop.run(step)
    model.eval()
    with ckpt.atomic_directory(cfg.out) as tmp:
        TextScorer(model.cpu(), tok).save_pretrained(tmp)
    print(f"saved {cfg.out} after {step} steps ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
