"""Fail fast when a model would come from the Hugging Face hub and cannot.

Offline, transformers and open_clip retry a download for a minute or more and end in a traceback that
names no way out. Before anything is loaded, ``require`` checks each model a command needs: a local path
is fine; a hub name is fine when the hub answers or the name is in the local cache; otherwise it exits at
once naming the model and the flag that takes a local copy. The hub is probed once per process, with a
short timeout, and not at all when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass

PROBE_TIMEOUT_S = 5.0
_reachable: dict[str, bool] = {}


class HubUnavailable(OSError):
    """A model named by its hub id, with the hub out of reach and the model not in the local cache."""


def offline_requested() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub answers at all (any HTTP status counts), probed once per endpoint and process."""
    if offline_requested():
        return False
    url = endpoint()
    if url not in _reachable:
        try:
            urllib.request.urlopen(urllib.request.Request(url + "/api/models?limit=1", method="HEAD"), timeout=timeout)
            _reachable[url] = True
        except urllib.error.HTTPError:  # it answered, if only to refuse
            _reachable[url] = True
        except (OSError, ValueError):  # DNS failure, refused, timed out, no route ...
            _reachable[url] = False
    return _reachable[url]


def looks_offline(error: BaseException) -> bool:
    """Whether an exception from a hub download means "no connection" (checked without regard to case)."""
    text = f"{type(error).__name__} {error!r}".lower()
    return any(w in text for w in ("connection", "connect", "resolve", "offline", "localentrynotfound",
                                   "timed out", "timeout", "max retries", "name or service not known",
                                   "failed to download"))


def is_local(name: str) -> bool:
    return os.path.exists(os.path.expanduser(name))


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ("org/name") or an open_clip tag."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(
        (".safetensors", ".bin", ".pt", ".pth"))


def in_cache(repo_id: str, filenames: tuple[str, ...]) -> bool:
    """Whether any of ``filenames`` of the hub repository ``repo_id`` is in the local hub cache."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)


@dataclass(frozen=True)
class Need:
    """One model a command loads: ``name`` (a hub id or a local path), what it is, and how to give a local copy."""

    name: str
    what: str  # "DistilBERT", "GPT-2", "tokenizer", "CLIP"
    flag: str  # "--encoder DIR", "--clip open_clip:ViT-B-32-quickgelu:FILE" ...
    repo: str = ""  # the hub repository that holds it (default: name)
    files: tuple[str, ...] = ("config.json",)  # any of these in the cache means it is there


def open_clip_need(model_name: str, pretrained: str, flag: str | None = None) -> Need | None:
    """The hub download open_clip would make for ``create_model_and_transforms(model_name, pretrained)``;
    None when nothing is downloaded (a local weights file, or no weights). A missing local file or an
    unknown tag raises FileNotFoundError / ValueError at once."""
    flag = flag or f"--clip open_clip:{model_name}:FILE"
    if not pretrained:
        return None
    if is_local(pretrained):
        return None
    if looks_like_path(pretrained):
        raise FileNotFoundError(f"CLIP weights file {pretrained!r} not found (for open_clip {model_name!r})")
    import open_clip

    if model_name not in open_clip.list_models():
        raise ValueError(f"open_clip has no model {model_name!r}; known ViT-B models: "
                         f"{', '.join(m for m in open_clip.list_models() if m.startswith('ViT-B'))}")
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise ValueError(f"open_clip {model_name!r} has no pretrained tag {pretrained!r}; its tags are "
                         f"{', '.join(open_clip.list_pretrained_tags_by_model(model_name)) or 'none'}, or give a "
                         f"local weights file ({flag})")
    hf = cfg.get("hf_hub", "")
    if hf:  # "org/repo/" (open_clip's default file name) or "org/repo/file.bin"
        repo, filename = hf.rstrip("/"), ""
        if not hf.endswith("/"):
            repo, filename = os.path.split(hf)
        if not filename or filename == "open_clip_pytorch_model.bin":
            files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        elif filename.endswith((".bin", ".pth")):  # open_clip tries the .safetensors beside it first
            files = (filename.rsplit(".", 1)[0] + ".safetensors", filename)
        else:
            files = (filename,)
        return Need(f"{model_name}:{pretrained}", "CLIP", flag, repo=repo, files=files)
    url = cfg.get("url", "")
    return Need(f"{model_name}:{pretrained}", "CLIP", flag, repo="", files=(os.path.basename(url),))


def _cached(need: Need) -> bool:
    if not need.repo:  # a plain URL download: open_clip keeps it in ~/.cache/clip
        return any(os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), f)) for f in need.files if f)
    return in_cache(need.repo, need.files)


def missing(needs: list[Need]) -> list[Need]:
    """The needs that cannot be met: hub names while the hub is out of reach and not in the local cache."""
    remote = [n for n in needs if not is_local(n.name)]
    if not remote or hub_reachable():
        return []
    return [n for n in remote if not _cached(n)]


def message(lost: list[Need]) -> str:
    why = ("HF_HUB_OFFLINE is set" if offline_requested()
           else f"the hub ({endpoint()}) cannot be reached: this machine seems to be offline")
    lines = [f"{why}, and {'this model is' if len(lost) == 1 else 'these models are'} not in the local cache:"]
    for n in lost:
        lines.append(f"  - {n.what} {n.name!r}: give a local copy with {n.flag}")
    lines.append("Download them where the hub is reachable (save_pretrained folders, or open_clip's weights file), "
                 "or set HF_HOME to a cache that holds them.")
    return "\n".join(lines)


def require(needs: list[Need | None]) -> None:
    """Raise HubUnavailable naming every model of ``needs`` that cannot be had, at once (not after a
    minute of retries); return quietly when all are local, cached, or the hub answers. A name that is
    plainly a local path but does not exist raises FileNotFoundError naming it and its flag."""
    needs = [n for n in needs if n is not None]
    for n in needs:
        if looks_like_path(n.name) and not is_local(n.name):
            raise FileNotFoundError(f"{n.what} {n.name!r}: no such file or directory (give a local copy that exists "
                                    f"with {n.flag}; a folder saved with save_pretrained works offline)")
    lost = missing(needs)
    if lost:
        raise HubUnavailable(message(lost))
