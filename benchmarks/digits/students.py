"""Students trained from the store with every method (``ktc train``), evaluated on val/ (``ktc eval``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from digits.data import Split, load_split
from digits.ktc import run_ktc
from digits.probe import linear_probe

STUDENT = "resnet10t"
METHODS = ("ce", "kd", "avg", "uniform", "kpu", "bikd", "fg")

# Which stored teachers each method gets (docs/methods.md): Bi-KD and FG only use predictive teachers that
# cover all 10 classes, so they get digits_all; KD averages the predictive teachers' zero-padded
# probabilities; AVG/UNIFORM/KPU also use the descriptive teacher's features. CE ignores teachers.
METHOD_TEACHERS = {"ce": "all", "kd": "predictive", "avg": "all", "uniform": "all", "kpu": "all",
                   "bikd": "digits_all", "fg": "digits_all"}


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters shared by every student run."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    img_size: int = 32
    workers: int = 0


@dataclass
class StudentResult:
    """One (method, seed) run."""

    method: str
    seed: int
    teachers: str
    top1: float
    top5: float
    probe_top1: float         # linear probe on the frozen student features (digits.probe)
    train_wall_s: float       # the whole `ktc train` process (start-up, data, loop, final evaluation)
    train_cpu_s: float        # its CPU seconds (user + system): steadier than wall time on a shared machine
    loop_s: float             # the epochs only (sum of metrics.jsonl epoch seconds)
    eval_wall_s: float
    final_loss: float | None


def train_args(store: Path, data: Path, method: str, seed: int, settings: TrainSettings, run: Path,
               teachers: str | None = None, opts: tuple[str, ...] = ()) -> list[str]:
    """``ktc train`` arguments; ``teachers`` defaults to the method's selection, ``opts`` are ``KEY=VALUE``."""
    args = ["train", "--cache", str(store), "--data", str(data), "--student", STUDENT,
            "--img-size", str(settings.img_size), "--method", method,
            "--teachers", teachers or METHOD_TEACHERS[method],
            "--epochs", str(settings.epochs), "--batch-size", str(settings.batch_size), "--lr", str(settings.lr),
            "--seed", str(seed), "--workers", str(settings.workers), "--out", str(run), "--no-progress"]
    return args + [f"--opt={opt}" for opt in opts]


def read_metrics(run: Path) -> tuple[float, float | None]:
    """(sum of epoch seconds, loss of the last logged step) from ``run/metrics.jsonl``."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = sum(r["seconds"] for r in rows if r.get("kind") == "epoch")
    steps = [r for r in rows if r.get("kind") == "step"]
    return seconds, (steps[-1]["loss"] if steps else None)


def used_teachers(run: Path, method: str) -> str:
    """The teacher ids ``ktc train`` selected (its ``run.json``); ce uses none of them."""
    if method == "ce":
        return "none (labels)"
    ids = json.loads((run / "run.json").read_text()).get("teachers", [])
    return ", ".join(i.removeprefix("digits_") for i in ids)


def train_and_eval(out: Path, store: Path, name: str, method: str, seed: int, settings: TrainSettings,
                   splits: tuple[Split, Split], teachers: str | None = None,
                   opts: tuple[str, ...] = ()) -> StudentResult:
    """``ktc train`` one student from ``store`` into ``out/runs/NAME-sSEED``; ``ktc eval`` it on ``out/data/val``
    and fit a linear probe on its frozen features."""
    run, logs = out / "runs" / f"{name}-s{seed}", out / "logs"
    trained = run_ktc(train_args(store, out / "data" / "train", method, seed, settings, run, teachers, opts),
                      logs / f"train-{name}-s{seed}.log")
    evaluated = run_ktc(["eval", "--checkpoint", str(run), "--data", str(out / "data" / "val"), "--json"],
                        logs / f"eval-{name}-s{seed}.log")
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    loop_s, loss = read_metrics(run)
    return StudentResult(name, seed, used_teachers(run, method), metrics["top1"], metrics["top5"],
                         linear_probe(run, *splits, seed=seed), trained.wall_s, trained.cpu_s, loop_s,
                         evaluated.wall_s, loss)


def run_student(out: Path, method: str, seed: int, settings: TrainSettings, splits: tuple[Split, Split]) -> StudentResult:
    """Train one student from ``out/store.zarr`` with the method's default teachers; evaluate it on val/."""
    return train_and_eval(out, out / "store.zarr", method, method, seed, settings, splits)


def run_all(out: Path, methods: tuple[str, ...], seeds: tuple[int, ...], settings: TrainSettings) -> list[dict[str, Any]]:
    """Every (method, seed); appends each result to ``out/students.jsonl`` as it finishes."""
    results, splits = [], (load_split(out / "data" / "train"), load_split(out / "data" / "val"))
    with (out / "students.jsonl").open("w") as sink:
        for seed in seeds:
            for method in methods:
                result = asdict(run_student(out, method, seed, settings, splits))
                print(f"  {method:<8} seed {seed}: top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  "
                      f"probe {result['probe_top1']:.4f}  "
                      f"train {result['train_wall_s']:.0f} s wall / {result['train_cpu_s']:.0f} s CPU", flush=True)
                sink.write(json.dumps(result) + "\n")
                sink.flush()
                results.append(result)
    return results
