"""The extraction engine: waves of teachers, one decode per image per pass, a writer thread.

``run_wave`` is the unit of work of the single-process path: it loads the wave's teachers once,
streams the rows of the pending units through DataLoader workers (decode + resize per resolution),
normalises per teacher on the device, runs every teacher that still needs the unit, and hands whole
units to a writer thread that writes every array of a unit and then its ``done`` flag.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kt_cache.store import format as fmt
from kt_cache.decode import UnitBatchSampler, ViewDecodeDataset, collate_views
from kt_cache.errors import ImageDecodeError
from kt_cache.outputs import fill_failed_rows, label_map, storage_blocks, to_numpy_for_store


@dataclass
class TeacherTiming:
    """Per-teacher cost of one run: weight load, forward passes, image-views processed."""

    load_s: float = 0.0
    forward_s: float = 0.0
    images: int = 0

    def as_dict(self) -> dict[str, float]:
        rate = self.images / self.forward_s if self.forward_s > 0 else 0.0
        return {"load_s": round(self.load_s, 4), "forward_s": round(self.forward_s, 4), "images": self.images,
                "images_per_s": round(rate, 2)}


@dataclass
class RunState:
    """What a run accumulates across waves: timings, failed images, processed rows, wall time."""

    timings: dict[str, TeacherTiming] = field(default_factory=dict)
    weights_sha256: dict[str, str] = field(default_factory=dict)   # of the weights actually loaded (hub too)
    failures: dict[int, str] = field(default_factory=dict)
    rows: int = 0
    wall_s: float = 0.0


def plan_waves(plans: Sequence[Any], budget_bytes: int) -> list[list[Any]]:
    """Group teachers into waves whose parameters fit ``budget_bytes`` (a teacher alone may exceed it).

    Teachers of one input resolution are kept together so each wave resizes each view as few times as
    possible; within a resolution, manifest order is kept.
    """
    ordered = sorted(plans, key=lambda p: [q.resize_key for q in plans].index(p.resize_key))
    waves: list[list[Any]] = []
    used = 0
    for plan in ordered:
        if waves and used + plan.param_bytes <= budget_bytes:
            waves[-1].append(plan)
            used += plan.param_bytes
        else:
            waves.append([plan])
            used = plan.param_bytes
    return waves


def pending_units(root: Any, teacher_id: str) -> set[int]:
    done = np.asarray(root[f"teachers/{teacher_id}/done"][:], dtype=bool)
    return {int(u) for u in np.flatnonzero(~done)}


class UnitWriter:
    """A writer thread: whole units are written in the background while the device computes.

    Errors in the thread are re-raised in the caller at the next ``submit`` or at ``close``.
    """

    def __init__(self, max_pending: int = 4):
        self.jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.write_s = 0.0
        self.thread = threading.Thread(target=self.loop, name="ktc-writer", daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                start = time.perf_counter()
                try:
                    job()
                except BaseException as err:  # handed to the main thread, which raises it
                    self.error = err
                self.write_s += time.perf_counter() - start

    def submit(self, job: Callable[[], None]) -> None:
        self.raise_if_failed()
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error


@dataclass
class WaveTeacher:
    """A loaded teacher with what the wave loop needs: pending units, label map, normaliser, fills."""

    plan: Any
    model: Any
    class_map: torch.Tensor | None
    mean: torch.Tensor
    std: torch.Tensor
    fills: dict[str, Any]
    index_dtype: str
    pending: set[int] = field(default_factory=set)
    buffers: dict[int, list[dict[str, np.ndarray]]] = field(default_factory=dict)


def make_wave_teacher(plan: Any, root: Any, device: torch.device, target_classes: Sequence[str], state: RunState) -> WaveTeacher:
    from kt_cache.teachers import load_teacher

    start = time.perf_counter()
    model = load_teacher(plan, device)
    state.timings.setdefault(plan.id, TeacherTiming()).load_s += time.perf_counter() - start
    if getattr(model, "weights_sha256", None):
        state.weights_sha256[plan.id] = model.weights_sha256
    meta = fmt.read_store_meta(root, "store")
    specs = fmt.teacher_array_specs(plan, meta.n_views, coded=False)   # a unit is computed in floats
    cmap = label_map(tuple(target_classes), plan.class_names) if plan.num_classes else None
    return WaveTeacher(
        plan=plan, model=model,
        class_map=torch.as_tensor(cmap, device=device) if cmap is not None else None,
        mean=torch.tensor(plan.mean, device=device).view(1, 3, 1, 1) * 255.0,
        std=torch.tensor(plan.std, device=device).view(1, 3, 1, 1) * 255.0,
        fills={s.path: s.fill for s in specs},
        index_dtype=fmt.index_dtype(plan.num_classes or 1),
    )


def teacher_forward(wt: WaveTeacher, pixels: torch.Tensor, device: torch.device, timing: TeacherTiming) -> dict[str, torch.Tensor]:
    """uint8 ``[b, V, 3, H, W]`` -> outputs ``{name: [b, V, ...]}`` in teacher-sized sub-batches."""
    b, v = pixels.shape[:2]
    flat = pixels.reshape(b * v, *pixels.shape[2:])
    parts: list[dict[str, torch.Tensor]] = []
    start = time.perf_counter()
    for chunk in flat.split(wt.plan.spec.batch_size):
        x = (chunk.to(device, non_blocking=True).float() - wt.mean) / wt.std
        with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
            parts.append({k: t.float() for k, t in wt.model.forward(x).items()})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timing.forward_s += time.perf_counter() - start
    timing.images += b * v
    return {k: torch.cat([p[k] for p in parts]).reshape(b, v, *parts[0][k].shape[1:]) for k in parts[0]}


def load_wave(root: Any, wave: Sequence[Any], device: torch.device, state: RunState) -> list[WaveTeacher]:
    """Load a wave's teachers once; a dask worker keeps them across the units it is given."""
    meta = fmt.read_store_meta(root, "store")
    return [make_wave_teacher(p, root, device, meta.classes, state) for p in wave]


def run_wave(root: Any, wave: Sequence[Any], options: Any, state: RunState, progress: Any = None,
             units: set[int] | None = None, teachers: list[WaveTeacher] | None = None) -> None:
    """One pass over the pending units of a wave's teachers (see module docstring).

    Args:
        units: restrict the pass to these units (a dask task is one unit); default every pending unit.
        teachers: already loaded teachers of this wave (kept by the caller); default load and release here.
    """
    meta = fmt.read_store_meta(root, "store")
    device = torch.device(options.device)
    allowed = units if units is not None else set(range(meta.n_units))
    pending = {p.id: pending_units(root, p.id) & allowed for p in wave}
    todo = sorted(set().union(*pending.values()))
    if not todo:
        return
    with recorded_threads(meta, device):
        compute_wave(root, wave, options, state, progress, todo, pending, teachers, meta, device)


def compute_wave(root: Any, wave: Sequence[Any], options: Any, state: RunState, progress: Any, todo: list[int],
                 pending: dict[str, set[int]], teachers: list[WaveTeacher] | None, meta: fmt.StoreMeta, device: torch.device) -> None:
    loaded = teachers if teachers is not None else load_wave(root, wave, device, state)
    for wt in loaded:
        wt.pending = pending[wt.plan.id]
    try:
        samples = {name: np.asarray(root[f"samples/{name}"][:]) for name in ("id", "label")}
        ranges = [fmt.unit_slice(u, meta.n_samples, meta.unit_rows) for u in todo]
        loader = make_loader(root, options, samples["id"], wave, ranges, meta)
        writer = UnitWriter()
        try:
            consume(loader, loaded, ranges, todo, samples["label"], root, writer, device, state, options, progress)
        finally:
            writer.close()
    finally:
        if teachers is None:
            for wt in loaded:
                wt.model.release()


@contextmanager
def recorded_threads(meta: fmt.StoreMeta, device: torch.device) -> Iterator[None]:
    """Compute with the store's recorded CPU thread count (``cpu_threads``), whatever process runs the unit
    (single process, dask worker, a resumed run), so a unit's bytes do not depend on how units were scheduled."""
    wanted = meta.cpu_threads
    if device.type != "cpu" or not isinstance(wanted, int) or wanted < 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(min(wanted, 1024))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_loader(root: Any, options: Any, sample_ids: np.ndarray, wave: Sequence[Any], ranges: Sequence[slice], meta: fmt.StoreMeta) -> Any:
    from kt_cache.image_source import open_images
    from kt_cache.manifest_types import ViewsSpec

    policy = ViewsSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.views.items()})
    keys = sorted({p.resize_key for p in wave})
    images = open_images(meta.dataset, sample_ids, options.data_root)
    dataset = ViewDecodeDataset(images, policy, keys)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=UnitBatchSampler(ranges, options.batch_size), num_workers=options.workers,
        collate_fn=collate_views, pin_memory=torch.device(options.device).type == "cuda",
        persistent_workers=False, prefetch_factor=4 if options.workers > 0 else None,
    )


def consume(loader: Any, teachers: list[WaveTeacher], ranges: Sequence[slice], units: Sequence[int], labels: np.ndarray,
            root: Any, writer: UnitWriter, device: torch.device, state: RunState, options: Any, progress: Any) -> None:
    """Run every batch through the teachers that need its unit; submit finished units to the writer."""
    unit_of = {r.start: (u, r) for u, r in zip(units, ranges)}
    current: tuple[int, slice] | None = None
    sample_parts: list[dict[str, np.ndarray]] = []
    for batch in loader:
        rows = batch["rows"]
        if int(rows[0]) in unit_of:
            current, sample_parts = unit_of[int(rows[0])], []
        record_failures(batch, state, options.strict)
        sample_parts.append({"ok": batch["ok"], "views": batch["views"], "digests": batch["digests"]})
        batch_labels = torch.as_tensor(labels[rows].astype(np.int64), device=device)
        for wt in teachers:
            if current[0] in wt.pending:
                run_teacher_on_batch(wt, batch, batch_labels, current[0], device, state)
        state.rows += len(rows)
        if progress is not None:
            progress.update(len(rows))
        if int(rows[-1]) + 1 == current[1].stop:
            submit_unit(root, writer, teachers, current, sample_parts)


def record_failures(batch: dict[str, Any], state: RunState, strict: bool) -> None:
    for row, ok, error in zip(batch["rows"], batch["ok"], batch["errors"]):
        if not ok:
            if strict:
                raise ImageDecodeError(f"{error} (--strict stops at the first unreadable image; "
                                       "without it the image is recorded in samples/ok and extraction continues)")
            state.failures[int(row)] = error


def run_teacher_on_batch(wt: WaveTeacher, batch: dict[str, Any], labels: torch.Tensor, unit: int,
                         device: torch.device, state: RunState) -> None:
    timing = state.timings.setdefault(wt.plan.id, TeacherTiming())
    outputs = teacher_forward(wt, batch["pixels"][wt.plan.resize_key], device, timing)
    blocks = storage_blocks(outputs, labels, wt.class_map, wt.plan.spec.logits_topk)
    arrays = to_numpy_for_store(blocks, wt.plan.spec.dtype, wt.plan.id, wt.index_dtype)
    fill_failed_rows(arrays, batch["ok"], wt.fills)
    wt.buffers.setdefault(unit, []).append(arrays)


def submit_unit(root: Any, writer: UnitWriter, teachers: list[WaveTeacher], current: tuple[int, slice],
                sample_parts: list[dict[str, np.ndarray]]) -> None:
    unit, rows = current
    ok = np.concatenate([p["ok"] for p in sample_parts])
    views = np.concatenate([p["views"] for p in sample_parts])
    digests = np.concatenate([p["digests"] for p in sample_parts])
    writer.submit(lambda: fmt.write_samples_unit(root, rows, ok, views, digests))
    for wt in teachers:
        parts = wt.buffers.pop(unit, None)
        if parts is None:
            continue
        arrays = {path: np.concatenate([p[path] for p in parts]) for path in parts[0]}
        group = fmt.teacher_group(root, wt.plan.id)
        writer.submit(lambda g=group, a=arrays, p=wt.plan: fmt.write_unit(g, unit, rows, fmt.encode_unit_arrays(a, p)))
