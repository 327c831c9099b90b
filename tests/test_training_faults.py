"""Training runs meeting faults: SIGKILL at a random step, a kill inside a checkpoint write, a full disk,
an unwritable output folder, a damaged training state. Nothing trained may be lost beyond the last
checkpoint, a resumed run must end bitwise identical to an uninterrupted one (CPU), and every failure
is one clear line, early.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import common, train_baseline, train_diffusion

ROOT = Path(__file__).resolve().parents[1]
STEPS, CKPT_EVERY = 48, 4


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, clip_encoder, tokenizer) -> str:
    """A CLIP folder as train_clip writes it (weights, config, tokenizer), from the session's tiny CLIP."""
    d = str(tmp_path_factory.mktemp("faults-clip") / "clip")
    clip_encoder.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("faults-cache"))


def _args(world_dir, clip_dir, cache_dir, root: Path, *extra) -> list[str]:
    return ["--preset", "tiny", "--data-dir", world_dir, "--clip", clip_dir, "--cache-dir", cache_dir,
            "--out", str(root / "out"), "--run-dir", str(root / "run"), "--steps", str(STEPS), "--batch-size", "8",
            "--val-every", "1", "--ckpt-every", str(CKPT_EVERY), "--device", "cpu", "--dropout", "0.1", *extra]


@contextmanager
def _one_thread():
    """In-process runs use the thread count of the killed subprocesses, so float sums are bitwise alike."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _start(cmd: list[str], log: Path, **env_extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env_extra}
    out = open(log, "w")
    return subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _logged_steps(run: Path) -> list[int]:
    try:
        lines = (run / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):  # a line being written right now
            pass
    return steps


def _kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 300) -> None:
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before it could be killed:\n"
                                 + log.read_text()[-3000:])
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the moment to kill:\n" + log.read_text()[-3000:])
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _state_step(run: Path) -> int:
    return json.loads((run / common.STATE_DIR / "state.json").read_text())["step"]


def _same_weights(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _baseline_args(world_dir, clip_dir, cache_dir, root: Path, *extra) -> list[str]:
    args = _args(world_dir, clip_dir, cache_dir, root, *extra)
    args[args.index("--val-every") + 1] = "3"  # the baseline's validation also decodes captions: slower
    return args


def test_both_trainers_killed_at_a_random_step_resume_bitwise_identical(world_dir, clip_dir, cache_dir, tmp_path,
                                                                         capsys):
    """``python -m training.train_diffusion`` and ``training.train_baseline``, SIGKILLed at a random step
    after their first checkpoint, then run again with ``--resume``: the final weights, the raw weights
    and the optimizer state equal those of an uninterrupted run, bit for bit."""
    trainers = {"train_diffusion": (train_diffusion, _args), "train_baseline": (train_baseline, _baseline_args)}
    rng = random.Random()
    kill_after = {name: rng.randint(CKPT_EVERY + 3, STEPS // 2) for name in trainers}
    note = f"(killed after steps {kill_after})"
    with _one_thread():  # the uninterrupted runs; they also fill the feature cache the others read
        for name, (module, args) in trainers.items():
            module.main(args(world_dir, clip_dir, cache_dir, tmp_path / name / "reference"))
    resumed_from = {}
    for name, (_, args) in trainers.items():
        # one run at a time, watched from its start: a run started beside another can finish unwatched
        proc = _start(["-m", f"training.{name}", *args(world_dir, clip_dir, cache_dir, tmp_path / name / "killed")],
                      tmp_path / f"{name}.log")
        run = tmp_path / name / "killed" / "run"
        _kill_when(proc, lambda: (run / common.STATE_DIR / "state.json").exists()
                   and max(_logged_steps(run), default=0) >= kill_after[name], tmp_path / f"{name}.log")
        resumed_from[name] = _state_step(run)
        # the step the run had reached: its last log line, or its last checkpoint when that came later (the
        # baseline logs every 3 steps and checkpoints every 4, so step 20's state can follow step 18's line)
        killed_at = max(max(_logged_steps(run)), resumed_from[name])
        assert kill_after[name] <= killed_at < STEPS and not (run.parent / "out").exists(), note
        assert CKPT_EVERY <= resumed_from[name] <= killed_at and resumed_from[name] % CKPT_EVERY == 0, note
    capsys.readouterr()
    with _one_thread():
        for name, (module, args) in trainers.items():
            module.main(args(world_dir, clip_dir, cache_dir, tmp_path / name / "killed", "--resume", "true"))
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resumed from")]
    assert said == [f"resumed from {tmp_path / name / 'killed' / 'run'} at step {resumed_from[name]}"
                    for name in trainers], note
    for name in trainers:
        ref, got = tmp_path / name / "reference", tmp_path / name / "killed"
        _same_weights(ref / "out" / "model.safetensors", got / "out" / "model.safetensors")
        for f in ("model.safetensors", "optimizer.safetensors"):
            _same_weights(ref / "run" / common.STATE_DIR / f, got / "run" / common.STATE_DIR / f)


# Saves a small training state completely, then (in a forked child per kill point) saves the next one
# and stops for good at that point of the write, for the test to SIGKILL it there. Kill points: after
# each file of the new state, and between the two renames of the directory swap.
KILL_POINTS = ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "ema.safetensors", "state.json",
               "between-renames"]
KILL_INSIDE_SAVE = r"""
import os, sys, time
import torch
from safetensors.torch import save_file
from diffusion_caption import checkpoint as ckpt
from training import common

base, points = sys.argv[1], sys.argv[2].split(",")
armed = {"point": None}

def stop_here(point):
    if armed["point"] == point:
        with open(os.path.join(base, f"stopped-{point}"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(3600)

real_save, real_json, real_replace = ckpt.save_tensors, ckpt.write_json, os.replace
def save_tensors(tensors, path, metadata=None):
    real_save(tensors, path, metadata)
    stop_here(os.path.basename(path))
def write_json(path, data):
    real_json(path, data)
    stop_here(os.path.basename(path))
def replace(src, dst):
    real_replace(src, dst)
    if str(dst).endswith(common.STATE_DIR + ".old"):
        stop_here("between-renames")
ckpt.save_tensors, ckpt.write_json, os.replace = save_tensors, write_json, replace

def train_and_save(run, model, opt, gen, ema, step):
    model(torch.randn(4, 6)).square().mean().backward()
    opt.step()
    common.save_train_state(run, model, opt, step, gen, {}, extra_modules={"ema": ema})

warm = torch.nn.Linear(6, 3)  # first use of autograd and AdamW here, once, not in every child
train_and_save(os.path.join(base, "warm-up"), warm, torch.optim.AdamW(warm.parameters()), torch.Generator(), warm, 1)
for point in points:
    pid = os.fork()
    if pid == 0:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Dropout(0.2), torch.nn.Linear(5, 3))
        ema = torch.nn.Linear(6, 5)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        run = os.path.join(base, point)
        train_and_save(run, model, opt, gen, ema, 1)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(base, f"expected-{point}.safetensors"))
        armed["point"] = point
        train_and_save(run, model, opt, gen, ema, 2)
        os._exit(3)  # not reached: the test kills the child while it waits inside the save
    _, status = os.waitpid(pid, 0)
    print(point, os.WTERMSIG(status) if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}", flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill points are reached in forked children")
def test_a_kill_at_any_point_of_a_checkpoint_write_leaves_the_previous_state_loadable(tmp_path):
    proc = _start(["-c", KILL_INSIDE_SAVE, str(tmp_path), ",".join(KILL_POINTS)], tmp_path / "log")
    t0 = time.time()
    for point in KILL_POINTS:
        marker = tmp_path / f"stopped-{point}"
        while not (marker.exists() and marker.read_text()):
            assert proc.poll() is None and time.time() - t0 < 300, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.005)
        os.kill(int(marker.read_text()), signal.SIGKILL)
    proc.wait(timeout=60)
    assert (tmp_path / "log").read_text().split() == [w for p in KILL_POINTS for w in (p, str(int(signal.SIGKILL)))]
    for point in KILL_POINTS:
        run = tmp_path / point
        left = sorted(p.name for p in run.iterdir())
        if point == "between-renames":  # the old state moved aside, the new one complete but not in place
            assert left == [common.STATE_DIR + ".old", f"{common.STATE_DIR}.tmp-{left[1].split('.tmp-')[1]}"], left
        else:  # the old state in place, the new one half-written beside it
            assert left[0] == common.STATE_DIR and left[1].startswith(common.STATE_DIR + ".tmp-") and len(left) == 2
        model, opt, gen, ema = _tiny_state(seed=1)
        assert common.has_train_state(str(run))  # restores the moved-aside state, clears the temporary one
        assert common.load_train_state(str(run), model, opt, gen, extra_modules={"ema": ema})["step"] == 1, point
        expected = load_file(str(tmp_path / f"expected-{point}.safetensors"))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items()), point
        assert sorted(p.name for p in run.iterdir()) == [common.STATE_DIR]


# ------------------------------------------------------------------------------------------------ state
def _tiny_state(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Dropout(0.2), torch.nn.Linear(5, 3))
    ema = torch.nn.Linear(6, 5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    return model, opt, gen, ema


def _saved_state(run: Path, step: int) -> dict:
    """A small model trained ``step`` steps and its training state saved in ``run``; returns its weights."""
    model, opt, gen, ema = _tiny_state()
    for _ in range(step):
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
    common.save_train_state(str(run), model, opt, step, gen, {"note": "test"}, extra_modules={"ema": ema})
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_full_disk_mid_run_stops_with_a_message_and_keeps_the_previous_state(tmp_path, monkeypatch):
    from diffusion_caption import checkpoint as ckpt

    first = _saved_state(tmp_path, 2)
    real, calls = ckpt.save_tensors, []

    def fills_the_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the optimizer file: a few bytes land, then ENOSPC
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tensors, path, metadata)

    monkeypatch.setattr(ckpt, "save_tensors", fills_the_disk)
    with pytest.raises(SystemExit) as e:
        _saved_state(tmp_path, 3)
    assert str(e.value) == (f"could not save the training state at step 3 to {tmp_path / common.STATE_DIR}: "
                            "No space left on device; the previous training state is intact")
    monkeypatch.setattr(ckpt, "save_tensors", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == [common.STATE_DIR]  # no half-written folder
    model, opt, gen, ema = _tiny_state(seed=1)
    assert common.load_train_state(str(tmp_path), model, opt, gen, extra_modules={"ema": ema})["step"] == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in first.items())


def test_a_damaged_training_state_stops_resume_with_the_file_named(tmp_path):
    from safetensors.torch import save_file

    _saved_state(tmp_path, 2)
    state = tmp_path / common.STATE_DIR
    wider = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Dropout(0.2), torch.nn.Linear(7, 3))
    cases = []
    t = load_file(str(state / "optimizer.safetensors"))
    t["state.0.exp_avg"] = torch.zeros(2, 2)
    cases.append(("optimizer.safetensors", t, r"optimizer\.safetensors: does not fit this run's optimizer.*exp_avg"))
    cases.append(("rng.safetensors", {"other": torch.zeros(1)}, r"rng\.safetensors: not a saved RNG state"))
    for name, tensors, why in cases:
        backup = (state / name).read_bytes()
        save_file(tensors, str(state / name))
        model, opt, gen, ema = _tiny_state()
        with pytest.raises(SystemExit, match=f"cannot resume from {re.escape(str(tmp_path))}: .*{why}"):
            common.load_train_state(str(tmp_path), model, opt, gen, extra_modules={"ema": ema})
        (state / name).write_bytes(backup)
    model, opt, gen, ema = _tiny_state()
    with pytest.raises(SystemExit, match=r"model\.safetensors does not match the model.*0\.weight: shape \(5, 6\)"):
        common.load_train_state(str(tmp_path), wider, torch.optim.AdamW(wider.parameters()), gen)
    (state / "ema.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle where weights should be
    with pytest.raises(SystemExit, match=r"ema\.safetensors: not a readable safetensors file"):
        common.load_train_state(str(tmp_path), model, opt, gen, extra_modules={"ema": ema})
    (state / "state.json").write_text('{"step": "three"}')
    with pytest.raises(SystemExit, match=r"state\.json: 'step' is 'three'"):
        common.load_train_state(str(tmp_path), model, opt, gen)


# ------------------------------------------------------------------------------------------------ disks
def test_unwritable_output_folders_fail_before_any_training(world_dir, clip_dir, cache_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    base = _args(world_dir, clip_dir, cache_dir, tmp_path / "ok")
    for flag, value in [("--run-dir", blocker / "run"), ("--out", blocker / "sub" / "out")]:
        args = list(base)
        args[args.index(flag) + 1] = str(value)
        t0 = time.perf_counter()
        with pytest.raises(SystemExit) as e:
            train_diffusion.main(args)
        assert str(e.value).startswith(f"cannot create the output directory {blocker}") and "Not a directory" in str(e.value)
        assert time.perf_counter() - t0 < 5 and not (tmp_path / "ok" / "run" / common.STATE_DIR).exists()
    if os.geteuid() != 0:  # root writes anywhere; the read-only mount below covers it
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(SystemExit, match="Permission denied"):
            common.check_writable(str(locked / "run"))


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (a tmpfs), for a full disk and a read-only one; needs root on Linux."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    d = tmp_path / "small-disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_a_real_full_disk_and_a_read_only_one(small_disk, world_dir, clip_dir, cache_dir, tmp_path):
    from diffusion_caption import checkpoint as ckpt

    run = small_disk / "run"
    (small_disk / "filler").write_bytes(b"\0" * (1536 << 10))  # 1.5 of 2 MiB used
    with pytest.raises(SystemExit, match=f"cannot write to the output directory {run}: No space left on device"):
        train_diffusion.main(_args(world_dir, clip_dir, cache_dir, tmp_path, "--run-dir", str(run)))
    with pytest.raises(OSError, match="could not write .*big.safetensors: No space left on device") as e:
        ckpt.save_tensors({"w": torch.zeros(1 << 18)}, str(run / "big.safetensors"))  # 1 MiB into 0.5
    assert e.value.errno == errno.ENOSPC and os.listdir(run) == []  # the partial file is gone
    model = torch.nn.Linear(512, 512)  # 1 MiB of weights, 3 MiB with Adam's moments: more than is free
    opt = torch.optim.AdamW(model.parameters())
    _train_steps_linear(model, opt)
    with pytest.raises(SystemExit, match=r"not enough disk space in .* for the training state at step 1: "
                                         r"[\d.]+ MiB needed, [\d.]+ MiB free"):
        common.save_train_state(str(run), model, opt, 1, torch.Generator(), {})
    assert os.listdir(run) == []
    fd = os.open(small_disk / "filler-2", os.O_WRONLY | os.O_CREAT)  # now fill it to the last byte
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as full:
        assert full.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with pytest.raises(SystemExit, match=f"could not append to the training log {run}/log.jsonl: No space left"):
        common.write_log(str(run), {"step": 1, "loss": 0.5})
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(SystemExit, match=f"cannot write to the output directory {run}: Read-only file system"):
        common.check_writable(str(run))


def _train_steps_linear(model, opt) -> None:
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
