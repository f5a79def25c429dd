"""UNIFORM's head width with a wide student (D = 2048): does ``hidden=512`` cost accuracy against ``hidden=D``?

At the design point the student is a ResNet-50 (D = 2048), and UNIFORM's default heads (an MLP encoder and
decoder of width D per teacher) hold 1.2 B parameters at 100 teachers: 18 GiB with gradients and AdamW
moments (docs/benchmarks.md, step time with resnet50). The digits tables (``digits_uniform.py``, table
``heads``) measured narrower heads only with D = 512. Here the same zoo and store trains a timm ``resnet14t``
student (bottleneck blocks: D = 2048) with the heads' width spelled out (``--opt hidden=...``, so the rows do
not move when the default does), 3 seeds each, side by side in one run.

Usage::

    python benchmarks/digits_heads.py --out /tmp/digits-uniform --seeds 0,1,2 --doc   # ~40 min on 2 cores

Reuses ``digits_uniform.py``'s prepared folder (images, zoo, stores) when ``--out`` is the same. Writes
``benchmarks/results/heads_wide.json`` with ``--doc`` (rendered into docs/benchmarks.md by ``run_all.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from digits.data import load_split  # noqa: E402
from digits.uniform_cells import Arm, Recipe, main_teachers, read_cells, run_cells  # noqa: E402

RESULTS = HERE / "results" / "heads_wide.json"
STUDENT, WIDTH = "resnet14t", 2048
HIDDEN = (2048, 512, 128)


def arms() -> list[Arm]:
    return [Arm("heads_wide", f"{STUDENT} uniform hidden={h}", "ktc", "uniform", main_teachers("uniform"),
                opts=(f"hidden={h}",)) for h in HIDDEN]


def summarise(cells: list[dict], seeds: tuple[int, ...]) -> list[dict]:
    rows = []
    for hidden, arm in zip(HIDDEN, arms()):
        found = [c for c in cells if c["key"] == arm.key and c["seed"] in seeds]
        top1 = [100 * c["top1"] for c in found]
        rows.append({"hidden": hidden, "seeds": [c["seed"] for c in found], "top1": top1,
                     "mean": statistics.mean(top1) if top1 else None,
                     "std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                     "seconds": [c["seconds"] for c in found]})
    return rows


def render(result: dict) -> list[str]:
    """The docs/benchmarks.md section."""
    rows, base = result["rows"], result["rows"][0]
    lines = ["## UNIFORM's head width with a 2048-wide student (`python benchmarks/digits_heads.py`)", "",
             f"The digits zoo of docs/results-uniform.md (store4: 13 teachers, 4 stored views), UNIFORM with its "
             f"defaults but the heads' width, a timm `{result['student']}` student (D = {result['width']}) from "
             f"scratch at 32 px, {result['epochs']} epochs, batch 64, lr 0.001; top-1 on the 540 val images by `ktc "
             f"eval`, mean ± std over seeds {', '.join(map(str, result['seeds']))} ({result['date']}).", "",
             "| UNIFORM heads | head params per teacher | top-1 % | Δ vs hidden = D | Δ per seed | s per run |",
             "|---|---:|---|---|---|---:|"]
    for r in rows:
        params = 2 * (r["hidden"] * (result["width"] + result["teacher_dim"]) + r["hidden"]) + result["teacher_dim"] \
            + result["width"]
        delta = "—" if r is base else f"{r['mean'] - base['mean']:+.2f}"
        own = dict(zip(r["seeds"], r["top1"]))
        paired = "—" if r is base else ", ".join(f"{own[s] - b:+.2f}" for s, b in zip(base["seeds"], base["top1"]) if s in own)
        name = f"hidden = {r['hidden']}" + (" (= D)" if r["hidden"] == result["width"] else "")
        lines.append(f"| {name} | {params / 1e6:.2f} M | {r['mean']:.2f} ± {r['std']:.2f} | {delta} | {paired} | "
                     f"{statistics.mean(r['seconds']):.0f} |")
    return lines + ["", "`s per run` is each run's own wall time on the shared 2 cores (other jobs ran beside it). The default "
                    "width is min(D, 512) since this run: at D = 2048, width 512 is within the seeds' spread of width D, "
                    "at a quarter of the head parameters and a quarter of the run time. Paired by seed it scores a "
                    "little lower on average (the Δ per seed column), less than the spread between seeds; with "
                    "3 seeds that difference is not resolved.", ""]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/digits-uniform"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=Recipe.epochs)
    parser.add_argument("--doc", action="store_true", help=f"save {RESULTS.relative_to(HERE.parent)}")
    args = parser.parse_args(argv)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    import digits_uniform

    digits_uniform.prepare(args.out, full=False)
    splits = (load_split(args.out / "data" / "train"), load_split(args.out / "data" / "val"))
    run_cells(arms(), seeds, args.out, Recipe(epochs=args.epochs, student=STUDENT), splits)
    result = {"date": time.strftime("%Y-%m-%d"), "student": STUDENT, "width": WIDTH, "teacher_dim": teacher_dim(args.out),
              "epochs": args.epochs, "seeds": list(seeds), "rows": summarise(read_cells(args.out / "cells.jsonl"), seeds)}
    print("\n".join(render(result)))
    if args.doc:
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    return result


def teacher_dim(out: Path) -> int:
    """The zoo's feature width d_t (every digits teacher has the same)."""
    from kt_cache.store import StoreReader

    reader = StoreReader(out / "store4.zarr")
    dims = {reader.teacher_record(t).feature_dim for t in main_teachers("uniform")}
    return int(dims.pop()) if len(dims) == 1 else int(max(dims))


if __name__ == "__main__":
    main()
