"""Diffusion-LM on token embeddings: the training loss and the progressive sampling loop.

The network is anything with the signature ``model(x_t, t, cond, drop_cond) -> (prediction, feature)``
and an ``embeddings`` table; the schedule and the sampler are separate objects, so any sampler runs any
trained model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from .config import ObjectiveConfig
from .denoiser import Denoiser
from .rounding import clamp_to_embeddings, token_logits
from .samplers import BlockSampler, Sampler, spaced_timesteps
from .schedule import NoiseSchedule


@dataclass
class StepOutput:
    """What the sampling loop produces at each step, for the rows of the batch still being denoised."""
    index: int
    t: int
    x_t: torch.Tensor  # [B', L, d] input of this step
    x0_pred: torch.Tensor  # [B', L, d] predicted clean embeddings (after guidance, before clamping)
    # with early stopping only (otherwise None: all B rows, in order, until the last timestep):
    rows: torch.Tensor | None = None  # [B'] which rows of the batch these are
    done: torch.Tensor | None = None  # [B'] bool: the row's last step (its tokens converged, or the last timestep)
    token_ids: torch.Tensor | None = None  # [B', L] nearest token of each position of x0_pred


class GaussianDiffusion:
    def __init__(self, schedule: NoiseSchedule, predict: str = "x0", self_cond: bool = False):
        self.schedule = schedule
        self.predict = predict
        self.self_cond = self_cond  # the network reads its previous x0 estimate (``Denoiser``'s x_self_cond)

    def _x0(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x0 estimate from the network's output (itself, or derived from a predicted eps)."""
        out = out.float()
        return out if self.predict == "x0" else self.schedule.predict_start_from_noise(x_t, t, out)

    # ------------------------------------------------------------------------------------------ training
    def training_losses(self, model, tokens: torch.Tensor, cond: torch.Tensor, objective: ObjectiveConfig | None = None,
                        generator: torch.Generator | None = None, pad_id: int | None = None,
                        t_focus: list[int] | None = None, **overrides) -> dict[str, torch.Tensor]:
        """Losses for a batch of token ids [B, L] and image features [B, D] under ``objective`` (default:
        ``ObjectiveConfig.plain()``; keyword ``overrides`` change its fields for this call; ``t_focus``, when
        given, replaces the focus timesteps it would draw from its ``focus_steps``).

        x_0 = E(w) (Diffusion-LM's embedding step, with its small N(0, 1 - alpha_bar_0) jitter);
        x_t ~ q(x_t | x_0) at uniform t (with ``t_focus``, a fraction ``p_focus`` of the batch at one of
        those timesteps instead: the ones a few-step sampler visits). With ``p_unroll`` (and at least two
        focus timesteps), that fraction of the batch sits instead at the sampler's second timestep t_1, and
        its x_t is not drawn from q(x_t | x_0) but made as the sampler makes it: the network's own x0 from
        pure noise at t_0 (no gradient), then one DDIM step to t_1. The network so learns to correct its
        own first draft, not only a noisy copy of the truth (step-unrolled training, as in SUNDAE, Savinov
        et al. 2022). A self-conditioned network (``self_cond``) also reads an x0 estimate: for a fraction
        ``p_self_cond`` of the batch its own, from a first gradient-free pass on the same x_t (Chen et al.
        2022), for unrolled rows the first step's, as the sampler gives it, and zeros for the rest. ``mse``
        is ||x0_hat - E(w)||^2 (or the eps error with ``predict="eps"``), ``round`` the cross-entropy
        -log p(w | x0_hat) of the tied rounding head (weighted by alpha_bar_t with ``predict="eps"``),
        ``prior`` keeps ||sqrt(alpha_bar_T) E(w)||^2 small, ``feature`` is 1 - cos between the predicted
        and the true image feature. ``loss`` = mse + prior + lambda_round * round + lambda_feature * feature.
        """
        o = dataclasses.replace(objective or ObjectiveConfig.plain(), **overrides)
        net = getattr(model, "module", model)
        if getattr(getattr(net, "cfg", None), "block_size", 0):
            return self._block_losses(model, tokens, cond, o, generator)
        if t_focus is None and o.focus_steps:
            t_focus = spaced_timesteps(self.schedule.T, o.focus_steps, o.focus_spacing)
        lambda_round, lambda_feature, p_uncond, p_focus = o.lambda_round, o.lambda_feature, o.p_uncond, o.p_focus
        p_unroll, focus_spacing, p_self_cond = o.p_unroll, o.focus_spacing, o.p_self_cond
        B, L = tokens.shape
        dev = tokens.device
        E = getattr(model, "module", model).embeddings  # the table itself, also under DistributedDataParallel
        x_start_mean = E[tokens]
        sched = self.schedule
        std0 = float(sched.sqrt_one_minus_alphas_cumprod[0])
        noise0 = torch.randn(x_start_mean.shape, generator=generator, device=dev)
        x_start = x_start_mean + std0 * noise0
        t = torch.randint(0, sched.T, (B,), generator=generator, device=dev)
        if t_focus and p_focus > 0:
            focus = torch.as_tensor(t_focus, device=dev)
            pick = focus[torch.randint(0, len(focus), (B,), generator=generator, device=dev)]
            t = torch.where(torch.rand(B, generator=generator, device=dev) < p_focus, pick, t)
        noise = torch.randn(x_start.shape, generator=generator, device=dev)
        x_t = sched.q_sample(x_start, t, noise)
        drop = (torch.rand(B, generator=generator, device=dev) < p_uncond) if p_uncond > 0 else None
        x_sc = torch.zeros_like(x_t) if self.self_cond else None
        if p_unroll > 0:
            if not t_focus or len(t_focus) < 2:
                raise ValueError("p_unroll needs at least two focus timesteps: it trains the sampler's second step")
            unroll = torch.rand(B, generator=generator, device=dev) < p_unroll
            if bool(unroll.any()):
                x_t, t, x0_first = self._unrolled(model, x_t, t, cond, drop, unroll, t_focus, focus_spacing, generator)
                if x_sc is not None:
                    x_sc = torch.where(unroll[:, None, None], x0_first.to(x_sc.dtype), x_sc)
        if x_sc is not None and p_self_cond > 0:
            rows = torch.rand(B, generator=generator, device=dev) < p_self_cond
            if p_unroll > 0:
                rows = rows & ~unroll
            idx = rows.nonzero().flatten()
            if idx.numel():
                with torch.no_grad():
                    net = getattr(model, "module", model)  # the gradient-free pass needs no DDP bookkeeping
                    first, _ = net(x_t[idx], t[idx], cond[idx], drop[idx] if drop is not None else None)
                    x_sc[idx] = self._x0(first, x_t[idx], t[idx]).to(x_sc.dtype)
        out, feature = model(x_t, t, cond, drop) if x_sc is None else model(x_t, t, cond, drop, x_sc)
        out = out.float()
        if self.predict == "x0":
            x0_hat = out
            mse = (out - x_start_mean).pow(2).mean()
        else:
            x0_hat = sched.predict_start_from_noise(x_t, t, out)
            mse = (out - noise).pow(2).mean()
        logits = token_logits(x0_hat, E.float())
        ce = F.cross_entropy(logits.reshape(B * L, -1), tokens.reshape(-1), reduction="none").view(B, L).mean(1)
        if self.predict == "eps":
            # x0 from an eps prediction carries eps's error times sqrt((1 - alpha_bar) / alpha_bar):
            # weighting by alpha_bar_t keeps the noisiest steps from swamping the loss
            ce = ce * sched.alphas_cumprod.to(dev)[t].float()
        round_ce = ce.mean()
        t_last = torch.full((B,), sched.T - 1, device=dev, dtype=torch.long)
        prior = sched.q_mean_variance(x_start_mean, t_last)[0].pow(2).mean()
        losses = {"mse": mse, "round": round_ce, "prior": prior}
        loss = mse + prior + lambda_round * round_ce
        if feature is not None:
            feat_loss = 1 - F.cosine_similarity(feature.float(), cond.float(), dim=-1).mean()
            losses["feature"] = feat_loss
            loss = loss + lambda_feature * feat_loss
        with torch.no_grad():
            losses["token_acc"] = (logits.argmax(-1) == tokens).float().mean()
        losses["loss"] = loss
        return losses

    def _block_losses(self, model, tokens, cond, o: ObjectiveConfig, generator) -> dict[str, torch.Tensor]:
        """``training_losses`` of a block denoiser (``Denoiser.forward_blocks``): every position pure noise
        at T-1 beside the clean caption, each block predicted from the clean blocks before it, all blocks
        of every caption in one pass; mse + prior + lambda_round * round over every position."""
        B, L = tokens.shape
        dev = tokens.device
        net = getattr(model, "module", model)
        E = net.embeddings
        x_start_mean = E[tokens]
        sched = self.schedule
        t = torch.full((B, L), sched.T - 1, device=dev, dtype=torch.long)
        noise = torch.randn(x_start_mean.shape, generator=generator, device=dev)
        x_t = sched.q_sample(x_start_mean, t, noise)
        drop = (torch.rand(B, generator=generator, device=dev) < o.p_uncond) if o.p_uncond > 0 else None
        fwd = net.forward_blocks  # (under DistributedDataParallel this bypasses its gradient hooks: CPU and one GPU only)
        blocks = (net.random_block_ids(B, L, o.p_block_split, generator, dev) if o.p_block_split > 0 else None)
        out, _ = fwd(x_t, t, x_start_mean, cond, drop, blocks)
        x0_hat = out.float()
        mse = (x0_hat - x_start_mean).pow(2).mean()
        logits = token_logits(x0_hat, E.float())
        round_ce = F.cross_entropy(logits.reshape(B * L, -1), tokens.reshape(-1))
        t_last = torch.full((B,), sched.T - 1, device=dev, dtype=torch.long)
        prior = sched.q_mean_variance(x_start_mean, t_last)[0].pow(2).mean()
        loss = mse + prior + o.lambda_round * round_ce
        with torch.no_grad():
            acc = (logits.argmax(-1) == tokens).float().mean()
        return {"mse": mse, "round": round_ce, "prior": prior, "token_acc": acc, "loss": loss}

    @torch.no_grad()
    def _unrolled(self, model, x_t, t, cond, drop, rows, t_focus, spacing, generator):
        """``x_t`` and ``t`` with the ``rows`` replaced by one DDIM step of the network's own prediction
        from pure noise at ``t_focus[0]`` to ``t_focus[1]`` (see ``training_losses``), and that prediction
        (zeros outside ``rows``)."""
        from .samplers import DDIMSampler

        t0, t1 = int(t_focus[0]), int(t_focus[1])
        sampler = DDIMSampler(self.schedule, len(t_focus), spacing)
        if list(sampler.timesteps) != [int(v) for v in t_focus]:
            raise ValueError(f"focus timesteps {list(t_focus)} are not those of {len(t_focus)} steps with {spacing!r}")
        idx = rows.nonzero().flatten()
        n = idx.numel()
        x_T = torch.randn((n,) + tuple(x_t.shape[1:]), generator=generator, device=x_t.device)
        tt = torch.full((n,), t0, device=x_t.device, dtype=torch.long)
        d = drop[idx] if drop is not None else None
        out, _ = getattr(model, "module", model)(x_T, tt, cond[idx], d)
        x0 = self._x0(out, x_T, tt)
        x_t = x_t.clone()
        x_t[idx] = sampler.step(x0, t0, x_T).prev_sample.to(x_t.dtype)
        x0_all = torch.zeros(x_t.shape, device=x_t.device)
        x0_all[idx] = x0
        return x_t, torch.where(rows, torch.full_like(t, t1), t), x0_all

    # ------------------------------------------------------------------------------------------ sampling
    def predict_x0(self, model, x_t: torch.Tensor, t: int, cond: torch.Tensor,
                   guidance: float = 1.0, x_self_cond: torch.Tensor | None = None) -> torch.Tensor:
        """The network's x0 at one timestep, with classifier-free guidance when ``guidance != 1``.

        Guided: x0 = x0_uncond + guidance * (x0_cond - x0_uncond), both passes batched as one forward
        (and both reading the same ``x_self_cond``, the previous guided estimate, when the network
        is self-conditioned).
        """
        B = x_t.shape[0]
        tt = t if torch.is_tensor(t) else torch.full((B,), t, device=x_t.device, dtype=torch.long)
        sc = () if x_self_cond is None else (x_self_cond,)
        if guidance == 1.0:
            out, _ = model(x_t, tt, cond, None, *sc)
        else:
            drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x_t.device)
            sc = tuple(torch.cat([v, v]) for v in sc)
            both, _ = model(torch.cat([x_t, x_t]), torch.cat([tt, tt]), torch.cat([cond, cond]), drop, *sc)
            out_c, out_u = both[:B], both[B:]
            out = out_u + guidance * (out_c - out_u)
        return self._x0(out, x_t, tt)

    @torch.no_grad()
    def sample_progressive(self, model, cond: torch.Tensor, sampler: Sampler, seq_len: int,
                           guidance: float = 1.0, clamp: bool = False, generator: torch.Generator | None = None,
                           x_T: torch.Tensor | None = None, early_stop: int = 0) -> Iterator[StepOutput]:
        """Yield one ``StepOutput`` per sampler timestep, from pure noise to the final prediction.

        ``early_stop = k > 0`` stops a row once the nearest token of every position of its x0 prediction
        has stayed the same over the last ``k`` steps: that step is its last (``done``), and the row
        leaves the batch, so later steps compute only the rows still changing (``rows`` says which).
        A row's result does not depend on the other rows (with DDIM; DDPM's noise is drawn per batch).
        """
        if early_stop < 0:
            raise ValueError(f"early_stop must be >= 0 (0 = off), got {early_stop}")
        B = cond.shape[0]
        E = model.embeddings.detach().float()
        if x_T is None:
            x_T = torch.randn((B, seq_len, E.shape[1]), generator=generator, device=cond.device)
        x = x_T.float()
        n = len(sampler.timesteps)
        rows = torch.arange(B, device=cond.device) if early_stop else None
        prev_ids = stable = None
        if early_stop:  # nearest token = argmax of 2 x.E_v - ||E_v||^2, the table's norms computed once
            E_t, E_sq = E.T.contiguous(), E.pow(2).sum(-1)
        if isinstance(sampler, BlockSampler):
            if early_stop or guidance != 1.0:
                raise ValueError("the block sampler ends each caption at its [SEP] and has no guidance: "
                                 "use early_stop=0 and guidance=1")
            yield from self._sample_blocks(model, cond, sampler, x, E)
            return
        x0 = None  # the previous step's estimate, which a self-conditioned network reads
        for i, t in enumerate(sampler.timesteps):
            x0 = self.predict_x0(model, x, t, cond, guidance, x0 if self.self_cond and x0 is not None else None)
            if not early_stop:
                yield StepOutput(i, t, x, x0)
            else:
                ids = (2 * x0 @ E_t - E_sq).argmax(-1)  # round_to_tokens' rounding, without its softmax
                if prev_ids is None:
                    stable = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
                else:
                    stable = torch.where((ids == prev_ids).all(-1), stable + 1, torch.zeros_like(stable))
                done = stable >= early_stop
                if i == n - 1:
                    done = torch.ones_like(done)
                yield StepOutput(i, t, x, x0, rows, done, ids)
                if i == n - 1:
                    return
                if bool(done.any()):
                    keep = ~done
                    if not bool(keep.any()):
                        return
                    x, x0, cond, rows, ids, stable = (v[keep] for v in (x, x0, cond, rows, ids, stable))
                prev_ids = ids
            x0_used = clamp_to_embeddings(x0, E) if clamp else x0
            x = sampler.step(x0_used, t, x, generator).prev_sample

    def _sample_blocks(self, model, cond, sampler: BlockSampler, x, E):
        """``sample_progressive`` for the block sampler: [CLS] is given at position 0, then each step predicts
        the next block (``block_size`` positions) from pure noise given the clean positions before it (cached
        in the network) and reveals it as its rounded tokens' embeddings: all of it, or with
        ``sampler.commit`` = c > 0 its positions up to the second one rounded with probability < c (the rest is
        predicted again as the next step's block, which ends where the fixed block does, so blocks never
        straddle two fixed ones), until a caption has revealed ``BlockSampler.MAX_SHORT`` blocks short, and
        whole blocks after that; with ``BlockSampler.VERIFY`` the step that finishes such a rest also predicts
        the next fixed block from the rest's guesses, in a second row, and takes it where they are confirmed.
        Each step's x0 is the caption so
        far: the revealed positions as predicted when revealed, the block's unrevealed guesses, and [PAD]'s
        embedding after them. A row is done at the step that reveals its [SEP] (or the last position), and at
        the last step reveals all its block."""
        B, L, d = x.shape
        b = model.block_size
        T = self.schedule.T
        c = float(getattr(sampler, "commit", 0.0))
        n = len(sampler.timesteps) if c > 0 else min(len(sampler.timesteps), -(-(L - 1) // b))
        dev = x.device
        pad_id = sampler.pad_id if sampler.pad_id is not None else 0
        cls = sampler.cls_id if sampler.cls_id is not None else 0
        sep_id = sampler.sep_id if sampler.sep_id is not None else -1
        # rounding's logits up to a per-position constant (the softmax and the nearest token are the same):
        # 2 x.E_v - ||E_v||^2, one matrix product
        E2t, E_sq = 2 * E.T, -E.pow(2).sum(-1)
        # what each step shows, one scratch column L past the end taking the writes that show nothing:
        # the network's input (revealed embeddings, noise elsewhere), the caption so far (x0: revealed positions
        # as predicted when revealed, the block's guesses, [PAD]'s embedding after) and its tokens
        x_in = torch.cat([x[:, :L], x[:, :1]], 1)
        x_in[:, 0] = E[cls]
        x0 = (E[sampler.pad_id] if sampler.pad_id is not None else torch.zeros_like(E[0])).repeat(B, L + 1, 1)
        x0[:, 0] = E[cls]
        ids_all = torch.full((B, L + 1), pad_id, dtype=torch.long, device=dev)
        ids_all[:, 0] = cls
        x = torch.cat([x, x[:, -1:].expand(B, b, d)], 1)  # noise for blocks running past the end (never revealed)
        # each block start position's room: the positions left in its fixed block and in the caption
        at = torch.arange(L + b, device=dev)
        room = torch.minimum(b - (at - 1) % b, (L - at).clamp(min=0))
        offs = torch.arange(b, device=dev)
        rows = torch.arange(B, device=dev)
        start = torch.ones(B, dtype=torch.long, device=dev)  # each row's first unrevealed position
        cache, clean, clean_start, clean_valid = None, E[cls].expand(B, 1, -1), start - 1, None
        short = torch.zeros(B, dtype=torch.long, device=dev)  # how many blocks each row has revealed short

        def reveal(unsure, inside, short):  # how many leading positions: up to the second unsure one (any, once
            # a caption has cut MAX_SHORT blocks short)
            unsure = unsure & (short < sampler.MAX_SHORT)[:, None] & inside
            return ((unsure.cumsum(1) <= 1) & inside).sum(1)

        def show(r, win, inside, pred, ids, k):  # a block's outcome into the trace's rows r (None: all of them);
            # returns its revealed positions and whether they hold a [SEP] (nothing after it is shown)
            revealed = offs[:win.shape[1]] < k[:, None]
            sep = (ids == sep_id) & revealed
            shown = inside & (sep.cumsum(-1) <= sep)
            to = lambda m: torch.where(m, win, L)  # noqa: E731
            out = (x0, ids_all, x_in) if r is None else (x0[r], ids_all[r], x_in[r])
            out[0].scatter_(1, to(shown)[..., None].expand(-1, -1, d), pred)
            out[1].scatter_(1, to(inside), torch.where(shown, ids, pad_id))
            out[2].scatter_(1, to(revealed & shown)[..., None].expand(-1, -1, d), E[ids])
            if r is not None:
                x0[r], ids_all[r], x_in[r] = out
            return revealed, sep.any(-1)

        inside_prev = None  # each row's last block: its positions inside the caption
        for i in range(n):
            last = i == n - 1
            R = len(start)
            win = start[:, None] + offs  # [B, b]: this step's block, up to the end of its fixed block
            inside = offs < room[start][:, None]
            x_blk = x.gather(1, win[..., None].expand(-1, -1, d))
            spec = None  # the rows that finish a fixed block cut short, and so also guess the next one
            if c > 0 and sampler.VERIFY and not last:
                nxt = start + room[start]
                spec = (((start - 1) % b != 0) & (nxt < L)).nonzero().squeeze(1)
                spec = spec if len(spec) else None
            if spec is not None:
                # a second row for each of them predicts the next fixed block as if the rest of this one were
                # revealed as the last step guessed it (a block of its own after the revealed part); where the
                # guess is confirmed, that is exactly the next step's prediction, so the row takes it now
                guess = ids_all.gather(1, win.clamp(max=L))
                s_start = nxt[spec]
                s_win = s_start[:, None] + offs
                s_inside = offs < room[s_start][:, None]
                two = lambda u, v: torch.cat([u, v])  # noqa: E731
                cache = Denoiser.keep_rows(cache, two(torch.arange(R, device=dev), spec))
                pred, cache = model.block_step(
                    two(x_blk, x[spec].gather(1, s_win[..., None].expand(-1, -1, d))), T - 1, two(start, s_start),
                    cond, cache, two(clean, clean[spec]), clean_start=two(clean_start, clean_start[spec]),
                    clean_valid=two(clean_valid, inside_prev[spec]), valid=two(inside, s_inside),
                    clean_blocks=two(torch.zeros_like(clean_valid, dtype=torch.long), (~clean_valid[spec]).long()))
            elif c > 0:
                pred, cache = model.block_step(x_blk, T - 1, start, cond, cache, clean, clean_start=clean_start,
                                               clean_valid=clean_valid, valid=inside)
            else:  # every row at the same place: the plain cached step
                w = int(room[int(start[0])])
                x_blk, inside, win = x_blk[:, :w], inside[:, :w], win[:, :w]
                pred, cache = model.block_step(x_blk, T - 1, int(start[0]), cond, cache, clean)
            pred = pred.float()
            logits = torch.addmm(E_sq, pred.reshape(-1, d), E2t).view(*pred.shape[:2], -1)
            ids = logits.argmax(-1)
            if c > 0 and not last:
                unsure = logits.softmax(-1).amax(-1) < c
                k = reveal(unsure[:R], inside, short)
                short += k < inside.sum(1)
            else:
                k = inside.sum(1)
            revealed, sep = show(None, win, inside, pred[:R], ids[:R], k)
            done = sep | (start + k >= L) if not last else torch.ones_like(start, dtype=torch.bool)
            clean, clean_start, inside_prev = E[ids[:R]], start, inside
            clean_valid = revealed if c > 0 else None
            start = start + k
            if spec is not None:
                whole = (k == inside.sum(1)) & ((ids[:R] == guess) | ~inside).all(1) & ~sep
                took = whole[spec]
                r, sel = spec[took], R + took.nonzero().squeeze(1)
                if len(r):
                    s_win, s_inside, s_start = s_win[took], s_inside[took], s_start[took]
                    # (the next step's reveal: whole blocks if it was the last)
                    s_k = reveal(unsure[sel], s_inside, short[r]) if i < n - 2 else s_inside.sum(1)
                    short[r] += s_k < s_inside.sum(1)
                    s_revealed, s_sep = show(r, s_win, s_inside, pred[sel], ids[sel], s_k)
                    done[r] = s_sep | (s_start + s_k >= L)
                    clean[r], clean_start[r], inside_prev[r] = E[ids[sel]], s_start, s_inside
                    clean_valid[r], start[r] = s_revealed, s_start + s_k
                    rows_kept = torch.arange(R, device=dev)
                    rows_kept[r] = sel
                    cache = Denoiser.keep_rows(cache, rows_kept)
                else:  # every guess was wrong: the first rows, as they are
                    cache = Denoiser.keep_rows(cache, slice(0, R))
            yield StepOutput(i, T - 1, x_in[:, :L].clone(), x0[:, :L].clone(), rows, done, ids_all[:, :L].clone())
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                if not len(keep):
                    return
                x, x_in, x0, ids_all, cond, rows, clean, clean_start, start, short, inside_prev = (
                    v.index_select(0, keep)
                    for v in (x, x_in, x0, ids_all, cond, rows, clean, clean_start, start, short, inside_prev))
                clean_valid = clean_valid.index_select(0, keep) if clean_valid is not None else None
                cache = Denoiser.keep_rows(cache, keep)
