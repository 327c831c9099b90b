"""Checkpoint files: safetensors weights and JSON configs only, checked, written atomically.

Nothing here unpickles: a checkpoint is data, never code. Every problem is reported with the file it
is in and what is wrong with it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager

import torch
from torch import nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not match the model it should fill."""


def resolve(path_or_hub_id: str) -> str:
    """A local directory for a path, or for a Hugging Face hub id (downloaded, or from the local cache)."""
    p = os.path.expanduser(str(path_or_hub_id))
    if os.path.isdir(p):
        return p
    if os.path.exists(p):
        raise CheckpointError(f"{p} is a file; a checkpoint is a directory with {CONFIG_NAME} and {WEIGHTS_NAME}")
    looks_like_hub_id = p.count("/") == 1 and not p.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise CheckpointError(f"checkpoint directory not found: {p}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(p)
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; all mean "could not get it"
        name = type(e).__name__
        offline = any(k in name + str(e) for k in ("Offline", "Connect", "LocalEntryNotFound", "resolve", "Timeout"))
        why = "this machine is offline and the hub id is not in the local cache" if offline else f"{name}: {e}"
        raise CheckpointError(f"could not load hub id {p!r}: {why}. A local directory works offline.") from None


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file missing")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, with a clear error for a missing, truncated or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_into(module: nn.Module, path: str) -> None:
    """Load a safetensors file into ``module``, refusing any missing, extra, misshapen or mistyped tensor."""
    tensors = load_tensors(path)
    expected = module.state_dict()
    problems = []
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for k in sorted(set(expected) & set(tensors)):
        if tensors[k].shape != expected[k].shape:
            problems.append(f"{k}: shape {tuple(tensors[k].shape)}, the model needs {tuple(expected[k].shape)}")
        elif tensors[k].dtype != expected[k].dtype:
            problems.append(f"{k}: dtype {tensors[k].dtype}, the model needs {expected[k].dtype}")
    if problems:
        raise CheckpointError(f"{path} does not match the model its config describes: " + "; ".join(problems[:8]))
    module.load_state_dict(tensors, strict=True)


@contextmanager
def atomic_directory(path: str):
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` in one rename.

    A crash while writing leaves the previous ``path`` untouched (at worst a stale ``*.tmp-*`` folder).
    """
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
