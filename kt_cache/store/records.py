"""Typed records of a store's attributes: ``StoreMeta`` (root ``attrs["ktc"]``) and ``TeacherRecord``
(``teachers/<id>`` ``attrs["ktc_teacher"]``).

These two classes are the only code that parses or builds those attributes: ``from_attrs`` checks every type
(a damaged or foreign value is a ``StoreError`` naming the key, expected vs got) and ``to_attrs`` gives the JSON
that is stored; ``write_store_meta`` / ``write_teacher_record`` are the only writers. docs/store-format.md lists
every key. A key this ktc does not model (written by a newer ktc of the same format version) is kept in
``unknown`` and written back unchanged, so a rewrite (finalize, compact, merge) never drops it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kt_cache.store import checks
from kt_cache.errors import StoreError

FORMAT_NAME = "ktc"
FORMAT_VERSION = 3
ROOT_ATTR = "ktc"
TEACHER_ATTR = "ktc_teacher"
DATASET_CLASSES = "dataset"               # v2: ``class_names`` equal to the dataset's target classes
DEFAULT_CHUNK_BYTES = 2 << 20             # stores from before ``chunk_bytes`` was recorded used it


def json_form(value: Any) -> Any:
    """``value`` as it reads back once stored as JSON (tuples become lists, keys strings)."""
    import json

    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True)
class StoreMeta:
    """Root ``attrs["ktc"]``: format version, sizes, dataset, view policy, row order, teachers, provenance.

    ``dataset`` keeps the producer's dataset record (``kind``, ``root``, ``fingerprint``, ``n_listed``, ``limit``,
    ``classes``; shards add ``shards`` and ``pattern``); ``views`` the view policy (``kt_cache.views.ViewsSpec``).
    ``teachers`` (v3, written by finalize) is the id of every teacher group, sorted: readers find the teachers
    there, without listing the store, and open only the ones they use (each teacher's own ``zarr.json`` holds the
    consolidated metadata of its nodes). None in v1/v2 stores, whose root consolidates every node.
    """

    version: int
    n_samples: int
    n_views: int
    unit_rows: int
    n_units: int
    dataset: dict[str, Any]
    views: dict[str, Any] = field(default_factory=dict)
    order: dict[str, Any] = field(default_factory=dict)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    created_with: dict[str, Any] = field(default_factory=dict)
    cpu_threads: int | None = None
    n_failed_samples: int = 0
    failed_samples: tuple[str, ...] = ()
    teachers: tuple[str, ...] | None = None
    keys: frozenset[str] = frozenset()
    unknown: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        """The dataset's target class names (``samples/label`` indexes them)."""
        return list(self.dataset.get("classes") or [])

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], where: str) -> StoreMeta:
        """The record in a store's root attributes; refuses a non-ktc group, an unknown version, damaged sizes."""
        meta = attrs.get(ROOT_ATTR)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise StoreError(f"{where} is a Zarr group but not a ktc store (no attrs['{ROOT_ATTR}'] with format "
                             f"'{FORMAT_NAME}'). Fix: point at a store written by `ktc extract`.")
        version = meta.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
            raise StoreError(f"{where} has ktc store format version {version!r}; this ktc reads versions "
                             f"1..{FORMAT_VERSION}. Fix: upgrade ktc (pip install -U ktc) or ask for a store in a "
                             "format this version reads.")
        checks.check_root_meta(meta, where)
        typed = {"chunk_bytes": int, "cpu_threads": int, "n_failed_samples": int, "order": dict, "created_with": dict}
        for key, kind in typed.items():
            value = meta.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise checks.damaged(where, f"attrs['{ROOT_ATTR}']['{key}'] must be {kind.__name__}, got {checks.short(value)}")
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("keys", "unknown")]
        known = {k: meta[k] for k in names if meta.get(k) is not None}
        known["failed_samples"] = tuple(str(s) for s in meta.get("failed_samples") or ())
        if meta.get("teachers") is not None:
            known["teachers"] = tuple(meta["teachers"])
        rest = {k: v for k, v in meta.items() if k not in names and k != "format"}
        return cls(**known, keys=frozenset(meta), unknown=rest)

    def to_attrs(self) -> dict[str, Any]:
        """The JSON object stored as ``attrs["ktc"]``: every key it was read with, and every field set."""
        return json_form({**self.unknown, "format": FORMAT_NAME, **stored_fields(self)})

    def replace(self, **changes: Any) -> StoreMeta:
        return dataclasses.replace(self, **changes)


TEACHER_TYPES: dict[str, tuple[type, ...]] = {
    "source": (str,), "model": (str,), "pretrained": (str, bool), "role": (str,), "weights": (str,),
    "weights_sha256": (str,), "preprocess": (dict,), "outputs": (list, tuple), "dtype": (str,), "entry": (dict,),
    "entry_sha256": (str,), "extra": (dict,), "library_versions": (dict,), "timing": (dict,),
    "seconds": (int, float), "feature_stats": (dict,), "complete": (bool,), "codec": (dict,), "renamed_from": (str,),
}
TEACHER_SIZES = ("num_classes", "feature_dim", "featmap_dim", "featmap_grid", "logits_topk", "units_done")


@dataclass(frozen=True)
class TeacherRecord:
    """``attrs["ktc_teacher"]`` of one teacher group: provenance, preprocessing, outputs and their sizes.

    ``class_names`` is what is stored (None, a list, or ``"dataset"`` for the dataset's target classes; use
    ``names(dataset_classes)``); ``keys`` are the keys the stored attributes hold (``ktc verify`` reports
    missing provenance from them); ``codec`` maps an output to its codec record (``kt_cache.codecs``).
    """

    source: str | None = None
    model: str | None = None
    pretrained: str | bool | None = None
    role: str = "predictive"
    weights: str | None = None
    weights_sha256: str | None = None
    preprocess: dict[str, Any] | None = None
    outputs: tuple[str, ...] = ()
    logits_topk: int | None = None
    featmap_grid: int | None = None
    dtype: str | None = None
    feature_dim: int | None = None
    num_classes: int | None = None
    featmap_dim: int | None = None
    class_names: tuple[str, ...] | str | None = None
    entry: dict[str, Any] = field(default_factory=dict)
    entry_sha256: str | None = None
    extra: dict[str, Any] | None = None
    library_versions: dict[str, Any] | None = None
    timing: dict[str, Any] | None = None
    seconds: float | None = None
    feature_stats: dict[str, Any] | None = None
    units_done: int | None = None
    complete: bool | None = None
    codec: dict[str, Any] = field(default_factory=dict)
    renamed_from: str | None = None
    keys: frozenset[str] = frozenset()
    unknown: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_attrs(cls, attrs: Any, teacher_id: str, where: str) -> TeacherRecord:
        """The record in a teacher group's ``attrs["ktc_teacher"]`` (``{}`` when absent), every type checked."""
        at, attr = f"{where}: teacher {teacher_id}", f"attrs['{TEACHER_ATTR}']"
        if not isinstance(attrs, Mapping):
            raise checks.damaged(at, f"{attr} must be an object, got {checks.short(attrs)}")
        for key in TEACHER_SIZES:
            value = attrs.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value <= checks.MAX_ROW_ELEMENTS):
                raise checks.damaged(at, f"{attr}['{key}'] must be a non-negative integer or null, got {checks.short(value)}")
        for key, kinds in TEACHER_TYPES.items():
            value = attrs.get(key)
            if value is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
                kind = "/".join(k.__name__ for k in kinds)
                raise checks.damaged(at, f"{attr}['{key}'] must be {kind} or null, got {checks.short(value)}")
        outputs, names = attrs.get("outputs") or (), attrs.get("class_names")
        if not all(isinstance(o, str) for o in outputs):
            raise checks.damaged(at, f"{attr}['outputs'] must be a list of output names, got {checks.short(outputs)}")
        listed = isinstance(names, list) and all(isinstance(n, str) for n in names)
        if names is not None and names != DATASET_CLASSES and not listed:
            raise checks.damaged(at, f"{attr}['class_names'] must be a list of names, 'dataset' or null, got "
                                     f"{checks.short(names)}")
        if listed and attrs.get("num_classes") is not None and len(names) != attrs["num_classes"]:
            raise checks.damaged(at, f"{attr} lists {len(names)} class_names for num_classes = {attrs['num_classes']}")
        fields_ = [f.name for f in dataclasses.fields(cls) if f.name not in ("keys", "unknown")]
        known = {k: attrs[k] for k in fields_ if attrs.get(k) is not None}
        known["outputs"] = tuple(outputs)
        if listed:
            known["class_names"] = tuple(names)
        rest = {k: v for k, v in attrs.items() if k not in fields_}
        return cls(**known, keys=frozenset(attrs), unknown=dict(rest))

    def names(self, dataset_classes: list[str] | None, teacher_id: str = "", where: str = "store") -> list[str] | None:
        """The names of the teacher's logits, ``"dataset"`` resolved to the dataset's target classes."""
        if self.class_names != DATASET_CLASSES:
            return list(self.class_names) if self.class_names is not None else None
        classes = list(dataset_classes or [])
        if self.num_classes is not None and len(classes) != self.num_classes:
            raise checks.damaged(where, f"teacher {teacher_id}: its logits are the dataset's classes, but it has "
                                        f"num_classes = {self.num_classes} and the dataset {len(classes)}")
        return classes

    def to_attrs(self) -> dict[str, Any]:
        """The JSON object stored as ``attrs["ktc_teacher"]``: every key it was read with, and every field set."""
        return json_form({**self.unknown, **stored_fields(self)})

    def replace(self, **changes: Any) -> TeacherRecord:
        return dataclasses.replace(self, **changes)


def stored_fields(record: Any) -> dict[str, Any]:
    """The fields of a record that are stored: those it was read with (``keys``) and those set to a value other
    than the field's default (so a record read from an older store is written back as it was)."""
    out = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name not in ("keys", "unknown") and (f.name in record.keys or value != default):
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def read_teacher_record(group: Any, teacher_id: str, where: str) -> TeacherRecord:
    """The record of an opened ``teachers/<id>`` group."""
    return TeacherRecord.from_attrs(group.attrs.get(TEACHER_ATTR, {}), teacher_id, where)


def write_teacher_record(group: Any, record: TeacherRecord) -> None:
    group.attrs[TEACHER_ATTR] = record.to_attrs()


def read_store_meta(root: Any, where: str) -> StoreMeta:
    """The record of an opened store root."""
    return StoreMeta.from_attrs(dict(root.attrs), where)


def write_store_meta(root: Any, meta: StoreMeta) -> None:
    """Written last by every command that makes a store: a store without it is recognisably unfinished."""
    root.attrs[ROOT_ATTR] = meta.to_attrs()
