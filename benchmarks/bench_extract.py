"""Extraction: `ktc extract` wall time vs the teachers' pure forward time vs the naive way, side by side.

One run, same machine, same images, same 8 teachers (random-init timm models of real architectures at
two input sizes, 1000 ImageNet logits stored as top-20 + LSE, plus pooled features), same views:

1. **pure forward** (the floor): every teacher's `forward` alone on exactly the batches ktc feeds it
   (same decoded views, same teacher-sized sub-batches), inputs prepared beforehand, after one untimed
   warm-up batch per teacher; summed over the 8 teachers.
2. **ktc extract**: `kt_cache.extract.run_extract` (what the `ktc extract` command calls after parsing
   its flags) on a fresh store, 2 decode workers; wall time from plan to finalized store.
3. **naive**: one full decode-and-forward pass per teacher, as clip-retrieval and timm's inference
   script do: load the teacher, a DataLoader (same 2 workers, the same decode + view code) decoding
   every image again for this teacher, forward, write its outputs (`.npy`), next teacher.

Usage: python benchmarks/bench_extract.py [--images-per-class 32] [--views 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

TARGET = 1.1
DECODE_BATCH = 32          # images per decode batch (ktc extract --batch-size), each with all its views
TEACHER_BATCH = 64         # image-views per teacher forward (manifest defaults.batch_size)
TEACHERS = [               # (model, input size, model_args): two resolutions, several interpolations
    ("resnet50", 112, {}), ("convnext_tiny", 112, {}), ("efficientnet_b0", 112, {}),
    ("vit_small_patch16_224", 112, {"img_size": 112}), ("regnety_016", 96, {}), ("mobilenetv3_large_100", 96, {}),
    ("deit_tiny_patch16_224", 96, {"img_size": 96}), ("resnet18", 96, {}),
]


def teacher_entries() -> list[dict]:
    return [common.timm_teacher(f"x{i}_{m}", m, size, model_args=a) for i, (m, size, a) in enumerate(TEACHERS)]


def rows_in_batches(n: int) -> list[list[int]]:
    return [list(range(s, min(n, s + DECODE_BATCH))) for s in range(0, n, DECODE_BATCH)]


def pure_forward(plans: list[Any], dataset: Any, n: int) -> dict[str, float]:
    """Seconds of each teacher's forward over the batches ktc feeds it (inputs built beforehand)."""
    from kt_cache.teachers import load_teacher

    seconds = {}
    for plan in plans:
        teacher = load_teacher(plan, "cpu")
        mean = torch.tensor(plan.mean).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(plan.std).view(1, 3, 1, 1) * 255.0
        chunks = []
        for rows in rows_in_batches(n):
            pixels = torch.stack([dataset[r]["pixels"][plan.resize_key] for r in rows])     # [b, V, 3, H, W]
            flat = pixels.reshape(-1, *pixels.shape[2:])
            chunks += [(c.float() - mean) / std for c in flat.split(plan.spec.batch_size)]
        with torch.inference_mode():
            teacher.forward(chunks[0])                                   # warm-up (untimed)
            start = time.perf_counter()
            for x in chunks:
                teacher.forward(x)
            seconds[plan.id] = time.perf_counter() - start
        teacher.release()
        print(f"  pure forward {plan.id}: {seconds[plan.id]:.2f} s ({sum(len(c) for c in chunks)} views)", flush=True)
    return seconds


def naive(plans: list[Any], root: Path, ids: list[str], policy: Any, out: Path, workers: int) -> dict[str, Any]:
    """One decode-and-forward pass per teacher; outputs written as .npy per teacher."""
    from kt_cache.decode import ViewDecodeDataset, collate_views
    from kt_cache.teachers import load_teacher

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    load_s = forward_s = 0.0
    start = time.perf_counter()
    for plan in plans:
        t0 = time.perf_counter()
        teacher = load_teacher(plan, "cpu")
        load_s += time.perf_counter() - t0
        mean = torch.tensor(plan.mean).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(plan.std).view(1, 3, 1, 1) * 255.0
        dataset = ViewDecodeDataset(root, ids, policy, [plan.resize_key])        # decodes every image again
        loader = torch.utils.data.DataLoader(dataset, batch_size=DECODE_BATCH, num_workers=workers,
                                             collate_fn=collate_views, prefetch_factor=4 if workers else None)
        feats, values, index, lse = [], [], [], []
        for batch in loader:
            pixels = batch["pixels"][plan.resize_key]
            flat = pixels.reshape(-1, *pixels.shape[2:])
            for chunk in flat.split(plan.spec.batch_size):
                t0 = time.perf_counter()
                with torch.inference_mode():
                    got = teacher.forward((chunk.float() - mean) / std)
                forward_s += time.perf_counter() - t0
                top = got["logits"].topk(20, dim=-1)
                feats.append(got["features"].half().numpy())
                values.append(top.values.half().numpy())
                index.append(top.indices.to(torch.int16).numpy())
                lse.append(torch.logsumexp(got["logits"], -1).numpy())
        for name, parts in (("features", feats), ("topk_values", values), ("topk_index", index), ("lse", lse)):
            np.save(out / f"{plan.id}.{name}.npy", np.concatenate(parts))
        teacher.release()
    return {"wall_s": time.perf_counter() - start, "load_s": load_s, "forward_s": forward_s}


def cli_startup_s() -> float:
    """Interpreter + import cost of the `ktc` command (not in the in-process wall times)."""
    import subprocess

    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import kt_cache.cli, kt_cache.extract, kt_cache.engine, torch, timm"],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images-per-class", type=int, default=32, help="3 classes: 96 images by default")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="decode workers (ktc extract --workers)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = common.load_average()

    from kt_cache.decode import ViewDecodeDataset
    from kt_cache.extract import ExtractOptions, build_plan
    from kt_cache.manifest_types import ViewsSpec

    images = common.make_images(common.WORK / f"images-extract-{args.images_per_class}", args.images_per_class,
                                256, 400, seed=2)
    folder = common.WORK / "extract"
    shutil.rmtree(folder, ignore_errors=True)
    manifest = common.write_manifest(folder / "manifest.yaml", images, teacher_entries(), views=args.views,
                                     batch_size=TEACHER_BATCH)
    store = folder / "store.zarr"

    # The row order and view boxes ktc will use (a throwaway store gives them; no teacher runs).
    plan = build_plan(ExtractOptions(manifest=manifest, out=store))
    n = plan.n_samples
    from kt_cache.coordinator import open_or_create_store

    probe = folder / "probe.zarr"
    root = open_or_create_store(probe, plan.listing, plan.manifest.views, plan.manifest.storage, None)
    ids = [str(s) for s in root["samples/id"][:]]
    policy = ViewsSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in root.attrs["ktc"]["views"].items()})
    shutil.rmtree(probe)
    keys = sorted({p.resize_key for p in plan.plans})
    print(f"{n} images x {args.views} views, {len(plan.plans)} teachers at {len(keys)} resize keys {keys}", flush=True)
    dataset = ViewDecodeDataset(plan.listing.root, ids, policy, keys)

    print("1/3 pure forward ...", flush=True)
    forward = pure_forward(plan.plans, dataset, n)
    forward_sum = sum(forward.values())

    print("2/3 ktc extract ...", flush=True)
    report, ktc_wall = common.run_extract_inprocess(manifest, store, workers=args.workers, batch_size=DECODE_BATCH)
    ktc_load = sum(t["load_s"] for t in report.timings.values())
    ktc_forward = sum(t["forward_s"] for t in report.timings.values())

    print("3/3 naive: one decode-and-forward pass per teacher ...", flush=True)
    naive_result = naive(plan.plans, plan.listing.root, ids, policy, folder / "naive", args.workers)
    startup = cli_startup_s()

    ratio = ktc_wall / forward_sum
    steady = (ktc_wall - ktc_load) / forward_sum
    rows = [
        ("pure forward (sum of 8 teachers)", f"{forward_sum:.2f}", "1.00x", "", ""),
        ("ktc extract (in-process run_extract)", f"{ktc_wall:.2f}", f"{ratio:.2f}x", f"{ktc_load:.2f}",
         f"{ktc_forward:.2f}"),
        ("naive: one decode+forward pass per teacher", f"{naive_result['wall_s']:.2f}",
         f"{naive_result['wall_s'] / forward_sum:.2f}x", f"{naive_result['load_s']:.2f}",
         f"{naive_result['forward_s']:.2f}"),
    ]
    common.print_table(f"extraction: {n} images x {args.views} views x 8 teachers, CPU", rows,
                       ("way", "wall s", "vs pure forward", "model load s", "forward s (own timer)"))
    print(f"\n  {common.verdict(ratio <= TARGET)}  ktc extract / sum of pure forwards: {ratio:.2f}x (target <= {TARGET}x)")
    print(f"        without the one-off model loading: {steady:.2f}x")
    print(f"        naive / ktc extract: {naive_result['wall_s'] / ktc_wall:.2f}x (ktc is that much faster)")
    print(f"        `ktc` command startup (interpreter + imports, not in the walls above): {startup:.2f} s")
    print(f"  load average before {load_before}, after {common.load_average()}")
    data = {"n_images": n, "views": args.views, "teachers": [f"{m}@{s}" for m, s, _ in TEACHERS],
            "resize_keys": [list(k) for k in keys], "workers": args.workers, "threads": args.threads,
            "pure_forward_s": forward, "pure_forward_sum_s": forward_sum,
            "ktc": {"wall_s": ktc_wall, "load_s": ktc_load, "forward_s": ktc_forward, "timings": report.timings},
            "naive": naive_result, "cli_startup_s": startup,
            "targets": [{"what": "ktc extract wall / sum of the teachers' pure forward times (8 teachers)",
                         "value": ratio, "target": f"<= {TARGET}x", "pass": ratio <= TARGET},
                        {"what": "same, without the one-off model loading", "value": steady,
                         "target": f"<= {TARGET}x", "pass": steady <= TARGET, "supplementary": True}],
            "naive_vs_ktc": naive_result["wall_s"] / ktc_wall,
            "load_before": load_before, "load_after": common.load_average()}
    common.save_result("extract", data)
    return data


if __name__ == "__main__":
    main()
