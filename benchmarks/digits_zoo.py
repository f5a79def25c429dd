"""A small real task for ktc, end to end on CPU: scikit-learn's digits, a self-trained teacher zoo, every method.

Steps (each one is also a helper module under ``benchmarks/digits/``):

1. ``data``: render ``sklearn.datasets.load_digits`` (1797 8x8 grey images, 10 classes) as 32x32 RGB PNGs in
   ``OUT/data/{train,val}/<class>/`` with a seeded, stratified 70/30 split.
2. ``teachers``: train a zoo of timm ``resnet10t`` teachers (plain cross-entropy, seeded, CPU) and save them
   as safetensors: ``digits_lo`` (classes 0-4), ``digits_hi`` (5-9), ``digits_all`` (0-9, deliberately weak:
   1/5 of the images) and ``digits_parity`` (descriptive: trained on even/odd, features only).
3. ``extract``: write ``OUT/manifest.yaml`` (a lab's own checkpoints, 4 views, 256-row units) and run
   ``ktc extract`` into ``OUT/store.zarr``; ``targets`` then scores the soft targets that KD, UNIFORM/AVG
   and Bi-KD/FG build from the stored logits.
4. ``students``: ``ktc train`` a ``resnet10t`` student with ce, kd, avg, uniform, kpu, bikd and fg for each
   seed, then ``ktc eval --data OUT/data/val --json`` and a linear probe on its frozen features (``probe``).
5. ``report``: print the table; write ``OUT/results.md`` and ``OUT/digits_methods.png``; with ``--doc``, also
   refresh the generated block of that Markdown page and its chart (``<doc folder>/img/digits_methods.png``).

Usage::

    python benchmarks/digits_zoo.py --out /tmp/digits                          # 1 seed, ~10 min on 2 cores
    python benchmarks/digits_zoo.py --out /tmp/digits --seeds 0,1,2            # mean ± std over 3 seeds
    python benchmarks/digits_zoo.py --out /tmp/digits --doc docs/results-digits.md

Reruns reuse the rendered images and the trained teachers when their recipe is unchanged; the store and the
student runs are always made afresh. Logs of every ``ktc`` call are in ``OUT/logs/``. ``--report-only`` rebuilds
the table, chart and page of a finished run (``OUT/summary.json`` + ``OUT/students.jsonl``) without training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import report  # noqa: E402
from digits.data import load_split, render_digits  # noqa: E402
from digits.extract import UNIT_ROWS, VIEWS, extract  # noqa: E402
from digits.students import METHODS, STUDENT, TrainSettings, run_all  # noqa: E402
from digits.targets import target_quality, targets_table  # noqa: E402
from digits.teachers import ARCH, VIEW_SCALE, build_zoo  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/digits"), help="work folder (default /tmp/digits)")
    parser.add_argument("--seeds", default="0", help="student seeds, comma-separated (default 0)")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods to train (default: all seven)")
    parser.add_argument("--epochs", type=int, default=TrainSettings.epochs, help="student epochs")
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--workers", type=int, default=TrainSettings.workers, help="ktc train decode workers")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the stratified train/val split")
    parser.add_argument("--teacher-seed", type=int, default=0, help="seed of the teacher zoo")
    parser.add_argument("--doc", type=Path, help="also refresh the generated block of this Markdown page")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: rebuild tables, chart and --doc from OUT/summary.json + OUT/students.jsonl")
    args = parser.parse_args(argv)
    args.seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.seeds:
        parser.error(f"unknown methods {unknown} (choose from {', '.join(METHODS)})" if unknown else "no seeds")
    return args


def setup_text(args: argparse.Namespace, counts: dict[str, int], settings: TrainSettings, seconds: dict) -> str:
    """The setup paragraph of the generated block: data, zoo, student recipe, machine, timings."""
    import timm
    import torch

    load = " / ".join(f"{v:.1f}" for v in seconds["load"])
    return "\n".join([
        f"- Data: `sklearn.datasets.load_digits`, 32x32 RGB PNGs, stratified split (seed {args.split_seed}): "
        f"**{counts['train']} train / {counts['val']} val** images, classes `0`..`9`.",
        f"- Teachers: timm `{ARCH}` (`output_stride=16`, so a 32 px input leaves a 2x2 map), trained here with "
        f"cross-entropy, AdamW lr 2e-3, batch 64, random-resized crops (scale {list(VIEW_SCALE)}, no flip), seed "
        f"{args.teacher_seed}.",
        f"- Store: {VIEWS} views per image (view 0 = centre crop 0.875, views 1-3 random-resized crops, no flip), "
        f"`unit_rows: {UNIT_ROWS}`, float16; predictive teachers store features + full logits + a 2x2 featmap.",
        f"- Students: timm `{STUDENT}` from scratch, `--img-size 32`, {settings.epochs} epochs, batch "
        f"{settings.batch_size}, lr {settings.lr} (AdamW, cosine, weight decay 0.05 = ktc defaults), "
        f"seeds {', '.join(map(str, args.seeds))} ({len(args.seeds)} seed{'s' if len(args.seeds) > 1 else ''}); "
        "evaluated on val/ with `ktc eval --json` (centre view).",
        f"- Machine: {os.cpu_count()} CPU cores, {platform.python_implementation()} {platform.python_version()}, "
        f"torch {torch.__version__}, timm {timm.__version__}; load average at start / end: {load} (the machine "
        "was shared, so seconds are upper bounds).",
        f"- Wall time: render {seconds['data']:.0f} s, teachers {seconds['teachers']:.0f} s, extract "
        f"{seconds['extract']:.0f} s, students {seconds['students']:.0f} s; total {seconds['total']:.0f} s.",
        f"- Command: `python benchmarks/digits_zoo.py --out {args.out} --seeds {','.join(map(str, args.seeds))} "
        f"--epochs {settings.epochs}" + (f" --doc {args.doc}`" if args.doc else "`"),
    ])


def publish(args: argparse.Namespace, block_inputs: dict, rows: list[dict], zoo: list[dict]) -> None:
    """Write ``OUT/results.md`` + chart, and with ``--doc`` the page's generated block + its chart."""
    chart = report.plot(rows, zoo, args.out / "digits_methods.png")
    (args.out / "results.md").write_text(report.generated_block(image="digits_methods.png", **block_inputs) + "\n")
    if args.doc is not None:
        image = args.doc.parent / "img" / "digits_methods.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chart, image)
        block = report.generated_block(image="img/digits_methods.png", **block_inputs)
        report.update_doc(args.doc, block, "ktc on a small real task: scikit-learn digits")
        print(f"updated {args.doc} and {image}")


class Stopwatch:
    """Wall seconds per named stage (``with clock("teachers"): ...``), plus the load average around the run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.start, self.loads = time.perf_counter(), [os.getloadavg()[0]]
        self.stage = ""

    def __call__(self, stage: str) -> Stopwatch:
        self.stage = stage
        return self

    def __enter__(self) -> None:
        self.tick = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self.stage] = time.perf_counter() - self.tick

    def summary(self) -> dict:
        return {**self.seconds, "total": time.perf_counter() - self.start, "load": [*self.loads, os.getloadavg()[0]]}


def prepare(args: argparse.Namespace, clock: Stopwatch) -> dict:
    """Stages 1-3: images, teacher zoo, store (+ the quality of the soft targets built from it)."""
    print(f"[1/4] rendering digits into {args.out / 'data'}")
    with clock("data"):
        counts = render_digits(args.out / "data", args.split_seed)
    print("[2/4] teacher zoo")
    with clock("teachers"):
        zoo = build_zoo(args.out / "teachers", load_split(args.out / "data" / "train"),
                        load_split(args.out / "data" / "val"), args.teacher_seed)
    print("[3/4] ktc extract")
    with clock("extract"):
        extraction = extract(args.out)
    print(f"  {extraction['images']} images in {extraction['seconds']:.1f} s ({extraction['images_per_s']:.1f} images/s)")
    targets = targets_table(target_quality(args.out / "store.zarr"))
    print(targets)
    return {"counts": counts, "zoo": zoo, "extraction": extraction, "targets": targets}


def finish(args: argparse.Namespace, settings: TrainSettings, ready: dict, results: list[dict], seconds: dict) -> None:
    """Aggregate, print the table, save ``summary.json``, write the results page(s) and the chart."""
    rows = report.aggregate(results, args.methods)
    summary = {**ready, "rows": rows, "seconds": seconds, "settings": asdict(settings), "seeds": list(args.seeds)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(report.student_table(rows))
    inputs = {"setup": setup_text(args, ready["counts"], settings, seconds), "zoo": ready["zoo"],
              "extraction": ready["extraction"], "targets": ready["targets"], "rows": rows}
    publish(args, inputs, rows, ready["zoo"])
    print(f"total {seconds['total']:.0f} s; results in {args.out / 'results.md'}")


def report_only(args: argparse.Namespace) -> None:
    """Rebuild every output of a finished run from its ``summary.json`` and ``students.jsonl``."""
    summary = json.loads((args.out / "summary.json").read_text())
    results = [json.loads(line) for line in (args.out / "students.jsonl").read_text().splitlines() if line.strip()]
    args.seeds = tuple(summary["seeds"])
    settings = TrainSettings(**summary["settings"])
    ready = {k: summary[k] for k in ("counts", "zoo", "extraction", "targets")}
    finish(args, settings, ready, results, summary["seconds"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report_only:
        report_only(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    settings = TrainSettings(args.epochs, args.batch_size, args.lr, workers=args.workers)
    clock = Stopwatch()
    ready = prepare(args, clock)
    print(f"[4/4] students: {', '.join(args.methods)} x seeds {args.seeds}, {settings.epochs} epochs")
    with clock("students"):
        results = run_all(args.out, args.methods, args.seeds, settings)
    finish(args, settings, ready, results, clock.summary())


if __name__ == "__main__":
    main()
