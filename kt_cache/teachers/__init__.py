"""Teacher adapters: resolve a manifest teacher offline, then load it for extraction.

``resolve_teacher`` never loads weights nor touches the network (the model is built on the meta
device); ``load_teacher`` builds the real network with its weights. timm and open_clip are imported
only when a teacher of that source is resolved or loaded.
"""

from __future__ import annotations

import hashlib

from pathlib import Path
from types import ModuleType

import torch

from kt_cache.errors import TeacherError, did_you_mean
from kt_cache.manifest_types import OUTPUT_KINDS, TeacherSpec
from kt_cache.teachers import open_clip_source, timm_source
from kt_cache.teachers.base import LoadedTeacher, TeacherPlan

SOURCES: dict[str, ModuleType] = {"timm": timm_source, "open_clip": open_clip_source}

__all__ = ["SOURCES", "LoadedTeacher", "TeacherPlan", "load_teacher", "resolve_teacher"]


def _source(spec: TeacherSpec) -> ModuleType:
    module = SOURCES.get(spec.source)
    if module is None:
        raise TeacherError(
            f"teacher {spec.id}: unknown source {spec.source!r}.{did_you_mean(spec.source, SOURCES)} "
            f"Fix: set `source:` to one of {sorted(SOURCES)}."
        )
    bad = [o for o in spec.outputs if o not in OUTPUT_KINDS]
    if bad or not spec.outputs:
        raise TeacherError(f"teacher {spec.id}: outputs {list(spec.outputs)} must be a non-empty subset of "
                           f"{list(OUTPUT_KINDS)}. Fix: correct `outputs:`.")
    return module


def resolve_teacher(
    spec: TeacherSpec, target_classes: tuple[str, ...] | None, base_dir: Path | None = None
) -> TeacherPlan:
    """Resolve a teacher offline: validate names and files, learn its output shapes on the meta device.

    Args:
        spec: the manifest entry.
        target_classes: the dataset's class names (open_clip zero-shot logits score these), or None.
        base_dir: folder relative ``checkpoint:`` / class-list paths are resolved against.

    Returns:
        The plan: preprocessing (model config overridden by ``spec.preprocess``), per-view output sizes
        (``features`` [D], ``logits`` [C_t], ``featmap`` [g, g, d]; None when not requested), class names,
        parameter bytes and the weights' origin ("random", a file path, or "hub:<model>[:<tag>]").

    Raises:
        TeacherError: unknown model or tag, missing checkpoint, class-count mismatch, unusable outputs.
    """
    return _source(spec).resolve(spec, target_classes, base_dir)


def load_teacher(plan: TeacherPlan, device: str | torch.device) -> LoadedTeacher:
    """Build the plan's network with its weights, frozen and in eval mode on ``device``.

    Raises:
        TeacherError: unreadable or ill-fitting checkpoint, or hub weights that cannot be downloaded.
    """
    with torch.random.fork_rng(devices=[]):
        # Random-init teachers (`pretrained: none`) must be the same network in every process and on
        # resume, so their initial weights are seeded from the teacher id.
        torch.manual_seed(int(hashlib.sha256(plan.id.encode()).hexdigest()[:8], 16))
        return _source(plan.spec).load(plan, device)
