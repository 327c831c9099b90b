"""Checkpoint files: safetensors weights and JSON configs only, checked, written atomically.

Nothing here unpickles: a checkpoint is data, never code. Every problem is reported with the file it
is in and what is wrong with it.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not match the model it should fill."""


def resolve(path_or_hub_id: str) -> str:
    """A local directory for a path, or for a Hugging Face hub id (downloaded, or from the local cache)."""
    p = os.path.expanduser(str(path_or_hub_id))
    if os.path.isdir(p) or recover_directory(p):
        return p
    if os.path.exists(p):
        raise CheckpointError(f"{p} is a file; a checkpoint is a directory with {CONFIG_NAME} and {WEIGHTS_NAME}")
    looks_like_hub_id = p.count("/") == 1 and not p.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise CheckpointError(f"checkpoint directory not found: {p}")
    try:
        from huggingface_hub import snapshot_download

        # data files only: a hub repository's pickled weights (*.bin, *.pt) are never even downloaded
        return snapshot_download(p, allow_patterns=["*.json", "*.safetensors", "*.txt"])
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
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _write_error(path: str, e: BaseException) -> OSError:
    """An OSError for a failed write, keeping the errno (ENOSPC, EACCES ...) when there is one."""
    code = getattr(e, "errno", None)
    if code is None:  # safetensors reports I/O failures as "... (os error 28)"
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else errno.EIO
    return OSError(code, f"could not write {path}: {os.strerror(code)}")


def write_json(path: str, data: dict) -> None:
    """Write JSON to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            _fsync(f)
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise _write_error(path, e) from None


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


# safetensors dtype names (as in a file's header) -> torch dtypes, for messages and header-only checks
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _open_error(path: str, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}")


def read_header(path: str) -> dict[str, tuple[tuple[int, ...], object]]:
    """Name -> (shape, dtype) of every tensor in a safetensors file, from its header alone (no data read)."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file missing")
    try:
        with safe_open(path, "pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype(), sl.get_dtype()))
            return out
    except (SafetensorError, OSError, ValueError) as e:
        raise _open_error(path, e) from None


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, with a clear error for a missing, truncated or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise _open_error(path, e) from None


def save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file to a temporary name, flush it to disk, then rename it over ``path``.

    A failed write (a full disk, say) removes the partial file and raises an OSError with the errno.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        _remove_quietly(tmp)
        raise _write_error(path, e) from None


def _mismatches(path: str, found: dict, expected: dict) -> list[str]:
    """What differs between the tensors a file has and those a model needs (both name -> (shape, dtype))."""
    problems = []
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for k in sorted(set(expected) & set(found)):
        (fs, fd), (es, ed) = found[k], expected[k]
        if tuple(fs) != tuple(es):
            problems.append(f"{k}: shape {tuple(fs)}, the model needs {tuple(es)}")
        elif fd != ed:
            problems.append(f"{k}: dtype {fd}, the model needs {ed}")
    return problems


def _expected(module: nn.Module) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def check_matches(module: nn.Module, path: str, described_by: str = "its config") -> None:
    """Raise a CheckpointError naming ``path`` and every mismatch if the file's tensors (from its header)
    are not exactly the names, shapes and dtypes of ``module``'s state."""
    problems = _mismatches(path, read_header(path), _expected(module))
    if problems:
        raise CheckpointError(f"{path} does not match the model {described_by} describes: "
                              + "; ".join(problems[:8]))


def load_into(module: nn.Module, path: str) -> None:
    """Load a safetensors file into ``module``, refusing any missing, extra, misshapen or mistyped tensor.

    The file's header is checked against the module before any tensor data is read.
    """
    check_matches(module, path)
    tensors = load_tensors(path)
    module.load_state_dict(tensors, strict=True)


def build_and_load(build: Callable[[], nn.Module], path: str, config_file: str) -> nn.Module:
    """Build the model ``config_file`` describes and fill it from the safetensors file ``path``.

    The model is first built on the ``meta`` device (no memory) and compared with the file's header, so a
    tampered config (absurd sizes, say) is refused before anything is allocated. A config the model code
    cannot build at all is reported as such.
    """
    errors = (TypeError, ValueError, KeyError, AttributeError, AssertionError, RuntimeError, IndexError)
    try:
        with torch.device("meta"):
            probe = build()
    except errors as e:
        raise CheckpointError(f"{config_file}: the model it describes cannot be built: "
                              f"{type(e).__name__}: {e}") from None
    check_matches(probe, path, config_file)
    del probe
    try:
        module = build()
    except MemoryError:
        raise CheckpointError(f"{config_file}: the model it describes does not fit in memory") from None
    load_into(module, path)
    return module


def _fsync_dir(path: str) -> None:
    """Make renames inside ``path`` durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(path: str):
    """Yield a temporary directory beside ``path``; on success it replaces ``path``.

    The protocol: everything is written (and flushed) into ``<path>.tmp-XXXX``; then the previous ``path``
    is moved aside to ``<path>.old``, the new directory renamed to ``path``, and ``<path>.old`` deleted.
    A crash at any moment leaves a complete copy: the previous ``path`` while writing, the new one after
    the second rename, and between the two renames the previous one as ``<path>.old``, which
    ``recover_directory`` (called by every reader) moves back. A stale ``*.tmp-*`` folder is all a crash
    can leave behind.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    recover_directory(path)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        yield tmp
        _fsync_dir(tmp)
        old = path + ".old"
        if os.path.exists(path):
            if os.path.exists(old):  # left by an earlier crash after the new copy was already in place
                shutil.rmtree(old)
            os.replace(path, old)
        else:
            old = None
        os.replace(tmp, path)
        _fsync_dir(parent)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_directory(path)  # a failed second rename: the previous copy goes straight back
        raise


def recover_directory(path: str, remove_temporaries: bool = False) -> bool:
    """Finish what a crash inside ``atomic_directory`` left: if ``path`` is missing but ``<path>.old`` is
    there (killed between its two renames), move the previous copy back. Returns whether it did.

    With ``remove_temporaries``, also delete the ``<path>.tmp-*`` folders of writes that never finished
    (only safe when nothing else is writing ``path`` right now, e.g. when a training run resumes).
    """
    path = os.path.abspath(path)
    old = path + ".old"
    recovered = False
    if not os.path.exists(path) and os.path.isdir(old):
        os.replace(old, path)
        recovered = True
    if remove_temporaries:
        for d in glob.glob(glob.escape(path) + ".tmp-*"):
            shutil.rmtree(d, ignore_errors=True)
    return recovered
