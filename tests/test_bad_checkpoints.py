"""Untrusted checkpoints: only safetensors and JSON are read, and any tampering is refused with a
message naming the file and the mismatch; a hub id offline says so; no pickle is loaded anywhere.

Every case edits a copy of one small saved captioner, then loads it through the API (and some through
the command line); ``CheckpointError`` is the only exception allowed out.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_caption import Captioner, CheckpointError
from diffusion_caption.checkpoint import CONFIG_NAME, WEIGHTS_NAME

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tokenizer, clip_encoder, tmp_path_factory) -> str:
    from diffusion_caption.config import preset
    from diffusion_caption.denoiser import Denoiser

    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, cond_dim=clip_encoder.feature_dim)
    path = str(tmp_path_factory.mktemp("good") / "ckpt")
    Captioner(cfg, Denoiser(cfg), clip_encoder, tokenizer).save_pretrained(path)
    return path


def _copy(saved, tmp_path, name="ckpt") -> Path:
    d = tmp_path / name
    shutil.copytree(saved, d)
    return d


def _edit_weights(d: Path, fn, file: str = WEIGHTS_NAME) -> None:
    t = load_file(str(d / file))
    fn(t)
    save_file(t, str(d / file))


def _edit_config(d: Path, fn, file: str = CONFIG_NAME) -> None:
    meta = json.loads((d / file).read_text())
    fn(meta)
    (d / file).write_text(json.dumps(meta))


def _refused(path, *patterns) -> str:
    """Load ``path``; it must raise CheckpointError whose message matches every pattern."""
    with pytest.raises(CheckpointError) as e:
        Captioner.from_pretrained(str(path))
    msg = str(e.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in {msg!r}"
    return msg


def _header_only_safetensors(path: Path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_tampered_weights_name_the_file_and_the_tensor(saved, tmp_path):
    weights = re.escape(WEIGHTS_NAME)
    d = _copy(saved, tmp_path, "shape")
    _edit_weights(d, lambda t: t.__setitem__("null_cond", torch.zeros(3)))
    _refused(d, weights, r"null_cond: shape \(3,\), the model needs \(\d+,\)")
    d = _copy(saved, tmp_path, "dtype")
    _edit_weights(d, lambda t: t.__setitem__("null_cond", t["null_cond"].half()))
    _refused(d, weights, r"null_cond: dtype torch.float16, the model needs torch.float32")
    d = _copy(saved, tmp_path, "missing")
    _edit_weights(d, lambda t: t.pop("null_cond"))
    _refused(d, weights, r"missing tensors \['null_cond'\]")
    d = _copy(saved, tmp_path, "extra")
    _edit_weights(d, lambda t: t.__setitem__("injected.payload", torch.ones(4)))
    _refused(d, weights, r"unexpected tensors \['injected.payload'\]")
    d = _copy(saved, tmp_path, "truncated")
    raw = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(raw[:len(raw) * 2 // 3])
    _refused(d, weights, "not a readable safetensors file")
    d = _copy(saved, tmp_path, "huge-header")  # a header length of 2**40 bytes: refused, not allocated
    (d / WEIGHTS_NAME).write_bytes(struct.pack("<Q", 2**40) + b"{}")
    _refused(d, weights, "not a readable safetensors file")
    d = _copy(saved, tmp_path, "offsets")  # offsets pointing past the end of the file
    _header_only_safetensors(d / WEIGHTS_NAME, {"null_cond": {"dtype": "F32", "shape": [1000000],
                                                              "data_offsets": [0, 4000000]}}, b"\0" * 16)
    _refused(d, weights, "not a readable safetensors file")


def test_a_config_that_does_not_match_its_weights(saved, tmp_path):
    d = _copy(saved, tmp_path, "layers")  # one more layer than the weights have
    _edit_config(d, lambda m: (m["captioner"].update(n_layers=2), m["encoder_config"].update(n_layers=2)))
    _refused(d, re.escape(WEIGHTS_NAME), re.escape(CONFIG_NAME), r"missing tensors \['encoder\.transformer\.layer\.1")
    d = _copy(saved, tmp_path, "vocab")
    _edit_config(d, lambda m: m["captioner"].update(vocab_size=m["captioner"]["vocab_size"] + 5))
    _refused(d, "tokenizer has \\d+ tokens but .*config.json says vocab_size")
    d = _copy(saved, tmp_path, "cond")
    _edit_config(d, lambda m: m["captioner"].update(cond_dim=7))
    _refused(d, re.escape(WEIGHTS_NAME), "shape")
    d = _copy(saved, tmp_path, "unbuildable")  # 7 heads do not divide the width: the model cannot exist
    _edit_config(d, lambda m: m["encoder_config"].update(n_heads=7))
    _refused(d, re.escape(CONFIG_NAME), "cannot be built")
    d = _copy(saved, tmp_path, "not-a-dict")
    _edit_config(d, lambda m: m.update(encoder_config=[1, 2, 3]))
    _refused(d, re.escape(CONFIG_NAME), "cannot be built")
    d = _copy(saved, tmp_path, "unknown-field")
    _edit_config(d, lambda m: m["captioner"].update(run_this="rm -rf /"))
    _refused(d, re.escape(CONFIG_NAME), "run_this")


def test_absurd_sizes_in_a_config_are_refused_before_anything_is_allocated(saved, tmp_path):
    """A config asking for a 2**40-parameter model: compared with the file's header on the meta device
    first, so it is refused in well under a second instead of allocating terabytes."""
    d = _copy(saved, tmp_path)

    def grow(m):
        big = 2**20
        m["captioner"].update(dim=big, hidden_dim=big)
        m["encoder_config"].update(dim=big, hidden_dim=big)

    _edit_config(d, grow)
    t0 = time.perf_counter()
    _refused(d, re.escape(WEIGHTS_NAME), r"the model needs \([^)]*1048576")
    assert time.perf_counter() - t0 < 30


def test_broken_json_files(saved, tmp_path):
    cfg = re.escape(CONFIG_NAME)
    for name, text, why in [("not-json", "{not json", "not valid JSON"),
                            ("a-list", "[1, 2, 3]", "expected a JSON object, found list"),
                            ("deep", "[" * 100000 + "]" * 100000, "nested too deeply|not valid JSON"),
                            ("binary", "\udcff", "not valid JSON")]:
        d = _copy(saved, tmp_path, name)
        (d / CONFIG_NAME).write_bytes(text.encode("utf-8", "surrogateescape"))
        _refused(d, cfg, why)
    d = _copy(saved, tmp_path, "format")
    _edit_config(d, lambda m: m.update(format="someone-else/9"))
    _refused(d, cfg, "format 'someone-else/9' is not")
    d = _copy(saved, tmp_path, "encoder-source")
    _edit_config(d, lambda m: m.update(image_encoder={"kind": "exec", "code": "print(1)"}))
    _refused(d, "image encoder", "unknown image encoder source")
    for name, source in [("source-str", "clip"), ("source-incomplete", {"kind": "open_clip"})]:
        d = _copy(saved, tmp_path, name)
        _edit_config(d, lambda m: m.update(image_encoder=source))
        _refused(d, "image encoder")
    for name, text in [("tok-garbage", "garbage"), ("tok-empty-object", "{}")]:
        d = _copy(saved, tmp_path, name)
        (d / "tokenizer.json").write_text(text)
        _refused(d, "tokenizer files unreadable")


def test_the_bundled_clip_is_checked_as_strictly(saved, tmp_path):
    clip_weights = "clip/open_clip_model.safetensors"
    d = _copy(saved, tmp_path, "clip-truncated")
    raw = (d / clip_weights).read_bytes()
    (d / clip_weights).write_bytes(raw[:len(raw) // 2])
    _refused(d, re.escape(clip_weights), "not a readable safetensors file")
    name = next(iter(load_file(str(Path(saved) / clip_weights))))
    d = _copy(saved, tmp_path, "clip-dtype")  # open_clip alone would cast this silently
    _edit_weights(d, lambda t: t.__setitem__(name, t[name].half()), clip_weights)
    _refused(d, re.escape(clip_weights), "dtype torch.float16")
    d = _copy(saved, tmp_path, "clip-shape")
    _edit_weights(d, lambda t: t.__setitem__(name, torch.zeros(2, 2)), clip_weights)
    _refused(d, re.escape(clip_weights), "does not match")
    d = _copy(saved, tmp_path, "clip-config")
    (d / "clip" / "open_clip_config.json").write_text('{"model_cfg": "no"}')
    _refused(d, "open_clip_config.json", "model_cfg")


# a protocol-0 pickle that runs `touch MARKER` when unpickled: it must never be
PICKLE_PAYLOAD = "cposix\nsystem\n(S'touch {marker}'\ntR."


def test_pickled_files_are_never_loaded(saved, tmp_path):
    marker = tmp_path / "code-ran"
    payload = PICKLE_PAYLOAD.format(marker=marker).encode()
    d = _copy(saved, tmp_path, "pickles")
    for rel in [WEIGHTS_NAME, "pytorch_model.bin", "clip/open_clip_model.safetensors", "clip/pytorch_model.bin",
                "clip/open_clip_pytorch_model.bin"]:
        (d / rel).write_bytes(payload)
    _refused(d, re.escape(WEIGHTS_NAME), "not a readable safetensors file")
    d2 = _copy(saved, tmp_path, "pickled-clip-only")  # good weights, the CLIP's replaced by a pickle
    (d2 / "clip" / "open_clip_model.safetensors").write_bytes(payload)
    (d2 / "clip" / "open_clip_pytorch_model.bin").write_bytes(payload)
    _refused(d2, "clip/open_clip_model.safetensors", "not a readable safetensors file")
    os.remove(d2 / "clip" / "open_clip_model.safetensors")  # only the pickle left: still never opened
    _refused(d2, "open_clip_model.safetensors", "missing")
    assert not marker.exists()


def test_a_hub_id_offline_says_so_in_the_api_and_the_cli(monkeypatch, capsys, tmp_path):
    import huggingface_hub.constants as hc

    from diffusion_caption.__main__ import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match="offline"):
        Captioner.from_pretrained("nobody-here/no-such-captioner")
    assert main(["--checkpoint", "nobody-here/no-such-captioner", "any.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not load hub id 'nobody-here/no-such-captioner'") and "offline" in err


def test_an_interrupted_save_is_recovered_and_a_failed_one_leaves_the_old_checkpoint(saved, tmp_path, monkeypatch):
    """save_pretrained writes a temporary folder and renames it; killed between moving the old copy
    aside and moving the new one in, the next load puts the old copy back."""
    from diffusion_caption import checkpoint as ckpt

    d = _copy(saved, tmp_path)
    cap = Captioner.from_pretrained(str(d))
    os.replace(d, str(d) + ".old")  # the state a kill between the two renames leaves
    assert Captioner.from_pretrained(str(d)).config == cap.config and d.is_dir()

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "write_json", full_disk)
    with pytest.raises(OSError, match="No space left"):
        cap.save_pretrained(str(d))
    assert Captioner.from_pretrained(str(d)).config == cap.config
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind


# ------------------------------------------------------------------------------------------------ pickle
PICKLE_RULES = [  # (pattern, why it is refused)
    (r"\bpickle\.loads?\s*\(", "pickle.load"),
    (r"\bcPickle\b|\bdill\.loads?\b|\bjoblib\.load\b|\bshelve\.open\b|\bmarshal\.loads?\b", "another unpickler"),
    (r"\bread_pickle\s*\(", "pandas.read_pickle"),
    (r"\ballow_pickle\s*=\s*True", "np.load(allow_pickle=True)"),
    (r"\bweights_only\s*=\s*False", "weights_only=False"),
    (r"\btrust_remote_code\s*=\s*True", "trust_remote_code=True runs a repository's code"),
    (r"\btorch\.jit\.load\s*\(", "TorchScript archives"),
    (r"\buse_safetensors\s*=\s*False", "use_safetensors=False"),
]


def _project_sources() -> list[Path]:
    files = sorted((ROOT / "diffusion_caption").rglob("*.py")) + sorted((ROOT / "training").rglob("*.py"))
    return files + ([ROOT / "app.py"] if (ROOT / "app.py").exists() else [])


def _torch_load_calls(text: str) -> list[str]:
    """Every ``torch.load(...)`` call (arguments included, across lines)."""
    calls = []
    for m in re.finditer(r"\btorch\.load\s*\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        calls.append(text[m.start():i])
    return calls


def pickle_uses(text: str) -> list[str]:
    found = [why for pattern, why in PICKLE_RULES if re.search(pattern, text)]
    found += [f"{call} without weights_only=True" for call in _torch_load_calls(text)
              if not re.search(r"weights_only\s*=\s*True", call)]
    return found


def test_the_pickle_scanner_finds_what_it_should():
    assert pickle_uses("x = torch.load(path,\n    map_location='cpu')")
    assert not pickle_uses("x = torch.load(path, map_location='cpu', weights_only=True)")
    assert pickle_uses("import pickle\nobj = pickle.load(f)")
    assert pickle_uses("np.load(f, allow_pickle=True)") and not pickle_uses("np.load(f, allow_pickle=False)")
    assert pickle_uses("AutoModel.from_pretrained(name, trust_remote_code=True)")


def test_no_pickle_loading_anywhere_in_the_project():
    sources = _project_sources()
    assert len(sources) > 20
    offenders = {str(p.relative_to(ROOT)): uses for p in sources if (uses := pickle_uses(p.read_text(encoding="utf-8")))}
    assert offenders == {}, offenders


def test_a_checkpoint_loads_its_clip_from_another_copy_when_told(make_captioner, scene_image, tmp_path, capsys):
    """A checkpoint whose CLIP is not where it says (moved, or a hub tag offline) names the way out, and
    ``clip=`` / ``--clip`` loads another copy of it: the same captions."""
    import shutil

    from diffusion_caption import Captioner, CheckpointError
    from diffusion_caption.__main__ import main as cli

    d = tmp_path / "ckpt"
    make_captioner().save_pretrained(str(d))
    want = Captioner.from_pretrained(str(d)).caption(scene_image, seed=3).text
    shutil.move(str(d / "clip"), str(tmp_path / "elsewhere"))
    with pytest.raises(CheckpointError, match=r"image encoder: .*give another copy of it with clip=\.\.\. / --clip"):
        Captioner.from_pretrained(str(d))
    cap = Captioner.from_pretrained(str(d), clip=str(tmp_path / "elsewhere"))
    assert cap.caption(scene_image, seed=3).text == want
    assert cli([scene_image, "--checkpoint", str(d), "--clip", str(tmp_path / "elsewhere"), "--seed", "3"]) == 0
    assert want in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="open_clip:MODEL:TAG_OR_FILE"):
        Captioner.from_pretrained(str(d), clip="open_clip:ViT-B-32")
