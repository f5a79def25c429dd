"""``ktc extract`` as a library call: manifest -> plan -> store -> waves -> finalize.

Everything is validated before a model loads: the manifest, the dataset listing, every teacher
(resolved offline on the meta device) and the existing store, if any.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kt_cache.store import format as fmt
from kt_cache.errors import UsageError, did_you_mean


@dataclass
class ExtractOptions:
    """Command-line knobs of ``ktc extract`` (see ``ktc extract --help``)."""

    manifest: Path
    out: Path | None = None
    device: str = "auto"
    batch_size: int = 32                      # images (all their views) per decode batch
    workers: int = 2
    limit: int | None = None
    only: tuple[str, ...] = ()
    overwrite: tuple[str, ...] = ()
    max_teacher_memory: int = 8 << 30
    strict: bool = False
    dry_run: bool = False
    progress: bool = True
    cluster: str | None = None               # "local:N": a dask LocalCluster of N workers
    scheduler: str | None = None             # address of a running dask scheduler
    force_unlock: bool = False               # remove a lock the user knows is dead (kt_cache.lock)
    data_root: Path | None = field(default=None, repr=False)   # filled from the dataset listing


@dataclass
class ExtractPlan:
    """What a run will do: resolved teachers, waves, the dataset listing and the store path."""

    manifest: Any
    listing: Any
    plans: list[Any]
    waves: list[list[Any]]
    out: Path
    n_samples: int


@dataclass
class ExtractReport:
    plan: ExtractPlan
    statuses: dict[str, str]
    timings: dict[str, dict[str, float]]
    failures: dict[str, str]
    rows: int
    wall_s: float


def parse_bytes(text: str) -> int:
    """'8GB', '512MiB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?i?[bB]?)\s*", str(text))
    if not match:
        raise UsageError(f"--max-teacher-memory: cannot read {text!r} as a size. Fix: write e.g. 8GB or 512MiB.")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2)[:1].lower()]
    return int(float(match.group(1)) * scale)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available on this machine. Fix: use --device cpu or auto.")
    return name


def select_teachers(manifest: Any, only: tuple[str, ...]) -> list[Any]:
    ids = [t.id for t in manifest.teachers]
    for name in only:
        if name not in ids:
            raise UsageError(f"--only {name}: no teacher with that id in {manifest.path}.{did_you_mean(name, ids)} "
                             f"Fix: use one of: {', '.join(ids)}.")
    return [t for t in manifest.teachers if not only or t.id in only]


def build_plan(options: ExtractOptions) -> ExtractPlan:
    """Validate everything offline (no weights loaded) and decide teachers, waves and the output."""
    from kt_cache.datasets import list_dataset
    from kt_cache.engine import plan_waves
    from kt_cache.manifest import load_manifest
    from kt_cache.teachers import resolve_teacher

    manifest = load_manifest(options.manifest)
    base = Path(manifest.path).parent
    listing = list_dataset(manifest.dataset, base)
    if options.limit is not None and options.limit < 1:
        raise UsageError(f"--limit {options.limit}: must be at least 1.")
    out = options.out or manifest.store
    if out is None:
        raise UsageError(f"{manifest.path}: no store path. Fix: add `store: path.zarr` to the manifest or pass --out.")
    for name in options.overwrite:
        if name not in [t.id for t in manifest.teachers]:
            raise UsageError(f"--overwrite {name}: no teacher with that id in {manifest.path}."
                             f"{did_you_mean(name, [t.id for t in manifest.teachers])}")
    if options.cluster:
        from kt_cache.cluster import parse_cluster

        parse_cluster(options.cluster)               # a bad spec is refused before any store is written
    specs = select_teachers(manifest, options.only)
    plans = [mapped_classes(resolve_teacher(spec, listing.class_names or None, base), listing.class_names, manifest)
             for spec in specs]
    n = min(len(listing.ids), options.limit or len(listing.ids))
    return ExtractPlan(manifest, listing, plans, plan_waves(plans, options.max_teacher_memory), Path(out), n)


def mapped_classes(plan: Any, target: Any, manifest: Any) -> Any:
    """The plan with its logits renamed by the teacher's ``class_map:`` (``kt_cache.classes.apply_class_map``)."""
    import dataclasses

    from kt_cache.classes import apply_class_map, read_class_map

    if plan.spec.class_map is None:
        return plan
    index = [t.id for t in manifest.teachers].index(plan.id)
    where = f"{manifest.path}:teachers[{index}].class_map"
    if plan.class_names is None:
        from kt_cache.errors import ManifestError

        raise ManifestError(f"{where}: the teacher's logits have no class names to map. Fix: give the teacher "
                            "`classes:` (the names of its logits, in order), then map them.")
    pairs = read_class_map(plan.spec.class_map, where, Path(manifest.path).parent)
    return dataclasses.replace(plan, class_names=apply_class_map(plan.class_names, pairs, list(target or ()), where))


def run_extract(options: ExtractOptions) -> ExtractReport:
    """Extract (or resume, or add teachers to) the store described by ``options``, holding its lock."""
    from kt_cache.lock import store_lock

    plan = build_plan(options)
    options.device = resolve_device(options.device)
    options.data_root = plan.listing.root
    with store_lock(plan.out, f"ktc extract --manifest {options.manifest}", options.force_unlock):
        return extract_into_store(plan, options)


def extract_into_store(plan: ExtractPlan, options: ExtractOptions) -> ExtractReport:
    """Create or resume the store, run every wave, finalize (the caller holds the store's lock)."""
    from kt_cache.coordinator import open_or_create_store, prepare_teacher
    from kt_cache.engine import RunState, run_wave
    from kt_cache.finalize import finalize_store

    manifest = plan.manifest
    root = open_or_create_store(plan.out, plan.listing, manifest.views, manifest.storage, options.limit)
    reopen_damaged_units(plan, options)
    statuses = {p.id: prepare_teacher(root, p, p.id in options.overwrite) for p in plan.plans}
    state, start = RunState(), time.perf_counter()
    if options.cluster or options.scheduler:
        from kt_cache.cluster import run_on_cluster

        run_on_cluster(plan, root, options, state, lambda total: task_progress(total, options))
    for number, wave in enumerate(plan.waves, 1):      # single process; after a cluster run, nothing is left
        with wave_progress(root, wave, number, len(plan.waves), options) as bar:
            run_wave(root, wave, options, state, bar)
    state.wall_s = time.perf_counter() - start
    ids = fmt.StoreReader(str(plan.out), consolidated=False).samples()["id"]
    finalize_store(plan.out, {p.id: state.timings.get(p.id) for p in plan.plans}, ids,
                   state.weights_sha256)
    failures = {str(ids[row]): reason for row, reason in sorted(state.failures.items())}
    timings = {k: v.as_dict() for k, v in state.timings.items()}
    return ExtractReport(plan, statuses, timings, failures, state.rows, state.wall_s)


def reopen_damaged_units(plan: ExtractPlan, options: ExtractOptions) -> None:
    """A rerun recomputes units whose objects changed since the last finalize (never re-lists damage)."""
    import click

    from kt_cache.repair import check_and_reopen_damaged_units, describe_repairs

    reopened = check_and_reopen_damaged_units(plan.out, [p.id for p in plan.plans], tuple(options.overwrite))
    if reopened:
        click.echo(f"{plan.out}: {describe_repairs(reopened)}", err=True)


def task_progress(total: int, options: ExtractOptions) -> Any:
    from contextlib import nullcontext

    from tqdm import tqdm

    if not options.progress:
        return nullcontext(None)
    return tqdm(total=total, unit="unit", desc="cluster tasks", disable=os.environ.get("KTC_NO_PROGRESS") == "1")


def wave_progress(root: Any, wave: list[Any], number: int, total: int, options: ExtractOptions) -> Any:
    """A tqdm bar over the images of the wave's pending units (images/s and ETA)."""
    from contextlib import nullcontext

    from tqdm import tqdm

    from kt_cache.engine import pending_units

    meta = fmt.read_store_meta(root, "store")
    units = set().union(*(pending_units(root, p.id) for p in wave))
    rows = sum(len(range(*fmt.unit_slice(u, meta.n_samples, meta.unit_rows).indices(meta.n_samples))) for u in units)
    if not options.progress or rows == 0:         # a finished wave shows no empty bar
        return nullcontext(None)
    names = ", ".join(p.id for p in wave)
    return tqdm(total=rows, unit="img", desc=f"wave {number}/{total} [{len(wave)} teachers: {names[:60]}]",
                disable=os.environ.get("KTC_NO_PROGRESS") == "1", dynamic_ncols=True)
