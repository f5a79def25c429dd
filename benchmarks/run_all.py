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
    args.doc.write_text(write_doc(*results, durations) + stream_section() + compact_section(), encoding="utf-8")
    print(f"\nwrote {args.doc} and " + ", ".join(str(args.img / name) for name in written))


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
