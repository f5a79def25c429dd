"""Build everything a training run needs from a ``TrainConfig``: store, teachers, students, method, data.

No teacher network is ever built here: teachers exist only as their cached outputs.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kt_cache.errors import UsageError
from kt_cache.store import StoreReader
from kt_train.config import TrainConfig


@dataclass
class Run:
    """A ready-to-train run (see ``build_run``)."""

    config: TrainConfig
    reader: StoreReader
    teacher_ids: list[str]
    cached: Any
    students: list[Any]
    method: Any
    loader: Any
    device: torch.device
    use_labels: bool
    initial: Any | None            # fg: frozen copy of the initial student
    info: dict[str, Any]           # what `ktc eval` needs: classes, centre crop, student files, teachers
    notes: list[str] = field(default_factory=list)   # the method's start-of-run notices (Method.run_notes)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device on this machine. Fix: --device cpu or auto.")
    return torch.device(name)


def sentinel_spec(reader: StoreReader, teacher_id: str | None) -> Any:
    """KPU: the store teacher (role sentinel) whose network becomes the student's frozen trunk."""
    if teacher_id is None:
        return None
    from kt_train.students import SentinelSpec

    record = reader.teacher_record(teacher_id)
    if record.source != "timm":
        raise UsageError(f"--sentinel {teacher_id}: its source is {record.source}; the sentinel trunk must be a "
                         "timm ViT. Fix: name a timm ViT teacher of the store (role: sentinel).")
    weights = str(record.weights)
    if weights != "random" and not Path(weights).is_file():
        raise UsageError(f"--sentinel {teacher_id}: its weights ({weights}) are not a local file on this machine, so "
                         "the frozen trunk cannot be built from them. Fix: extract the sentinel teacher from a local "
                         "`checkpoint:` (the store records its path), or copy that file to the recorded path.")
    checkpoint = None if weights == "random" else weights
    model_args = {k: v for k, v in (record.entry.get("model_args") or {}).items() if k != "num_classes"}
    return SentinelSpec(model=str(record.model).split(".")[0], checkpoint=checkpoint, model_args=model_args)


def build_students(config: TrainConfig, reader: StoreReader, num_classes: int, device: torch.device) -> list[Any]:
    from kt_train.students import build_student

    sentinel = sentinel_spec(reader, config.sentinel)
    names = config.students or [sentinel.model if sentinel else config.student]
    return [build_student(name, num_classes, checkpoint=config.student_checkpoint, sentinel=sentinel,
                          img_size=config.img_size).to(device) for name in names]


def method_options(config: TrainConfig, n_students: int) -> dict[str, Any]:
    from kt_train.methods import METHODS

    options = dict(config.method_options)
    if METHODS[config.method].live_students:
        options.setdefault("num_students", n_students)
    return options


def build_method(config: TrainConfig, cached: Any, student: Any, n_students: int, device: torch.device) -> Any:
    from kt_train.methods import MethodDims
    from kt_train.methods import build_method as build

    dims = MethodDims(student.feature_dim, cached.num_classes, cached.teacher_infos())
    return build(config.method, method_options(config, n_students), dims).to(device)


def build_loader(config: TrainConfig, reader: StoreReader, student: Any, cached: Any, rank: int, world: int) -> Any:
    from kt_train.data import StudentViews, make_loader

    cfg = student.data_config
    dataset = StudentViews(reader, tuple(cfg["input_size"][1:]), cfg["mean"], cfg["std"],
                           cfg.get("interpolation", "bilinear"), data_root=config.data, seed=config.seed)
    usable = int(dataset.ok.sum()) // world
    remote = "://" in str(config.cache)
    return make_loader(dataset, config.batch_size, cached.block_rows, config.window_blocks, config.seed, rank=rank,
                       world=world, split=config.ddp_split, num_workers=config.workers, drop_last=usable >= 2 * config.batch_size,
                       multiprocessing_context="spawn" if remote and config.workers else None,
                       pin_memory=torch.cuda.is_available())


def ram_budget_bytes(gib: float | None) -> int:
    """``--ram-budget-gb`` in bytes; by default a quarter of the machine's physical memory (the rest is left to
    the model, the data loader's workers and the OS page cache)."""
    if gib is not None:
        return int(gib * (1 << 30))
    return physical_memory_bytes() // 4


def physical_memory_bytes() -> int:
    """The machine's physical memory (bytes)."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def build_run(config: TrainConfig, rank: int = 0, world: int = 1, local_rank: int = 0) -> Run:
    """Open the store, select teachers, check the method can run on them, build students, method, data.

    Under torchrun (``world`` > 1) each rank builds the same run (same seed: same initial weights) and
    its loader reads only this rank's strided share of the samples.
    """
    from kt_train.data import CachedTeachers, select_teachers
    from kt_train.methods import METHODS, build_options
    from kt_train.requirements import check_requirements, run_notes

    device = resolve_device(config.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    torch.manual_seed(config.seed)
    reader = StoreReader(config.cache)
    teacher_ids = select_teachers(reader, config.teachers)
    options = build_options(config.method, method_options(config, max(1, len(config.students))))
    labels = reader.sample("label")
    use_labels = config.labels == "use" and bool((labels >= 0).any())
    check_requirements(config, reader, teacher_ids, options, use_labels)
    budget = ram_budget_bytes(config.ram_budget_gb)
    cached = CachedTeachers(reader, teacher_ids, needs=METHODS[config.method].needs, window_blocks=config.window_blocks,
                            ram_budget_bytes=budget)
    students = build_students(config, reader, cached.num_classes, device)
    method = build_method(config, cached, students[0], len(students), device)
    loader = build_loader(config, reader, students[0], cached, rank, world)
    initial = None
    if METHODS[config.method].reference_student:
        initial = copy.deepcopy(students[0]).eval().requires_grad_(False)
    info = {"classes": reader.class_names, "center_crop": reader.meta.views.get("center_crop", 0.875),
            "data_root": loader.dataset.data_root, "data_kind": loader.dataset.images.kind,
            "cache": str(config.cache), "teachers": teacher_ids, "ram_budget_bytes": budget,
            "method": config.method, "method_options": options_dict(method),
            "students": [f"student{i if len(students) > 1 else ''}.safetensors" for i in range(len(students))]}
    notes = run_notes(config, reader, teacher_ids, options)
    return Run(config, reader, teacher_ids, cached, students, method, loader, device, use_labels, initial, info, notes)


def options_dict(method: Any) -> dict[str, Any]:
    import dataclasses

    options = getattr(method, "options", None)
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}
