"""The seed paper's experiments, one named grid per question, on the shapes world.

    python -m research.ablate --list                      # the grids, their runs and the paper's direction
    python -m research.ablate --grid fusion               # concat vs add: train, evaluate, append results
    python -m research.ablate --grid lambda-round --steps 6000 --seeds 0,1,2   # a larger budget, three seeds
    python -m research.ablate --report                    # rewrite the tables and plots of research/ABLATIONS.md

Every run is a short training of the ``shapes`` preset from one shared config (``SHARED_FLAGS``, a smaller
denoiser so a run takes minutes on 2 CPU cores) plus the one change its grid is about, with the same
step budget and seeds, then an evaluation by ``diffusion_caption.eval.evaluation.evaluate`` (the protocol of
``training.evaluate``) on the first ``--eval-limit`` test images.

Results go to one JSON file (``--results``), appended record by record as each training and each
evaluation finishes; a record is keyed by a hash of everything that determines it (the training flags,
the evaluation settings and data), not by its grid, so the unchanged reference run is trained once and
serves every grid. An interrupted grid resumes where it stopped: finished trainings and evaluations are
read back and never repeated, and a training killed part-way continues from its last checkpoint
(``train_diffusion --resume``). After a grid, the plots (``--plots-dir``) and the generated sections of
``--doc`` (between ``<!-- ablate:GRID -->`` markers; text outside them is kept) are rewritten.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from diffusion_caption import checkpoint as ckpt
from diffusion_caption.eval.evaluation import evaluate, load_model, summary_row
from diffusion_caption.data import load_datasets
from training import train_diffusion

RESULTS_FORMAT = "diffusion-caption-ablations/1"

# The shared config: the shapes preset with a smaller denoiser (0.63 M instead of 2.2 M parameters) and a
# shorter EMA (0.999 ** 2000 would still leave 14 % of the random initial weights in a 2000-step run).
SHARED_FLAGS = ("--preset", "shapes", "--dim", "128", "--n-layers", "2", "--hidden-dim", "512", "--warmup", "100",
                "--ema", "0.995")
HEADLINE = "BLEU-4"  # the paper's metric, used for the agree / disagree column


@dataclass(frozen=True)
class Run:
    label: str
    flags: tuple[str, ...] = ()  # train_diffusion flags: the one change from the shared config
    evals: tuple[dict, ...] = ({},)  # sampling settings of each evaluation ({} = the model's defaults)
    world: tuple[tuple[str, object], ...] = ()  # WorldConfig overrides: train on a world rendered for the run


@dataclass(frozen=True)
class Grid:
    name: str
    question: str
    paper: str  # the seed paper's reported direction, in words
    runs: tuple[Run, ...]
    expect: tuple[tuple[str, str], ...] = ()  # (row the paper found better, row it found worse) on BLEU-4
    notes: str = ""


REF = Run("reference")  # the shared config unchanged: the same training in every grid


def _ref(label: str, evals: tuple[dict, ...] = ({},)) -> Run:
    return Run(label, (), evals)


GUIDED = ({"guidance": 1.0}, {"guidance": 1.3}, {"guidance": 2.0})

GRIDS: dict[str, Grid] = {g.name: g for g in (
    Grid("fusion", "Fusing the CLIP feature by concatenation (a prefix token) or by elementwise adding",
         "concat better: BLEU-4 0.1549 vs 0.1033 (add) on Flickr8k, 0.2337 vs 0.1948 on Flickr8k+30k",
         (_ref("concat"), Run("add", ("--fusion", "add"))), (("concat", "add"),)),
    Grid("lambda-round", "The rounding cross-entropy weight lambda, including 0",
         "0.3 best of 0.2/0.3/0.5/1.0; at 0 the model collapses to random tokens",
         (Run("lambda 0", ("--lambda-round", "0")), _ref("lambda 0.3"), Run("lambda 1.0", ("--lambda-round", "1.0"))),
         (("lambda 0.3", "lambda 0"), ("lambda 0.3", "lambda 1.0"))),
    Grid("lr-schedule", "Learning-rate schedule after warm-up (1e-3 -> 5e-5)",
         "linear decay (1e-4 -> 5e-5) best of constant / log / cosine annealing",
         (_ref("linear"), Run("constant", ("--lr-schedule", "constant")), Run("log", ("--lr-schedule", "log")),
          Run("cosine", ("--lr-schedule", "cosine"))),
         (("linear", "constant"), ("linear", "log"), ("linear", "cosine"))),
    Grid("lr", "Peak learning rate (linear decay to 5e-5)",
         "used 1e-4 (fine-tuning pretrained DistilBERT at batch 8); no comparison quoted",
         (Run("lr 3e-4", ("--lr", "3e-4")), _ref("lr 1e-3"), Run("lr 3e-3", ("--lr", "3e-3")))),
    Grid("optimizer", "Optimizer",
         "used AdamW; no comparison quoted",
         (_ref("AdamW (wd 0)"), Run("AdamW wd 0.01", ("--weight-decay", "0.01")),
          Run("Adam + L2 0.01", ("--optimizer", "adam", "--weight-decay", "0.01")),
          Run("SGD Nesterov, lr 0.05", ("--optimizer", "sgd", "--lr", "0.05", "--lr-end", "0.0025"))),
         notes="With weight decay 0 Adam and AdamW are the same update, so the decay is what differs."),
    Grid("noise-schedule", "Noise schedule",
         "tried cosine against other schedules and kept cosine (our `base` preset); no numbers quoted",
         (_ref("sqrt"), Run("cosine", ("--schedule", "cosine")), Run("linear", ("--schedule", "linear"))),
         (("cosine", "sqrt"), ("cosine", "linear"))),
    Grid("guidance", "Classifier-free guidance: condition dropout p_uncond in training, scale w in sampling",
         "trained with p_uncond 0.2, sampled with w 0.3 and 1.0; guidance not adopted (no gain)",
         (Run("p_uncond 0", ("--p-uncond", "0")), _ref("p_uncond 0.1", GUIDED),
          Run("p_uncond 0.2", ("--p-uncond", "0.2"), GUIDED)),
         (("p_uncond 0.2, w 1", "p_uncond 0.2, w 1.3"), ("p_uncond 0.2, w 1", "p_uncond 0.2, w 2")),
         notes="Our scale is x0 = x0_uncond + w' (x0_cond - x0_uncond), w' = 1 no guidance; the paper's w "
               "(Ho & Salimans' (1 + w) cond - w uncond) is w' - 1, so its 0.3 and 1.0 are our 1.3 and 2."),
    Grid("predict-feature", "An extra head predicting the image feature from the text positions",
         "tried predicting the image feature; no numbers quoted",
         (_ref("no feature head"), Run("feature head (lambda 0.1)", ("--predict-feature", "true")))),
    Grid("predict", "What the network predicts: x0, or (ours) the noise eps",
         "x0 prediction better: BLEU-4 0.1549 vs 0.1474 for predicting x_{t-100}",
         (_ref("x0"), Run("eps", ("--predict", "eps"))), (("x0", "eps"),),
         notes="The paper's alternative was x_{t-n} (n = 100 steps back); ours is the noise, the usual one."),
    Grid("seed", "Training-seed noise: the shared config under three training seeds",
         "not a question of the paper; the spread of these rows is the noise floor of a one-seed comparison",
         (_ref("seed 0"), Run("seed 1", ("--seed", "1")), Run("seed 2", ("--seed", "2"))),
         notes="A run's own --seed comes after the grid's --seeds, so it wins; use --seeds 0 with this grid."),
    Grid("data", "More training data (same steps, so fewer passes over each image)",
         "more data better: BLEU-4 0.2337 (Flickr8k+30k) vs 0.1549 (Flickr8k)",
         (Run("2000 images", ("--train-limit", "2000")), _ref("8000 images"),
          Run("16000 images", (), ({},), (("n_train", 16000),)),
          Run("8000 + 8000 re-backgrounded", (), ({},), (("augment_backgrounds", 1),))),
         (("8000 images", "2000 images"), ("16000 images", "8000 images")),
         notes="'16000 images' is the same world with more scenes (its first 8000 are the usual ones); "
               "the re-backgrounded copies also break the training split's shape/background correlation."),
)}


# ------------------------------------------------------------------------------------------------ keys
def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text.lower()).strip("-")


def eval_label(run: Run, settings: dict) -> str:
    """A table row's name: the run's label, plus the guidance scale when the run is evaluated at several."""
    if len(run.evals) == 1:
        return run.label
    return f"{run.label}, w {settings.get('guidance', 1.0):g}"


@dataclass
class Budget:
    """Everything shared by every run of an ablation: the step budget, data, evaluation protocol."""
    # 6000 steps: at 2000 the shared config had not yet learned to read the image (single-object colour
    # 0.19, shape 0.23), so every comparison was between two models that ignore it
    steps: int = 6000
    batch_size: int = 64
    seeds: tuple[int, ...] = (0,)
    data_dir: str = "data/shapes"
    clip: str = "assets/checkpoints/shapes-clip"
    cache_dir: str = "cache"
    runs_dir: str = "runs/ablate"
    device: str = "auto"
    val_every: int = 1000
    train_args: tuple[str, ...] = ()  # extra train_diffusion flags for every run (after SHARED_FLAGS)
    split: str = "test"
    eval_limit: int = 300
    eval_steps: int = 20
    eval_seed: int = 0
    eval_batch_size: int = 250
    tokenizer: str = "ptb"
    extra: dict = field(default_factory=dict)

    def world_dir(self, run: Run) -> str:
        return os.path.join(self.runs_dir, "worlds", _slug("-".join(f"{k}-{v}" for k, v in run.world)))

    def train_flags(self, run: Run, seed: int) -> list[str]:
        """The training's flags, paths that do not change its result left out (they are added in ``argv``)."""
        data_dir = self.world_dir(run) if run.world else self.data_dir
        return [*SHARED_FLAGS, "--steps", str(self.steps), "--batch-size", str(self.batch_size),
                "--val-every", str(self.val_every), "--data-dir", data_dir, "--clip", self.clip,
                "--seed", str(seed), *self.train_args, *run.flags]

    def train_key(self, run: Run, seed: int) -> str:
        return _hash({"flags": self.train_flags(run, seed), "world": [list(kv) for kv in run.world]})

    def eval_settings(self, evals: dict) -> dict:
        return {"steps": self.eval_steps, "sampler": "ddim", "guidance": 1.0, "seed": self.eval_seed,
                "clamp": False, **evals}

    def eval_key(self, train_key: str, settings: dict) -> str:
        return _hash({"train": train_key, "settings": settings, "data": self.data_dir, "split": self.split,
                      "limit": self.eval_limit, "tokenizer": self.tokenizer})


# ------------------------------------------------------------------------------------------------ results
def read_results(path: str) -> dict:
    if not os.path.isfile(path):
        return {"format": RESULTS_FORMAT, "records": []}
    data = ckpt.read_json(path)
    if data.get("format") != RESULTS_FORMAT:
        raise SystemExit(f"{path}: not an ablation results file (format {data.get('format')!r})")
    return data


def append_result(path: str, record: dict) -> None:
    """Add one record, rewriting the file atomically (a kill leaves the old file or the new one)."""
    data = read_results(path)
    data["records"] = [r for r in data["records"] if r["key"] != record["key"]] + [record]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ckpt.write_json(path, data)


def read_log(run_dir: str) -> list[dict]:
    """``log.jsonl`` of a training, one record per step (a resumed run may have logged a step twice)."""
    by_step: dict[int, dict] = {}
    path = os.path.join(run_dir, "log.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def ensure_world(run: Run, budget: Budget) -> str:
    from diffusion_caption.world.scenes import WorldConfig, write_dataset

    out = budget.world_dir(run)
    if not os.path.isfile(os.path.join(out, "dataset_shapes.json")):
        write_dataset(out, WorldConfig(**dict(run.world)))
    return out


# ------------------------------------------------------------------------------------------------ running
def plan(grid: Grid, budget: Budget) -> list[tuple[Run, int]]:
    return [(run, seed) for run in grid.runs for seed in budget.seeds]


def run_grid(grid: Grid, budget: Budget, results_path: str, stop_after: int = 0) -> dict:
    """Train and evaluate every run of ``grid`` that ``results_path`` does not hold yet.

    Returns counts of what was done now and what was found done. ``stop_after`` ends after that many
    runs were completed by this call, as if killed (for testing the resume).
    """
    done = {r["key"]: r for r in read_results(results_path)["records"]}
    counts = {"trained": 0, "evaluated": 0, "reused_trainings": 0, "reused_evaluations": 0}
    todo = plan(grid, budget)
    completed_now = 0
    for run, seed in tqdm(todo, desc=f"ablate {grid.name}"):
        tkey = budget.train_key(run, seed)
        run_dir = os.path.join(budget.runs_dir, grid.name, f"{_slug(run.label)}-s{seed}-{tkey}")
        # an earlier grid may have trained the same config (the shared reference) under its own folder
        if tkey in done and os.path.isdir(done[tkey]["run_dir"]):
            run_dir = done[tkey]["run_dir"]
        out = os.path.join(run_dir, "final")
        evals = [(budget.eval_settings(e), e) for e in run.evals]
        missing = [(s, e) for s, e in evals if budget.eval_key(tkey, s) not in done]
        if tkey in done and not missing:
            counts["reused_trainings"] += 1
            counts["reused_evaluations"] += len(evals)
            continue
        if tkey not in done or not os.path.isfile(os.path.join(out, "config.json")):
            if run.world:
                ensure_world(run, budget)
            argv = [*budget.train_flags(run, seed), "--run-dir", run_dir, "--out", out,
                    "--cache-dir", budget.cache_dir, "--device", budget.device, "--ckpt-every", str(budget.val_every),
                    "--resume", "true"]
            tqdm.write(f"[{grid.name}] training {run.label!r} seed {seed}: python -m training.train_diffusion "
                       + shlex.join(argv))
            state = os.path.join(run_dir, "train_state", "state.json")
            resumed_from = ckpt.read_json(state)["step"] if os.path.isfile(state) else 0
            t0, c0 = time.time(), time.process_time()
            train_diffusion.main(argv)
            if not os.path.isfile(os.path.join(out, "config.json")):
                raise RuntimeError(f"training {run_dir} ended without a checkpoint at {out}")
            rec = {"type": "training", "key": tkey, "grid": grid.name, "label": run.label, "seed": seed,
                   "flags": budget.train_flags(run, seed), "change": list(run.flags), "world": dict(run.world),
                   "run_dir": run_dir, "checkpoint": out, "seconds": round(time.time() - t0, 1),
                   "cpu_seconds": round(time.process_time() - c0, 1), "resumed_from_step": resumed_from,
                   "log": read_log(run_dir), "host": _host(), "finished_at": time.time()}
            append_result(results_path, rec)
            done[tkey] = rec
            counts["trained"] += 1
        else:
            counts["reused_trainings"] += 1
        counts["reused_evaluations"] += len(evals) - len(missing)
        if missing:
            device = budget.device if budget.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            model = load_model(out, device=device)
            records = load_datasets("shapes", budget.data_dir, splits=[budget.split])
            records = records[:budget.eval_limit] if budget.eval_limit else records
            for settings, _ in missing:
                s = model.settings(settings["seed"], steps=settings["steps"], sampler=settings["sampler"],
                                   guidance=settings["guidance"], clamp=settings["clamp"],
                                   spacing=settings.get("spacing", "linspace"))  # as every record so far
                torch.manual_seed(s["seed"])
                t0 = time.time()
                res = evaluate(model, records, s, budget.eval_batch_size, budget.cache_dir, tokenizer=budget.tokenizer)
                ekey = budget.eval_key(tkey, settings)
                rec = {"type": "evaluation", "key": ekey, "train_key": tkey, "grid": grid.name,
                       "label": eval_label(run, settings), "seed": seed, "settings": s, "data": budget.data_dir,
                       "split": budget.split, "n_images": len(records), "tokenizer": budget.tokenizer,
                       "row": summary_row(res), "attributes": res.get("attributes"), "bias": res.get("bias"),
                       "notes": res.get("metrics", {}).get("notes", []), "seconds": round(time.time() - t0, 1),
                       "examples": [{k: c[k] for k in ("image_id", "caption", "references")}
                                    for c in res["captions"][:5]],
                       "finished_at": time.time()}
                append_result(results_path, rec)
                done[ekey] = rec
                counts["evaluated"] += 1
                tqdm.write(f"[{grid.name}] {rec['label']} seed {seed}: "
                           + " ".join(f"{k}={v:.3f}" for k, v in rec["row"].items() if isinstance(v, float)))
        completed_now += 1
        if stop_after and completed_now >= stop_after:
            tqdm.write(f"stopped after {completed_now} runs (--stop-after); run the same command again to go on")
            break
    return counts


def _host() -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ------------------------------------------------------------------------------------------------ report
COLUMNS = ("BLEU-4", "METEOR", "CIDEr", "1-obj colour", "1-obj shape", "count", "relation", "hallucination",
           "bias shape")


def grid_rows(grid: Grid, budget: Budget, records: list[dict]) -> list[dict]:
    """One row per (run, evaluation setting) that has results, means over the seeds present."""
    by_key = {r["key"]: r for r in records}
    rows = []
    for run in grid.runs:
        for e in run.evals:
            settings = budget.eval_settings(e)
            evs, trs = [], []
            for seed in budget.seeds:
                tkey = budget.train_key(run, seed)
                ev = by_key.get(budget.eval_key(tkey, settings))
                if ev is not None:
                    evs.append(ev)
                    trs.append(by_key.get(tkey))
            if not evs:
                continue
            row = {"run": eval_label(run, settings), "change": " ".join(run.flags) or
                   (" ".join(f"world {k}={v}" for k, v in run.world) or "(shared config)")}
            for c in COLUMNS:
                vals = [ev["row"].get(c) for ev in evs if ev["row"].get(c) is not None]
                row[c] = sum(vals) / len(vals) if vals else None
                if c == HEADLINE and len(vals) > 1:
                    row["BLEU-4 seeds"] = "/".join(f"{v:.3f}" for v in vals)
            logs = [t["log"][-1] for t in trs if t and t.get("log")]
            row["val tok acc"] = sum(lg["val_token_acc"] for lg in logs) / len(logs) if logs else None
            cpu = [t["cpu_seconds"] for t in trs if t and "cpu_seconds" in t]
            row["train CPU min"] = sum(cpu) / 60 / len(cpu) if cpu else None
            row["seeds"] = len(evs)
            rows.append(row)
    return rows


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def seed_spread(budget: Budget, records: list[dict]) -> float | None:
    """max - min BLEU-4 of the 'seed' grid's rows (the shared config under several training seeds)."""
    vals = [r[HEADLINE] for r in grid_rows(GRIDS["seed"], budget, records) if r.get(HEADLINE) is not None]
    return max(vals) - min(vals) if len(vals) > 1 else None


def verdicts(grid: Grid, rows: list[dict], spread: float | None = None) -> list[str]:
    """Each of the paper's pairwise findings against ours, on BLEU-4 (the paper's metric); a difference
    no larger than the training-seed spread is called within noise."""
    by = {r["run"]: r for r in rows}
    out = []
    for better, worse in grid.expect:
        if better not in by or worse not in by or by[better][HEADLINE] is None or by[worse][HEADLINE] is None:
            out.append(f"- paper: {better} > {worse}: not measured yet")
            continue
        d = by[better][HEADLINE] - by[worse][HEADLINE]
        word = "agrees" if d > 0 else ("ties" if d == 0 else "disagrees")
        noise = "" if spread is None else (f", within the seed spread {spread:.3f}" if abs(d) <= spread
                                           else f", beyond the seed spread {spread:.3f}")
        out.append(f"- paper: {better} > {worse}; ours: {HEADLINE} {by[better][HEADLINE]:.3f} vs "
                   f"{by[worse][HEADLINE]:.3f} ({d:+.3f}): **{word}**{noise}")
    return out


def plot_grid(grid: Grid, budget: Budget, records: list[dict], path: str) -> bool:
    """Validation curves (x0 MSE, rounding CE, token accuracy) of every trained run; False if none yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {r["key"]: r for r in records}
    curves = []
    for run in grid.runs:
        for seed in budget.seeds:
            tr = by_key.get(budget.train_key(run, seed))
            if tr and tr.get("log"):
                curves.append((run.label + (f" (seed {seed})" if len(budget.seeds) > 1 else ""), tr["log"]))
    if not curves:
        return False
    panels = (("val_mse", "validation MSE (x0, or eps for eps runs)", True),
              ("val_round", "validation rounding CE", True), ("val_token_acc", "validation token accuracy", False))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, (key, title, log) in zip(axes, panels):
        for label, log_recs in curves:
            pts = [(r["step"], r[key]) for r in log_recs if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"ablation '{grid.name}': {grid.question}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def command_line(grid: Grid, budget: Budget) -> str:
    default = Budget()
    parts = ["python -m research.ablate --grid", grid.name]
    for flag, name in (("--steps", "steps"), ("--batch-size", "batch_size"), ("--eval-limit", "eval_limit"),
                       ("--eval-steps", "eval_steps"), ("--tokenizer", "tokenizer")):
        if getattr(budget, name) != getattr(default, name):
            parts += [flag, str(getattr(budget, name))]
    if budget.seeds != default.seeds:
        parts += ["--seeds", ",".join(map(str, budget.seeds))]
    if budget.train_args:
        parts += ["--train-args", shlex.quote(" ".join(budget.train_args))]
    return " ".join(parts)


def grid_section(grid: Grid, budget: Budget, records: list[dict], plot_path: str, doc_path: str) -> str:
    rows = grid_rows(grid, budget, records)
    lines = [f"**Question.** {grid.question}.", "", f"**Paper.** {grid.paper}.", ""]
    if grid.notes:
        lines += [grid.notes, ""]
    lines += ["```bash", command_line(grid, budget), "```", ""]
    if not rows:
        lines += ["Not run yet: the command above runs it.", ""]
        return "\n".join(lines)
    n_runs = sum(len(r.evals) for r in grid.runs)
    if len(rows) < n_runs:
        lines += [f"Partial: {len(rows)} of {n_runs} rows measured so far.", ""]
    lines += [markdown(rows), ""]
    resumed = sorted({f"{r['label']} (seed {r['seed']}, from step {r['resumed_from_step']})" for r in records
                      if r["type"] == "training" and r.get("resumed_from_step")
                      and r["key"] in {budget.train_key(run, s) for run in grid.runs for s in budget.seeds}})
    if resumed:
        lines += ["Resumed after an interruption (CPU time counts the last part only): " + ", ".join(resumed) + ".", ""]
    v = verdicts(grid, rows, seed_spread(budget, records))
    if v:
        lines += v + [""]
    if plot_grid(grid, budget, records, plot_path):
        rel = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(doc_path)))
        lines += [f"![validation curves of '{grid.name}']({rel})", ""]
    return "\n".join(lines)


def write_report(budget: Budget, results_path: str, doc_path: str, plots_dir: str,
                 grids: list[str] | None = None) -> None:
    """Rewrite each grid's generated section of ``doc_path`` (creating the file if needed), keeping the rest."""
    records = read_results(results_path)["records"]
    text = open(doc_path).read() if os.path.isfile(doc_path) else "# Ablations\n\n"
    for name in grids or list(GRIDS):
        grid = GRIDS[name]
        begin, end = f"<!-- ablate:{name} -->", f"<!-- /ablate:{name} -->"
        body = grid_section(grid, budget, records, os.path.join(plots_dir, f"{name}.png"), doc_path)
        block = f"{begin}\n{body}{end}"
        if begin in text and end in text:
            text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
        else:
            text = text.rstrip("\n") + f"\n\n## {name}\n\n{block}\n"
    os.makedirs(os.path.dirname(os.path.abspath(doc_path)), exist_ok=True)
    with open(doc_path + ".tmp", "w") as f:
        f.write(text)
    os.replace(doc_path + ".tmp", doc_path)


# ------------------------------------------------------------------------------------------------ CLI
def list_grids(budget: Budget) -> str:
    out = []
    for g in GRIDS.values():
        out.append(f"{g.name}: {g.question}\n    paper: {g.paper}")
        for run in g.runs:
            change = " ".join(run.flags) or " ".join(f"world {k}={v}" for k, v in run.world) or "(shared config)"
            ev = "" if len(run.evals) == 1 else "  evaluated at " + ", ".join(
                f"w {e.get('guidance', 1.0):g}" for e in run.evals)
            out.append(f"    - {run.label}: {change}{ev}")
    out.append("shared config: " + " ".join(SHARED_FLAGS) + f" --steps {budget.steps} --batch-size {budget.batch_size}")
    return "\n".join(out)


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=sorted(GRIDS), help="the grid to run")
    p.add_argument("--list", action="store_true", help="list the grids and exit")
    p.add_argument("--report", action="store_true", help="only rewrite the doc sections and plots from --results")
    d = Budget()
    p.add_argument("--steps", type=int, default=d.steps, help="training steps of every run")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seeds", default="0", help="comma-separated training seeds; each run once per seed")
    p.add_argument("--train-args", default="", help="extra train_diffusion flags for every run, e.g. '--dim 192'")
    p.add_argument("--val-every", type=int, default=d.val_every, help="validation (and checkpoint) interval")
    p.add_argument("--data-dir", default=d.data_dir)
    p.add_argument("--clip", default=d.clip)
    p.add_argument("--cache-dir", default=d.cache_dir)
    p.add_argument("--runs-dir", default=d.runs_dir, help="training folders (checkpoints, logs)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--split", default=d.split)
    p.add_argument("--eval-limit", type=int, default=d.eval_limit, help="evaluate on the first N images (0: all)")
    p.add_argument("--eval-steps", type=int, default=d.eval_steps, help="DDIM sampling steps in evaluation")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--tokenizer", default=d.tokenizer, choices=["ptb", "simple"])
    p.add_argument("--results", default="research/ablations/results.json")
    p.add_argument("--doc", default="research/ABLATIONS.md")
    p.add_argument("--plots-dir", default="research/ablations")
    p.add_argument("--no-report", action="store_true", help="do not rewrite the doc after the grid")
    p.add_argument("--stop-after", type=int, default=0, help="stop after N runs as if killed (to test resuming)")
    args = p.parse_args(argv)
    budget = Budget(steps=args.steps, batch_size=args.batch_size,
                    seeds=tuple(int(s) for s in args.seeds.split(",") if s.strip()), data_dir=args.data_dir,
                    clip=args.clip, cache_dir=args.cache_dir, runs_dir=args.runs_dir, device=args.device,
                    val_every=args.val_every, train_args=tuple(shlex.split(args.train_args)), split=args.split,
                    eval_limit=args.eval_limit, eval_steps=args.eval_steps, eval_batch_size=args.eval_batch_size,
                    tokenizer=args.tokenizer)
    if not budget.seeds:
        p.error("--seeds needs at least one seed")
    if args.list:
        print(list_grids(budget))
        return None
    if args.report:
        write_report(budget, args.results, args.doc, args.plots_dir)
        print(f"wrote {args.doc} and plots in {args.plots_dir}")
        return None
    if not args.grid:
        p.error("give --grid NAME (see --list), --list or --report")
    if args.tokenizer == "ptb" and shutil.which("java") is None:
        raise SystemExit("--tokenizer ptb needs Java on the PATH; install it or use --tokenizer simple")
    counts = run_grid(GRIDS[args.grid], budget, args.results, args.stop_after)
    print(f"grid {args.grid}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if not args.no_report:
        write_report(budget, args.results, args.doc, args.plots_dir, [args.grid])
        print(f"updated {args.doc} (section {args.grid}) and {args.plots_dir}/{args.grid}.png")
    return counts


if __name__ == "__main__":
    main(sys.argv[1:])
