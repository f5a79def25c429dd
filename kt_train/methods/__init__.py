"""Knowledge-transfer methods behind one interface (see ``base.py`` and ``docs/methods.md``).

Usage::

    from kt_train.methods import MethodDims, TeacherInfo, build_method
    dims = MethodDims(student_dim=384, num_classes=1000, teachers=(TeacherInfo("convnext", feature_dim=768,
                                                                              has_logits=True),))
    method = build_method("uniform", {"alpha2": 0.25, "zscore": False}, dims)
    parts = method(StudentOutput(logits, features), teacher_batch)     # {"loss": ..., "logit_loss": ...}
    parts["loss"].backward()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kt_cache.errors import did_you_mean
from kt_train.methods.avg import Avg
from kt_train.methods.base import (
    Method,
    MethodDims,
    StudentOutput,
    TeacherBatch,
    TeacherInfo,
    scatter_full_logits,
    scatter_topk_logits,
)
from kt_train.methods.bikd import BiKD
from kt_train.methods.ce import CE
from kt_train.methods.fg import FG
from kt_train.methods.kd import KD
from kt_train.methods.kpu import KPU
from kt_train.methods.options import MethodConfigError, MethodOptions
from kt_train.methods.uniform import Uniform

METHODS: dict[str, type[Method]] = {
    "ce": CE,
    "kd": KD,
    "avg": Avg,
    "uniform": Uniform,
    "kpu": KPU,
    "bikd": BiKD,
    "fg": FG,
}

__all__ = [
    "METHODS", "Method", "MethodConfigError", "MethodDims", "MethodOptions", "StudentOutput", "TeacherBatch",
    "TeacherInfo", "build_method", "build_options", "list_methods", "register_method", "scatter_full_logits",
    "scatter_topk_logits",
]


def register_method(cls: type[Method]) -> type[Method]:
    """Add ``cls`` to ``METHODS`` (in place) under ``cls.name`` once its declaration checks out; usable as a
    class decorator. ``ktc train``'s ``--method`` choices, help, requirement checks and setup then include it.

    Raises:
        MethodConfigError: the class attributes a method must set are missing or wrong (each one named).
    """
    problems = cls.declaration_problems() if isinstance(cls, type) and issubclass(cls, Method) else ["not a Method"]
    if problems:
        raise MethodConfigError(f"cannot register method class {getattr(cls, '__qualname__', cls)!r}: "
                                f"{'; '.join(problems)}. Fix: set these class attributes (docs/methods.md, "
                                "'Adding a method').")
    METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(METHODS)


def _lookup(name: str) -> type[Method]:
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in METHODS:
        raise MethodConfigError(
            f"unknown method {name!r}.{did_you_mean(key, METHODS)} Known methods: {', '.join(list_methods())}."
        )
    return METHODS[key]


def build_options(name: str, options: Mapping[str, Any] | None = None) -> MethodOptions:
    """Validate ``options`` for method ``name`` into its frozen options dataclass (no dims needed)."""
    cls = _lookup(name)
    return cls.Options.from_dict(options, cls.name)


def build_method(name: str, options: Mapping[str, Any] | None, dims: MethodDims) -> Method:
    """Build method ``name`` (case-insensitive; ``bi-kd`` = ``bikd``) with ``options`` for ``dims``.

    Raises:
        MethodConfigError: unknown name or option (with a did-you-mean), wrong type or value.
    """
    cls = _lookup(name)
    return cls(cls.Options.from_dict(options, cls.name), dims)
