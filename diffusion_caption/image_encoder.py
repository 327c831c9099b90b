"""The frozen CLIP image encoder, through open_clip.

Presets:
- ``base``: ViT-B-32 with OpenAI's weights (``ViT-B-32-quickgelu``, tag ``openai``; downloads when online), or any
  open_clip model with a tag or a local weights file (the training commands' ``--clip open_clip:MODEL:TAG_OR_FILE``).
- ``shapes``: a small open_clip CLIP trained from scratch on the shapes world (``training.train_clip``),
  saved as an open_clip ``local-dir:`` folder (open_clip_config.json + open_clip_model.safetensors) with
  the shapes tokenizer beside it.

Features are L2-normalised image embeddings, as the seed paper used. The text tower is kept too: with
the CLIP's own text tokenizer (saved in its folder, or open_clip's for a named model) ``encode_text``
gives caption embeddings in the same space, which is how candidate captions are ranked by CLIP score
(``diffusion_caption.selection.rerank``).
"""
from __future__ import annotations

import json
import os

import torch

from . import checkpoint as ckpt
from .images import load_image

CLIP_CONFIG = "open_clip_config.json"
CLIP_WEIGHTS = "open_clip_model.safetensors"
TEXT_TOKENIZER = "tokenizer.json"  # the CLIP's text tokenizer, beside its weights (optional)

# the shapes preset: a small ModifiedResNet (open_clip's RN50 design at width 16) on 64 x 64 renders, and a
# 3-layer text tower over the shapes WordPiece vocabulary. A ViT of the same cost learned colour at once but
# no shape beyond chance on uncorrelated backgrounds within the CPU budget: it read shape off the background.
SHAPES_CLIP_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 512, "width": 128, "heads": 4, "layers": 3,
                 "pool_type": "eos", "pad_id": 0, "eos_id": 3},
}
SHAPES_PREPROCESS_CFG = {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                         "interpolation": "bicubic", "resize_mode": "shortest"}
# the seed paper's CLIP: OpenAI's ViT-B/32 weights, whose architecture open_clip names ViT-B-32-quickgelu
BASE_MODEL, BASE_PRETRAINED = "ViT-B-32-quickgelu", "openai"


class ImageEncoder:
    """An open_clip model, frozen, with its preprocessing; ``encode(images)`` gives [N, D] unit vectors.

    ``text_tokenizer`` is the CLIP's own: a ``CaptionTokenizer`` (shapes preset), open_clip's tokenizer
    (a named model), or None when unknown, in which case ``encode_text`` refuses.
    """

    def __init__(self, model, preprocess, source: dict, device: str | torch.device = "cpu", text_tokenizer=None):
        self.model = model.eval().requires_grad_(False)
        self._tower_memo: tuple = (None, None)  # (the weights it was made from, the image tower as it runs)
        self.preprocess = preprocess
        self.source = source  # how to rebuild it: {"kind": "local-dir"|"open_clip", ...}
        self.device = torch.device(device)
        self.model.to(self.device)
        self.text_tokenizer = text_tokenizer

    @property
    def feature_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def image_size(self) -> int:
        size = getattr(self.model.visual, "image_size", None) or self.source.get("model_cfg", {}).get(
            "vision_cfg", {}).get("image_size", 224)
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def context_length(self) -> int:
        """How many token ids the text tower reads."""
        return int(self.model.context_length)

    def image_tower_fingerprint(self) -> str:
        """A hash of the image tower's weights and preprocessing: equal for two CLIPs whose image features
        are the same (a text scorer records the one it was trained against)."""
        import hashlib

        h = hashlib.sha1(json.dumps(self.source.get("preprocess_cfg", {}), sort_keys=True).encode())
        for k, v in sorted(self.model.visual.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().float().reshape(-1).numpy().tobytes())
        return h.hexdigest()[:16]

    def to(self, device) -> "ImageEncoder":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    # ---------------------------------------------------------------------------------------- building
    @classmethod
    def create_shapes(cls, vocab_size: int, eos_id: int, pad_id: int, context_length: int = 24,
                      device="cpu", text_tokenizer=None) -> "ImageEncoder":
        """A randomly initialised shapes-preset CLIP, ready for ``training.train_clip``."""
        import open_clip

        cfg = json.loads(json.dumps(SHAPES_CLIP_CFG))
        cfg["text_cfg"].update(vocab_size=vocab_size, eos_id=eos_id, pad_id=pad_id, context_length=context_length)
        model = open_clip.CLIP(**cfg)
        preprocess = open_clip.image_transform(SHAPES_PREPROCESS_CFG["size"], is_train=False,
                                               mean=SHAPES_PREPROCESS_CFG["mean"], std=SHAPES_PREPROCESS_CFG["std"],
                                               interpolation="bicubic", resize_mode="shortest")
        return cls(model, preprocess, {"kind": "local-dir", "model_cfg": cfg,
                                       "preprocess_cfg": SHAPES_PREPROCESS_CFG}, device, text_tokenizer)

    @classmethod
    def from_pretrained(cls, path: str, device="cpu") -> "ImageEncoder":
        """Load a CLIP folder saved by ``save_pretrained`` (open_clip's ``local-dir:`` layout)."""
        import open_clip

        cfg_path = os.path.join(path, CLIP_CONFIG)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"CLIP checkpoint directory not found: {path}")
        for f in (CLIP_CONFIG, CLIP_WEIGHTS):
            if not os.path.isfile(os.path.join(path, f)):
                raise FileNotFoundError(f"{os.path.join(path, f)}: missing from the CLIP checkpoint")
        cfg = ckpt.read_json(cfg_path)
        if not isinstance(cfg.get("model_cfg"), dict):
            raise ckpt.CheckpointError(f"{cfg_path}: no 'model_cfg' object (is this an open_clip folder?)")
        weights = os.path.join(path, CLIP_WEIGHTS)
        ckpt.read_header(weights)  # a truncated or corrupt file is named as such before open_clip reads it
        try:
            model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + os.path.abspath(path))
        except (RuntimeError, TypeError, KeyError, ValueError) as e:  # e.g. open_clip's load_state_dict mismatch
            raise ckpt.CheckpointError(f"{weights} does not match {cfg_path}: {type(e).__name__}: {e}") from None
        ckpt.check_matches(model, weights, cfg_path)  # open_clip casts dtypes and resizes position embeddings silently
        text_tokenizer = None
        if os.path.isfile(os.path.join(path, TEXT_TOKENIZER)):
            from .tokenizer import CaptionTokenizer
            text_tokenizer = CaptionTokenizer.from_pretrained(path)
        return cls(model, preprocess, {"kind": "local-dir", "model_cfg": cfg["model_cfg"],
                                       "preprocess_cfg": cfg.get("preprocess_cfg", {})}, device, text_tokenizer)

    @classmethod
    def from_open_clip(cls, model_name: str = BASE_MODEL, pretrained: str = BASE_PRETRAINED,
                       device="cpu") -> "ImageEncoder":
        """The ``base`` preset: an open_clip architecture with a pretrained tag or a local weights file."""
        import open_clip

        from . import hub

        try:  # before open_clip's minute of retries: a missing file, an unknown tag, an unreachable hub
            hub.require([hub.open_clip_need(model_name, pretrained)])
        except (OSError, ValueError) as e:
            raise RuntimeError(f"could not load open_clip {model_name!r} with pretrained={pretrained!r}: {e}") from None
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        except Exception as e:  # noqa: BLE001 - re-raised with the reason a person can act on
            hint = (f" This machine seems to be offline: give a local weights file (the training commands' --clip "
                    f"open_clip:{model_name}:FILE) or run where the hub is reachable.") if hub.looks_offline(e) else ""
            raise RuntimeError(f"could not load open_clip {model_name!r} with pretrained={pretrained!r}: "
                               f"{type(e).__name__}: {e}.{hint}") from None
        return cls(model, preprocess, {"kind": "open_clip", "model_name": model_name, "pretrained": pretrained}, device,
                   open_clip.get_tokenizer(model_name))

    @classmethod
    def load(cls, source: dict, base_dir: str | None = None, device="cpu") -> "ImageEncoder":
        """Rebuild from a ``source`` reference as stored in a captioner's config.json."""
        if source.get("kind") == "local-dir":
            path = source.get("path", "clip")
            if base_dir and not os.path.isabs(path):
                path = os.path.join(base_dir, path)
            return cls.from_pretrained(path, device)
        if source.get("kind") == "open_clip":
            return cls.from_open_clip(source["model_name"], source["pretrained"], device)
        raise ValueError(f"unknown image encoder source {source!r}")

    @classmethod
    def from_spec(cls, spec: str, device="cpu") -> "ImageEncoder":
        """A CLIP named as the commands name one: a CLIP folder, or ``open_clip:MODEL:TAG_OR_FILE`` (an
        open_clip architecture with a pretrained tag, or a local weights file)."""
        if spec.startswith("open_clip:"):
            parts = spec.split(":", 2)
            if len(parts) != 3 or not parts[1] or not parts[2]:
                raise ValueError(f"{spec!r} is not open_clip:MODEL:TAG_OR_FILE (e.g. open_clip:ViT-B-32-quickgelu:openai)")
            return cls.from_open_clip(parts[1], parts[2], device=device)
        return cls.from_pretrained(spec, device=device)

    def same_weights(self, other: "ImageEncoder") -> bool:
        """Whether two CLIPs hold the same tensors (both towers), name for name."""
        a, b = self.model.state_dict(), other.model.state_dict()
        return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k].cpu(), b[k].cpu()) for k in a)

    def save_with(self, tmp_dir: str, final_dir: str, reference: str | None = None) -> dict:
        """Store this CLIP for a captioner checkpoint being written in ``tmp_dir`` (to become ``final_dir``)
        and return the ``image_encoder`` entry of its config.json.

        A local CLIP is copied into ``clip/``, unless ``reference`` names a CLIP folder holding exactly these
        weights: then the checkpoint refers to it by a path relative to ``final_dir`` ("../shapes-clip"),
        so several checkpoints share one copy. A named open_clip model is referenced by name.
        """
        source = dict(self.source)
        if source.get("kind") != "local-dir":
            return source
        if reference:
            shared = ImageEncoder.from_pretrained(reference)
            if not self.same_weights(shared):
                raise ValueError(f"{reference} is not this captioner's CLIP (its weights differ); refer only to "
                                 "the CLIP the captioner was trained with")
            return {"kind": "local-dir", "path": os.path.relpath(os.path.abspath(reference), os.path.abspath(final_dir))}
        self.save_pretrained(os.path.join(tmp_dir, "clip"))
        return {"kind": "local-dir", "path": "clip"}

    def save_pretrained(self, path: str) -> None:
        from safetensors.torch import save_file

        if self.source.get("kind") != "local-dir":
            raise ValueError("only local-dir CLIP models are saved with the captioner; "
                             f"{self.source} is referenced by name instead")
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CLIP_CONFIG), "w") as f:
            json.dump({"model_cfg": self.source["model_cfg"], "preprocess_cfg": self.source["preprocess_cfg"]}, f, indent=2)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, os.path.join(path, CLIP_WEIGHTS))
        if self.text_tokenizer is not None and hasattr(self.text_tokenizer, "save_pretrained"):
            self.text_tokenizer.save_pretrained(path)

    # ---------------------------------------------------------------------------------------- encoding
    def pixels(self, images) -> torch.Tensor:
        """Preprocessed [N, 3, H, W] pixels for images given as PIL images, paths or arrays (channels-last in
        memory, as the tower runs). open_clip's evaluation transform (resize, centre crop, to tensor, normalise)
        runs on each group of same-sized images at once, as uint8 tensors: torchvision's antialiased uint8
        resize gives PIL's pixels to one level of 255 (exactly, on the shapes renders), at a fraction of the
        per-image cost. Any other transform runs per image."""
        loaded = [load_image(im) for im in images]
        steps = _batchable(self.preprocess)
        if steps is None or not loaded:
            out = torch.stack([self.preprocess(im) for im in loaded])
        else:
            out = torch.empty(0)
            by_size: dict[tuple[int, int], list[int]] = {}
            for i, im in enumerate(loaded):
                by_size.setdefault(im.size, []).append(i)
            for idx in by_size.values():
                x = _preprocess_batch([loaded[i] for i in idx], *steps)
                if not out.numel():
                    out = x.new_empty((len(loaded), *x.shape[1:]))
                out[idx] = x
        return out.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.tower()(pixels.to(self.device)).float()
        return torch.nn.functional.normalize(feats, dim=-1) if normalize else feats

    def tower(self) -> torch.nn.Module:
        """The image tower as encoding runs it. For a ModifiedResNet (the shapes CLIP): a copy of
        ``model.visual`` in channels-last memory, each batch norm folded into the convolution before it and the
        attention pool computing its one output query only (open_clip's computes all of them and keeps the
        first); the same features to float rounding, some 1.5 times faster on a CPU, and the checkpoint's own
        modules untouched (training and saving read those). Made again when their weights change. Any other
        tower runs as it is."""
        parts = list(self.model.visual.parameters()) + list(self.model.visual.buffers())
        key = tuple((t.data_ptr(), t._version, t.device) for t in parts)
        if self._tower_memo[0] != key:
            self._tower_memo = (key, _inference_tower(self.model.visual))
        return self._tower_memo[1]

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 512) -> torch.Tensor:
        """[N, D] L2-normalised embeddings of ``texts`` by the CLIP's text tower, in the image features' space."""
        if self.text_tokenizer is None:
            raise ValueError("this CLIP has no text tokenizer (its folder holds no tokenizer.json), so captions "
                             "cannot be scored against images; save the CLIP with its tokenizer")
        context = int(self.model.context_length)
        out = []
        for i in range(0, len(texts), batch_size):
            chunk = list(texts[i:i + batch_size])
            ids = (self.text_tokenizer.encode(chunk, context) if hasattr(self.text_tokenizer, "hf")
                   else self.text_tokenizer(chunk))  # a CaptionTokenizer, or open_clip's callable tokenizer
            out.append(torch.nn.functional.normalize(self.encode_text_ids(ids.to(self.device)).float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.feature_dim, device=self.device)

    @torch.no_grad()
    def encode_text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The text tower's (unnormalised) embeddings of token ids [N, context_length].

        A CLIP text tower with a causal mask that pools at the end-of-text token (open_clip's ``eos`` and
        ``argmax`` pooling) never lets a position see the ones after it, so the padding behind the batch's
        longest caption cannot change any pooled output: the pass runs over that many positions only
        (the first eos, or the argmax token, of every row), which for short captions in a 77-position
        context is most of the work. Any other tower runs open_clip's own ``encode_text`` unchanged.
        """
        from open_clip.transformer import text_global_pool

        m = self.model
        pool = getattr(m, "text_pool_type", None)
        mask = getattr(m, "attn_mask", None)
        if (pool not in ("eos", "argmax") or mask is None or getattr(m, "transformer", None) is None
                or ids.dim() != 2 or ids.shape[0] == 0):
            return m.encode_text(ids)
        eos = getattr(m, "text_eos_id", None)
        if pool == "eos":
            if eos is None:
                return m.encode_text(ids)
            end = (ids == eos).int().argmax(-1)
        else:
            end = ids.argmax(-1)
        n = int(end.max()) + 1
        ids = ids[:, :n]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(ids).to(cast) + m.positional_embedding[:n].to(cast)
        x = m.ln_final(m.transformer(x, attn_mask=mask[:n, :n]))
        x = text_global_pool(x, ids, pool, eos_token_id=eos)
        proj = m.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj

    def encode(self, images: list, batch_size: int = 64, normalize: bool = True) -> torch.Tensor:
        """[N, D] L2-normalised image features (``normalize=False``: the image tower's raw embeddings, whose
        length is part of what says how unlike the training images an input is; ``ood.py``)."""
        out = [self.encode_pixels(self.pixels(images[i:i + batch_size]), normalize)
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.feature_dim)


def _batchable(preprocess):
    """(resize, centre crop, normalise) of an open_clip evaluation transform (``Compose`` of Resize, CenterCrop,
    the RGB conversion, ToTensor and Normalize), which ``_preprocess_batch`` computes on tensors; None for any
    other transform."""
    from torchvision import transforms as T

    steps = getattr(preprocess, "transforms", None)
    if not isinstance(steps, list) or len(steps) != 5:
        return None
    resize, crop, convert, to_tensor, norm = steps
    if not (type(resize) is T.Resize and type(crop) is T.CenterCrop and isinstance(to_tensor, T.ToTensor)
            and type(norm) is T.Normalize and type(convert).__name__ == "MaybeConvertMode"
            and getattr(convert, "mode", None) == "RGB" and resize.antialias in (True, None)):
        return None
    return resize, crop, norm


def _preprocess_batch(images: list, resize, crop, norm) -> torch.Tensor:
    """``Compose([resize, crop, RGB, ToTensor, norm])`` of same-sized PIL images, as one uint8 batch."""
    import numpy as np
    from torchvision.transforms.v2 import functional as TF

    arrays = [np.asarray(im if im.mode == "RGB" else im.convert("RGB")) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [N, 3, H, W], uint8, channels-last in memory
    x = TF.resize(x, resize.size, interpolation=resize.interpolation, max_size=resize.max_size, antialias=True)
    x = TF.center_crop(x, list(crop.size))
    return TF.normalize(x.float().div_(255), list(norm.mean), list(norm.std))


def _inference_tower(visual: torch.nn.Module) -> torch.nn.Module:
    """``ImageEncoder.tower``'s copy of a ModifiedResNet image tower; any other tower (a ViT has no batch norm to
    fold) is used as it is, without a second copy in memory."""
    import copy

    from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if not isinstance(visual, ModifiedResNet):  # nothing to fold (a ViT): the tower itself, no second copy
        return visual
    tower = copy.deepcopy(visual).eval().requires_grad_(False)

    def fold(mods: dict, conv: str, bn: str) -> None:
        if isinstance(mods.get(conv), torch.nn.Conv2d) and isinstance(mods.get(bn), torch.nn.BatchNorm2d):
            mods[conv], mods[bn] = fuse_conv_bn_eval(mods[conv], mods[bn]), torch.nn.Identity()
    blocks = [tower] + [block for layer in (tower.layer1, tower.layer2, tower.layer3, tower.layer4)
                        for block in layer]
    for block in blocks:
        for i in (1, 2, 3):
            fold(block._modules, f"conv{i}", f"bn{i}")
        if getattr(block, "downsample", None) is not None:
            fold(block.downsample._modules, "0", "1")
    if isinstance(tower.attnpool, AttentionPool2d):
        tower.attnpool = _FirstQueryPool(tower.attnpool)
    return tower.to(memory_format=torch.channels_last)


class _FirstQueryPool(torch.nn.Module):
    """open_clip's ``AttentionPool2d`` with only its output query computed: the mean of the feature map
    attending to it and to every position (open_clip's attends from every position and keeps the first)."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool
        x = x.flatten(2).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + p.positional_embedding[:, None, :].to(x.dtype)
        out, _ = torch.nn.functional.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=p.num_heads,
            q_proj_weight=p.q_proj.weight, k_proj_weight=p.k_proj.weight, v_proj_weight=p.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([p.q_proj.bias, p.k_proj.bias, p.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=p.c_proj.weight,
            out_proj_bias=p.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
        return out[0]
