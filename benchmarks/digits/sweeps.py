"""The three sweeps of the digits benchmark, each a list of student runs (``ktc train`` + ``ktc eval``).

- ``ablation``: UNIFORM on the zoo's store with each vote switched off (``--opt feature_vote=…``,
  ``--opt logit_vote=…``): no voting (= AVG), logit vote only, feature vote only, both.
- ``teachers``: accuracy vs number of teachers, 2 → 50 prefixes of the crowd (``digits.crowd``), with
  ``kd`` and ``uniform``, from one 50-teacher store.
- ``topk``: the zoo's predictive teachers stored again with ``logits: {topk: k}`` (k = 1, 2, 3) beside
  full logits, in one store; ``kd`` and ``uniform`` students from each layout, plus the bytes each layout
  takes per sample-view-teacher on disk.

Every finished run is appended to ``OUT/sweeps.jsonl`` at once; a rerun skips the runs already there, so an
interrupted sweep resumes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from digits.crowd import crowd
from digits.data import Split, load_split
from digits.extract import teacher_entry
from digits.students import TrainSettings, train_and_eval
from digits.teachers import ZOO

ABLATION = {
    "no voting (= AVG)": ("feature_vote=false", "logit_vote=false"),
    "logit vote only": ("feature_vote=false",),
    "feature vote only": ("logit_vote=false",),
    "both votes (UNIFORM)": (),
}
TEACHER_COUNTS = (2, 4, 10, 20, 50)
TOPK = (1, 2, 3, None)             # None = full logits
SWEEP_METHODS = ("kd", "uniform")
PREDICTIVE = tuple(spec for spec in ZOO if spec.role == "predictive")


@dataclass(frozen=True)
class SweepRun:
    """One student of a sweep: which store, which teachers, which options."""

    sweep: str
    setting: str              # the swept value, as shown in the table
    method: str
    store: str                # file name under OUT
    teachers: str             # --teachers
    opts: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.sweep}-{self.method}-" + "".join(c if c.isalnum() else "_" for c in self.setting)


def topk_id(base: str, k: int | None) -> str:
    return f"{base}_{'full' if k is None else f'top{k}'}"


def topk_entries() -> list[dict[str, Any]]:
    """Manifest items: every predictive zoo teacher once per layout of ``TOPK`` (same checkpoint)."""
    entries = []
    for k in TOPK:
        for spec in PREDICTIVE:
            entry = teacher_entry(spec, featmap=False) | {"id": topk_id(spec.name, k)}
            if k is not None:
                entry["logits"] = {"topk": k}
            entries.append(entry)
    return entries


def crowd_entries() -> list[dict[str, Any]]:
    return [teacher_entry(spec, folder="crowd", featmap=False) for spec in crowd()]


def plan(sweeps: tuple[str, ...]) -> list[SweepRun]:
    """Every run of the requested sweeps, in a fixed order."""
    runs: list[SweepRun] = []
    if "ablation" in sweeps:
        runs += [SweepRun("ablation", name, "uniform", "store.zarr", "all", opts) for name, opts in ABLATION.items()]
    if "teachers" in sweeps:
        ids = [spec.name for spec in crowd()]
        runs += [SweepRun("teachers", str(n), method, "crowd.zarr", ",".join(ids[:n]))
                 for n in TEACHER_COUNTS for method in SWEEP_METHODS]
    if "topk" in sweeps:
        runs += [SweepRun("topk", "full" if k is None else f"top-{k}", method, "topk.zarr",
                          ",".join(topk_id(spec.name, k) for spec in PREDICTIVE))
                 for k in TOPK for method in SWEEP_METHODS]
    return runs


def finished(results: Path) -> set[tuple[str, str, str, int]]:
    if not results.is_file():
        return set()
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {(r["sweep"], r["setting"], r["method"], r["seed"]) for r in rows}


def run_sweeps(out: Path, runs: list[SweepRun], seeds: tuple[int, ...], settings: TrainSettings) -> None:
    """Train and evaluate every (run, seed) not yet in ``OUT/sweeps.jsonl``; append each as it finishes."""
    results = out / "sweeps.jsonl"
    done = finished(results)
    splits: tuple[Split, Split] = (load_split(out / "data" / "train"), load_split(out / "data" / "val"))
    for seed in seeds:
        for run in runs:
            if (run.sweep, run.setting, run.method, seed) in done:
                continue
            result = train_and_eval(out, out / run.store, run.name, run.method, seed, settings, splits,
                                    run.teachers, run.opts)
            row = asdict(run) | asdict(result) | {"method": run.method, "seed": seed}
            print(f"  {run.sweep:<8} {run.setting:<22} {run.method:<8} seed {seed}: top-1 {row['top1']:.4f}  "
                  f"probe {row['probe_top1']:.4f}  ({row['train_wall_s']:.0f} s)", flush=True)
            with results.open("a") as sink:
                sink.write(json.dumps(row) + "\n")
