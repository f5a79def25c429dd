"""Run every ktc benchmark one after the other, then write docs/benchmarks.md and docs/img/bench_*.png.

Usage:
    python benchmarks/run_all.py              # run the four benchmarks (about 8-10 min on 2 CPU cores), write the doc
    python benchmarks/run_all.py --doc-only   # rewrite the doc from benchmarks/results/*.json
    python benchmarks/run_all.py --only train,memory
    python benchmarks/run_all.py --doc-only --doc /tmp/b.md --img /tmp/img   # the doc elsewhere (tests do this)

The benchmarks run sequentially (never two at once: they would time each other). Each one's console
output is kept in benchmarks/results/<name>.log and its numbers in benchmarks/results/<name>.json. The page
is written by report_doc.py (text) and report_plots.py (figures).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from report_doc import write_doc  # noqa: E402
from report_plots import plots  # noqa: E402

NAMES = ("extract", "train", "storage", "memory")
DOC = common.REPO / "docs" / "benchmarks.md"
IMG = common.REPO / "docs" / "img"
DURATIONS = common.RESULTS / "durations.json"


def run(name: str) -> float:
    log = common.RESULTS / f"{name}.log"
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    print(f"\n######## bench_{name}.py", flush=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, str(HERE / f"bench_{name}.py")], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            if "Warning" in line or "warnings.warn" in line:
                handle.write(line)
                continue
            sys.stdout.write(line)
            handle.write(line)
        proc.wait()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench_{name}.py failed (exit {proc.returncode}); see {log}")
    print(f"######## bench_{name}.py: {seconds:.0f} s", flush=True)
    return seconds


def load(name: str) -> dict[str, Any]:
    return json.loads((common.RESULTS / f"{name}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--doc-only", action="store_true", help="only rewrite the doc from the saved results")
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(NAMES))
    parser.add_argument("--doc", type=Path, default=DOC, help=f"the Markdown page to write (default {DOC})")
    parser.add_argument("--img", type=Path, default=IMG, help=f"folder of the plots (default {IMG})")
    args = parser.parse_args()
    durations = run_benchmarks(args.only) if not args.doc_only else load_durations()
    results = [load(n) for n in NAMES]
    written = plots(*results, args.img)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(write_doc(*results, durations) + stream_section() + saved_section("budget", "bench_budget")
                        + saved_section("views_read", "bench_views_read") + teachers_section() + teachers_r50_section()
                        + saved_section("heads_wide", "digits_heads") + compact_section()
                        + saved_section("featmap_study", "featmap_study") + saved_section("metadata", "bench_metadata"),
                        encoding="utf-8")
    print(f"\nwrote {args.doc} and " + ", ".join(str(args.img / name) for name in written))


def saved_section(results: str, script: str) -> str:
    """The section a benchmark run on its own renders (``<script>.render``) from ``results/<results>.json``;
    empty until that benchmark has saved its results."""
    import importlib

    saved = common.RESULTS / f"{results}.json"
    if not saved.exists():
        return ""
    return "\n" + "\n".join(importlib.import_module(script).render(json.loads(saved.read_text())))


def stream_section() -> str:
    """``benchmarks/bench_stream.py``'s table (run on its own), from its saved results."""
    saved = common.RESULTS / "stream.json"
    if not saved.exists():
        return ""
    r = json.loads(saved.read_text())
    mib = 1 << 20
    lines = ["", "## Training from a store larger than `--ram-budget-gb` (`python benchmarks/bench_stream.py`)", "",
             f"{r['rows']} rows x {r['views']} views, one teacher's features (512) and 4x4 maps (512 channels): "
             f"{r['teacher_bytes_decoded'] / mib:.0f} MiB of teacher arrays decoded ({r['teacher_bytes_stored'] / mib:.0f} "
             f"MiB stored), budget {r['budget'] / mib:.0f} MiB (1/8). One epoch of the trainer's read path (block-shuffled "
             "order, batches of 64, `gather` + `to_teacher_batch` for KPU's needs), each mode in a fresh process; RSS "
             "is the peak above the process after its libraries are loaded and the store is opened.", "",
             "| mode | samples/s | peak RSS above baseline | streamed arrays | block rows |", "|---|---|---|---|---|"]
    for name, m in r["modes"].items():
        lines.append(f"| {name} | {m['samples_per_s']:.0f} | {m['peak_rss_above_baseline'] / mib:.0f} MiB | "
                     f"{', '.join(m['streamed']) or 'none'} | {m['block_rows']} |")
    lines += ["", f"Streamed with read-ahead / in RAM: {r['read_path_ratio']:.2f}x for the read path alone (nothing to "
              f"overlap with), {r['speed_ratio']:.2f}x with a simulated {r['step_ms']:.0f} ms accelerator step per batch "
              f"(the CPU idles meanwhile, as while a GPU computes); streamed peak RSS / budget: {r['rss_over_budget']:.2f}. "
              "Read-ahead (`CachedTeachers.plan_epoch`: the next sampler window's blocks read by two background "
              "threads) is what closes most of the gap to RAM; the targets are >= 0.9x and RSS within budget + 10 %."]
    return "\n".join(lines) + "\n"




def teachers_section() -> str:
    """``benchmarks/bench_teachers.py``'s table (run on its own), with the per-teacher code's run beside it."""
    saved, before_file = common.RESULTS / "teachers.json", common.RESULTS / "teachers_before.json"
    if not saved.exists():
        return ""
    r = json.loads(saved.read_text())
    before = json.loads(before_file.read_text()) if before_file.exists() else {"results": {}}
    lines = ["", "## Step time at 10, 100 and 1000 cached teachers (`python benchmarks/bench_teachers.py`)", "",
             f"`kd` and `uniform` steps of `ktc train` (resnet18 student at 64 px, batch {r['batch_size']}, "
             f"{r['threads']} thread, AdamW) against a plain CE step of the same student, interleaved round robin in "
             f"one run ({r['warmup']} warm-up round, {r['steps']} timed; ratio = median over rounds of loop step / CE "
             "step of the same round). 100 and 1000 teachers are synthetic stores of copies of the 10 real teachers' "
             "groups. *After*: teachers as tensors (one gather, device copy and top-k scatter per group of "
             "equal-shaped teachers; UNIFORM's heads one batched MLP per group). *Before*: the same script on the "
             f"code before that change ({before.get('label') or 'not run'}), a separate run.", "",
             *teacher_rows(r, before), "", *uniform_cost(r), "Step parts (seconds, median of 2 steps timed piece by piece):", ""]
    parts = list(next(iter(r["parts"].values())))
    lines += ["| loop | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
    lines += [f"| {name} | " + " | ".join(f"{p[k]:.3f}" for k in parts) + " |" for name, p in r["parts"].items()]
    return "\n".join(lines) + "\n"


def teachers_r50_section() -> str:
    """``bench_teachers.py --student resnet50 --img-size 224 --save-as teachers_r50``: the design point's student."""
    saved = common.RESULTS / "teachers_r50.json"
    if not saved.exists():
        return ""
    r = json.loads(saved.read_text())
    lines = ["", "### The same with the design point's student: resnet50 at 224 px", "",
             f"`python benchmarks/bench_teachers.py --student resnet50 --img-size 224 --counts "
             f"{','.join(map(str, r['counts']))} --hidden 512 --steps {r['steps']} --save-as teachers_r50` (batch "
             f"{r['batch_size']}, {r['threads']} thread, {r['warmup']} warm-up round, {r['steps']} timed). The teachers "
             "and stores are those above; only the student differs: 4.1 GFLOPs per image instead of 0.15, and "
             "UNIFORM's latent D = 2048, so its heads of width D (the default when these rows were timed) are 4x wider per "
             "teacher. Each step here is "
             "10-20 s, so only 4 rounds were timed, on the shared 2 cores while other jobs ran: a ratio carries about "
             f"+-10 % of noise (kd at 10 teachers, nearly plain CE's work, measured "
             f"{r['results']['kd, 10 cached']['vs_plain_ce']:.2f}x).", "",
             *teacher_rows(r, {"results": {}}, r.get("student_dim", 2048)), "", *capped_default(r), *r50_at_1000()]
    return "\n".join(lines) + "\n"


def r50_at_1000() -> list[str]:
    """``bench_teachers.py --student resnet50 --img-size 224 --counts 1000 --save-as teachers_r50_1000``."""
    saved = common.RESULTS / "teachers_r50_1000.json"
    if not saved.exists():
        return []
    r = json.loads(saved.read_text())
    return ["At 1000 teachers, a separate run (`--counts 1000 --steps "
            f"{r['steps']} --save-as teachers_r50_1000`, {r['warmup']} warm-up round): UNIFORM's default heads (width "
            "512) would need the memory in the note below, so it runs with `hidden=64`, as the resnet18 table does. Other "
            "jobs shared the 2 cores during this run (a round's CE step took 6 to 17 s); each ratio is the median of "
            "same-round ratios, so it carries more noise than the step seconds suggest, about +-20 %.", "",
            *teacher_rows(r, {"results": {}}, 2048, "512, the default min(D, 512), with D = 2048"), ""]


def capped_default(r: dict[str, Any]) -> list[str]:
    """These rows were timed when UNIFORM's heads defaulted to width D; the default is now min(D, 512)."""
    row = r["results"].get("uniform (hidden 512), 100 cached")
    if row is None:
        return []
    return [f"These rows were timed when UNIFORM's heads defaulted to width D. The default is now min(D, 512) (the "
            "digits evidence is the section \"UNIFORM's head width with a 2048-wide student\" below), so with this "
            f"student the default is the `uniform (hidden 512)` rows: {row['vs_plain_ce']:.2f}x a plain CE step at 100 "
            "teachers, within the 1.5x target.", ""]


def uniform_cost(r: dict[str, Any]) -> list[str]:
    """Where UNIFORM's step goes at 100 teachers (its heads' own arithmetic), from the step parts."""
    name, base = "uniform, 100 cached", "plain CE (no teachers)"
    if name not in r["parts"]:
        return []
    p, ce, e = r["parts"][name], r["parts"][base], r["results"][name]
    return [f"UNIFORM at 100 teachers: {e['head_param_bytes'] / 4 / 1e6:.0f} M head parameters (an MLP encoder and "
            f"decoder per teacher, width 512). Its heads' forward takes "
            f"{1000 * p['method forward']:.0f} ms, their backward adds {1000 * (p['backward'] - ce['backward']):.0f} ms and "
            f"AdamW over them {1000 * (p['clip + AdamW'] - ce['clip + AdamW']):.0f} ms, against "
            f"{1000 * sum(ce.values()):.0f} ms for the plain CE step; reading the 100 teachers takes "
            f"{1000 * p['read: gather + TeacherBatch']:.0f} ms. Running the heads batched removes the per-teacher "
            "calls, not that arithmetic: the 1.5x target needs smaller heads (`hidden`) or an accelerator.", ""]


def teacher_rows(r: dict[str, Any], before: dict[str, Any], dim: int = 512, width: str = "") -> list[str]:
    """The table of ``teachers_section``: one row per loop, then a note per loop not run."""
    rows = ["| loop | step s | vs plain CE | before | target | verdict | gather + TeacherBatch ms | head params MiB |",
            "|---|---|---|---|---|---|---|---|"]
    targets, notes = {t["what"]: t for t in r["targets"]}, []
    for name, e in r["results"].items():
        t, old = targets.get(name), before["results"].get(name)
        was = f"{old['vs_plain_ce']:.2f}x" if old else "-"
        verdict = ("PASS" if t["pass"] else "MISS") if t else "-"
        rows.append(f"| {name} | {e['step_s']:.2f} | {e['vs_plain_ce']:.2f}x | {was} | {t['target'] if t else '-'} | "
                    f"{verdict} | {e.get('gather_s', 0) * 1000:.0f} | {e.get('head_param_bytes', 0) / 2**20:.0f} |")
    for name, skip in r.get("skipped", {}).items():
        rows.append(f"| {name} | not run | - | - | {targets[name]['target']} | MISS | - | - |")
        notes.append(f"`{name}` was not run: its heads (an MLP encoder and decoder of width {width or f'D = {dim}'} per "
                     f"teacher) with their gradients and AdamW moments need {skip['needs_bytes'] / 2**30:.1f} GiB, "
                     f"more than half of the memory available ({2 * skip['cap_bytes'] / 2**30:.1f} GiB).")
    return rows + ([""] + notes if notes else [])





def compact_section() -> str:
    """``benchmarks/compact.py``'s tables (run on its own: it trains students), from its saved results."""
    saved = common.RESULTS / "compact.json"
    if not saved.exists():
        return ""
    from compact import markdown

    return "\n## Compact stores (`python benchmarks/compact.py`)\n\n" + markdown(json.loads(saved.read_text())) + "\n"


def load_durations() -> dict[str, float]:
    return json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}


def run_benchmarks(only: str) -> dict[str, float]:
    """Run the chosen benchmarks in order; their wall seconds, merged into and saved with the earlier ones."""
    durations = load_durations()
    for name in [n for n in NAMES if not only or n in only.split(",")]:
        durations[name] = run(name)
        common.RESULTS.mkdir(parents=True, exist_ok=True)
        DURATIONS.write_text(json.dumps(durations, indent=1))
    return durations


if __name__ == "__main__":
    main()
