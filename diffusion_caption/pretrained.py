"""What the two captioners share: a checkpoint folder's reading, checking and writing, the CLIP image
encoder, images in and one caption per image out.

A checkpoint is ``config.json`` (a ``format`` line and named sections), ``model.safetensors``, the
tokenizer files, and the CLIP either in ``clip/``, referenced by a relative path (``../shapes-clip``) or by
an open_clip name. ``Captioner`` (diffusion) and ``BaselineCaptioner`` (ClipCap) fill in the sections and
the network; this class does the rest, once.
"""
from __future__ import annotations

import os

import torch

from . import checkpoint as ckpt
from .image_encoder import ImageEncoder


class PretrainedCaptioner:
    """Base of the captioners: ``network`` (an nn.Module), ``image_encoder``, ``tokenizer``, ``device``.

    A subclass sets ``FORMAT`` (its config.json format line), ``SECTIONS`` (the config.json sections it
    needs) and ``KIND`` (a name for messages), and implements ``_sections()`` (what ``save_pretrained``
    writes besides format and image encoder) and ``caption_batch``.
    """
    FORMAT = ""
    SECTIONS: tuple[str, ...] = ()
    KIND = "captioner"
    network: torch.nn.Module
    image_encoder: ImageEncoder

    def to(self, device):
        self.device = torch.device(device)
        self.network.to(self.device)
        self.image_encoder.to(self.device)
        return self

    # ---------------------------------------------------------------------------------------- files
    @classmethod
    def read_checkpoint(cls, path_or_hub_id: str) -> tuple[str, str, dict]:
        """The folder, its config.json's path and contents, with the format and every section checked."""
        path = ckpt.resolve(path_or_hub_id)
        cfg_file = os.path.join(path, ckpt.CONFIG_NAME)
        meta = ckpt.read_json(cfg_file)
        if meta.get("format") != cls.FORMAT:
            others = {sub.FORMAT: sub for sub in PretrainedCaptioner.__subclasses__() if sub is not cls}
            hint = (f" (a {others[meta.get('format')].KIND} checkpoint: load it with {others[meta.get('format')].__name__})"
                    if meta.get("format") in others else f" (is this a diffusion-caption {cls.KIND} checkpoint?)")
            raise ckpt.CheckpointError(f"{cfg_file}: format {meta.get('format')!r} is not {cls.FORMAT!r}{hint}")
        for key in cls.SECTIONS:
            if key not in meta:
                raise ckpt.CheckpointError(f"{cfg_file}: missing the {key!r} section")
        return path, cfg_file, meta

    @staticmethod
    def read_config(config_cls, section: dict, cfg_file: str, what: str):
        """``config_cls.from_dict(section)``, a bad value named as a CheckpointError."""
        try:
            return config_cls.from_dict(section, source=cfg_file)
        except (TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{cfg_file}: bad {what} config: {e}") from None

    @staticmethod
    def load_image_encoder(meta: dict, path: str, cfg_file: str, cond_dim: int, clip: str | None = None) -> ImageEncoder:
        """The checkpoint's CLIP, checked to give the features the network was trained on. ``clip`` (a CLIP
        folder or ``open_clip:MODEL:TAG_OR_FILE``) loads another copy of it instead of the one the checkpoint
        names: a local weights file for a checkpoint that refers to its CLIP by hub tag, say. Its
        architecture must be the recorded one."""
        source = meta["image_encoder"]
        try:
            if clip:
                image_encoder = ImageEncoder.from_spec(clip)
                want, got = source.get("model_name"), image_encoder.source.get("model_name")
                if want and got and want != got:
                    raise ValueError(f"--clip {clip} is a {got}, but the checkpoint was trained on features of a {want}")
            else:
                image_encoder = ImageEncoder.load(source, base_dir=path)
        except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
            hint = "" if clip else " (give another copy of it with clip=... / --clip)"
            raise ckpt.CheckpointError(f"{path}: image encoder: {e}{hint}") from None
        if image_encoder.feature_dim != cond_dim:
            raise ckpt.CheckpointError(f"{path}: the image encoder gives {image_encoder.feature_dim}-d features "
                                       f"but {cfg_file} says cond_dim={cond_dim}")
        return image_encoder

    def _sections(self) -> dict:
        raise NotImplementedError

    def save_pretrained(self, path: str, clip_reference: str | None = None) -> None:
        """Write config.json, model.safetensors, the tokenizer and (for local CLIPs) the CLIP in ``clip/``,
        or, with ``clip_reference`` (a folder holding this very CLIP), a relative reference to it instead."""
        with ckpt.atomic_directory(path) as tmp:
            source = self.image_encoder.save_with(tmp, path, clip_reference)
            meta = {"format": self.FORMAT, **self._sections(), "image_encoder": source}
            ckpt.write_json(os.path.join(tmp, ckpt.CONFIG_NAME), meta)
            ckpt.save_tensors(self.network.state_dict(), os.path.join(tmp, ckpt.WEIGHTS_NAME))
            self.tokenizer.save_pretrained(tmp)

    # ---------------------------------------------------------------------------------------- images
    def encode_images(self, images: list) -> torch.Tensor:
        return self.image_encoder.encode(images).to(self.device)

    def features_of(self, images: list | None, features: torch.Tensor | None) -> torch.Tensor:
        """The [N, D] image features to caption: ``features`` as given, or the CLIP's of ``images``."""
        if features is None:
            if not images:
                raise ValueError("give at least one image (or precomputed features)")
            features = self.encode_images(list(images))
        return features.to(self.device).float()

    def caption_batch(self, images: list | None = None, *, features: torch.Tensor | None = None, **settings) -> list:
        raise NotImplementedError

    def caption(self, image, **settings):
        """Caption one image (a path, PIL image, array or bytes); settings as ``caption_batch``'s."""
        return self.caption_batch([image], **settings)[0]
