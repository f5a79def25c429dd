"""The runs of the UNIFORM / parity benchmark (``benchmarks/digits_uniform.py``), one ``Cell`` each.

A cell is one (arm, seed): either ``ktc train`` + ``ktc eval`` from a store (``kind="ktc"``) or the uncached
reference loop (``kind="ref"``, ``digits.reference``). Finished cells are appended to ``OUT/cells.jsonl`` at
once and skipped on a rerun, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digits.data import Split
from digits.hard_zoo import HARD_ZOO, main_ids, predictive_ids
from digits.ktc import run_ktc


@dataclass(frozen=True)
class Arm:
    """One configuration of a table row.

    Attributes:
        table: the table it belongs to; label: its row name there.
        kind: ``ktc`` (from ``store``) or ``ref`` (uncached; ``pixels`` full | rrc).
        method, teachers, opts: ``ktc train --method/--teachers/--opt``; ``labels``: use | ignore.
        extra: further ``ktc train`` flags (e.g. ``("--lr", "0.004")``).
        probe: also score the student by a linear probe on its frozen features (``digits.probe``).
    """

    table: str
    label: str
    kind: str
    method: str
    teachers: tuple[str, ...] = ()
    store: str = "store4.zarr"
    pixels: str = "full"
    labels: str = "ignore"
    opts: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    probe: bool = False

    @property
    def key(self) -> str:
        text = f"{self.table}-{self.label}"
        return "".join(c if c.isalnum() else "_" for c in text)


@dataclass(frozen=True)
class Recipe:
    """The student recipe every arm shares (flags of ``ktc train``)."""

    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    student: str = "resnet10t"


@dataclass
class CellResult:
    key: str
    table: str
    label: str
    seed: int
    top1: float
    top1_full: float                   # the same student scored on the whole image (centre crop 1.0)
    pseudo_acc: float | None           # the teachers' vote (the method's target) vs the true label, last epoch
    seconds: float
    losses: dict[str, float] = field(default_factory=dict)
    probe: float | None = None         # linear-probe top-1 on the frozen student features (arms with ``probe``)


def ktc_train_args(arm: Arm, out: Path, seed: int, recipe: Recipe, run: Path) -> list[str]:
    args = ["train", "--cache", str(out / arm.store), "--data", str(out / "data" / "train"), "--student",
            recipe.student, "--img-size", "32", "--method", arm.method, "--labels", arm.labels,
            "--epochs", str(recipe.epochs), "--batch-size", str(recipe.batch_size), "--lr", str(recipe.lr),
            "--seed", str(seed), "--workers", "0", "--out", str(run), "--no-progress"]
    if arm.teachers:
        args += ["--teachers", ",".join(arm.teachers)]
    return args + [f"--opt={o}" for o in arm.opts] + list(arm.extra)


def last_epoch_means(run: Path) -> dict[str, float]:
    """Mean of each logged scalar over the last epoch's step records (``metrics.jsonl``)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r.get("kind") == "step"]
    last = [r for r in steps if r["epoch"] == steps[-1]["epoch"]] if steps else []
    keys = {k for r in last for k, v in r.items() if isinstance(v, float) and k not in ("lr",)}
    return {k: sum(r[k] for r in last if k in r) / max(1, sum(k in r for r in last)) for k in sorted(keys)}


def run_ktc_cell(arm: Arm, out: Path, seed: int, recipe: Recipe, splits: tuple[Split, Split]) -> CellResult:
    from digits.probe import linear_probe
    from digits.reference import val_top1
    from kt_train.evaluate import load_run_info
    from kt_train.students import load_student

    run, logs, start = out / "runs" / f"{arm.key}-s{seed}", out / "logs", time.perf_counter()
    run_ktc(ktc_train_args(arm, out, seed, recipe, run), logs / f"train-{arm.key}-s{seed}.log")
    evaluated = run_ktc(["eval", "--checkpoint", str(run), "--data", str(out / "data" / "val"), "--json"],
                        logs / f"eval-{arm.key}-s{seed}.log")
    top1 = json.loads(evaluated.stdout.strip().splitlines()[-1])["top1"]
    student = load_student(run / load_run_info(run)["students"][0], "cpu").eval()
    losses = last_epoch_means(run)
    probe = linear_probe(run, splits[0], splits[1], seed) if arm.probe else None
    return CellResult(arm.key, arm.table, arm.label, seed, top1, val_top1(student, splits[1], 1.0),
                      losses.get("pseudo_acc"), time.perf_counter() - start, losses, probe)


def run_ref_cell(arm: Arm, out: Path, seed: int, recipe: Recipe, splits: tuple[Split, Split]) -> CellResult:
    from digits.reference import OnlineTeachers, RefSettings, epoch_pixels, train_reference, val_top1

    start = time.perf_counter()
    specs = [s for s in HARD_ZOO if s.name in arm.teachers]
    settings = RefSettings(arm.method, seed, recipe.epochs, recipe.batch_size, recipe.lr, use_labels=arm.labels == "use",
                           pixels=arm.pixels, student=recipe.student, options=tuple(parse_opt(o) for o in arm.opts))
    teachers = OnlineTeachers(out / "teachers", specs) if specs else None
    if teachers is not None:   # statistics over the pixels the teachers will see, as the store's are
        pixels = epoch_pixels(splits[0], torch.arange(len(splits[0].labels)), settings, np.random.default_rng(seed + 99))
        teachers.fit_stats(pixels)
    student, log = train_reference(settings, splits[0], teachers)
    center = 1.0 if arm.pixels == "full" else 0.875
    tail = log[-max(1, len(log) // recipe.epochs):]
    losses = {k: sum(r[k] for r in tail if k in r) / len(tail) for k in tail[-1] if k != "step"} if log else {}
    return CellResult(arm.key, arm.table, arm.label, seed, val_top1(student, splits[1], center),
                      val_top1(student, splits[1], 1.0), losses.get("pseudo_acc"), time.perf_counter() - start, losses)


def parse_opt(text: str) -> tuple[str, Any]:
    import yaml

    key, _, raw = text.partition("=")
    return key, yaml.safe_load(raw)


def run_cells(arms: list[Arm], seeds: tuple[int, ...], out: Path, recipe: Recipe, splits: tuple[Split, Split],
              shard: tuple[int, int] = (0, 1)) -> None:
    """Every (arm, seed) not yet in ``OUT/cells.jsonl`` (with ``shard = (i, n)``: every n-th one from the i-th,
    so n processes share the work and append to the same file)."""
    sink = out / "cells.jsonl"
    done = {(r["key"], r["seed"]) for r in read_cells(sink)}
    todo = [(seed, arm) for seed in seeds for arm in arms]
    for index, (seed, arm) in enumerate(todo):
        if (arm.key, seed) in done or index % shard[1] != shard[0]:
            continue
        result = run_ktc_cell(arm, out, seed, recipe, splits) if arm.kind == "ktc" else \
            run_ref_cell(arm, out, seed, recipe, splits)
        with sink.open("a") as f:   # one short line per append: concurrent shards do not interleave
            f.write(json.dumps(asdict(result)) + "\n")
        vote = "" if result.pseudo_acc is None else f"  vote {result.pseudo_acc:.4f}"
        print(f"  {arm.key:<48} s{seed}: top-1 {result.top1:.4f} (full {result.top1_full:.4f}){vote}  "
              f"{result.seconds:.0f} s", flush=True)


def read_cells(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def main_teachers(method: str) -> tuple[str, ...]:
    """kd averages the predictive teachers only; avg / uniform also use the descriptive teachers' features."""
    ids = main_ids()
    return tuple(t for t in ids if t.startswith("p")) if method == "kd" else tuple(ids)


def count_teachers(method: str, count: int) -> tuple[str, ...]:
    descriptive = tuple(s.name for s in HARD_ZOO if s.role == "descriptive")
    return tuple(predictive_ids(count)) + (() if method == "kd" else descriptive)
