"""Training stage of ``benchmarks/gpu.py``: plain CE vs ``kd`` and ``uniform`` at two cached-teacher counts.

Every configuration is what ``ktc train`` runs per batch (``build_run`` + ``train_step`` over the trainer's
own loader, decode in DataLoader workers); the plain-CE baseline is the same loop with ``--method ce``, so
the ratio isolates what the cached teachers cost. Time spent in ``next(loader)`` is the loader wait: a
high fraction means the student is decode-bound, not teacher-bound.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Iterator

import common
from gpu_common import GpuSampler, autocast_dtype, sync


def build_stores(work: Path, device: str, profile: Any) -> tuple[Path, Path]:
    """The small store (a real ``ktc extract`` of cheap teachers) and the large one (byte-identical copies of
    its groups under new ids, ``common.synthetic_store``): what the trainer reads is that many teachers."""
    from kt_cache.extract import ExtractOptions, run_extract

    folder = work / "train"
    manifest = common.write_manifest(folder / "teachers.yaml", work / "images", profile.train_teachers,
                                     profile.train_views, unit_rows=profile.unit_rows, batch_size=profile.teacher_batch)
    small = folder / "store-small.zarr"
    run_extract(ExtractOptions(manifest=manifest, out=small, device=device, workers=profile.workers,
                               batch_size=profile.decode_batch, progress=False))
    return small, common.synthetic_store(small, profile.teacher_counts[1], folder / "store-large.zarr")


def batches(run: Any) -> Iterator[dict[str, Any]]:
    """The trainer's loader, epoch after epoch (``set_epoch`` first, as ``train_epoch`` does)."""
    epoch = 0
    while True:
        run.loader.set_epoch(epoch)
        yield from run.loader
        epoch += 1


def step_times(run: Any, profile: Any, device: str) -> list[tuple[float, float]]:
    """(loader wait, compute) seconds of each timed step; warm-up steps are run and dropped."""
    from kt_train.distributed import Trainable
    from kt_train.loop import make_optimizer, train_step

    model = Trainable(run.students, run.method).train()
    optimizer, scheduler, scaler = make_optimizer(run, profile.train_warmup + profile.train_steps)
    source, times = batches(run), []
    try:
        for step in range(1, profile.train_warmup + profile.train_steps + 1):
            start = time.perf_counter()
            batch = next(source)
            got = time.perf_counter()
            train_step(run, model, batch, optimizer, scaler)
            scheduler.step_update(step)
            sync(device)
            times.append((got - start, time.perf_counter() - got))
    finally:
        source.close()                                   # stops the DataLoader workers now, not at gc
    return times[profile.train_warmup:]


def train_config(store: Path, method: str, out: Path, device: str, profile: Any) -> Any:
    from kt_train.config import build_config

    return build_config({}, {"cache": str(store), "student": profile.student, "img_size": profile.student_size,
                             "method": method, "batch_size": profile.train_batch, "workers": profile.workers,
                             "device": device, "out": str(out), "amp": True, "log_every": 1000})


def measure(name: str, method: str, store: Path, work: Path, device: str, profile: Any) -> dict[str, Any]:
    """One configuration: build the run (timed apart), then its step times and GPU utilisation."""
    from kt_train.setup import build_run

    reset_peak_memory(device)
    start = time.perf_counter()
    run = build_run(train_config(store, method, work / "runs" / method, device, profile))
    build_s = time.perf_counter() - start
    with GpuSampler(device) as sampler:
        times = step_times(run, profile, device)
    n_teachers = 0 if method == "ce" else len(run.teacher_ids)
    head_params_m = sum(p.numel() for p in run.method.parameters()) / 1e6
    del run
    release(device)
    wait, compute = sum(w for w, _ in times), sum(c for _, c in times)
    return {"name": name, "method": method, "teachers": n_teachers, "build_s": build_s, "steps": len(times),
            "samples_per_s": profile.train_batch * len(times) / (wait + compute),
            "compute_samples_per_s": profile.train_batch * len(times) / compute,
            "loader_wait_fraction": wait / (wait + compute), "step_s_median": common.median([w + c for w, c in times]),
            "head_params_m": head_params_m, "peak_gpu_mem_gib": peak_memory_gib(device), **sampler.summary()}


def reset_peak_memory(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def peak_memory_gib(device: str) -> float | None:
    """Peak GPU memory of one configuration (uniform's heads grow with teachers x student width)."""
    import torch

    return torch.cuda.max_memory_allocated(torch.device(device)) / 2**30 if device.startswith("cuda") else None


def release(device: str) -> None:
    """Free one configuration's student, heads and tables before the next is built."""
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_train_stage(work: Path, device: str, profile: Any) -> dict[str, Any]:
    """Stores, then the five configurations in bf16 autocast (fp32 on a CPU, where ktc train runs no AMP)."""
    import torch

    small, large = build_stores(work, device, profile)
    n_small, n_large = profile.teacher_counts
    plan = [("plain CE", "ce", small)] + [(f"{method}, {n} cached", method, store) for n, store in
                                          ((n_small, small), (n_large, large)) for method in ("kd", "uniform")]
    with autocast_dtype(device, torch.bfloat16):
        configs = [measure(name, method, store, work, device, profile) for name, method, store in plan]
    base = configs[0]["step_s_median"]
    for config in configs:
        config["vs_plain_ce"] = config["step_s_median"] / base
    return {"student": profile.student, "img_size": profile.student_size, "batch_size": profile.train_batch,
            "dtype": "bfloat16" if device.startswith("cuda") else "float32", "workers": profile.workers,
            "views": profile.train_views, "warmup": profile.train_warmup, "teacher_counts": list(profile.teacher_counts),
            "configs": configs}
