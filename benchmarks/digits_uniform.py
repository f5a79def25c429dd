"""Parity and UNIFORM's gain on a hard zoo: does caching lose anything, and does voting pay off?

One command runs it all on CPU (``--seeds 0,1,2``: about 1.5 h on 2 cores) and refreshes the generated block
of ``docs/results-uniform.md`` with ``--doc``:

1. renders scikit-learn's digits (``digits.data``) and trains the hard zoo (``digits.hard_zoo``: 20 partial,
   noisy, mixed-architecture predictive teachers and 3 descriptive ones);
2. extracts two stores with ``ktc extract``: ``store1.zarr`` (the main zoo, ``views: {count: 1,
   center_crop: 1.0}``: one full-image view) and ``store4.zarr`` (all 23 teachers, 4 views, scale [0.6, 1]);
3. trains students (``digits.uniform_cells``): ``ktc train`` + ``ktc eval`` from the stores, and the uncached
   reference loop (``digits.reference``: teachers online, ktc's student / loss / optimizer code) on full images
   and on online random crops;
4. prints and writes the tables: parity, UNIFORM vs AVG vs KD, the vote ablation, the teacher-count curve.

Reruns reuse images, teachers, stores and every finished run (``OUT/cells.jsonl``).

Usage::

    python benchmarks/digits_uniform.py --out /tmp/digits-uniform --seeds 0,1,2 --doc docs/results-uniform.md
    python benchmarks/digits_uniform.py --out /tmp/digits-uniform --report-only --doc docs/results-uniform.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import uniform_report  # noqa: E402
from digits.data import load_split, render_digits  # noqa: E402
from digits.extract import extract, teacher_entry  # noqa: E402
from digits.hard_zoo import HARD_ZOO, main_ids  # noqa: E402
from digits.teachers import build_zoo  # noqa: E402
from digits.uniform_cells import Recipe, read_cells, run_cells  # noqa: E402
from digits.uniform_tables import TABLES, arms_of  # noqa: E402

STORES = {
    "store1": {"count": 1, "center_crop": 1.0},
    "store4": {"count": 4, "scale": [0.6, 1.0], "center_crop": 0.875},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/digits-uniform"))
    parser.add_argument("--seeds", default="0,1,2", help="student seeds, comma-separated")
    parser.add_argument("--tables", default=",".join(TABLES), help=f"tables to run (default all: {', '.join(TABLES)})")
    parser.add_argument("--epochs", type=int, default=Recipe.epochs)
    parser.add_argument("--lr", type=float, default=Recipe.lr)
    parser.add_argument("--shard", default="0/1", help="I/N: run every N-th cell from the I-th (N processes in "
                        "parallel, e.g. two with OMP_NUM_THREADS=1 on 2 cores); report after all have finished")
    parser.add_argument("--doc", type=Path, help="refresh the generated block of this Markdown page")
    parser.add_argument("--prepare-only", action="store_true", help="only train the zoo and extract the stores "
                        "(run once before several --shard processes)")
    parser.add_argument("--report-only", action="store_true", help="train nothing; report OUT/cells.jsonl")
    args = parser.parse_args(argv)
    args.seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    args.shard = tuple(int(x) for x in args.shard.split("/"))
    args.tables = tuple(t.strip() for t in args.tables.split(",") if t.strip())
    unknown = [t for t in args.tables if t not in TABLES]
    if unknown:
        parser.error(f"unknown tables {unknown}; choose from {', '.join(TABLES)}")
    return args


def prepare(out: Path, full: bool) -> dict:
    """Images, the zoo (trained once) and both stores (extracted once: a complete store is kept). ``full``: all 23
    teachers (``store4`` then gains the 10 extra predictive teachers: ``ktc extract`` adds them to the store);
    else the main zoo only (13), which every table but ``teachers`` uses."""
    render_digits(out / "data", 0)
    specs = tuple(s for s in HARD_ZOO if full or s.name in main_ids())
    zoo = build_zoo(out / "teachers", load_split(out / "data" / "train"), load_split(out / "data" / "val"), 0, specs)
    entries = {spec.name: teacher_entry(spec, featmap=False) for spec in specs}
    stores = {}
    for name, views in STORES.items():
        chosen = main_ids() if name == "store1" else list(entries)
        stores[name] = extract(out, [entries[t] for t in chosen], name, fresh=False, views=views)
        print(f"  {name}: {stores[name]['images']} images x {len(chosen)} teachers in {stores[name]['seconds']:.1f} s")
    return {"zoo": zoo, "stores": stores}


def prepared(out: Path) -> dict:
    """What ``prepare`` returns, read back from a prepared folder (the zoo's records; store reports are not kept)."""
    import json

    return {"zoo": json.loads((out / "teachers" / "zoo.json").read_text()), "stores": {}}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(epochs=args.epochs, lr=args.lr)
    start = time.perf_counter()
    # shards share the prepared folder: a second concurrent `ktc extract` of the same store would wait on its lock
    sharing = args.report_only or args.shard[1] > 1
    ready = prepared(args.out) if sharing else prepare(args.out, full="teachers20" in args.tables)
    if not args.report_only and not args.prepare_only:
        splits = (load_split(args.out / "data" / "train"), load_split(args.out / "data" / "val"))
        for table in args.tables:
            print(f"[{table}]")
            run_cells(arms_of(table), args.seeds, args.out, recipe, splits, args.shard)
    cells = read_cells(args.out / "cells.jsonl")
    text = uniform_report.render(cells, ready, recipe, args, time.perf_counter() - start)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    if args.doc is not None:
        uniform_report.update_doc(args.doc, text)
        print(f"updated {args.doc}")


if __name__ == "__main__":
    main()
