"""The coordinator: the only code that creates a store, its groups and arrays, or changes attrs.

It runs before any writer starts (docs/store-format.md, "create, then write"), decides what an existing store
may be reused for (resume, add a teacher) and refuses what it must not (another dataset, other views,
a changed teacher entry without ``--overwrite``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from kt_cache.store import format as fmt
from kt_cache.errors import StoreMismatchError, UsageError


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes stored values (recorded for provenance)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("ktc", "torch", "torchvision", "timm", "open_clip_torch", "zarr", "numpy", "pillow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def json_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def row_order(n_listed: int, seed: int, limit: int | None) -> np.ndarray:
    """The recorded row permutation: row r holds dataset sample ``order[r]`` (class-mixed blocks)."""
    order = np.random.default_rng(seed).permutation(n_listed).astype(np.int64)
    return order[:limit] if limit is not None else order


def root_meta(listing: Any, views: Any, storage: Any, order: np.ndarray, limit: int | None) -> fmt.StoreMeta:
    """``attrs["ktc"]`` of a new store, in the form it reads back once stored (tuples become lists)."""
    n = int(order.size)
    dataset = dict(listing.description, fingerprint=listing.fingerprint, n_listed=len(listing.ids),
                   limit=limit, classes=list(listing.class_names))
    meta = fmt.StoreMeta(
        version=fmt.FORMAT_VERSION, n_samples=n, n_views=views.count, unit_rows=storage.unit_rows,
        n_units=fmt.n_units(n, storage.unit_rows), chunk_bytes=storage.chunk_bytes, dataset=dataset,
        views=asdict(views), order={"seed": storage.order_seed, "sha256": hashlib.sha256(order.tobytes()).hexdigest()},
        created_with=library_versions(), cpu_threads=cpu_threads(),
    )
    return fmt.StoreMeta.from_attrs({fmt.ROOT_ATTR: meta.to_attrs()}, "the new store")


def cpu_threads() -> int:
    """The intra-op thread count every process computing a unit of this store uses on CPU: a float sum's
    order, and so its last bit, depends on it (kt_cache.engine.recorded_threads)."""
    import torch

    return int(torch.get_num_threads())


def check_output_path(path: Path) -> None:
    """The output must be a new path or an existing ktc store directory."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"output {path} exists and is a file, not a store directory. "
                         "Fix: choose another --out path or remove the file.")
    if path.is_dir() and any(path.iterdir()) and not (path / "zarr.json").is_file():
        raise UsageError(f"output {path} is a non-empty folder that is not a Zarr store. "
                         "Fix: choose a new --out path (ktc never writes into unrelated folders).")


def open_or_create_store(path: Path, listing: Any, views: Any, storage: Any, limit: int | None) -> Any:
    """Open the store at ``path`` for writing, creating it with its samples arrays when new."""
    import zarr

    check_output_path(path)
    order = row_order(len(listing.ids), storage.order_seed, limit)
    wanted = root_meta(listing, views, storage, order, limit)
    if (path / "zarr.json").is_file():
        root = fmt.open_group(str(path), mode="r+", consolidated=False)
        check_same_store(fmt.read_store_meta(root, str(path)), wanted, path)
        return root
    root = zarr.open_group(str(path), mode="w")
    create_samples(root, listing, order, views.count, storage)
    root.create_group("teachers")
    fmt.write_store_meta(root, wanted)   # written last: a store without it is recognisably unfinished
    return root


def create_samples(root: Any, listing: Any, order: np.ndarray, n_views: int, storage: Any) -> None:
    n = int(order.size)
    specs = {spec.path: spec for spec in fmt.sample_array_specs(n_views)}
    group = root.create_group("samples")
    for spec in specs.values():
        fmt.create_array(group, spec, n, storage.unit_rows, storage.chunk_bytes)
    group["id"][:] = np.array([listing.ids[i] for i in order], dtype=str)
    group["index"][:] = order
    group["label"][:] = np.asarray(listing.labels, dtype=np.int32)[order]


def check_same_store(stored: fmt.StoreMeta, wanted: fmt.StoreMeta, path: Path) -> None:
    """Refuse to resume a store made from another dataset, view policy or row order."""
    checks = [
        ("dataset fingerprint", stored.dataset.get("fingerprint"), wanted.dataset["fingerprint"]),
        ("--limit", stored.dataset.get("limit"), wanted.dataset["limit"]),
        ("target classes", stored.dataset.get("classes"), wanted.dataset["classes"]),
        ("views policy", stored.views, wanted.views),
        ("row order (storage.order_seed)", stored.order, wanted.order),
        ("storage.unit_rows", stored.unit_rows, wanted.unit_rows),
    ]
    for what, have, want in checks:
        if have != want:
            raise StoreMismatchError(
                f"store {path} was made with another {what}: stored {short(have)}, this run {short(want)}. "
                "Teacher outputs of different samples or views cannot share one store. "
                "Fix: write to a new store (--out NEW.zarr), or rerun with the manifest and dataset the store was made from.")


def short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


PROVENANCE_KEYS = frozenset({"source", "model", "pretrained", "role", "weights", "weights_sha256", "preprocess",
                             "outputs", "logits_topk", "featmap_grid", "dtype", "feature_dim", "num_classes",
                             "featmap_dim", "class_names", "entry", "entry_sha256", "extra", "library_versions"})


def teacher_record(plan: Any, weights_sha256: str | None, dataset_classes: list[str]) -> fmt.TeacherRecord:
    """Provenance of one teacher, written when its group is created (timings/stats added at finalize); every
    provenance key is written, null included (``ktc verify`` tells a null hash from a missing one)."""
    spec = plan.spec
    entry = spec.fingerprint_entry()
    return fmt.TeacherRecord(
        source=spec.source, model=spec.model, pretrained=spec.pretrained, role=spec.role,
        weights=plan.weights, weights_sha256=weights_sha256,
        preprocess={"input_size": list(plan.input_size), "mean": list(plan.mean), "std": list(plan.std),
                    "interpolation": plan.interpolation},
        outputs=tuple(spec.outputs), logits_topk=stored_topk(spec.logits_topk, plan.num_classes),
        featmap_grid=spec.featmap_grid, dtype=spec.dtype, feature_dim=plan.feature_dim, num_classes=plan.num_classes,
        featmap_dim=plan.featmap_dim, class_names=fmt.class_names_attr(plan.class_names, dataset_classes),
        entry=entry, entry_sha256=json_sha256(entry), extra=plan.extra, library_versions=library_versions(),
        keys=PROVENANCE_KEYS,
    )


def stored_topk(topk: int | None, num_classes: int | None) -> int | None:
    """The k the store really holds: a teacher with fewer classes than ``topk`` keeps all of them."""
    return min(topk, num_classes) if topk is not None and num_classes else topk


def weights_file_sha256(plan: Any) -> str | None:
    """sha256 of a local weights file (what the teacher will load); None for hub or random weights."""
    path = Path(plan.weights)
    return file_sha256(path) if plan.weights not in ("random",) and path.is_file() else None


def prepare_teacher(root: Any, plan: Any, overwrite: bool) -> str:
    """Create or reuse ``teachers/<id>``. Returns "created", "resumed" or "recreated"."""
    meta = fmt.read_store_meta(root, "store")
    teachers = root["teachers"]
    entry_sha = json_sha256(plan.spec.fingerprint_entry())
    status = "created"
    weights_sha = weights_file_sha256(plan)
    if plan.id in teachers:
        current = fmt.teacher_group(root, plan.id)
        stored = fmt.read_teacher_record(current, plan.id, "store")
        # A local weights file is compared by content; hub weights are hashed only once loaded (finalize).
        same = stored.entry_sha256 == entry_sha and weights_sha in (None, stored.weights_sha256)
        if not overwrite and same and stored_arrays_match(current, plan, meta):
            return "resumed"
        if not overwrite and any_unit_done(current):
            raise StoreMismatchError(changed_teacher_message(plan, stored, weights_sha))
        del teachers[plan.id]   # --overwrite, or an earlier run that failed before any unit: nothing is lost
        status = "recreated"
    group = teachers.create_group(plan.id)
    for spec in fmt.teacher_array_specs(plan, meta.n_views):
        fmt.create_array(group, spec, meta.n_samples, meta.unit_rows, meta.chunk_bytes, per_view=True)
    fmt.create_done_array(group, meta.n_units)
    codecs = fmt.create_codec_arrays(group, plan, meta.n_units)
    fmt.write_teacher_record(group, teacher_record(plan, weights_sha, meta.classes).replace(codec=codecs))
    return status


def any_unit_done(group: Any) -> bool:
    """Whether the stored teacher holds finished work (a missing ``done`` array counts as finished: keep it)."""
    return "done" not in group or bool(np.asarray(group["done"][:], dtype=bool).any())


def stored_arrays_match(group: Any, plan: Any, meta: fmt.StoreMeta) -> bool:
    """True when the stored arrays have the shapes this plan would create (same model, same outputs)."""
    for spec in fmt.teacher_array_specs(plan, meta.n_views):
        if spec.path not in group or tuple(group[spec.path].shape[1:]) != spec.row_shape:
            return False
    return "done" in group


def changed_teacher_message(plan: Any, stored: fmt.TeacherRecord, weights_sha: str | None) -> str:
    old, new = dict(stored.entry), plan.spec.fingerprint_entry()
    old["weights sha256"], new["weights sha256"] = stored.weights_sha256, weights_sha
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)) or ["(stored arrays differ)"]
    diffs = "; ".join(f"{k}: stored {short(old.get(k), 60)}, now {short(new.get(k), 60)}" for k in keys[:5])
    return (f"teacher '{plan.id}' already exists in the store with a different manifest entry ({diffs}). "
            f"Its stored outputs would no longer match the manifest. Fix: rerun with --overwrite {plan.id} to "
            "recompute it, or give the changed teacher a new id so both are kept.")
