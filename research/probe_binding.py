"""Does the image feature say which colour belongs to which shape? A probe, on the shapes world.

The captioners read each image through one pooled CLIP vector. When a caption pairs a scene's colours
with the wrong shapes (``binding`` in ``training.evaluate``), either the vector does not keep which
colour goes with which shape, or the captioner does not read it out. This command tells the two
apart: a small classifier (the probe) is trained on the frozen features of the training split to
answer "what colour is the <shape>?" for every object of a multi-object scene whose shape is unique in
its scene (scenes whose objects all share one colour are left out: there the answer needs no binding),
and is scored on another split. Its accuracy is set against ``chance``: picking one of the scene's
colours at random, the most a reader knowing which colours are present but not which shape wears
which could expect.

It also asks the CLIP's text tower (when the CLIP folder has its tokenizer) how often the image's
similarity ranks the true caption of a two-object scene ("a purple star and a red square") above the
swapped one ("a red star and a purple square") and above each repeated-shape one ("a purple star and a
red star", "a purple square and a red square"): what ranking candidate captions by CLIP score
(``diffusion_caption.selection.rerank``) can tell apart.

Features probed:
- ``pooled``: the L2-normalised image embedding, exactly what the captioners are given;
- ``tokens``: the attention pool's outputs at every spatial position of the last feature map (CLIP's
  patch tokens, for the ModifiedResNet image towers the shapes preset uses), concatenated.

    python -m research.probe_binding --clip assets/checkpoints/shapes-clip --data-dir data/shapes-aug
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from torch import nn
from tqdm import tqdm

from diffusion_caption.data import ImageRecord, load_datasets
from diffusion_caption.features import image_features
from diffusion_caption.image_encoder import ImageEncoder
from diffusion_caption.world.scenes import COLORS, SHAPES, article

FEATURES = ("pooled", "tokens")


def binding_questions(records: list[ImageRecord]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(record index, shape index, colour index) of every question "what colour is the <shape>?" the
    multi-object scenes of ``records`` answer, and the chance accuracy of a guess among each scene's colours."""
    rows, chance = [], []
    for i, r in enumerate(records):
        objs = (r.scene or {}).get("objects", [])
        colours = {o["color"] for o in objs}
        if len(objs) < 2 or len(colours) < 2:
            continue
        for o in objs:
            if sum(p["shape"] == o["shape"] for p in objs) == 1:
                rows.append((i, SHAPES.index(o["shape"]), COLORS.index(o["color"])))
                chance.append(1.0 / len(colours))
    if not rows:
        raise SystemExit("no multi-object scene with a uniquely shaped object and two colours: "
                         "the probe needs the shapes world's scenes")
    t = torch.tensor(rows)
    return t[:, 0], t[:, 1], t[:, 2], sum(chance) / len(chance)


@torch.no_grad()
def attention_pool_tokens(encoder: ImageEncoder, image_paths: list[str], batch_size: int = 256) -> torch.Tensor:
    """[N, (HW + 1) * D]: open_clip's ModifiedResNet attention pool evaluated at every query (the mean
    token, whose output is the pooled embedding, then each spatial position), concatenated."""
    visual = encoder.model.visual
    pool = getattr(visual, "attnpool", None)
    if pool is None:
        raise SystemExit(f"--features tokens needs a ModifiedResNet image tower (the shapes preset); "
                         f"this CLIP's is a {type(visual).__name__}")
    out = []
    for i in tqdm(range(0, len(image_paths), batch_size), desc="encoding tokens", leave=False):
        x = encoder.pixels(image_paths[i:i + batch_size]).to(encoder.device)
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
        x = x.flatten(2).permute(2, 0, 1)  # (HW)NC, as AttentionPool2d.forward
        x = torch.cat([x.mean(0, keepdim=True), x]) + pool.positional_embedding[:, None].to(x.dtype)
        y, _ = nn.functional.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
            out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
        out.append(y.permute(1, 0, 2).flatten(1).float().cpu())
    return torch.cat(out)


def train_probe(x: torch.Tensor, shape: torch.Tensor, colour: torch.Tensor, hidden: int, epochs: int,
                seed: int = 0) -> nn.Module:
    """An MLP from [feature, one-hot shape] to the colour; ``hidden`` 0: one linear map of the feature
    per shape (a linear map of [feature, one-hot shape] could not let the question change the answer)."""
    torch.manual_seed(seed)
    d = x.shape[1] * len(SHAPES) if hidden == 0 else x.shape[1] + len(SHAPES)
    net = nn.Linear(d, len(COLORS)) if hidden == 0 else nn.Sequential(
        nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, len(COLORS)))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    inputs = probe_inputs(x, shape, hidden == 0)
    for _ in tqdm(range(epochs), desc=f"probe (hidden {hidden})", leave=False):
        for idx in torch.randperm(len(inputs)).split(256):
            loss = nn.functional.cross_entropy(net(inputs[idx]), colour[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def probe_inputs(x: torch.Tensor, shape: torch.Tensor, per_shape: bool = False) -> torch.Tensor:
    """[feature, one-hot shape], or with ``per_shape`` the feature in the question's slot of a
    [N, n_shapes * D] input (zero elsewhere), so that one linear map holds one classifier per shape."""
    q = nn.functional.one_hot(shape, len(SHAPES)).float()
    return (q[:, :, None] * x[:, None]).flatten(1) if per_shape else torch.cat([x, q], dim=1)


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, shape: torch.Tensor, colour: torch.Tensor) -> float:
    per_shape = isinstance(net, nn.Linear)
    return (net(probe_inputs(x, shape, per_shape)).argmax(1) == colour).float().mean().item()


def caption_ranking(encoder: ImageEncoder, records: list[ImageRecord], features: torch.Tensor) -> dict:
    """How often CLIP similarity puts the true caption of a two-object scene (objects differing in colour
    and shape) above its swapped and repeated-shape variants; ``features`` [N, D] are the records' own."""
    rows = []
    for i, r in enumerate(records):
        objs = (r.scene or {}).get("objects", [])
        if len(objs) != 2 or objs[0]["color"] == objs[1]["color"] or objs[0]["shape"] == objs[1]["shape"]:
            continue
        (ca, sa), (cb, sb) = [(o["color"], o["shape"]) for o in objs]
        phrase = lambda c, s: f"{article(c)} {c} {s}"  # noqa: E731
        rows.append((i, [f"{phrase(ca, sa)} and {phrase(cb, sb)}", f"{phrase(cb, sa)} and {phrase(ca, sb)}",
                         f"{phrase(ca, sa)} and {phrase(cb, sa)}", f"{phrase(ca, sb)} and {phrase(cb, sb)}"]))
    if not rows:
        return {"n": 0}
    text = encoder.encode_text([c for _, group in rows for c in group]).view(len(rows), 4, -1)
    image = nn.functional.normalize(features[[i for i, _ in rows]].float(), dim=-1).to(text.device)
    sims = (text * image[:, None]).sum(-1)
    beats = (sims[:, :1] > sims[:, 1:]).float().mean(0).tolist()
    return {"n": len(rows), "true above swapped": beats[0], "true above repeated shape (first object's)": beats[1],
            "true above repeated shape (second object's)": beats[2]}


def run(clip: str, data_dir: str, eval_split: str = "test", features=FEATURES, hidden=(0, 512), epochs: int = 30,
        cache_dir: str | None = "cache", seed: int = 0) -> dict:
    unknown = [f for f in features if f not in FEATURES]
    if unknown:  # before any image is encoded
        raise SystemExit(f"unknown feature(s) {unknown}; expected some of {FEATURES}")
    encoder = ImageEncoder.from_pretrained(clip)
    train = load_datasets("shapes", data_dir, splits=["train"])
    held = load_datasets("shapes", data_dir, splits=[eval_split])
    q_train, q_held = binding_questions(train), binding_questions(held)
    if encoder.text_tokenizer is not None:
        f_rank = image_features(encoder, [r.image_path for r in held], cache_dir, desc=f"encoding {eval_split} images")
        ranking = caption_ranking(encoder, held, f_rank)
    else:
        ranking = None
    out = {"clip": clip, "data_dir": data_dir, "eval_split": eval_split, "epochs": epochs, "caption_ranking": ranking,
           "questions": {"train": len(q_train[0]), eval_split: len(q_held[0])},
           "chance": {"train": q_train[3], eval_split: q_held[3]}, "probes": []}
    for name in features:
        if name == "pooled":
            f_train = image_features(encoder, [r.image_path for r in train], cache_dir, desc="encoding train images")
            f_held = image_features(encoder, [r.image_path for r in held], cache_dir, desc=f"encoding {eval_split} images")
        else:
            f_train = attention_pool_tokens(encoder, [r.image_path for r in train])
            f_held = attention_pool_tokens(encoder, [r.image_path for r in held])
        mean, std = f_train.mean(0), f_train.std(0) + 1e-6  # standardised with the training split's statistics
        x_train, x_held = (f_train[q_train[0]] - mean) / std, (f_held[q_held[0]] - mean) / std
        for h in hidden:
            net = train_probe(x_train, q_train[1], q_train[2], h, epochs, seed)
            out["probes"].append({"features": name, "dim": int(x_train.shape[1]), "hidden": h,
                                  "train": accuracy(net, x_train, q_train[1], q_train[2]),
                                  eval_split: accuracy(net, x_held, q_held[1], q_held[2])})
    return out


def table(result: dict) -> str:
    split = result["eval_split"]
    lines = [f"| features | dim | probe | train | {split} |", "|---|---|---|---|---|",
             f"| chance (a colour of the scene) | - | - | {result['chance']['train']:.3f} | {result['chance'][split]:.3f} |"]
    for p in result["probes"]:
        kind = "linear, one per shape" if p["hidden"] == 0 else f"MLP {p['hidden']}"
        lines.append(f"| {p['features']} | {p['dim']} | {kind} | {p['train']:.3f} | {p[split]:.3f} |")
    rank = result.get("caption_ranking")
    if rank and rank.get("n"):
        lines += ["", f"CLIP similarity on the {rank['n']} two-object scenes of {split} (objects differing in colour "
                      "and shape): how often the true caption ranks above", ""]
        lines += [f"- {k[len('true above '):]}: {v:.3f}" for k, v in rank.items() if k.startswith("true above")]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", default="assets/checkpoints/shapes-clip", help="a CLIP folder (save_pretrained layout)")
    p.add_argument("--data-dir", default="data/shapes-aug", help="a shapes world (training.make_world)")
    p.add_argument("--split", default="test", help="the split the probes are scored on")
    p.add_argument("--features", default=",".join(FEATURES), help=f"comma-separated, of {FEATURES}")
    p.add_argument("--hidden", default="0,512", help="probe hidden widths, comma-separated (0: a linear map per shape)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the result as JSON here")
    a = p.parse_args(argv)
    try:
        hidden = tuple(int(h) for h in a.hidden.split(","))
    except ValueError:
        raise SystemExit(f"--hidden {a.hidden!r}: expected comma-separated widths such as 0,512") from None
    if a.epochs < 1 or any(h < 0 for h in hidden):
        raise SystemExit("--epochs must be >= 1 and --hidden widths >= 0")
    result = run(a.clip, a.data_dir, a.split, tuple(f.strip() for f in a.features.split(",")), hidden, a.epochs,
                 a.cache_dir or None, a.seed)
    print(table(result))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
