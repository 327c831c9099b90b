"""The ablation runner on the tiny world: a grid end to end, and resuming after interruptions."""
import json
import math

import pytest
import torch

from research import ablate
from training import common, train_clip, train_diffusion

TINY = "--preset tiny --dim 32 --n-layers 1 --hidden-dim 64 --warmup 1"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, world_dir):
    out = str(tmp_path_factory.mktemp("clip") / "shapes-clip")
    run = str(tmp_path_factory.mktemp("clip-run"))
    train_clip.main(["--data-dir", world_dir, "--out", out, "--run-dir", run, "--steps", "2", "--batch-size", "16",
                     "--corpus-size", "24", "--val-every", "2", "--ckpt-every", "2", "--warmup", "1", "--device", "cpu"])
    return out


def _args(world_dir, clip_dir, tmp, grid, *extra, steps=1, train_args=TINY):
    return ["--grid", grid, "--steps", str(steps), "--batch-size", "8", "--val-every", "1", "--train-args", train_args,
            "--data-dir", world_dir, "--clip", clip_dir, "--cache-dir", str(tmp / "cache"),
            "--runs-dir", str(tmp / "runs"), "--device", "cpu", "--eval-limit", "4", "--eval-steps", "2",
            "--tokenizer", "simple", "--results", str(tmp / "results.json"), "--doc", str(tmp / "ABLATIONS.md"),
            "--plots-dir", str(tmp / "plots"), *extra]


def _records(tmp, kind):
    return [r for r in json.loads((tmp / "results.json").read_text())["records"] if r["type"] == kind]


@pytest.fixture
def count_trainings(monkeypatch):
    calls = []
    real = train_diffusion.main

    def counted(argv):
        calls.append(argv)
        return real(argv)

    monkeypatch.setattr(ablate.train_diffusion, "main", counted)
    return calls


def test_grid_of_two_one_step_runs_end_to_end(world_dir, clip_dir, tmp_path, count_trainings):
    counts = ablate.main(_args(world_dir, clip_dir, tmp_path, "fusion"))
    assert counts["trained"] == 2 and counts["evaluated"] == 2 and len(count_trainings) == 2
    trainings, evals = _records(tmp_path, "training"), _records(tmp_path, "evaluation")
    assert [r["label"] for r in trainings] == ["concat", "add"]
    assert trainings[1]["change"] == ["--fusion", "add"]
    assert all(r["log"] and r["log"][-1]["step"] == 1 and "val_token_acc" in r["log"][-1] for r in trainings)
    for ev in evals:
        assert ev["n_images"] == 4 and 0.0 <= ev["row"]["BLEU-4"] <= 1.0 and ev["settings"]["steps"] == 2
    # the two runs really differ in their one change: the add model has no prefix token
    from diffusion_caption.eval.evaluation import load_model

    fusions = [load_model(r["checkpoint"]).config.fusion for r in trainings]
    assert fusions == ["concat", "add"]
    doc = (tmp_path / "ABLATIONS.md").read_text()
    assert "<!-- ablate:fusion -->" in doc and "| concat |" in doc and "| add |" in doc
    assert "paper: concat > add; ours: BLEU-4" in doc
    assert (tmp_path / "plots" / "fusion.png").stat().st_size > 1000

    # run again: everything is read back, nothing is trained or evaluated
    counts = ablate.main(_args(world_dir, clip_dir, tmp_path, "fusion"))
    assert counts["trained"] == 0 and counts["evaluated"] == 0 and len(count_trainings) == 2
    assert len(_records(tmp_path, "evaluation")) == 2

    # the reference run is shared: the 'predict' grid trains only its eps run
    counts = ablate.main(_args(world_dir, clip_dir, tmp_path, "predict"))
    assert counts == {"trained": 1, "evaluated": 1, "reused_trainings": 1, "reused_evaluations": 1}
    assert count_trainings[-1][count_trainings[-1].index("--predict") + 1] == "eps"


def test_resume_runs_only_the_missing_runs(world_dir, clip_dir, tmp_path, count_trainings):
    # killed between runs: after the first run of the grid
    ablate.main(_args(world_dir, clip_dir, tmp_path, "fusion", "--stop-after", "1"))
    first = _records(tmp_path, "evaluation")
    assert [r["label"] for r in first] == ["concat"] and len(count_trainings) == 1
    ablate.main(_args(world_dir, clip_dir, tmp_path, "fusion"))
    assert len(count_trainings) == 2 and "add" in " ".join(count_trainings[1])
    evals = _records(tmp_path, "evaluation")
    assert [r["label"] for r in evals] == ["concat", "add"]
    assert evals[0] == first[0]  # the finished run was kept as it was, not redone

    # killed during an evaluation: the training is kept, only the evaluation runs again
    def killed(*a, **k):
        raise KeyboardInterrupt

    real_evaluate = ablate.evaluate
    ablate.evaluate = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            ablate.main(_args(world_dir, clip_dir, tmp_path, "predict"))
    finally:
        ablate.evaluate = real_evaluate
    assert len(count_trainings) == 3 and [r["label"] for r in _records(tmp_path, "training")][-1] == "eps"
    counts = ablate.main(_args(world_dir, clip_dir, tmp_path, "predict"))
    assert counts["trained"] == 0 and counts["evaluated"] == 1 and len(count_trainings) == 3
    assert [r["label"] for r in _records(tmp_path, "evaluation")] == ["concat", "add", "eps"]


def test_a_training_killed_part_way_continues_from_its_checkpoint(world_dir, clip_dir, tmp_path, monkeypatch,
                                                                 capsys):
    real = train_diffusion.main

    def killed_after_step_1(argv):
        real([*argv, "--stop-at", "1"])  # checkpoints step 1 and returns, as a kill right after it would
        raise KeyboardInterrupt

    monkeypatch.setattr(ablate.train_diffusion, "main", killed_after_step_1)
    with pytest.raises(KeyboardInterrupt):
        ablate.main(_args(world_dir, clip_dir, tmp_path, "fusion", steps=2))
    assert not (tmp_path / "results.json").exists()
    monkeypatch.setattr(ablate.train_diffusion, "main", real)
    capsys.readouterr()
    ablate.main(_args(world_dir, clip_dir, tmp_path, "fusion", "--stop-after", "1", steps=2))
    assert "at step 1" in capsys.readouterr().out  # "resumed from RUN_DIR at step 1"
    trainings = _records(tmp_path, "training")
    assert [r["label"] for r in trainings] == ["concat"]
    assert [r["step"] for r in trainings[0]["log"]] == [1, 2] and trainings[0]["resumed_from_step"] == 1
    assert "Resumed after an interruption" in (tmp_path / "ABLATIONS.md").read_text()


def test_train_keys_depend_on_the_change_budget_and_seed():
    b = ablate.Budget()
    fusion = ablate.GRIDS["fusion"]
    concat, add = fusion.runs
    assert b.train_key(concat, 0) == b.train_key(ablate.GRIDS["predict"].runs[0], 0)  # the shared reference
    assert len({b.train_key(concat, 0), b.train_key(add, 0), b.train_key(concat, 1),
                ablate.Budget(steps=10).train_key(concat, 0)}) == 4
    # the last flag wins in argparse: the run's change overrides the shared config and --train-args
    tcfg, mcfg, _ = train_diffusion.configs_from_args(ablate.Budget(train_args=("--fusion", "concat")).train_flags(add, 3))
    assert mcfg.fusion == "add" and tcfg.seed == 3 and mcfg.dim == 128 and tcfg.steps == 6000


def test_every_grid_parses_and_every_expectation_names_a_row():
    b = ablate.Budget()
    for grid in ablate.GRIDS.values():
        labels = {ablate.eval_label(r, b.eval_settings(e)) for r in grid.runs for e in r.evals}
        for better, worse in grid.expect:
            assert better in labels and worse in labels, (grid.name, better, worse)
        for run in grid.runs:
            train_diffusion.configs_from_args(b.train_flags(run, 0))  # raises SystemExit on a bad flag


@pytest.mark.parametrize("schedule", common.LR_SCHEDULES)
def test_lr_schedules_go_from_lr_to_lr_end(schedule):
    lrs = [common.scheduled_lr(schedule, s, 100, 1e-3, 5e-5, warmup=10) for s in range(101)]
    assert math.isclose(lrs[9], 1e-3) and lrs[0] < lrs[9]
    end = 1e-3 if schedule == "constant" else 5e-5
    assert math.isclose(lrs[100], end, rel_tol=1e-9)
    assert all(a >= b - 1e-15 for a, b in zip(lrs[10:], lrs[11:]))  # never increasing after warm-up
    if schedule == "linear":
        assert lrs == [common.linear_lr(s, 100, 1e-3, 5e-5, 10) for s in range(101)]
    with pytest.raises(ValueError):
        common.scheduled_lr("step", 0, 10, 1e-3, 1e-4)


def test_optimizer_choice_and_bad_names_fail_loudly():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert type(common.make_optimizer("adamw", params, 1e-3)) is torch.optim.AdamW
    assert type(common.make_optimizer("adam", params, 1e-3)) is torch.optim.Adam
    assert type(common.make_optimizer("sgd", params, 1e-3)) is torch.optim.SGD
    with pytest.raises(ValueError):
        common.make_optimizer("lamb", params, 1e-3)
    for bad in (["--optimizer", "lamb"], ["--lr-schedule", "step"]):
        with pytest.raises(SystemExit):
            train_diffusion.configs_from_args(bad)
