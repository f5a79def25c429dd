"""Extraction stage of ``benchmarks/gpu.py``: ``ktc extract`` of real architectures vs their pure forward.

The floor of each teacher is its own forward pass (the ``LoadedTeacher`` ktc loads) on a batch already on
the device, under the autocast ``kt_cache.engine.teacher_forward`` uses: anything ktc adds on top (decode,
host-to-device copies, top-k, device-to-host, the writer) shows as ktc's rate falling below the floor.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

import numpy as np

import common
from gpu_common import GpuSampler, Stopwatch, fraction, sync


# ---------------------------------------------------------------------------------------------- images
def make_jpeg(job: tuple[str, int, int, int]) -> None:
    """One photo-sized JPEG: smooth random colour fields plus grain, so it compresses and decodes like a
    photo (pure noise would decode slower and weigh 5x more than an ImageNet JPEG)."""
    from PIL import Image

    path, seed, lo, hi = job
    rng = np.random.default_rng(seed)
    short, ratio = int(rng.integers(lo, hi + 1)), float(rng.uniform(1.0, 1.5))
    size = (round(short * ratio), short) if rng.random() < 0.7 else (short, round(short * ratio))
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.asarray(base, dtype=np.int16) + rng.normal(0, 10, (size[1], size[0], 1)).astype(np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_jpegs(root: Path, n: int, side: tuple[int, int], seed: int = 0) -> Path:
    """``n`` JPEGs in ImageNet-named class folders (the target label space is imagenet-1k). Many images are
    written by a forked pool: this runs before CUDA is touched, so forking is safe."""
    classes = common.IMAGENET_FOLDERS
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
    jobs = [(str(root / classes[i % len(classes)] / f"img{i:05d}.jpg"), seed * 1_000_003 + i, *side) for i in range(n)]
    if n < 256:
        for job in jobs:
            make_jpeg(job)
    else:
        with multiprocessing.get_context("fork").Pool() as pool:
            pool.map(make_jpeg, jobs, chunksize=32)
    return root


# ---------------------------------------------------------------------------------------------- floor
def gflops_per_image(teacher: Any, x: Any) -> float:
    """Forward GFLOPs of one view, counted once per model (torch.utils.flop_counter: matmuls, convolutions,
    attention); the dtype does not change the count."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        teacher.forward(x[:1])
    return counter.get_total_flops() / 1e9


def forward_seconds(teacher: Any, x: Any, device: str, batches: int) -> float:
    """``batches`` forwards exactly as ``teacher_forward`` runs them (inference mode, default autocast on CUDA,
    outputs to fp32), timed between device syncs."""
    import torch

    kind = torch.device(device).type
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        with torch.inference_mode(), torch.autocast(kind, enabled=kind == "cuda"):
            {k: v.float() for k, v in teacher.forward(x).items()}
    sync(device)
    return time.perf_counter() - start


def teacher_floor(plan: Any, device: str, profile: Any) -> dict[str, float]:
    """The pure-forward rate (views/s) and FLOPs of one teacher, loaded the way ktc loads it."""
    import torch
    from kt_cache.teachers import load_teacher

    teacher = load_teacher(plan, device)
    try:
        x = torch.randn(profile.teacher_batch, *plan.input_size, device=device)
        gflops = gflops_per_image(teacher, x)
        forward_seconds(teacher, x, device, profile.floor_warmup)
        seconds = forward_seconds(teacher, x, device, profile.floor_batches)
        return {"floor_images_per_s": profile.teacher_batch * profile.floor_batches / seconds, "gflops_per_image": gflops}
    finally:
        teacher.release()


# ---------------------------------------------------------------------------------------------- decode
def decode_probe(plan: Any, profile: Any) -> dict[str, Any]:
    """Decode and resize cost per image in this process (one core), for the resolutions of the run; with
    ``workers`` DataLoader processes the decode side can feed at most ``workers / per-image time``."""
    from kt_cache.images import decode_image
    from kt_cache.views import sample_views, views_to_pixels

    keys = sorted({p.resize_key for p in plan.plans})
    decode_s = resize_s = 0.0
    ids = plan.listing.ids[:profile.decode_probe]
    for row, sample in enumerate(ids):
        with Stopwatch() as t:
            image = decode_image(Path(plan.listing.root) / sample)
        decode_s += t.s
        with Stopwatch() as t:
            views = sample_views(plan.manifest.views, row, (image.height, image.width))
            for key in keys:
                views_to_pixels(image, views, (key[0], key[1]), key[2])
        resize_s += t.s
    per_image = (decode_s + resize_s) / len(ids)
    return {"images": len(ids), "resolutions": [list(k) for k in keys], "decode_ms": 1000 * decode_s / len(ids),
            "resize_ms": 1000 * resize_s / len(ids), "decode_bound_images_per_s": max(1, profile.workers) / per_image}


# ---------------------------------------------------------------------------------------------- ktc
def run_ktc(manifest: Path, out: Path, device: str, profile: Any) -> tuple[Any, dict[str, Any]]:
    """``ktc extract`` through the library call the CLI makes, with GPU utilisation sampled meanwhile."""
    from kt_cache.extract import ExtractOptions, run_extract

    options = ExtractOptions(manifest=manifest, out=out, device=device, workers=profile.workers,
                             batch_size=profile.decode_batch, progress=False)
    with GpuSampler(device) as sampler:
        report = run_extract(options)
    return report, sampler.summary()


def teacher_row(plan: Any, timing: dict[str, float], floor: dict[str, float], peak: float | None) -> dict[str, Any]:
    ktc_rate, gf = timing["images_per_s"], floor["gflops_per_image"]
    ktc_tf, floor_tf = gf * ktc_rate / 1e3, gf * floor["floor_images_per_s"] / 1e3
    return {"id": plan.id, "model": plan.spec.model, "input_size": list(plan.input_size), "batch": plan.spec.batch_size,
            "params_m": plan.param_bytes / 4e6, "gflops_per_image": gf, "load_s": timing["load_s"],
            "ktc_images_per_s": ktc_rate, "floor_images_per_s": floor["floor_images_per_s"],
            "vs_floor": ktc_rate / floor["floor_images_per_s"], "ktc_tflops": ktc_tf, "floor_tflops": floor_tf,
            "ktc_peak_fraction": fraction(ktc_tf, peak), "floor_peak_fraction": fraction(floor_tf, peak)}


def totals(report: Any, rows: list[dict[str, Any]], views: int, peak: float | None) -> dict[str, Any]:
    """Whole-run figures: one "image" is one view through every teacher, as in ktc's own images/s."""
    n_views = report.plan.n_samples * views
    load_s = sum(r["load_s"] for r in rows)
    steady_s = max(1e-9, report.wall_s - load_s)
    floor_rate = 1.0 / sum(1.0 / r["floor_images_per_s"] for r in rows)
    gflops = sum(r["gflops_per_image"] for r in rows)
    ktc_tf, floor_tf = gflops * n_views / steady_s / 1e3, gflops * floor_rate / 1e3
    return {"wall_s": report.wall_s, "load_s": load_s, "images_per_s_wall": n_views / report.wall_s,
            "images_per_s": n_views / steady_s, "floor_images_per_s": floor_rate,
            "vs_floor": n_views / steady_s / floor_rate,
            "gflops_per_image": gflops, "tflops": ktc_tf, "floor_tflops": floor_tf, "peak_fraction": fraction(ktc_tf, peak),
            "floor_peak_fraction": fraction(floor_tf, peak)}


def run_extract_stage(work: Path, device: str, profile: Any, peak: float | None) -> dict[str, Any]:
    """Images -> manifest -> ``ktc extract`` -> per-teacher floors -> one record."""
    import torch

    images = work / "images"
    manifest = common.write_manifest(work / "extract" / "teachers.yaml", images, profile.teachers, profile.views,
                                     unit_rows=profile.unit_rows, batch_size=profile.teacher_batch)
    report, util = run_ktc(manifest, work / "extract" / "store.zarr", device, profile)
    floors = {p.id: teacher_floor(p, device, profile) for p in report.plan.plans}
    rows = [teacher_row(p, report.timings[p.id], floors[p.id], peak) for p in report.plan.plans]
    kind = torch.device(device).type
    return {"images": report.plan.n_samples, "views": profile.views, "workers": profile.workers,
            "decode_batch": profile.decode_batch, "autocast_dtype": "float16" if kind == "cuda" else None,
            "waves": len(report.plan.waves), "failures": len(report.failures), **totals(report, rows, profile.views, peak),
            **util, "decode": decode_probe(report.plan, profile), "teachers": rows}
