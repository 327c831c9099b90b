"""Fine-tune a CLIP's text tower against binding hard negatives, its image tower frozen.

    python -m research.tune_clip_text --clip assets/checkpoints/shapes-clip --data-dir data/shapes-aug \
        --out runs/clip-binding/final --run-dir runs/clip-binding

Choosing among candidate captions by CLIP score (``diffusion_caption.selection.rerank``) can only pick the
candidate that binds colours to the right shapes if the CLIP's text embeddings of "a red star and a blue
square" and "a blue star and a red square" differ, and differ in the direction the image feature
tells apart. ``training.train_clip``'s negatives replace every colour and shape word at once, so they
never ask for that. Here each training image's caption is ranked against captions of the same scene
changed in one way (``diffusion_caption.world.negatives``: swapped colours, a repeated shape or colour, one
colour or shape replaced), as NegCLIP does (Yuksekgonul et al., 2023), plus the batch's other captions.

Only the text tower learns. The image tower, and so every image feature the captioners were trained on,
stays bit for bit the same: the CLIP written to ``--out`` can replace a captioner's ``clip/`` folder,
changing only how its candidates are ranked. Image features are computed once (cached under
``--cache-dir``). Killed runs continue with ``--resume`` from ``--run-dir``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from diffusion_caption import checkpoint as ckpt
from diffusion_caption.data import load_karpathy
from diffusion_caption.features import image_features
from diffusion_caption.image_encoder import ImageEncoder
from diffusion_caption.world.negatives import KINDS, changed_scene, correct_captions, positive_and_negatives
from diffusion_caption.world.scenes import Scene, caption_candidates
from training import common
from training.loop import Loop


@dataclass
class TuneClipTextConfig:
    clip: str = "assets/checkpoints/shapes-clip"
    data_dir: str = "data/shapes-aug"
    out: str = "runs/clip-binding/final"
    run_dir: str = "runs/clip-binding"
    cache_dir: str = "cache"
    steps: int = 3000
    batch_size: int = 128
    negatives: int = 4  # per image, besides the batch's other captions
    lr: float = 2e-4
    lr_end: float = 1e-5
    warmup: int = 100
    weight_decay: float = 0.0
    val_every: int = 500
    ckpt_every: int = 500
    val_images: int = 500
    text_layers: int = 0  # keep only the first N blocks of the text tower (0: all): a cheaper scorer
    distill: float = 0.0  # weight of matching the given CLIP's full text tower's rankings (KL), besides the labels
    seed: int = 0
    device: str = "auto"
    resume: bool = False


def text_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The text tower's parameters: everything but ``visual.*`` and the logit scale."""
    return [(n, p) for n, p in model.named_parameters() if not n.startswith("visual") and n != "logit_scale"]


def keep_text_layers(enc: ImageEncoder, n: int) -> None:
    """Cut ``enc``'s text tower to its first ``n`` transformer blocks, in place, and say so in the config it
    is saved with. The embeddings, final norm and projection stay; the image tower is untouched."""
    blocks = enc.model.transformer.resblocks
    if not 1 <= n <= len(blocks):
        raise SystemExit(f"--text-layers {n}: the text tower has {len(blocks)} blocks")
    enc.model.transformer.resblocks = torch.nn.ModuleList(list(blocks)[:n])
    enc.model.transformer.layers = n
    enc.source["model_cfg"]["text_cfg"]["layers"] = n


def scenes_of(records) -> list[Scene]:
    missing = [r.image_id for r in records if not r.scene]
    if missing:
        raise SystemExit(f"{len(missing)} images have no scene (first: {missing[0]}): binding negatives are made "
                         "from a shapes-world scene, so --data-dir must be a shapes world (training.make_world)")
    return [Scene.from_json(r.scene) for r in records]


def validation_set(scenes: list[Scene], seed: int) -> list[tuple[int, str, str, str]]:
    """Fixed (image, kind, positive, negative) rows: one negative of each kind per scene that has it."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, scene in enumerate(scenes):
        order = [int(k) for k in rng.permutation(len(scene.objects))]
        templates = caption_candidates(scene, order)
        positive = templates[0]
        correct = correct_captions(scene)
        for kind in KINDS:
            other = changed_scene(scene, kind, rng)
            if other is None:
                continue
            text = caption_candidates(other, order)[0]
            if text not in correct:
                rows.append((i, kind, positive, text))
    return rows


def load_text_clip(path: str, flag: str, device) -> ImageEncoder:
    """The CLIP at ``path`` with its shapes text tokenizer, or a SystemExit that names the option ``flag``."""
    try:
        enc = ImageEncoder.from_pretrained(path, device=device)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"{flag} {path}: {e}") from None
    if enc.text_tokenizer is None or not hasattr(enc.text_tokenizer, "hf"):
        raise SystemExit(f"{flag} {path}: no shapes text tokenizer beside its weights (tokenizer.json)")
    return enc


@dataclass
class BindingData:
    """The training images with their scenes and features, and the fixed val rows of ``validation_set``."""
    train: list
    train_scenes: list[Scene]
    train_features: torch.Tensor
    val_features: torch.Tensor
    val_rows: list[tuple[int, str, str, str]]


def binding_data(enc: ImageEncoder, data_dir: str, cache_dir: str, val_images: int, seed: int) -> BindingData:
    """Load the shapes world's train and val splits and encode their images once with ``enc``'s frozen image
    tower (cached under ``cache_dir``)."""
    train = load_karpathy("shapes", data_dir, splits=["train"])
    val = load_karpathy("shapes", data_dir, splits=["val"])[:val_images]
    tr_scenes, va_scenes = scenes_of(train), scenes_of(val)
    enc.model.eval()
    tr_feats = image_features(enc, [r.image_path for r in train], cache_dir, desc="encoding train images")
    va_feats = image_features(enc, [r.image_path for r in val], cache_dir, desc="encoding val images")
    return BindingData(train, tr_scenes, tr_feats, va_feats, validation_set(va_scenes, seed + 1))


def binding_batch(scenes: list[Scene], rng: np.random.Generator, batch_size: int,
                  negatives: int) -> tuple[np.ndarray, list[str]]:
    """``batch_size`` training images drawn by ``rng`` and their texts: the images' captions first, in
    order, then ``negatives`` changed captions per image."""
    idx = rng.choice(len(scenes), batch_size, replace=False)
    positives, changed = [], []
    for i in idx:
        pos, negs = positive_and_negatives(scenes[i], rng, negatives)
        positives.append(pos)
        changed.extend(negs)
    return idx, positives + changed


@torch.no_grad()
def ranking_accuracy(model, tok, length: int, features: torch.Tensor, rows, device) -> dict:
    """How often the image's similarity puts its positive above the changed caption, per kind."""
    def embed(texts):
        out = [torch.nn.functional.normalize(model.encode_text(tok.encode(texts[i:i + 512], length).to(device)), dim=-1)
               for i in range(0, len(texts), 512)]
        return torch.cat(out).float().cpu()
    pos, neg = embed([r[2] for r in rows]), embed([r[3] for r in rows])
    img = features[[r[0] for r in rows]].float()
    win = ((pos * img).sum(-1) > (neg * img).sum(-1)).tolist()
    out = {}
    for kind in KINDS:
        hits = [w for w, r in zip(win, rows) if r[1] == kind]
        if hits:
            out[f"val_{kind}"] = sum(hits) / len(hits)
    out["val_all"] = sum(win) / max(len(win), 1)
    return out


def main(argv=None) -> None:
    cfg, device, _, _ = common.start_command(TuneClipTextConfig, argv, __doc__)
    enc = load_text_clip(cfg.clip, "--clip", device)
    tok, model = enc.text_tokenizer, enc.model
    length = int(model.context_length)
    teacher = None
    if cfg.distill > 0:  # the given tower, whole and frozen, before any block is cut
        import copy

        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.text_layers:
        keep_text_layers(enc, cfg.text_layers)

    data = binding_data(enc, cfg.data_dir, cfg.cache_dir, cfg.val_images, cfg.seed)
    va_feats, va_rows = data.val_features, data.val_rows

    model.requires_grad_(False)
    params = text_parameters(model)
    for _, p_ in params:
        p_.requires_grad_(True)
    opt = torch.optim.AdamW([p_ for _, p_ in params], lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if cfg.resume and common.has_train_state(cfg.run_dir):
        step = common.load_train_state(cfg.run_dir, model, opt, gen)["step"]
        print(f"resumed from {cfg.run_dir} at step {step}")
    scale = model.logit_scale.exp().detach()

    rec = {"step": step, **ranking_accuracy(model, tok, length, va_feats, va_rows, device)}
    tqdm.write(str(rec))
    common.write_log(cfg.run_dir, rec)
    def loss(step: int) -> dict:
        rng = np.random.default_rng([cfg.seed, step])  # per step, so a resumed run draws what it would have
        idx, texts = binding_batch(data.train_scenes, rng, cfg.batch_size, cfg.negatives)
        ids = tok.encode(texts, length).to(device)
        with common.autocast(device):
            txt = torch.nn.functional.normalize(model.encode_text(ids), dim=-1).float()
        img = data.train_features[torch.as_tensor(idx)].float().to(device)
        value, i2t = common.clip_loss(scale, img, txt)
        if teacher is not None:  # the full tower's ranking of the same captions for each image, as soft labels
            with torch.no_grad(), common.autocast(device):
                t_txt = torch.nn.functional.normalize(teacher.encode_text(ids), dim=-1).float()
            soft = (scale * img @ t_txt.T).log_softmax(-1)
            value = value + cfg.distill * torch.nn.functional.kl_div(i2t.log_softmax(-1), soft, log_target=True,
                                                                     reduction="batchmean")
        return {"loss": value}

    def validate() -> dict:
        model.eval()
        out = ranking_accuracy(model, tok, length, va_feats, va_rows, device)
        model.train()
        return out

    t0 = time.time()
    model.train()
    loop = Loop(opt, [p_ for _, p_ in params], loss, lambda s: common.linear_lr(s, cfg.steps, cfg.lr, cfg.lr_end, cfg.warmup),
                lambda s: common.save_train_state(cfg.run_dir, model, opt, s, gen, {"config": asdict(cfg)}),
                validate, cfg.run_dir, cfg.steps, cfg.val_every, cfg.ckpt_every, desc="tune_clip_text")
    step, _ = loop.run(step)
    model.eval()
    with ckpt.atomic_directory(cfg.out) as tmp:
        enc.save_pretrained(tmp)  # with its text tokenizer; the image tower is the one it was given
    print(f"saved {cfg.out} after {step} steps ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
