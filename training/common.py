"""What every training command shares: command-line config, device and DDP set-up, resumable state.

Configs are dataclasses; every field is a ``--flag`` (underscores become dashes) whose type is checked
by argparse, so an unknown flag or a wrong type fails loudly. Training state (weights, optimizer, RNG
and step) is saved as safetensors + JSON, atomically, so a killed run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
from contextlib import contextmanager

import numpy as np
import torch

from diffusion_caption import checkpoint as ckpt


# ------------------------------------------------------------------------------------------------ CLI
def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, defaults=None) -> None:
    """One ``--flag`` per field of ``cls``; default from ``defaults`` (an instance) or the field's own."""
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            continue
        default = getattr(defaults, f.name) if defaults is not None else f.default
        typ = f.type if isinstance(f.type, type) else eval(f.type, {})  # noqa: S307 - annotation strings
        kind = _parse_bool if typ is bool else typ
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                            help=f"(default: {default})")


def dataclass_from_args(cls, args: argparse.Namespace, base=None):
    """An instance of ``cls``: ``base``'s values overridden by every flag given on the command line."""
    base = base if base is not None else cls()
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
               if getattr(args, f.name, None) is not None}
    return dataclasses.replace(base, **changes)


def cheapest_near_best(rows: list[dict], tie: float) -> dict:
    """The row with the best ``score``, or among rows within ``tie`` of it the one with the fewest ``calls``
    (how a sampling setting is chosen on val)."""
    best = max(r["score"] for r in rows)
    near = [r for r in rows if r["score"] >= best - tie]
    return min(near, key=lambda r: (r["calls"], -r["score"]))


# ------------------------------------------------------------------------------------------------ devices
_group_users = 0  # setup_device calls not yet ended by end_distributed: one process group serves them all


def setup_device(requested: str = "auto") -> tuple[torch.device, int, int]:
    """(device, rank, world_size). Under torchrun, initialises DDP (NCCL on CUDA, gloo on CPU), or joins the
    process group already made by an enclosing command (``training.recipe`` runs several trainers in one
    process: a group destroyed and made again would reach the ranks' stale addresses)."""
    global _group_users
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but CUDA is not available on this machine")
    if world > 1:
        import torch.distributed as dist

        backend = "nccl" if requested.startswith("cuda") else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        _group_users += 1
        if requested.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            requested = f"cuda:{local}"
    return torch.device(requested), rank, world


def end_distributed() -> None:
    """The end of a ``setup_device`` under torchrun: waits for every rank, and destroys the process group
    when no enclosing command still uses it."""
    global _group_users
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    _group_users = max(_group_users - 1, 0)
    if _group_users == 0:
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU (where bf16 is slower and less exact)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def check_writable(path: str, probe_bytes: int = 1 << 20) -> None:
    """Fail before training starts, with a clear message, if the folder ``path`` cannot be created or
    written, or its disk cannot take ``probe_bytes`` more (a full disk)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"cannot create the output directory {path}: {_reason(e)}") from None
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * probe_bytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise SystemExit(f"cannot write to the output directory {path}: {_reason(e)}") from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)


@contextmanager
def fail_clearly(what: str):
    """Turn an OSError (full disk, permission denied ...) inside the block into a one-line exit message."""
    try:
        yield
    except OSError as e:
        raise SystemExit(f"could not {what}: {_reason(e)}") from None


def check_free_space(path: str, need_bytes: int, what: str) -> None:
    """Fail with a clear message if the disk holding ``path`` has less than ``need_bytes`` free."""
    import shutil

    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise SystemExit(f"not enough disk space in {path} for {what}: {need_bytes / 2**20:.1f} MiB needed, "
                         f"{free / 2**20:.1f} MiB free (No space left on device)")


# ------------------------------------------------------------------------------------------------ command opening
def start_command(cls, argv, description: str):
    """The opening of a training command with one config dataclass ``cls``: parse its flags from ``argv``, set
    up the device, check ``run_dir`` is writable (before any training) and seed. Returns (config, device,
    rank, world size)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, cls)
    cfg = dataclass_from_args(cls, p.parse_args(argv))
    device, rank, world = setup_device(cfg.device)
    check_writable(cfg.run_dir)
    seed_everything(cfg.seed)
    return cfg, device, rank, world


# ------------------------------------------------------------------------------------------------ models from the hub
def clip_need(spec: str):
    """What loading the ``--clip`` spec needs from the hub (a ``hub.Need``), or None for a local CLIP folder."""
    from diffusion_caption import hub

    if not spec.startswith("open_clip:"):
        if not os.path.isdir(spec):
            raise SystemExit(f"error: --clip {spec}: no such CLIP folder; give a folder saved by training.train_clip, "
                             "or open_clip:MODEL:TAG (a hub download) or open_clip:MODEL:FILE (a local weights file)")
        return None
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[1]:
        raise SystemExit(f"error: --clip {spec}: expected open_clip:MODEL:TAG_OR_FILE, e.g. "
                         "open_clip:ViT-B-32-quickgelu:openai or open_clip:ViT-B-32-quickgelu:/path/to/weights.safetensors")
    _, name, pretrained = parts
    try:
        return hub.open_clip_need(name, pretrained, flag=f"--clip open_clip:{name}:FILE (a local weights file)")
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --clip {spec}: {e}") from None


def require_models(needs: list) -> None:
    """Exit at once, with the models and the flags for local copies, if any of ``needs`` (``hub.Need``)
    would have to come from a hub this machine cannot reach; a local path that does not exist, an unknown
    open_clip tag, likewise."""
    from diffusion_caption import hub

    try:
        hub.require(needs)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


# ------------------------------------------------------------------------------------------------ losses
def clip_loss(scale: torch.Tensor, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's symmetric InfoNCE for unit image features ``img`` [B, D] against unit text features ``txt``
    [N, D] whose first B rows are the images' captions; the other N - B rows are extra negatives for the
    image-to-text direction. Returns (loss, image-to-text logits [B, N])."""
    labels = torch.arange(img.shape[0], device=img.device)
    i2t = scale * img @ txt.T
    t2i = scale * txt[: img.shape[0]] @ img.T
    loss = (torch.nn.functional.cross_entropy(i2t, labels) + torch.nn.functional.cross_entropy(t2i, labels)) / 2
    return loss, i2t


# ------------------------------------------------------------------------------------------------ LR
def linear_lr(step: int, total: int, lr: float, lr_end: float, warmup: int = 0) -> float:
    """Linear warm-up to ``lr``, then linear decay to ``lr_end`` at ``total`` (the seed paper's 1e-4 -> 5e-5)."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    frac = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return lr + (lr_end - lr) * frac


LR_SCHEDULES = ("linear", "constant", "cosine", "log")
OPTIMIZERS = ("adamw", "adam", "sgd")


def scheduled_lr(schedule: str, step: int, total: int, lr: float, lr_end: float, warmup: int = 0) -> float:
    """The learning rate at ``step``: linear warm-up to ``lr``, then from ``lr`` to ``lr_end`` at ``total``.

    ``linear`` is ``linear_lr``; ``constant`` stays at ``lr``; ``cosine`` anneals along half a cosine;
    ``log`` decays geometrically (linear in log-lr). The seed paper compared these four.
    """
    if schedule == "linear":
        return linear_lr(step, total, lr, lr_end, warmup)
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    frac = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr_end + (lr - lr_end) * 0.5 * (1 + math.cos(math.pi * frac))
    return lr * (lr_end / lr) ** frac


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``adamw`` (the default), ``adam`` (L2 penalty in the gradient instead of decoupled decay) or
    ``sgd`` (Nesterov momentum 0.9)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


# ------------------------------------------------------------------------------------------------ state
STATE_DIR = "train_state"


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        _, idx, k = name.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for name, v in meta["scalars"].items():
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_train_state(run_dir: str, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
                     generator: torch.Generator, info: dict,
                     extra_modules: dict[str, torch.nn.Module] | None = None) -> None:
    """Weights, optimizer, RNG states, progress (and ``extra_modules``, e.g. an EMA copy, each as
    ``NAME.safetensors``) in ``run_dir/train_state``, replaced atomically as one directory.

    A kill at any moment leaves the previous state or the new one, complete (see
    ``checkpoint.atomic_directory``). A full disk or an unwritable folder ends the run with a message
    saying so, and the previous state stays as it was.
    """
    state = os.path.join(run_dir, STATE_DIR)
    files = {"model.safetensors": model.state_dict()}
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    files["optimizer.safetensors"] = opt_tensors
    files["rng.safetensors"] = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    for name, module in (extra_modules or {}).items():
        files[f"{name}.safetensors"] = module.state_dict()
    kept = "; the previous training state is intact" if has_train_state(run_dir) else ""
    need = sum(_tensor_bytes(t) for t in files.values()) + (1 << 20)  # + headers and state.json
    try:
        os.makedirs(run_dir, exist_ok=True)
        check_free_space(run_dir, need, f"the training state at step {step}{kept}")
        with ckpt.atomic_directory(state) as tmp:
            for name, tensors in files.items():
                ckpt.save_tensors(tensors, os.path.join(tmp, name))
            ckpt.write_json(os.path.join(tmp, "state.json"),
                            {"step": step, "optimizer": opt_meta, "info": info, "saved_at": time.time(),
                             "files": sorted(files)})
    except OSError as e:
        raise SystemExit(f"could not save the training state at step {step} to {state}: {_reason(e)}{kept}") from None


def has_train_state(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a training state (after finishing what a kill mid-save left, if anything)."""
    ckpt.recover_directory(os.path.join(run_dir, STATE_DIR), remove_temporaries=True)
    return os.path.isfile(os.path.join(run_dir, STATE_DIR, "state.json"))


def load_train_state(run_dir: str, model: torch.nn.Module, opt: torch.optim.Optimizer,
                     generator: torch.Generator, extra_modules: dict[str, torch.nn.Module] | None = None) -> dict:
    """Restore what ``save_train_state`` wrote; returns the state.json contents (step, info).

    A state that is damaged or does not fit this run's model ends the run with a message naming the file.
    """
    d = os.path.join(run_dir, STATE_DIR)
    try:
        meta = ckpt.read_json(os.path.join(d, "state.json"))
        step = meta.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ckpt.CheckpointError(f"{os.path.join(d, 'state.json')}: 'step' is {step!r}, not a step number")
        ckpt.load_into(model, os.path.join(d, "model.safetensors"))
        for name, module in (extra_modules or {}).items():
            ckpt.load_into(module, os.path.join(d, f"{name}.safetensors"))
        opt_file = os.path.join(d, "optimizer.safetensors")
        try:
            opt.load_state_dict(_unflatten_optimizer(ckpt.load_tensors(opt_file), meta["optimizer"]))
            for group in opt.param_groups:
                for p in group["params"]:
                    for k, v in opt.state.get(p, {}).items():
                        if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                            raise ValueError(f"{k} has shape {tuple(v.shape)} for a parameter of shape {tuple(p.shape)}")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ckpt.CheckpointError(f"{opt_file}: does not fit this run's optimizer "
                                       f"({type(e).__name__}: {e})") from None
        rng_file = os.path.join(d, "rng.safetensors")
        rng = ckpt.load_tensors(rng_file)
        try:
            generator.set_state(rng["generator"])
            torch.set_rng_state(rng["torch"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"{rng_file}: not a saved RNG state ({type(e).__name__}: {e})") from None
    except ckpt.CheckpointError as e:
        raise SystemExit(f"cannot resume from {run_dir}: {e}") from None
    return meta


def write_log(run_dir: str, record: dict) -> None:
    path = os.path.join(run_dir, "log.jsonl")
    with fail_clearly(f"append to the training log {path}"):
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
