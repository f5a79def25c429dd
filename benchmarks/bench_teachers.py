"""Step time at 10, 100 and 1000 cached teachers: `kd` and `uniform` vs a plain CE step, side by side.

Every loop trains the same student (resnet18 at 64 px by default; `--student resnet50 --img-size 224` is the design
point's student; 1000 ImageNet classes, identical initial weights) on the
same pre-loaded batches (32 images with their store rows and views, from the trainer's own loader), with AdamW
built as `kt_train.loop.make_optimizer` builds it:

- **plain CE**: student forward, cross-entropy, backward, clip, AdamW; no teacher anywhere.
- **kd / uniform at N cached teachers**: `kt_train.setup.build_run` + `kt_train.loop.train_step`, i.e. what
  `ktc train` runs per batch: gather the teachers' rows, build the `TeacherBatch` (top-20 logits scattered
  into 1000 classes), method loss, backward, clip, AdamW over student + method heads. 10 teachers: the store
  of `bench_train.py` (10 random-init timm architectures); 100 and 1000: synthetic stores of byte-identical
  copies of those 10 groups (`common.synthetic_store`).

A `uniform` loop whose default heads, gradients and AdamW moments would not fit in half the machine's available
memory is not run (the result says so with the bytes it would need); `uniform` with MLP heads of width
`SMALL_HIDDEN` runs in its place, so the teacher count's own cost is still measured. Loops are interleaved round robin (order rotated every
round), the first `--warmup` rounds untimed; a ratio is the median over rounds of (loop step / plain CE step of
the same round). Results: `benchmarks/results/teachers.json`, rendered into docs/benchmarks.md by `run_all.py`.

Usage: python benchmarks/bench_teachers.py [--steps 8] [--warmup 1] [--threads 1] [--counts 10,100,1000]
       [--hidden 128,64 --save-as teachers_hidden]   # also UNIFORM with narrower heads, saved apart
       [--student resnet50 --img-size 224 --save-as teachers_r50]   # the design point's student
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from bench_train import BATCH, PARTS, CachedLoop, PlainCE, collect_batches  # noqa: E402

TARGETS = {10: 1.2, 100: 1.5, 1000: 3.0}
METHODS = ("kd", "uniform")
STUDENT_DIMS = {"resnet18": 512, "resnet50": 2048}   # pooled feature: UNIFORM's latent D and default MLP width
SMALL_HIDDEN = 64                     # UNIFORM's MLP width where the default (D) does not fit in memory


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (bytes); 0 where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def student_dim() -> int:
    return STUDENT_DIMS[common.STUDENT]


def uniform_train_bytes(store: Path, hidden: int | None = None) -> int:
    """Bytes of UNIFORM's heads (MLP encoder d_t -> h -> D and decoder D -> h -> d_t per teacher) with their
    gradients and AdamW's two moments: 4 fp32 copies of every parameter."""
    from kt_cache.store import StoreReader

    from kt_train.methods.uniform import DEFAULT_HIDDEN

    reader = StoreReader(store)
    dim = student_dim()
    params, h = 0, hidden or min(dim, DEFAULT_HIDDEN)
    for tid in reader.teacher_ids():
        d = int(reader.teacher_attrs(tid)["feature_dim"])
        params += (d * h + h + h * dim + dim) + (dim * h + h + h * d + d)   # encoder + decoder
    return 4 * 4 * params


def build_loops(counts: list[int], memory_cap: int, widths: tuple[int, ...] = ()
                ) -> tuple[dict[str, Callable], dict[str, dict[str, Any]]]:
    loops: dict[str, Callable] = {"plain CE (no teachers)": PlainCE()}
    skipped: dict[str, dict[str, Any]] = {}
    for n in counts:
        store = common.train_store(n)
        for method in METHODS:
            name = f"{method}, {n} cached"
            options: dict[str, Any] = {}
            if method == "uniform":
                need = uniform_train_bytes(store)
                if need > memory_cap:
                    skipped[name] = {"needs_bytes": need, "cap_bytes": memory_cap}
                    print(f"{name}: not run, heads + grads + AdamW moments need {need / 2**30:.1f} GiB "
                          f"> {memory_cap / 2**30:.1f} GiB (half of the available memory)", flush=True)
                    name, options = f"uniform (hidden {SMALL_HIDDEN}), {n} cached", {"hidden": SMALL_HIDDEN}
                    if uniform_train_bytes(store, hidden=SMALL_HIDDEN) > memory_cap:
                        continue
            print(f"building {name} ...", flush=True)
            loops[name] = CachedLoop(store, method, f"teachers-{method}{n}", options)
        for width in widths:          # --hidden: UNIFORM with narrower heads, timed beside the default
            name = f"uniform (hidden {width}), {n} cached"
            if name not in loops and uniform_train_bytes(store, hidden=width) <= memory_cap:
                print(f"building {name} ...", flush=True)
                loops[name] = CachedLoop(store, "uniform", f"teachers-uniform{n}-h{width}", {"hidden": width})
    return loops, skipped


def time_rounds(loops: dict[str, Callable], batches: list, warmup: int, steps: int) -> dict[str, list[float]]:
    """Round robin over the loops, order rotated each round; seconds per step of the timed rounds."""
    times: dict[str, list[float]] = {name: [] for name in loops}
    names = list(loops)
    for r in range(warmup + steps):
        batch = batches[r % len(batches)]
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            loops[name](batch)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
        for loop in loops.values():
            if isinstance(loop, CachedLoop):
                loop.time_gather(batch)
        if r >= warmup:
            print(f"round {r + 1}/{warmup + steps}: " + ", ".join(f"{n} {times[n][-1]:.2f}" for n in names) + " s",
                  flush=True)
        else:
            print(f"warm-up round {r + 1} done", flush=True)
    return times


def summarize(loops: dict[str, Callable], times: dict[str, list[float]], parts: dict[str, dict[str, float]],
              args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per loop: median step, paired ratio to plain CE, gather time, head bytes; printed as a table."""
    base = "plain CE (no teachers)"
    results, rows = {}, []
    for name, loop in loops.items():
        ratio = common.median([a / b for a, b in zip(times[name], times[base])])
        entry = {"step_s": common.median(times[name]), "steps_s": times[name], "vs_plain_ce": ratio}
        if isinstance(loop, CachedLoop):
            entry.update(n_teachers=loop.n_teachers, head_param_bytes=loop.head_bytes,
                         gather_s=common.median(loop.gather_s), build_run_s=loop.build_s)
        results[name] = entry
        rows.append((name, f"{entry['step_s']:.3f}", f"{ratio:.2f}x", f"{entry.get('gather_s', 0) * 1000:.1f}",
                     *[f"{parts[name][k]:.3f}" for k in PARTS]))
    common.print_table(f"step time (median of {args.steps}, batch {BATCH}, {common.STUDENT} @ {common.STUDENT_SIZE} px, CPU, "
                       f"{args.threads} thread)", rows, ("loop", "step s", "vs plain CE", "gather ms", *PARTS))
    return results


def verdicts(results: dict[str, dict[str, Any]], counts: list[int]) -> list[dict[str, Any]]:
    """The targets (<= 1.2x / 1.5x / 3x at 10 / 100 / 1000 teachers), printed; a loop not run misses."""
    checks = []
    print("\n== targets")
    for n in counts:
        small = f"uniform (hidden {SMALL_HIDDEN}), {n} cached"
        for name in [f"{m}, {n} cached" for m in METHODS] + ([small] if small in results else []):
            value = results[name]["vs_plain_ce"] if name in results else None
            ok = value is not None and value <= TARGETS.get(n, float("inf"))
            checks.append({"what": name, "value": value, "target": f"<= {TARGETS.get(n)}x", "pass": ok})
            shown = f"{value:.2f}x" if value is not None else "not run (memory)"
            print(f"  {common.verdict(ok)}  {name} vs plain CE: {shown} (target <= {TARGETS.get(n)}x)")
    return checks


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared CPU)")
    parser.add_argument("--counts", default="10,100,1000", help="teacher counts")
    parser.add_argument("--label", default="", help="a note saved with the results (e.g. the code version)")
    parser.add_argument("--hidden", default="", help="also time UNIFORM with MLP heads of these widths "
                        "(comma-separated, e.g. 128,64)")
    parser.add_argument("--student", default="resnet18", choices=sorted(STUDENT_DIMS),
                        help="the student of every loop (resnet50: the design point's)")
    parser.add_argument("--img-size", type=int, default=common.TRAIN_SIZE, help="the student's input size (px)")
    parser.add_argument("--save-as", default="teachers", help="results name (benchmarks/results/NAME.json); the "
                        "docs render 'teachers'")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    common.STUDENT, common.STUDENT_SIZE = args.student, args.img_size
    counts = [int(c) for c in args.counts.split(",")]
    load_before, cap = common.load_average(), available_bytes() // 2
    widths = tuple(int(w) for w in args.hidden.split(",") if w.strip())
    loops, skipped = build_loops(counts, cap, widths)
    first = next(loop for loop in loops.values() if isinstance(loop, CachedLoop))
    batches = collect_batches(first.run, 3)
    times = time_rounds(loops, batches, args.warmup, args.steps)
    parts = {}
    for name, loop in loops.items():
        runs = [loop.breakdown(batches[i % len(batches)]) for i in range(2)]
        parts[name] = {k: common.median([r[k] for r in runs]) for k in PARTS}
    results = summarize(loops, times, parts, args)
    checks = verdicts(results, counts)
    data = {"results": results, "skipped": skipped, "targets": checks, "parts": parts, "batch_size": BATCH,
            "threads": args.threads, "steps": args.steps,
            "student": args.student, "img_size": args.img_size, "warmup": args.warmup, "counts": counts,
            "label": args.label, "load_before": load_before, "load_after": common.load_average()}
    common.save_result(args.save_as, data)
    return data


if __name__ == "__main__":
    main()
