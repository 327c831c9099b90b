"""The public captioning API: image in, denoising trace out.

    cap = Captioner.from_pretrained("assets/checkpoints/shapes-diffusion-block")
    trace = cap.caption("scene.png", seed=0)                 # the checkpoint's own sampling defaults
    trace = cap.caption("scene.png", steps=20, sampler="ddim", guidance=5)   # any of them overridden
    trace.text, [(s.t, s.text) for s in trace.steps]

Sampling settings are a ``SamplingConfig`` (``sampling.py``): the checkpoint's defaults, stored in its
config.json's ``sampling`` section apart from the network's, updated by a call's keywords and validated
once. Choosing among candidates (K > 1) is the opt-in ``selection`` layer, loaded when a call asks for it.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Iterator

import torch

from . import checkpoint as ckpt
from .confidence import SPECIAL, Calibrator, decision_confidence
from .config import CaptionerConfig, ObjectiveConfig, split_objective
from .denoiser import Denoiser
from .diffusion import GaussianDiffusion, StepOutput
from .image_encoder import ImageEncoder
from .ood import FeatureDensity
from .pretrained import PretrainedCaptioner
from .rounding import round_to_tokens
from .samplers import make_sampler
from .sampling import SamplingConfig, native_bf16, split_legacy
from .schedule import NoiseSchedule
from .tokenizer import CaptionTokenizer
from .trace import DenoisingStep, Trace

FORMAT = "diffusion-caption/1"
RECORDS = ("all", "final")  # what a caption keeps: every step (the trace) or the last one only
AUTO_BF16_ROWS = 16  # precision="auto" samples in bfloat16 from this many images in a batch (``Captioner.bf16``)


class Captioner(PretrainedCaptioner):
    """A CLIP image encoder, a denoiser, its noise schedule and tokenizer, with sampling defaults."""
    FORMAT = FORMAT
    SECTIONS = ("captioner", "encoder_config", "image_encoder")
    KIND = "diffusion"

    def __init__(self, config: CaptionerConfig, denoiser: Denoiser, image_encoder: ImageEncoder,
                 tokenizer: CaptionTokenizer, device: str | torch.device = "cpu",
                 sampling: SamplingConfig | None = None, objective: ObjectiveConfig | None = None):
        self.config = config
        self.sampling = sampling or SamplingConfig()
        self.objective = objective or ObjectiveConfig()  # what it was trained with (a record; sampling ignores it)
        self.denoiser = self.network = denoiser.eval()
        self.image_encoder = image_encoder
        self._scorer = None  # another CLIP's text tower or a TextScorer to rank candidates; ``use_scorer``
        self._shared_vocab: tuple = (None, False)  # (scorer's text tokenizer, whether it has our vocabulary)
        self.tokenizer = tokenizer
        self.schedule = NoiseSchedule(config.schedule, config.T)
        self.diffusion = GaussianDiffusion(self.schedule, config.predict, config.self_cond)
        self._net = self.denoiser  # what sampling calls: the denoiser, or its compiled graph
        self._compile_options: dict | None = None  # Captioner.compile's, for the bfloat16 copy too
        self._bf16_net: tuple = (None, None)  # (the weights it was made from, the denoiser's bfloat16 copy)
        self.density: FeatureDensity | None = None  # how unlike the training images an input is (ood.py)
        self.calibrator: Calibrator | None = None  # a token's decision confidence -> P(right) (confidence.py)
        self.to(device)

    def to(self, device) -> "Captioner":
        super().to(device)
        if self._scorer is not None:
            self._scorer.to(self.device)
        return self

    def compile(self, **options) -> "Captioner":
        """Sample through ``torch.compile(denoiser, **options)``: the same results, less per-step overhead.

        The first call at each new input shape pays the compilation (seconds to minutes); sampling
        shapes are fixed apart from the batch, so a few graphs serve every call. Weights stay shared
        with ``self.denoiser``. A ``TextScorer`` set by ``use_scorer`` is compiled too (a copy of it),
        unless it is one that ``TextScorer.compile`` keeps eager.
        """
        self._net = torch.compile(self.denoiser, **options)
        self._compile_options, self._bf16_net = dict(options), (None, None)
        if self._scorer is not None:
            from .selection.candidates import compiled
            self._scorer = compiled(self._scorer, **options)
        return self

    # ---------------------------------------------------------------------------------------- files
    @property
    def scorer(self):
        """What ranks candidates under ``select="clip"``: the captioner's own CLIP unless ``use_scorer`` set
        another CLIP's text tower or a ``TextScorer``."""
        return self._scorer if self._scorer is not None else self.image_encoder

    def use_scorer(self, scorer) -> "Captioner":
        """Rank candidates (``select="clip"``) with something other than the captioner's own CLIP: a folder
        (a CLIP saved like the captioner's ``clip/``, or a text scorer saved by
        ``research.train_text_scorer``), an ``ImageEncoder`` or a ``TextScorer``; None restores the
        captioner's own. Either must read captions in the captioner's image-feature space
        (``selection.candidates.load_scorer`` says how that is checked)."""
        if scorer is None:
            self._scorer = None
            return self
        from .selection.candidates import load_scorer
        self._scorer = load_scorer(self, scorer, self.device)
        return self

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, device: str | torch.device = "cpu",
                        scorer: str | None = None, clip: str | None = None) -> "Captioner":
        """Load a checkpoint folder (or hub id). ``scorer`` (a folder) ranks candidates instead of the
        checkpoint's own ``sampling.scorer`` (a folder relative to the checkpoint's), or of its CLIP.
        ``clip`` loads the CLIP from another copy (``PretrainedCaptioner.load_image_encoder``)."""
        path, cfg_file, meta = cls.read_checkpoint(path_or_hub_id)
        # checkpoints written before the sampling and objective sections kept both inside the captioner's
        net, sampling = split_legacy(meta["captioner"])
        net, objective = split_objective(net)
        sampling.update(meta.get("sampling", {}))
        objective.update(meta.get("objective", {}))
        config = cls.read_config(CaptionerConfig, net, cfg_file, "captioner")
        sampling = cls.read_config(SamplingConfig, sampling, cfg_file, "sampling")
        objective = cls.read_config(ObjectiveConfig, objective, cfg_file, "objective")
        if sampling.steps > config.T:
            raise ckpt.CheckpointError(f"{cfg_file}: sampling steps {sampling.steps} exceed T={config.T}")
        try:
            tokenizer = CaptionTokenizer.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - the tokenizers parser raises KeyError, plain Exception ...
            raise ckpt.CheckpointError(f"{path}: tokenizer files unreadable: {type(e).__name__}: {e}") from None
        if tokenizer.vocab_size != config.vocab_size:
            raise ckpt.CheckpointError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but {cfg_file} "
                                       f"says vocab_size={config.vocab_size}")
        denoiser = ckpt.build_and_load(lambda: Denoiser(config, encoder_config=meta["encoder_config"]),
                                       os.path.join(path, ckpt.WEIGHTS_NAME), cfg_file)
        image_encoder = cls.load_image_encoder(meta, path, cfg_file, config.cond_dim, clip)
        if scorer is None and sampling.scorer:  # the checkpoint's own default scorer
            scorer = sampling.scorer if os.path.isabs(sampling.scorer) else os.path.join(path, sampling.scorer)
            if not os.path.isdir(scorer):
                raise ckpt.CheckpointError(f"{cfg_file}: its sampling scorer {sampling.scorer!r} is not a folder "
                                           f"({os.path.normpath(scorer)} not found); give scorer= to use another")
        cap = cls(config, denoiser, image_encoder, tokenizer, device, sampling, objective).use_scorer(scorer)
        if FeatureDensity.is_in(path):
            cap.density = FeatureDensity.load(path, image_encoder.feature_dim)
        if Calibrator.is_in(path):
            cap.calibrator = Calibrator.load(path)
        return cap

    def _sections(self) -> dict:
        return {"captioner": self.config.to_dict(), "objective": self.objective.to_dict(),
                "sampling": self.sampling.to_dict(), "encoder_config": self.denoiser.encoder_config}

    # ---------------------------------------------------------------------------------------- sampling
    def encode_and_assess(self, images: list) -> tuple[torch.Tensor, list[dict | None]]:
        """The images' [N, D] features, and for each how unlike the training images it is (``ood.py``; None
        for all when the checkpoint has no statistics), from one pass of the image tower."""
        if not images:
            raise ValueError("give at least one image (or precomputed features)")
        if self.density is None:
            features = self.encode_images(list(images))
            return features, [None] * features.shape[0]
        raw = self.image_encoder.encode(list(images), normalize=False)
        return torch.nn.functional.normalize(raw, dim=-1).to(self.device), self.density.assess(raw)

    def resolve(self, sampling: SamplingConfig | None = None, **overrides) -> SamplingConfig:
        """``sampling`` (default: the checkpoint's) with ``overrides``, checked against this checkpoint:
        a ValueError names the setting and its range."""
        T = self.config.T
        for name, low, what in (("steps", 1, "1"), ("early_stop", 0, "0 (off)")):  # the range needs T
            v = overrides.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer()
                                  or not low <= v <= T):
                raise ValueError(f"{name} must be an integer from {what} to {T}, got {v!r}")
        base = sampling or self.sampling
        if overrides.get("sampler") not in (None, "block") and overrides.get("commit") is None:
            base = base.replace(commit=0.0)  # the block sampler's threshold does not follow to another sampler
        s = base.replace(**overrides)
        if s.steps > T or s.early_stop > T:
            raise ValueError(f"steps and early_stop must be at most T = {T}, got {s.steps} and {s.early_stop}")
        if (s.sampler == "block") != bool(self.config.block_size):
            raise ValueError(f"this checkpoint's denoiser writes its caption a block of {self.config.block_size} "
                             f"positions at a time: it samples with the 'block' sampler only, not {s.sampler!r}"
                             if self.config.block_size else
                             "the 'block' sampler needs a denoiser trained with block_size > 0 (block diffusion); "
                             "this one denoises every position at once")
        if s.candidates > 1 and s.select == "clip" and self.scorer.text_tokenizer is None:
            raise ValueError("select='clip' ranks candidates by CLIP score, but this checkpoint's CLIP has no text "
                             "tokenizer (no tokenizer.json in its clip/ folder)")
        return s

    def bf16(self, sampling: SamplingConfig | None = None, rows: int = 1) -> bool:
        """Whether the network runs in bfloat16 (a bfloat16 copy of it) under ``sampling`` (default: the
        checkpoint's) for a batch of ``rows`` images: asked for, or ``"auto"`` on a device that multiplies bfloat16
        natively (``sampling.native_bf16``) and a batch of at least ``AUTO_BF16_ROWS`` images. Below that its
        products are too small to gain (the block sampler on 2 CPU cores, against float32: 0.85x the speed at
        batch 1, 1.0x at 8 to 16, 1.1x at 32 and 64)."""
        p = (sampling or self.sampling).precision
        return p == "bfloat16" or (p == "auto" and rows >= AUTO_BF16_ROWS and native_bf16(self.device))

    def _bfloat16(self) -> _BFloat16:
        """The network that sampling in bfloat16 calls: a bfloat16 copy of the denoiser, made again only when
        the denoiser's weights have changed since (training steps, ``load_state_dict``), compiled if
        ``compile`` was asked for."""
        key = tuple((p.data_ptr(), p._version) for p in self.denoiser.parameters())
        if self._bf16_net[0] != key:
            import copy
            net = copy.deepcopy(self.denoiser).to(torch.bfloat16).requires_grad_(False)
            if self._compile_options is not None:
                net = torch.compile(net, **self._compile_options)
            self._bf16_net = (key, net)
        return _BFloat16(self._bf16_net[1])

    def settings(self, seed: int = 0, sampling: SamplingConfig | None = None, rows: int | None = None,
                 **overrides) -> dict:
        """The settings of one run as a record (what ``Trace.settings`` holds): every sampling setting, the seed,
        checked. Given the batch's ``rows``, ``precision`` is what it resolves to for them on this device;
        without, "auto" stays "auto" (settings to pass on to a later call)."""
        _check_seed(seed)
        resolved = self.resolve(sampling, **overrides)
        s = resolved.to_dict()
        s.pop("scorer")
        if s["precision"] == "auto" and rows is not None:  # what it resolves to for this batch on this device
            s["precision"] = "bfloat16" if self.bf16(resolved, rows) else "float32"
        return {**s, "seed": seed}

    def _records(self, out: StepOutput, ids: torch.Tensor, conf: torch.Tensor) -> list[DenoisingStep]:
        """The records of the rows of ``out``, whose roundings are ``ids`` and ``conf``."""
        x_t, x0, ids = out.x_t.cpu().unbind(0), out.x0_pred.cpu().unbind(0), ids.tolist()
        return [DenoisingStep(index=out.index, t=out.t, x_t=a, x0_pred=b, token_ids=token_ids,
                              tokens=self.tokenizer.token_strings(token_ids), confidence=[round(c, 6) for c in cs],
                              text=text)
                for a, b, token_ids, cs, text in zip(x_t, x0, ids, conf.tolist(), self.tokenizer.decode_batch(ids))]

    def iter_caption_batch(self, images: list | None = None, *, features: torch.Tensor | None = None,
                           sampling: SamplingConfig | None = None, seed: int = 0, record: str = "all",
                           **overrides) -> Iterator[list[DenoisingStep | None]]:
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
        _check_seed(seed)
        s = self.resolve(sampling, **overrides)
        K = s.candidates
        if K > 1 and s.propose != "rounding":
            raise ValueError("choosing among several noise draws needs finished captions, so it cannot stream; "
                             "use caption_batch or caption (or candidates=1, or propose='rounding')")
        if K > 1:
            from .selection.candidates import choose_rounding
        features = self.features_of(images, features)
        B = features.shape[0]
        tok = self.tokenizer  # the samplers that read the caption's own ends
        ends = {"block": {"sep_id": tok.sep_id, "pad_id": tok.pad_id, "cls_id": tok.cls_id,
                          "commit": s.commit}}.get(s.sampler, {})
        smp = make_sampler(s.sampler, self.schedule, s.steps, s.spacing, **ends)
        n = len(smp.timesteps)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        E = self.denoiser.embeddings.detach()
        final: list[DenoisingStep | None] = [None] * B
        net = self._bfloat16() if self.bf16(s, B) else self._net
        for out in self.diffusion.sample_progressive(net, features, smp, self.config.seq_len,
                                                     guidance=s.guidance, clamp=s.clamp, generator=gen,
                                                     early_stop=s.early_stop):
            rows = range(B) if out.rows is None else out.rows.tolist()
            if out.done is not None:
                done = out.done.nonzero().flatten().tolist()
            else:
                done = list(range(len(rows))) if out.index == n - 1 else []
            if record == "all":
                ids, conf = round_to_tokens(out.x0_pred, E)
                batch: list[DenoisingStep | None] = [None] * B
                for b, step in zip(rows, self._records(out, ids, conf)):
                    batch[b] = step
                if K > 1 and done:
                    choose_rounding(self, batch, [rows[j] for j in done], features, K)
                yield batch
                continue
            if done:
                sel = torch.tensor(done, device=out.x0_pred.device)
                part = dataclasses.replace(out, x_t=out.x_t[sel], x0_pred=out.x0_pred[sel])
                ids, conf = round_to_tokens(part.x0_pred, E)
                for j, step in zip(done, self._records(part, ids, conf)):
                    final[rows[j]] = step
        if record == "final":
            if K > 1:
                choose_rounding(self, final, list(range(B)), features, K)
            yield final

    def iter_caption(self, image, **kw) -> Iterator[DenoisingStep]:
        """Yield the ``DenoisingStep`` of one image at every step, as it is computed (for streaming UIs)."""
        for batch in self.iter_caption_batch([image], **kw):
            yield batch[0]

    def caption_batch(self, images: list | None = None, *, features: torch.Tensor | None = None,
                      sampling: SamplingConfig | None = None, seed: int = 0, record: str = "all",
                      **overrides) -> list[Trace]:
        """One ``Trace`` per image, all images denoised together as one batch.

        Settings: ``sampling`` (default: the checkpoint's), any of its fields overridden by keyword
        (``steps``, ``sampler``, ``spacing``, ``guidance``, ``clamp``, ``early_stop``, ``candidates``,
        ``select``, ``propose``). ``record="final"`` keeps only each image's last step in its trace (the
        fast path, same caption); ``early_stop`` as in ``iter_caption_batch``. ``candidates = K > 1``:
        every image is denoised K times in the same batch (K different noise draws) and its trace is the
        one ``select`` keeps: the caption agreeing most with the other K-1 (``"mbr"``,
        ``selection.mbr``) or the one with the highest CLIP score (``"clip"``, ``selection.rerank``);
        ``Trace.candidates`` holds all K. With ``propose="rounding"`` the image is denoised once and the
        candidates are the K likeliest roundings of its last x0 prediction
        (``rounding.k_best_roundings``: each position its nearest or second-nearest token), the distinct
        ones kept, chosen among by CLIP score: a one-step captioner that all but ignores its noise gives
        few distinct captions over K draws, while its uncertain positions are exactly where the roundings
        differ. The trace's last step then holds the chosen tokens and each one's rounding probability.
        """
        t0 = time.perf_counter()
        s = self.resolve(sampling, **overrides)
        if features is None:
            features, ood = self.encode_and_assess(images)
        else:  # precomputed features carry no verdict: it reads the raw embeddings
            features = self.features_of(None, features)
            ood = [None] * features.shape[0]
        rows = features.shape[0] * (s.candidates if s.propose == "noise" else 1)
        settings = self.settings(seed, s, rows)
        if record != "all":
            settings["record"] = record
        if s.candidates > 1 and s.propose != "rounding":
            traces = self._caption_candidates(None, features, s, seed, record, settings, t0)
        else:
            per_image: list[list[DenoisingStep]] = [[] for _ in range(features.shape[0])]
            for batch in self.iter_caption_batch(features=features, sampling=s, seed=seed, record=record):
                for b, step in enumerate(batch):
                    if step is not None:
                        per_image[b].append(step)
            seconds = time.perf_counter() - t0
            traces = [Trace(steps, dict(settings), seconds, candidates=steps[-1].candidates, chosen=steps[-1].chosen)
                      for steps in per_image]
        for tr, verdict in zip(traces, ood):
            tr.ood = verdict
            self.calibrate(tr)
        return traces

    def calibrate(self, trace: Trace) -> Trace:
        """Fill ``trace.token_confidence`` (each final token's calibrated decision confidence; special tokens
        keep their raw rounding probability) and ``trace.caption_confidence`` (its least confident word's),
        when the checkpoint has a calibrator and the trace kept every step (``record="final"`` keeps no
        decision step); returns the trace."""
        if self.calibrator is None or not trace.steps or trace.settings.get("record", "all") != "all":
            return trace
        raw = decision_confidence(trace)
        cal = self.calibrator(raw)
        tokens = trace.final.tokens
        trace.token_confidence = [r if t in SPECIAL else c for t, r, c in zip(tokens, raw, cal)]
        words = [c for t, c in zip(tokens, cal) if t not in SPECIAL]
        trace.caption_confidence = min(words) if words else None
        return trace

    def _caption_candidates(self, images, features, s: SamplingConfig, seed: int, record: str, settings: dict,
                            t0: float) -> list[Trace]:
        """K noise draws of every image in one batch, one of them kept by MBR or by the scorer."""
        from .selection.candidates import choose_among_draws
        K = s.candidates
        features = self.features_of(images, features)
        samples = self.caption_batch(features=features.repeat_interleave(K, dim=0), sampling=s.replace(candidates=1),
                                     seed=seed, record=record)
        groups = [[tr.text for tr in samples[b * K:(b + 1) * K]] for b in range(features.shape[0])]
        chosen = choose_among_draws(self, features, groups, s.select)
        seconds = time.perf_counter() - t0
        return [Trace(samples[b * K + j].steps, dict(settings), seconds, candidates=texts, chosen=j)
                for b, (texts, j) in enumerate(zip(groups, chosen))]


class _BFloat16:
    """The denoiser's bfloat16 copy, called with float32 inputs and returning float32 predictions (the sampler's
    steps and the rounding stay float32). A copy in bfloat16 rather than autocast: autocast casts every
    layer's input at every call, which on small batches costs most of what bfloat16 matrix products save."""

    def __init__(self, net):
        self.net = net

    @property
    def embeddings(self) -> torch.Tensor:
        return self.net.embeddings

    @property
    def block_size(self) -> int:
        return self.net.block_size

    def __call__(self, *args):
        out, feature = self.net(*(_to_bf16(a) for a in args))
        return out.float(), None if feature is None else feature.float()

    def block_step(self, *args, **kw):
        out, cache = self.net.block_step(*(_to_bf16(a) for a in args), **kw)
        return out.float(), cache


def _to_bf16(x):
    return x.to(torch.bfloat16) if torch.is_tensor(x) and x.is_floating_point() else x


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
