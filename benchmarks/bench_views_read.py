"""Bytes read per sample and teacher when the trainer streams teacher arrays: old vs new chunk layout.

Stored teacher arrays are ``[N, V, ...]``. Before view-separable chunks, an inner chunk held every view of its
rows (``[rows, V, ...]``), so streaming one view of a block read all V; new stores hold one view per inner chunk
(``[rows, 1, ...]`` inside a shard of the whole unit) and the trainer gives every row of a block one view per
epoch (``kt_train.sampler.block_views``), so a streamed block reads only that view's chunks.

Builds (once, under ``--work``) two stores of the same images with ``ktc extract`` run in-process: ``--images``
synthetic 32 px images, 4 views, 3 random-init resnet10t teachers storing features (512) and a 2x2 map (512
channels), ``unit_rows`` 256, ``chunk_bytes`` 64 KiB; the old layout is written by setting
``kt_cache.store.VIEW_CHUNKS = False``. Then, per mode (old and new layout streamed under a 1 MiB budget, with
the same 64-row blocks; the new layout in RAM for reference), runs the trainer's read path for KPU's needs
(``plan_epoch`` with the epoch's block views, ``gather`` + ``to_teacher_batch`` in batches of 64, block-shuffled
order): one warm-up epoch, then ``--epochs`` timed. Reports samples/s, the decoded chunk bytes the block caches
read per sample and teacher (``CachedTeachers.read_counts``, what ``ktc train`` logs as
``read_bytes_per_sample_teacher``) and the stored (compressed) bytes fetched from the store's files per sample
and teacher, side by side, and writes ``benchmarks/results/views_read.json``.

Usage::

    python benchmarks/bench_views_read.py            # ~2 min on 2 cores (the two extractions are the most)
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

RESULTS = HERE / "results" / "views_read.json"
KiB = 1 << 10
VIEWS, TEACHERS, BLOCK_ROWS, BATCH = 4, 3, 64, 64


def build_store(work: Path, images: Path, view_chunks: bool) -> Path:
    """The store of ``images`` in the new (``view_chunks``) or the old chunk layout, extracted once."""
    import kt_cache.store.format as fmt

    name = "new" if view_chunks else "old"
    store = work / f"{name}.zarr"
    if (store / "ktc-objects.json").is_file():
        return store
    teachers = [{"id": f"cnn{i}", "source": "timm", "model": "resnet10t", "pretrained": "none",
                 "model_args": {"num_classes": 3}, "preprocess": {"input_size": [3, 32, 32]},
                 "outputs": ["features", "featmap"], "featmap": {"grid": 2}} for i in range(TEACHERS)]
    manifest = common.write_manifest(work / f"{name}.yaml", images, teachers, views=VIEWS, unit_rows=256,
                                     chunk_bytes=64 * KiB, batch_size=128, dataset={"root": str(images)})
    saved, fmt.VIEW_CHUNKS = fmt.VIEW_CHUNKS, view_chunks
    try:
        common.run_extract_inprocess(manifest, store, workers=0, batch_size=128)
    finally:
        fmt.VIEW_CHUNKS = saved
    return store


def synthetic_images(root: Path, count: int) -> Path:
    from PIL import Image

    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / f"{i:05d}.png")
    (root / ".complete").write_text("ok")
    return root


class StoredBytes:
    """Counts the bytes ``zarr.storage.LocalStore.get`` returns (whole objects and byte ranges: the shard
    indexes and the inner chunks read), from every thread."""

    def __init__(self) -> None:
        import zarr.storage

        self.total, self.lock, self.cls = 0, threading.Lock(), zarr.storage.LocalStore
        self.original = self.cls.get
        counter = self

        async def counting_get(store, key, prototype=None, byte_range=None):
            buffer = await counter.original(store, key, prototype, byte_range)
            with counter.lock:
                counter.total += 0 if buffer is None else len(buffer)
            return buffer

        self.cls.get = counting_get

    def close(self) -> None:
        self.cls.get = self.original


def epoch(cached, sampler, data, number: int, counter: StoredBytes) -> dict:
    """One epoch of the read path; its samples/s, decoded and stored bytes per sample and teacher."""
    sampler.set_epoch(number)
    data.set_epoch(number)
    order = np.array(list(sampler))
    views = data.block_views()
    stored_before = counter.total
    start = time.perf_counter()
    cached.plan_epoch(sampler.windows(), views)
    n = (len(order) // BATCH) * BATCH
    for i in range(0, n, BATCH):
        rows = order[i:i + BATCH]
        cached.to_teacher_batch(cached.gather(rows, views[rows // cached.block_rows]), None, "cpu")
    seconds = time.perf_counter() - start
    streamed = max(1, len({tid for tid, _ in cached.caches}))
    return {"samples_per_s": n / seconds, "decoded": cached.read_counts()["read_bytes_per_sample_teacher"],
            "stored": (counter.total - stored_before) / n / streamed if cached.caches else 0.0}


def measure(store: Path, budget: int, epochs: int) -> dict:
    """One mode: the median samples/s and mean bytes per sample and teacher over the timed epochs."""
    from kt_cache.store import StoreReader
    from kt_train.data import CachedTeachers, StudentViews
    from kt_train.sampler import BlockShuffleSampler

    reader = StoreReader(store)
    cached = CachedTeachers(reader, reader.teacher_ids(), needs={"features", "featmaps"}, ram_budget_bytes=budget,
                            window_blocks=4, block_rows=BLOCK_ROWS)
    data = StudentViews(reader, (16, 16), (0.5,) * 3, (0.25,) * 3, seed=0)
    data.set_view_blocks(cached.block_rows)
    sampler = BlockShuffleSampler(reader.n_samples, cached.block_rows, cached.window_blocks, seed=0,
                                  ok=reader.sample("ok"))
    counter = StoredBytes()
    try:
        runs = [epoch(cached, sampler, data, e, counter) for e in range(epochs + 1)][1:]   # epoch 0 warms up
    finally:
        counter.close()
    features = reader.checked_arrays(reader.teacher_ids()[0])["features"]
    return {"streamed": sorted(f"{t}/{p}" for t, p in cached.caches), "block_rows": cached.block_rows,
            "chunks_features": list(features.chunks),
            "samples_per_s": round(common.median([r["samples_per_s"] for r in runs]), 1),
            "read_bytes_per_sample_teacher": round(float(np.mean([r["decoded"] for r in runs])), 1),
            "stored_bytes_per_sample_teacher": round(float(np.mean([r["stored"] for r in runs])), 1)}


def run(work: Path, images: int, epochs: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    folder = synthetic_images(work / "images", images)
    stores = {"new": build_store(work, folder, True), "old": build_store(work, folder, False)}
    modes = {"old layout, streamed": measure(stores["old"], 1 << 20, epochs),
             "new layout, streamed": measure(stores["new"], 1 << 20, epochs),
             "new layout, in RAM": measure(stores["new"], 1 << 30, epochs)}
    old, new = modes["old layout, streamed"], modes["new layout, streamed"]
    return {"rows": images, "views": VIEWS, "teachers": TEACHERS, "block_rows": BLOCK_ROWS, "batch": BATCH,
            "epochs": epochs, "budget_streamed": 1 << 20, "date": time.strftime("%Y-%m-%d"), "modes": modes,
            "bytes_ratio": round(new["read_bytes_per_sample_teacher"] / old["read_bytes_per_sample_teacher"], 4),
            "stored_ratio": round(new["stored_bytes_per_sample_teacher"] / old["stored_bytes_per_sample_teacher"], 4),
            "speed_ratio": round(new["samples_per_s"] / old["samples_per_s"], 3)}


def render(r: dict) -> list[str]:
    """The docs/benchmarks.md section."""
    lines = ["## Bytes read per sample when streaming: one view per chunk (`python benchmarks/bench_views_read.py`)", "",
             f"{r['rows']} rows x {r['views']} views, {r['teachers']} teachers storing features (512) and 2x2 maps (512 "
             f"channels) in float16; `unit_rows` 256, `chunk_bytes` 64 KiB. The trainer's read path for KPU's needs "
             f"(block-shuffled order, batches of {r['batch']}, every row of a block in the epoch's view of the block), "
             f"streamed under a {r['budget_streamed'] >> 20} MiB budget in blocks of {r['block_rows']} rows, one "
             f"warm-up epoch then {r['epochs']} timed (samples/s: their median). *Decoded*: bytes of the inner chunks "
             "the block caches read, per sample and teacher (`read_bytes_per_sample_teacher` in `metrics.jsonl`); "
             "*stored*: bytes fetched from the store's files (zstd-compressed chunks and shard indexes).", "",
             "| mode | features chunk | decoded bytes / sample / teacher | stored bytes / sample / teacher | samples/s |",
             "|---|---|---:|---:|---:|"]
    for name, m in r["modes"].items():
        lines.append(f"| {name} | `{m['chunks_features']}` | {m['read_bytes_per_sample_teacher']:.0f} | "
                     f"{m['stored_bytes_per_sample_teacher']:.0f} | {m['samples_per_s']:.0f} |")
    lines += ["", f"New / old layout: {r['bytes_ratio']:.3f}x the decoded bytes (1/V = {1 / r['views']:.3f}), "
              f"{r['stored_ratio']:.3f}x the stored bytes, {r['speed_ratio']:.2f}x the samples/s. The old layout's row "
              "is also what ktc read before one view per block and epoch, on either layout: a streamed block was read "
              "with all V views. In RAM nothing is read per epoch (the arrays are read once, at start-up)."]
    return lines + [""]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=common.WORK / "views_read")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per mode (after one warm-up epoch)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run(args.work, args.images, args.epochs)
    return common.print_and_save(result, render(result), args.out)


if __name__ == "__main__":
    main()
