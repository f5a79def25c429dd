"""Sweeps on the digits task: UNIFORM's ablation, accuracy vs number of teachers (2 → 50), top-k vs accuracy.

Runs on the work folder of ``benchmarks/digits_zoo.py`` (its rendered images, teacher zoo and ``store.zarr``)
and adds (code in ``benchmarks/digits/sweeps.py``, ``crowd.py``, ``sweeps_report.py``):

1. ``ablation``: ``ktc train --method uniform`` on the zoo's store with ``--opt feature_vote=false`` and/or
   ``--opt logit_vote=false`` (no voting = AVG, logit vote only, feature vote only, both).
2. ``teachers``: a crowd of 50 weak 5-class teachers (complementary pairs; ``OUT/crowd/``), one store
   ``OUT/crowd.zarr``; ``kd`` and ``uniform`` students from the first 2, 4, 10, 20, 50 of them.
3. ``topk``: the zoo's predictive teachers stored again as top-1/2/3 and full logits in ``OUT/topk.zarr``;
   ``kd`` and ``uniform`` students from each layout, and each layout's bytes per sample-view-teacher.

Usage::

    python benchmarks/digits_zoo.py --out /tmp/digits --seeds 0,1,2 --doc docs/results-digits.md
    python benchmarks/digits_sweeps.py --out /tmp/digits --seeds 0,1,2 --doc docs/results-digits.md

Results go to ``OUT/sweeps.jsonl`` (a rerun resumes: finished runs are skipped; delete the file to redo) and,
with ``--doc``, into the page's ``digits_sweeps`` block plus ``docs/img/digits_teachers.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import report, sweeps_report  # noqa: E402
from digits.crowd import CROWD_EPOCHS, CROWD_TRAIN_FRAC, crowd  # noqa: E402
from digits.data import load_split  # noqa: E402
from digits.extract import extract  # noqa: E402
from digits.students import TrainSettings  # noqa: E402
from digits.sweeps import (ABLATION, PREDICTIVE, SWEEP_METHODS, TEACHER_COUNTS, TOPK, crowd_entries, plan,  # noqa: E402
                           run_sweeps, topk_entries, topk_id)
from digits.targets import concat_target, padded_logits  # noqa: E402
from digits.teachers import build_zoo  # noqa: E402

SWEEPS = ("ablation", "teachers", "topk")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/digits"), help="the work folder of digits_zoo.py")
    parser.add_argument("--seeds", default="0", help="student seeds, comma-separated (default 0)")
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma-separated subset of {','.join(SWEEPS)}")
    parser.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--doc", type=Path, help="also refresh the digits_sweeps block of this Markdown page")
    parser.add_argument("--report-only", action="store_true", help="train nothing; rebuild tables from OUT/sweeps.jsonl")
    args = parser.parse_args(argv)
    args.seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    args.sweeps = tuple(s.strip() for s in args.sweeps.split(",") if s.strip())
    if unknown := [s for s in args.sweeps if s not in SWEEPS]:
        parser.error(f"unknown sweeps {unknown} (choose from {', '.join(SWEEPS)})")
    if not (args.out / "store.zarr").is_dir() or not (args.out / "teachers" / "zoo.json").is_file():
        parser.error(f"{args.out} holds no digits_zoo.py run (store.zarr, teachers/zoo.json); run "
                     f"`python benchmarks/digits_zoo.py --out {args.out}` first")
    return args


def prepare(args: argparse.Namespace) -> dict:
    """The crowd (trained or reused) and the crowd/top-k stores (extracted or resumed); their records."""
    ready: dict = {}
    if "teachers" in args.sweeps:
        train, val = load_split(args.out / "data" / "train"), load_split(args.out / "data" / "val")
        start = time.perf_counter()
        ready["crowd"] = build_zoo(args.out / "crowd", train, val, 0, specs=crowd())
        ready["crowd_s"] = time.perf_counter() - start
        ready["crowd_extract"] = extract(args.out, crowd_entries(), "crowd", fresh=False)
        print(f"  crowd: {len(ready['crowd'])} teachers in {ready['crowd_s']:.0f} s; store {args.out / 'crowd.zarr'}")
    if "topk" in args.sweeps:
        ready["topk_extract"] = extract(args.out, topk_entries(), "topk", fresh=False)
    return ready


def crowd_targets(out: Path, counts: tuple[int, ...]) -> dict[str, str]:
    """Per teacher count: top-1 of the KD target / the Case-B target vs the labels, over all training views."""
    ids = tuple(spec.name for spec in crowd())
    logits, labels, _ = padded_logits(out / "crowd.zarr", ids)
    text = {}
    for n in counts:
        chosen = {tid: logits[tid] for tid in ids[:n]}
        kd = sum(z.softmax(-1) for z in chosen.values()) / n
        case_b = concat_target(chosen)
        text[str(n)] = " / ".join(f"{100 * float((p.argmax(-1) == labels).float().mean()):.1f}" for p in (kd, case_b))
    return text


def topk_bytes(out: Path) -> dict[str, str]:
    """Per layout: stored logit bytes per sample-view-teacher, and as a share of raw fp32, for 5 and 10 classes."""
    import zarr

    store = out / "topk.zarr"
    rows = int(zarr.open_group(str(store), mode="r")["samples/views"].shape[0]) * int(
        zarr.open_group(str(store), mode="r")["samples/views"].shape[1])
    text = {}
    for k in TOPK:
        parts = []
        for spec in PREDICTIVE[1:]:             # digits_hi (5 classes), digits_all (10 classes)
            stored = sweeps_report.layout_bytes(store, topk_id(spec.name, k), rows)
            parts.append(f"{stored:.1f} B = {100 * stored / (4 * len(spec.classes)):.0f} % ({len(spec.classes)} cl.)")
        text["full" if k is None else f"top-{k}"] = "; ".join(parts)
    return text


def block(args: argparse.Namespace, rows: list[dict]) -> str:
    """The generated Markdown between the sweeps markers."""
    ce = json.loads((args.out / "summary.json").read_text())["rows"] if (args.out / "summary.json").is_file() else []
    parts = [sweeps_report.BEGIN, "### UNIFORM ablation (zoo store: lo, hi, all, parity; no labels used)",
             sweeps_report.method_table(rows, "ablation", "votes", list(ABLATION), ("uniform",))]
    crowd_zoo = json.loads((args.out / "crowd" / "zoo.json").read_text()) if (args.out / "crowd" / "zoo.json").is_file() else []
    if crowd_zoo:
        accs = [t["val_acc"] for t in crowd_zoo]
        parts += ["### Accuracy vs number of teachers (crowd store)",
                  f"{len(crowd_zoo)} `resnet10t` teachers, each on 5 of the 10 digits (complementary pairs), "
                  f"{int(100 * CROWD_TRAIN_FRAC)} % of those training images, {CROWD_EPOCHS} epochs; own-class val "
                  f"accuracy {100 * min(accs):.1f}-{100 * max(accs):.1f} % (mean {100 * sum(accs) / len(accs):.1f} %).",
                  sweeps_report.method_table(rows, "teachers", "teachers", [str(n) for n in TEACHER_COUNTS],
                                             SWEEP_METHODS, crowd_targets(args.out, TEACHER_COUNTS),
                                             "target top-1 % on train views: KD mean / Case B"),
                  "![top-1 vs teachers](img/digits_teachers.png)"]
        reference = next((r["top1"] for r in ce if r["method"] == "ce"), None)
        chart = sweeps_report.plot_teachers(rows, TEACHER_COUNTS, SWEEP_METHODS, args.out / "digits_teachers.png", reference)
        if args.doc is not None:
            shutil.copyfile(chart, args.doc.parent / "img" / "digits_teachers.png")
    if (args.out / "topk.zarr").is_dir():
        parts += ["### Top-k logits vs accuracy (lo, hi, all stored as top-k + LSE, or full)",
                  sweeps_report.method_table(rows, "topk", "stored logits", [f"top-{k}" if k else "full" for k in TOPK],
                                             SWEEP_METHODS, topk_bytes(args.out),
                                             "stored logit bytes per sample-view-teacher (share of raw fp32)")]
    return "\n\n".join(parts + [sweeps_report.END])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.report_only:
        prepare(args)
        settings = TrainSettings(args.epochs, args.batch_size, args.lr)
        run_sweeps(args.out, plan(args.sweeps), args.seeds, settings)
    text = block(args, sweeps_report.load(args.out / "sweeps.jsonl"))
    (args.out / "sweeps.md").write_text(text + "\n")
    print(text)
    if args.doc is not None:
        report.update_doc(args.doc, text, "ktc on a small real task: scikit-learn digits",
                          sweeps_report.BEGIN, sweeps_report.END)
        print(f"updated {args.doc}")


if __name__ == "__main__":
    main()
