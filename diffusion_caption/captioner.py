"""The public captioning API: image in, denoising trace out.

    cap = Captioner.from_pretrained("assets/checkpoints/shapes-diffusion")
    trace = cap.caption("scene.png", steps=20, sampler="ddim", seed=0)
    trace.text, [(s.t, s.text) for s in trace.steps]
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from typing import Iterator

import torch

from . import checkpoint as ckpt
from .config import PROPOSALS, SELECTIONS, CaptionerConfig
from .denoiser import Denoiser
from .diffusion import GaussianDiffusion, StepOutput
from .image_encoder import ImageEncoder
from .rounding import k_best_roundings, round_to_tokens, top2_log_probs
from .selection.mbr import mbr_select
from .selection.rerank import clip_scores, clip_select
from .samplers import SAMPLERS, make_sampler, spacing_power
from .schedule import NoiseSchedule
from .selection.text_scorer import TextScorer
from .tokenizer import CaptionTokenizer
from .trace import DenoisingStep, Trace

FORMAT = "diffusion-caption/1"
MAX_GUIDANCE = 20.0
MAX_CANDIDATES = 64  # samples per image to choose among (each is one more row in every network call)
# propose="rounding": a position whose second-nearest token is e^3 (20) times less likely than its nearest
# keeps its nearest; letting every position move lets CLIP pick captions that name what is not there
ROUNDING_MAX_DELTA = 3.0
RECORDS = ("all", "final")  # what a caption keeps: every step (the trace) or the last one only


class Captioner:
    """A CLIP image encoder, a denoiser, its noise schedule and tokenizer, with sampling settings."""

    def __init__(self, config: CaptionerConfig, denoiser: Denoiser, image_encoder: ImageEncoder,
                 tokenizer: CaptionTokenizer, device: str | torch.device = "cpu"):
        self.config = config
        self.denoiser = denoiser.eval()
        self.image_encoder = image_encoder
        self._scorer: ImageEncoder | None = None  # another CLIP's text tower to rank candidates; ``use_scorer``
        self._shared_vocab: tuple = (None, False)  # (scorer's text tokenizer, whether it has our vocabulary)
        self.tokenizer = tokenizer
        self.schedule = NoiseSchedule(config.schedule, config.T)
        self.diffusion = GaussianDiffusion(self.schedule, config.predict, config.self_cond)
        self._net = self.denoiser  # what sampling calls: the denoiser, or its compiled graph
        self.to(device)

    def to(self, device) -> "Captioner":
        self.device = torch.device(device)
        self.denoiser.to(self.device)
        self.image_encoder.to(self.device)
        if self._scorer is not None:
            self._scorer.to(self.device)
        return self

    def compile(self, **options) -> "Captioner":
        """Sample through ``torch.compile(denoiser, **options)``: the same results, less per-step overhead.

        The first call at each new input shape pays the compilation (seconds to minutes); sampling
        shapes are fixed apart from the batch, so a few graphs serve every call. Weights stay shared
        with ``self.denoiser``. A ``TextScorer`` set by ``use_scorer`` is compiled too (a copy of it, for
        dynamic shapes: the candidates' count and length change from batch to batch), unless it is one
        that ``TextScorer.compile`` keeps eager.
        """
        self._net = torch.compile(self.denoiser, **options)
        if isinstance(self._scorer, TextScorer):  # a copy, so that a captioner this one was copied from stays eager
            self._scorer = copy.copy(self._scorer).compile(**{k: v for k, v in options.items() if k != "dynamic"})
        return self

    # ---------------------------------------------------------------------------------------- files
    @property
    def scorer(self) -> "ImageEncoder | TextScorer":
        """What ranks candidates under ``select="clip"``: the captioner's own CLIP unless ``use_scorer`` set
        another CLIP's text tower or a ``TextScorer``."""
        return self._scorer if self._scorer is not None else self.image_encoder

    def use_scorer(self, scorer: "str | ImageEncoder | TextScorer | None") -> "Captioner":
        """Rank candidates (``select="clip"``) with something other than the captioner's own CLIP: a folder
        (a CLIP saved like the captioner's ``clip/``, or a text scorer saved by
        ``training.train_text_scorer``), an ``ImageEncoder`` or a ``TextScorer``; None restores the
        captioner's own. Either must read captions in the captioner's image-feature space, so it must
        belong to the same image tower: a CLIP's image tower must be the captioner's, tensor for tensor (a
        CLIP whose text tower alone was tuned, as ``training.tune_clip_text`` makes), and a text scorer
        must have been trained against it (the fingerprint it records).
        """
        if scorer is None:
            self._scorer = None
            return self
        source = scorer
        if isinstance(scorer, (str, os.PathLike)):
            try:
                if TextScorer.is_checkpoint(str(scorer)):
                    scorer = TextScorer.from_pretrained(str(scorer), self.device)
                else:
                    scorer = ImageEncoder.from_pretrained(str(scorer), self.device)
            except (OSError, RuntimeError, KeyError, TypeError) as e:  # a CheckpointError passes as it is
                raise ckpt.CheckpointError(f"scorer: {e}") from None
        if not isinstance(scorer, (ImageEncoder, TextScorer)):
            raise TypeError(f"scorer must be a folder, an ImageEncoder or a TextScorer, got {type(scorer).__name__}")
        if scorer.text_tokenizer is None:
            raise ValueError(f"scorer {source}: its CLIP has no text tokenizer (tokenizer.json beside its weights), "
                             "so it cannot read captions")
        if isinstance(scorer, TextScorer):
            own = self.image_encoder.image_tower_fingerprint()
            if scorer.config.image_tower != own:
                raise ValueError(f"scorer {source}: this text scorer was trained against the image tower "
                                 f"{scorer.config.image_tower or '(not recorded)'}, and this captioner's CLIP has "
                                 f"{own}; its scores would compare captions with image features of another space")
            if scorer.feature_dim != self.image_encoder.feature_dim:
                raise ValueError(f"scorer {source}: embeds captions in {scorer.feature_dim} dimensions, the "
                                 f"image features have {self.image_encoder.feature_dim}")
            self._scorer = scorer.to(self.device)
            return self
        own = self.image_encoder.model.visual.state_dict()
        theirs = scorer.model.visual.state_dict()
        differ = sorted(k for k in own.keys() | theirs.keys()
                        if k not in own or k not in theirs or own[k].shape != theirs[k].shape
                        or not torch.equal(own[k].cpu(), theirs[k].cpu()))
        if differ:
            raise ValueError(f"scorer {source}: its image tower differs from this captioner's CLIP in {len(differ)} "
                             f"tensors (first: {differ[0]}); a scorer must share the image tower, since the "
                             "captioner's image features are what it scores captions against")
        self._scorer = scorer.to(self.device)
        return self

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, device: str | torch.device = "cpu",
                        scorer: str | None = None) -> "Captioner":
        """Load a checkpoint folder (or hub id). ``scorer`` (a folder) ranks candidates instead of the
        checkpoint's own ``sample_scorer`` (a folder relative to the checkpoint's), or of its CLIP."""
        path = ckpt.resolve(path_or_hub_id)
        meta = ckpt.read_json(os.path.join(path, ckpt.CONFIG_NAME))
        cfg_file = os.path.join(path, ckpt.CONFIG_NAME)
        if meta.get("format") != FORMAT:
            raise ckpt.CheckpointError(f"{cfg_file}: format {meta.get('format')!r} is not {FORMAT!r} "
                                       "(is this a diffusion-caption checkpoint?)")
        for key in ("captioner", "encoder_config", "image_encoder"):
            if key not in meta:
                raise ckpt.CheckpointError(f"{cfg_file}: missing the {key!r} section")
        try:
            config = CaptionerConfig.from_dict(meta["captioner"], source=cfg_file)
        except (TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{cfg_file}: bad captioner config: {e}") from None
        try:
            tokenizer = CaptionTokenizer.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - the tokenizers parser raises KeyError, plain Exception ...
            raise ckpt.CheckpointError(f"{path}: tokenizer files unreadable: {type(e).__name__}: {e}") from None
        if tokenizer.vocab_size != config.vocab_size:
            raise ckpt.CheckpointError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but {cfg_file} "
                                       f"says vocab_size={config.vocab_size}")
        denoiser = ckpt.build_and_load(lambda: Denoiser(config, encoder_config=meta["encoder_config"]),
                                       os.path.join(path, ckpt.WEIGHTS_NAME), cfg_file)
        try:
            image_encoder = ImageEncoder.load(meta["image_encoder"], base_dir=path)
        except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"{path}: image encoder: {e}") from None
        if image_encoder.feature_dim != config.cond_dim:
            raise ckpt.CheckpointError(f"{path}: the image encoder gives {image_encoder.feature_dim}-d features "
                                       f"but {cfg_file} says cond_dim={config.cond_dim}")
        if scorer is None and config.sample_scorer:  # the checkpoint's own default scorer
            scorer = config.sample_scorer
            if not os.path.isabs(scorer):
                scorer = os.path.join(path, scorer)
            if not os.path.isdir(scorer):
                raise ckpt.CheckpointError(f"{cfg_file}: its sample_scorer {config.sample_scorer!r} is not a folder "
                                           f"({os.path.normpath(scorer)} not found); give scorer= to use another")
        return cls(config, denoiser, image_encoder, tokenizer, device).use_scorer(scorer)

    def save_pretrained(self, path: str, clip_reference: str | None = None) -> None:
        """Write config.json, model.safetensors, the tokenizer and (for local CLIPs) the CLIP in ``clip/``,
        or, with ``clip_reference`` (a folder holding this very CLIP), a relative reference to it instead."""
        with ckpt.atomic_directory(path) as tmp:
            source = self.image_encoder.save_with(tmp, path, clip_reference)
            meta = {"format": FORMAT, "captioner": self.config.to_dict(),
                    "encoder_config": self.denoiser.encoder_config, "image_encoder": source}
            ckpt.write_json(os.path.join(tmp, ckpt.CONFIG_NAME), meta)
            ckpt.save_tensors(self.denoiser.state_dict(), os.path.join(tmp, ckpt.WEIGHTS_NAME))
            self.tokenizer.save_pretrained(tmp)

    # ---------------------------------------------------------------------------------------- sampling
    def check_settings(self, steps, sampler, guidance, seed, clamp, early_stop=0, *, spacing=None,
                       candidates=None, select=None, propose=None) -> dict:
        """Validated sampling settings, or a ValueError naming the parameter and its range."""
        T = self.config.T
        steps = self.config.sample_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, (int, float)) or int(steps) != steps or not 1 <= steps <= T:
            raise ValueError(f"steps must be an integer from 1 to {T}, got {steps!r}")
        sampler = str(sampler or self.config.sampler).lower()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        guidance = self.config.sample_guidance if guidance is None else guidance
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
                or not 0.0 <= guidance <= MAX_GUIDANCE:
            raise ValueError(f"guidance must be a number from 0 to {MAX_GUIDANCE} (1 = no guidance), got {guidance!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        early_stop = 0 if early_stop is None else early_stop
        if isinstance(early_stop, bool) or not isinstance(early_stop, int) or not 0 <= early_stop <= T:
            raise ValueError(f"early_stop must be an integer from 0 (off) to {T}, got {early_stop!r}")
        clamp = self.config.sample_clamp if clamp is None else clamp
        if not isinstance(clamp, (bool, int)) or clamp not in (0, 1):
            raise ValueError(f"clamp must be true or false, got {clamp!r}")
        spacing = self.config.sample_spacing if spacing is None else spacing
        if not isinstance(spacing, str):
            raise ValueError(f"spacing must be 'linspace', 'trailing' or 'trailing^k', got {spacing!r}")
        spacing_power(spacing)  # raises with the accepted forms
        candidates = self.config.sample_candidates if candidates is None else candidates
        if isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= MAX_CANDIDATES:
            raise ValueError(f"candidates must be an integer from 1 (no MBR) to {MAX_CANDIDATES}, got {candidates!r}")
        select = self.config.sample_select if select is None else select
        if select not in SELECTIONS:
            raise ValueError(f"select must be one of {SELECTIONS} (how one of several candidates is kept), got {select!r}")
        if select == "clip" and self.scorer.text_tokenizer is None:
            raise ValueError("select='clip' ranks candidates by CLIP score, but this checkpoint's CLIP has no text "
                             "tokenizer (no tokenizer.json in its clip/ folder)")
        propose = self.config.sample_propose if propose is None else propose
        if propose not in PROPOSALS:
            raise ValueError(f"propose must be one of {PROPOSALS} (where the candidates come from), got {propose!r}")
        if propose == "rounding" and candidates > 1 and select != "clip":
            raise ValueError("propose='rounding' varies one draw's rounding, and the consensus of those variants "
                             "is the draw itself: choose among them with select='clip'")
        return {"steps": int(steps), "sampler": sampler, "guidance": float(guidance), "seed": seed,
                "clamp": bool(clamp), "early_stop": early_stop, "spacing": spacing.strip().lower(),
                "candidates": candidates, "select": select, "propose": propose}

    def encode_images(self, images: list) -> torch.Tensor:
        return self.image_encoder.encode(images).to(self.device)

    def _records(self, out: StepOutput, j: int, ids: torch.Tensor, conf: torch.Tensor) -> DenoisingStep:
        """The record of row ``j`` of ``out``, whose rounding is ``ids[j]``, ``conf[j]``."""
        token_ids = ids[j].tolist()
        return DenoisingStep(index=out.index, t=out.t, x_t=out.x_t[j].cpu(), x0_pred=out.x0_pred[j].cpu(),
                             token_ids=token_ids, tokens=self.tokenizer.token_strings(token_ids),
                             confidence=[round(float(c), 6) for c in conf[j].tolist()],
                             text=self.tokenizer.decode(token_ids))

    def iter_caption_batch(self, images: list | None = None, *, features: torch.Tensor | None = None,
                           steps: int | None = None, sampler: str | None = None, guidance: float | None = None,
                           seed: int = 0, clamp: bool | None = None, early_stop: int = 0,
                           record: str = "all", spacing: str | None = None,
                           candidates: int | None = None, select: str | None = None,
                           propose: str | None = None) -> Iterator[list[DenoisingStep | None]]:
        """Yield, at every denoising step, one ``DenoisingStep`` per image. Give images or their features.

        ``early_stop = k > 0``: an image stops once every position's rounded token has stayed the same
        over its last ``k`` steps; from then on its entry in the yielded lists is None, and the loop
        ends when every image has stopped. ``record="final"`` is the fast path: nothing is rounded,
        copied or decoded at the intermediate steps, and a single list comes out, each image's last step.
        With ``candidates = K > 1`` and ``propose="rounding"``, an image's last step is the best of the K
        likeliest roundings of its final x0 by the scorer, and lists the candidates and their scores.
        """
        if record not in RECORDS:
            raise ValueError(f"record must be one of {RECORDS}, got {record!r}")
        s = self.check_settings(steps, sampler, guidance, seed, clamp, early_stop, spacing=spacing,
                                candidates=candidates, select=select, propose=propose)
        K = s["candidates"]
        if K > 1 and s["propose"] != "rounding":
            raise ValueError("choosing among several noise draws needs finished captions, so it cannot stream; "
                             "use caption_batch or caption (or candidates=1, or propose='rounding')")
        if features is None:
            if not images:
                raise ValueError("give at least one image (or precomputed features)")
            features = self.encode_images(list(images))
        features = features.to(self.device).float()
        B = features.shape[0]
        smp = make_sampler(s["sampler"], self.schedule, s["steps"], s["spacing"],
                           **({"sep_id": self.tokenizer.sep_id} if s["sampler"] == "reveal" else {}))
        n = len(smp.timesteps)
        gen = torch.Generator(device=self.device).manual_seed(s["seed"])
        E = self.denoiser.embeddings.detach()
        final: list[DenoisingStep | None] = [None] * B
        for out in self.diffusion.sample_progressive(self._net, features, smp, self.config.seq_len,
                                                     guidance=s["guidance"], clamp=s["clamp"], generator=gen,
                                                     early_stop=s["early_stop"]):
            rows = range(B) if out.rows is None else out.rows.tolist()
            if out.done is not None:
                done = out.done.nonzero().flatten().tolist()
            else:
                done = list(range(len(rows))) if out.index == n - 1 else []
            if record == "all":
                ids, conf = round_to_tokens(out.x0_pred, E)
                batch: list[DenoisingStep | None] = [None] * B
                for j, b in enumerate(rows):
                    batch[b] = self._records(out, j, ids, conf)
                if K > 1 and done:
                    self._choose_rounding(batch, [rows[j] for j in done], features, K)
                yield batch
                continue
            if done:
                sel = torch.tensor(done, device=out.x0_pred.device)
                part = dataclasses.replace(out, x_t=out.x_t[sel], x0_pred=out.x0_pred[sel])
                ids, conf = round_to_tokens(part.x0_pred, E)
                for k, j in enumerate(done):
                    final[rows[j]] = self._records(part, k, ids, conf)
        if record == "final":
            if K > 1:
                self._choose_rounding(final, list(range(B)), features, K)
            yield final

    def _choose_rounding(self, batch: list[DenoisingStep | None], which: list[int], features: torch.Tensor,
                         k: int) -> None:
        """Replace the last steps ``batch[b]`` (b in ``which``) by the scorer's best of their ``k`` likeliest
        roundings, each step listing its distinct candidates and their scores (an image with a single
        distinct candidate keeps it unscored: there is nothing to choose)."""
        steps = [batch[b] for b in which]
        proposals = self._roundings(steps, k)
        many = [i for i, p in enumerate(proposals) if len(p[0]) > 1]
        scores: dict[int, list[float]] = {}
        if many:
            ids = self._scorer_ids([proposals[i][1] for i in many])
            feats = features[torch.tensor([which[i] for i in many], device=features.device)]
            for i, sc in zip(many, clip_scores(self.scorer, feats.to(self.scorer.device),
                                               [proposals[i][0] for i in many], ids)):
                scores[i] = [round(float(v), 6) for v in sc]
        for i, (b, st) in enumerate(zip(which, steps)):
            texts, roundings, top2 = proposals[i]
            sc = scores.get(i)
            j = 0 if sc is None else max(range(len(sc)), key=lambda q: (sc[q], -q))
            batch[b] = dataclasses.replace(self._rounded_step(st, roundings[j], texts[j], top2),
                                           candidates=list(texts), scores=sc, chosen=j)

    def iter_caption(self, image, **kw) -> Iterator[DenoisingStep]:
        """Yield the ``DenoisingStep`` of one image at every step, as it is computed (for streaming UIs)."""
        for batch in self.iter_caption_batch([image], **kw):
            yield batch[0]

    def caption_batch(self, images: list | None = None, *, features: torch.Tensor | None = None,
                      steps: int | None = None, sampler: str | None = None, guidance: float | None = None,
                      seed: int = 0, clamp: bool | None = None, early_stop: int = 0, record: str = "all",
                      spacing: str | None = None, candidates: int | None = None,
                      select: str | None = None, propose: str | None = None) -> list[Trace]:
        """One ``Trace`` per image, all images denoised together as one batch.

        ``record="final"`` keeps only each image's last step in its trace (the fast path, same caption);
        ``early_stop`` as in ``iter_caption_batch``. ``candidates = K > 1``: every image is denoised K
        times in the same batch (K different noise draws) and its trace is the one ``select`` keeps: the
        caption agreeing most with the other K-1 (``"mbr"``, ``diffusion_caption.selection.mbr``) or the one with the
        highest CLIP score (``"clip"``, ``diffusion_caption.selection.rerank``); ``Trace.candidates`` holds all K.
        With ``propose="rounding"`` the image is denoised once and the candidates are the K likeliest
        roundings of its last x0 prediction (``rounding.k_best_roundings``: each position its nearest
        or second-nearest token), the distinct ones kept, chosen among by CLIP score: a one-step
        captioner that all but ignores its noise gives few distinct captions over K draws, while its
        uncertain positions are exactly where the roundings differ. The trace's last step then holds
        the chosen tokens and each one's rounding probability.
        """
        t0 = time.perf_counter()
        settings = self.check_settings(steps, sampler, guidance, seed, clamp, early_stop, spacing=spacing,
                                       candidates=candidates, select=select, propose=propose)
        if settings["candidates"] > 1 and settings["propose"] != "rounding":
            return self._caption_candidates(images, features, settings, record, t0)
        n = len(images) if features is None else features.shape[0]
        per_image: list[list[DenoisingStep]] = [[] for _ in range(n)]
        for batch in self.iter_caption_batch(images, features=features, record=record, **settings):
            for b, step in enumerate(batch):
                if step is not None:
                    per_image[b].append(step)
        seconds = time.perf_counter() - t0
        if record != "all":
            settings["record"] = record
        return [Trace(steps, dict(settings), seconds, candidates=steps[-1].candidates, chosen=steps[-1].chosen)
                for steps in per_image]

    def _caption_candidates(self, images, features, settings: dict, record: str, t0: float) -> list[Trace]:
        """K noise draws of every image in one batch, one of them kept by MBR or by the scorer."""
        K = settings["candidates"]
        if features is None:
            if not images:
                raise ValueError("give at least one image (or precomputed features)")
            features = self.encode_images(list(images))
        one = dict(settings, candidates=1)
        samples = self.caption_batch(features=features.repeat_interleave(K, dim=0), record=record, **one)
        groups = [[tr.text for tr in samples[b * K:(b + 1) * K]] for b in range(features.shape[0])]
        if settings["select"] == "clip":
            chosen = clip_select(self.scorer, features.to(self.scorer.device), list(groups))
        else:
            chosen = [mbr_select(texts) for texts in groups]
        seconds = time.perf_counter() - t0
        s = dict(settings, **({"record": record} if record != "all" else {}))
        return [Trace(samples[b * K + j].steps, dict(s), seconds, candidates=texts, chosen=j)
                for b, (texts, j) in enumerate(zip(groups, chosen))]

    def _roundings(self, steps: list[DenoisingStep], k: int) -> list[tuple[list[str], list[list[int]], tuple]]:
        """For each step, the distinct captions among the ``k`` likeliest roundings of its ``x0_pred``
        (positions up to its caption's [SEP] may move), their token ids, best first, and the step's top-2
        rounding (log probabilities, ids) per position, from which a rounding's confidences are read. The rounding
        log probabilities of the whole batch come from one matrix product; two roundings whose words
        (the ids before [SEP], specials dropped) agree are one caption, so each distinct one is decoded once."""
        if not steps:
            return []
        E = self.denoiser.embeddings.detach().cpu()
        top = top2_log_probs(torch.stack([st.x0_pred for st in steps]).cpu(), E)
        values, indices = top.values.tolist(), top.indices.tolist()
        sep = self.tokenizer.sep_id
        kept = []  # per step, its roundings with distinct words
        for b, st in enumerate(steps):
            ids = st.token_ids
            n = ids.index(sep) + 1 if sep in ids else len(ids)
            seen, mine = set(), []
            for alt, _ in k_best_roundings(values[b], indices[b], k, positions=n, max_delta=ROUNDING_MAX_DELTA):
                key = tuple(self.tokenizer.words(alt))
                if key not in seen:
                    seen.add(key)
                    mine.append(alt)
            kept.append(mine)
        texts = iter(self.tokenizer.decode_batch([r for mine in kept for r in mine]))  # one call for the batch
        out = []
        for b, mine in enumerate(kept):
            first = {}
            for j, text in enumerate([next(texts) for _ in mine]):
                first.setdefault(text, j)
            out.append((list(first), [mine[j] for j in first.values()], (values[b], indices[b])))
        return out

    def _scorer_ids(self, roundings: list[list[list[int]]]) -> list[torch.Tensor] | None:
        """The candidate roundings in the scorer's token ids, when its tokenizer shares this captioner's
        vocabulary and the ids say exactly what tokenising the decoded captions would (``encode_ids``);
        otherwise None, and the captions are tokenised as text."""
        tok = self.scorer.text_tokenizer
        if self._shared_vocab[0] is not tok:  # asked once per scorer
            self._shared_vocab = (tok, self.tokenizer.same_vocabulary(tok))
        if not self._shared_vocab[1]:
            return None
        if not roundings:
            return []
        ids = tok.encode_ids([self.tokenizer.words(r) for group in roundings for r in group],
                             int(self.scorer.context_length))  # one tensor for the batch
        return None if ids is None else list(ids.split([len(group) for group in roundings]))

    def _rounded_step(self, step: DenoisingStep, ids: list[int], text: str, top2: tuple) -> DenoisingStep:
        """``step`` with its tokens replaced by the rounding ``ids`` and each one's rounding probability,
        read from ``top2`` (the step's per-position top-2 log probabilities and ids: a rounding takes each
        position's first or second token)."""
        if list(ids) == list(step.token_ids):
            return step
        values, indices = top2
        conf = [math.exp(v[0] if i == first[0] else v[1]) for i, v, first in zip(ids, values, indices)]
        return dataclasses.replace(step, token_ids=list(ids), tokens=self.tokenizer.token_strings(ids),
                                   confidence=[round(c, 6) for c in conf], text=text)

    def caption(self, image, steps: int | None = None, sampler: str | None = None, guidance: float | None = None,
                seed: int = 0, clamp: bool | None = None, early_stop: int = 0, record: str = "all",
                spacing: str | None = None, candidates: int | None = None, select: str | None = None,
                propose: str | None = None) -> Trace:
        """Caption one image (a path, PIL image, array or bytes); the trace holds every step."""
        return self.caption_batch([image], steps=steps, sampler=sampler, guidance=guidance, seed=seed,
                                  clamp=clamp, early_stop=early_stop, record=record, spacing=spacing,
                                  candidates=candidates, select=select, propose=propose)[0]
