"""The trainer's read path under ``--ram-budget-gb``: a store 8x larger than the budget, streamed vs in RAM.

Builds (once, under ``--work``) a store with ``ktc extract``: ``--images`` (default 16384) synthetic 32 px images, 4 views, one
random-init resnet10t teacher storing features (512) and a 4x4 featmap (512 channels): ~64 KB per row. Then,
in a fresh process per mode, builds ``CachedTeachers`` for KPU's needs (features + featmaps) and runs one epoch
of ``BlockShuffleSampler`` order in batches of 64 through ``gather`` + ``to_teacher_batch`` (what each training
step does before the student's forward), streamed on demand and with read-ahead (``plan_epoch``). Reports samples/s and the peak RSS above the process's baseline
(RSS before the store is opened), side by side, and writes ``benchmarks/results/stream.json``.

Usage::

    python benchmarks/bench_stream.py                     # ~2 min on 2 cores (the extraction is the most)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MiB = 1 << 20


def build_store(work: Path, images: int) -> Path:
    from PIL import Image

    store = work / "stream.zarr"
    if (store / "ktc-objects.json").is_file():
        return store
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = work / "images" / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / f"{i:05d}.png")
    teacher = {"id": "cnn", "source": "timm", "model": "resnet10t", "pretrained": "none", "model_args": {"num_classes": 4},
               "preprocess": {"input_size": [3, 32, 32]}, "outputs": ["features", "featmap"], "featmap": {"grid": 4}}
    manifest = {"dataset": {"root": "images"}, "store": "stream.zarr", "views": {"count": 4, "seed": 0},
                "storage": {"unit_rows": 512}, "defaults": {"batch_size": 128}, "teachers": [teacher]}
    import yaml

    (work / "stream.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    subprocess.run([sys.executable, "-m", "kt_cache", "extract", "--manifest", str(work / "stream.yaml"), "--no-progress"],
                   check=True, capture_output=True)
    return store


def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))


def measure(store: str, budget: int, read_ahead: bool = True, step_s: float = 0.0, batch: int = 64) -> dict:
    """One mode, in this process: samples/s over one epoch and peak RSS above the baseline."""
    from kt_cache.store import StoreReader
    from kt_train.data import CachedTeachers     # imports torch: libraries are loaded before the baseline
    from kt_train.sampler import BlockShuffleSampler, block_views

    reader = StoreReader(store)
    reader.samples()
    base = rss_bytes()                           # libraries loaded, store opened: what a budget does not cover
    start = time.perf_counter()
    cached = CachedTeachers(reader, reader.teacher_ids(), needs={"features", "featmaps"}, ram_budget_bytes=budget)
    load_s = time.perf_counter() - start
    sampler = BlockShuffleSampler(reader.n_samples, cached.block_rows, cached.window_blocks, seed=0,
                                  ok=reader.sample("ok"))
    order = np.array(list(sampler))
    views = block_views(0, 0, sampler.n_blocks, reader.n_views)      # the trainer's: one view per block and epoch
    start = time.perf_counter()
    if read_ahead:
        cached.plan_epoch(sampler.windows(), views)
    for i in range(0, len(order) - batch + 1, batch):
        rows = order[i:i + batch]
        cached.to_teacher_batch(cached.gather(rows, views[rows // cached.block_rows]), None, "cpu")
        if step_s:
            time.sleep(step_s)       # the accelerator computing the step: the CPU is free to read ahead
    epoch_s = time.perf_counter() - start
    n = (len(order) // batch) * batch
    return {"budget": budget, "streamed": sorted(f"{t}/{p}" for t, p in cached.caches), "block_rows": cached.block_rows,
            "load_s": round(load_s, 3), "epoch_s": round(epoch_s, 3), "samples_per_s": round(n / epoch_s, 1),
            "peak_rss_above_baseline": peak_rss_bytes() - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/ktc-bench/stream"))
    parser.add_argument("--images", type=int, default=16384, help="synthetic images, one row each (at 4096 the "
                        "budget is so small, 34 MiB, that decode transients, a constant, dominate the RSS ratio)")
    parser.add_argument("--step-ms", type=float, default=10.0, help="simulated accelerator time per step of 64 "
                        "(the CPU idles, as while a GPU computes; 0: the read path alone)")
    parser.add_argument("--measure", nargs=4, metavar=("STORE", "BUDGET", "READ_AHEAD", "STEP_S"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]), args.measure[2] == "1", float(args.measure[3]))))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    store = build_store(args.work, args.images)
    arrays = sum(f.stat().st_size for f in (store / "teachers").rglob("*") if f.is_file())
    from kt_cache.store import StoreReader

    reader = StoreReader(store)
    decoded = sum(int(a.nbytes) for a in reader.teacher_arrays("cnn").values())
    budget = decoded // 8
    modes = {}
    for step in (0.0, args.step_ms / 1000):
        for name, size, ahead in (("in RAM", 4 * decoded, "1"), ("streamed, on demand", budget, "0"),
                                  ("streamed, read ahead", budget, "1")):
            out = subprocess.run([sys.executable, __file__, "--measure", str(store), str(size), ahead, str(step)],
                                 check=True, capture_output=True, text=True).stdout
            label = name if not step else f"{name}, {args.step_ms:.0f} ms step"
            modes[label] = json.loads(out.strip().splitlines()[-1])
    step = f", {args.step_ms:.0f} ms step"
    ram, streamed = modes["in RAM" + step], modes["streamed, read ahead" + step]
    result = {"rows": reader.n_samples, "views": reader.n_views, "teacher_bytes_decoded": decoded,
              "teacher_bytes_stored": arrays, "budget": budget, "modes": modes, "step_ms": args.step_ms,
              "read_path_ratio": round(modes["streamed, read ahead"]["samples_per_s"] / modes["in RAM"]["samples_per_s"], 3),
              "speed_ratio": round(streamed["samples_per_s"] / ram["samples_per_s"], 3),
              "rss_over_budget": round(max(m["peak_rss_above_baseline"] for k, m in modes.items()
                                           if k.startswith("streamed")) / budget, 3)}
    (HERE / "results" / "stream.json").write_text(json.dumps(result, indent=1))
    print(f"store: {reader.n_samples} rows x {reader.n_views} views, teacher arrays {decoded / MiB:.0f} MiB decoded "
          f"({arrays / MiB:.0f} MiB stored); budget {budget / MiB:.0f} MiB (1/8)")
    for name, m in modes.items():
        print(f"  {name:<21} {m['samples_per_s']:>9.0f} samples/s  load {m['load_s']:.2f} s  peak RSS above baseline "
              f"{m['peak_rss_above_baseline'] / MiB:.0f} MiB  streamed: {', '.join(m['streamed']) or 'none'}")
    print(f"streamed / in RAM speed: {result['read_path_ratio']:.2f}x for the read path alone, {result['speed_ratio']:.2f}x "
          f"with a {args.step_ms:.0f} ms step; streamed peak RSS / budget: {result['rss_over_budget']:.2f}")


if __name__ == "__main__":
    main()
