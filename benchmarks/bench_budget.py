"""`ktc train --ram-budget-gb 2` on a store 10x larger than the budget: the run's peak memory against the docs.

What a newcomer does at the design point, at a size this machine holds: a store whose teacher arrays decode to
about 20.5 GiB (``--rows`` 32768 images x 4 views x ``--teachers`` 84 teachers storing full 1000-class logits in
float16, 8 KiB per row and teacher), trained with ``kd`` (no method heads: what the trainer holds besides the
teacher arrays does not grow with the teacher count) from the command line, each run a fresh process:

- ``kd --ram-budget-gb 2`` and ``kd --ram-budget-gb 1`` (the store is 10x and 20x the budget);
- ``ce`` on the same store and student: no teacher array at all, i.e. the rest of the process (libraries,
  student, AdamW state, a batch, the data loader).

docs/scale.md ("Memory") says peak RSS = teacher arrays held + stream buffers (together <= the budget) + one
batch's teacher tensors (all three in the ``memory`` record of ``metrics.jsonl``) + the rest of the process,
independent of the store's size. The check: peak RSS of a ``kd`` run - peak RSS of the ``ce`` run <= the budget
+ 10 %, and <= the planned bytes + 10 %.

The store: one teacher (random-init resnet10t at 32 px) extracted by ``ktc extract`` over synthetic images,
then copied under new ids with hard links (byte-identical chunks, no disk cost) and finalized as
``ktc extract`` does (``benchmarks/common.synthetic_store``'s procedure). Built once under ``--work``.

Usage: python benchmarks/bench_budget.py [--rows 32768] [--teachers 84] [--budgets 2,1]
Writes benchmarks/results/budget.json (rendered into docs/benchmarks.md by ``run_all.py --doc-only``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

RESULTS = HERE / "results" / "budget.json"
GiB, MiB = 1 << 30, 1 << 20
STUDENT = ["--student", "resnet10t", "--img-size", "32", "--batch-size", "128", "--workers", "0", "--epochs", "1"]


def build_store(work: Path, rows: int, teachers: int) -> Path:
    """``rows`` images, one extracted teacher, ``teachers`` hard-linked copies of it, finalized."""
    from kt_cache.finalize import consolidate, write_object_manifest

    out = work / f"budget-{rows}x{teachers}.zarr"
    if (out / "ktc-objects.json").is_file():
        return out
    images = common.make_images(work / f"images-{rows}", per_class=-(-rows // 3))
    teacher = common.timm_teacher("t", "resnet10t", 32, topk=None, outputs=("logits",), batch_size=256)
    manifest = common.write_manifest(work / "budget.yaml", images, [teacher], views=4, unit_rows=4096,
                                     batch_size=256, store=str(work / "seed.zarr"))
    if not (work / "seed.zarr" / "ktc-objects.json").is_file():
        subprocess.run([sys.executable, "-m", "kt_cache", "extract", "--manifest", str(manifest), "--no-progress"],
                       check=True)
    seed = work / "seed.zarr"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(seed, out, ignore=shutil.ignore_patterns("t"), copy_function=os.link)
    for i in range(teachers):
        dest = out / "teachers" / f"s{i:03d}"
        shutil.copytree(seed / "teachers" / "t", dest, copy_function=os.link)
        doc_path = dest / "zarr.json"
        doc = json.loads(doc_path.read_text())
        doc["attributes"]["ktc_teacher"]["entry"]["id"] = f"s{i:03d}"
        doc_path.unlink()                  # a hard link: write a new file, never through the link
        doc_path.write_text(json.dumps(doc))
    root_path = out / "zarr.json"
    root = json.loads(root_path.read_text())
    root.pop("consolidated_metadata", None)
    root_path.unlink()
    root_path.write_text(json.dumps(root))
    consolidate(out)
    write_object_manifest(out)
    return out


def train(store: Path, out: Path, method: str, budget_gib: float | None) -> dict:
    """One ``ktc train`` in a fresh process; its peak RSS (``wait4``), the memory plan and speed it logged."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "kt_cache", "train", "--cache", str(store), "--out", str(out), "--method", method,
           *STUDENT, "--no-progress"] + (["--ram-budget-gb", str(budget_gib)] if budget_gib else [])
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "KTC_NO_PROGRESS": "1"})
    output = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    plan = next(r for r in records if r["kind"] == "memory")
    epoch = next(r for r in records if r["kind"] == "epoch")
    line = next((t for t in output.splitlines() if t.startswith("memory:")), "")
    return {"method": method, "budget_gib": budget_gib, "peak_rss": usage.ru_maxrss * 1024,
            "peak_rss_logged_mib": epoch["peak_rss_mib"], "epoch_s": epoch["seconds"],
            "read_bytes_per_sample_teacher": epoch["read_bytes_per_sample_teacher"], "plan": plan, "memory_line": line,
            "wall_s": round(time.perf_counter() - start, 1)}


def run(work: Path, rows: int, teachers: int, budgets: list[float]) -> dict:
    from kt_cache.store import StoreReader

    store = build_store(work, rows, teachers)
    reader = StoreReader(str(store))
    decoded = sum(int(reader.rows(t, "logits").nbytes) for t in reader.teacher_ids())
    stored = sum(p.stat().st_size for p in (store / "teachers" / "s000").rglob("*") if p.is_file()) * teachers
    runs = {"ce (no teacher arrays)": train(store, work / "run-ce", "ce", None)}
    for gib in budgets:
        runs[f"kd, --ram-budget-gb {gib:g}"] = train(store, work / f"run-kd-{gib:g}", "kd", gib)
    # compared while training (`peak_rss_mib`): the whole-run peak is the final evaluation's, whose own budget differs
    base = runs["ce (no teacher arrays)"]["peak_rss_logged_mib"] * MiB
    for name, r in runs.items():
        if r["budget_gib"]:
            plan = r["plan"]
            planned = plan["held_bytes"] + plan["stream_buffer_bytes"] + plan.get("batch_tensor_bytes", 0)
            above = r["peak_rss_logged_mib"] * MiB - base
            r.update(above_ce=above, planned=planned, within_budget=above <= 1.1 * r["budget_gib"] * GiB,
                     within_plan=above <= 1.1 * planned)
    return {"rows": rows, "views": 4, "teachers": teachers, "decoded_bytes": decoded, "stored_bytes": stored,
            "date": time.strftime("%Y-%m-%d"), "runs": runs, "student": " ".join(STUDENT),
            "samples_per_epoch": rows}


def render(r: dict) -> list[str]:
    """The docs/benchmarks.md section."""
    lines = ["## `ktc train --ram-budget-gb` on a store 10x and 20x the budget (`python benchmarks/bench_budget.py`)", "",
             f"{r['rows']} images x {r['views']} views x {r['teachers']} teachers storing full 1000-class logits "
             f"(float16): {r['decoded_bytes'] / GiB:.1f} GiB of teacher arrays decoded ({r['stored_bytes'] / GiB:.1f} "
             "GiB stored; the teachers are hard-linked copies of one extracted teacher). One epoch of `ktc train "
             f"{r['student']}` per row, each a fresh process from the command line; peak RSS from `wait4` (the "
             "process and its children, final evaluation included); *planned* = the teacher arrays held + stream buffers "
             "+ one batch's teacher tensors, from the `memory` record in `metrics.jsonl`. The `ce` run holds no teacher array: the rest of the process.", "",
             "| run | peak RSS, whole run | peak RSS, training (`peak_rss_mib`) | training, above `ce` | planned teacher arrays "
             "| epoch s | decoded bytes read / sample / teacher |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, run_ in r["runs"].items():
        above = f"{run_['above_ce'] / MiB:+.0f} MiB" if "above_ce" in run_ else "-"
        planned = f"{run_['planned'] / MiB:.0f} MiB" if "planned" in run_ else "-"
        lines.append(f"| {name} | {run_['peak_rss'] / MiB:.0f} MiB | {run_['peak_rss_logged_mib']:.0f} MiB | {above} | "
                     f"{planned} | {run_['epoch_s']:.0f} | "
                     f"{run_['read_bytes_per_sample_teacher']:.0f} |")
    lines.append("")
    for name, run_ in r["runs"].items():
        if "above_ce" in run_:
            lines.append(f"- {name}: store / budget = {r['decoded_bytes'] / (run_['budget_gib'] * GiB):.1f}x; peak "
                         f"RSS above `ce` {run_['above_ce'] / GiB:.2f} GiB: {common.verdict(run_['within_budget'])} "
                         f"within the budget + 10 % (the target), {common.verdict(run_['within_plan'])} within the "
                         "planned bytes + 10 %. "
                         f"The run printed: `{run_['memory_line']}`")
    return lines + [""]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=common.WORK / "budget")
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--teachers", type=int, default=84)
    parser.add_argument("--budgets", default="2,1", help="--ram-budget-gb values (GiB), comma-separated")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    result = run(args.work, args.rows, args.teachers, [float(b) for b in args.budgets.split(",")])
    return common.print_and_save(result, render(result), args.out)


if __name__ == "__main__":
    main()
