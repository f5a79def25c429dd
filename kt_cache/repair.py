"""Before a rerun of ``ktc extract`` re-finalizes a store: find the objects that changed or disappeared since
the last finalize, and send their units back to be recomputed instead of blessing the damage.

``ktc-objects.json`` lists every object with its size and sha256. A listed object is *damaged* when it is
gone, is a symbolic link, has another size, or was modified after the list was written and hashes
differently (size first; only objects newer than the list are hashed, so a clean rerun reads nothing).
A damaged chunk of a unit (``teachers/<id>/<array>/c/<unit>/…``, ``samples/ok|views/c/<unit>/…``) is
repaired by clearing that unit's ``done`` flag: the rerun recomputes it bit-identically. Anything else
(metadata documents, ``samples/id|index|label``, teachers this manifest does not name) cannot be
recomputed by the rerun, and the run stops before writing anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kt_cache.store import format as fmt
from kt_cache.store import checks
from kt_cache.errors import StoreError
from kt_cache.finalize import object_digest

UNIT_SAMPLE_ARRAYS = ("samples/ok/", "samples/views/", "samples/digest/")


def damaged_objects(path: Path) -> list[str]:
    """Keys of listed objects that are missing, linked, resized or rewritten with other bytes."""
    listing = path / fmt.OBJECT_MANIFEST
    if not listing.is_file():
        return []
    listed = checks.parse_object_manifest(listing.read_bytes(), str(path))
    stamp = listing.stat().st_mtime_ns
    bad = []
    for key, want in listed.items():
        file = path / key
        if file.is_symlink() or not file.is_file():
            bad.append(key)
            continue
        stat = file.stat()
        if stat.st_size != want["size"] or (stat.st_mtime_ns > stamp and object_digest(file)["sha256"] != want["sha256"]):
            bad.append(key)
    return bad


def unit_of(key: str) -> int | None:
    _, sep, grid = key.partition("/c/")
    first = grid.split("/")[0]
    return int(first) if sep and first.isdigit() else None


def repair_plan(bad: list[str], teacher_ids: list[str], overwrite: tuple[str, ...]) -> tuple[dict[str, set[int]], list[str]]:
    """(teacher id -> units to recompute, keys a rerun cannot repair)."""
    units: dict[str, set[int]] = {}
    unrepairable = []
    refinalized = {"zarr.json", *(f"teachers/{t}/zarr.json" for t in teacher_ids)}
    for key in bad:
        unit, parts = unit_of(key), key.split("/")
        if key in refinalized:
            continue   # attributes this run's finalize rewrites (a run killed while finalizing left them newer)
        if key.startswith("teachers/") and len(parts) > 2 and parts[1] in overwrite:
            continue   # the whole teacher is recomputed anyway
        if unit is not None and key.startswith("teachers/") and parts[1] in teacher_ids:
            units.setdefault(parts[1], set()).add(unit)
        elif unit is not None and key.startswith(UNIT_SAMPLE_ARRAYS) and teacher_ids:
            units.setdefault(teacher_ids[0], set()).add(unit)   # any teacher's pass rewrites the unit's samples
        else:
            unrepairable.append(key)
    return units, unrepairable


def check_and_reopen_damaged_units(path: Path, teacher_ids: list[str], overwrite: tuple[str, ...]) -> dict[str, list[int]]:
    """Clear ``done`` of every unit with a damaged object; stop (StoreError) if some damage is unrepairable.
    Returns the reopened units per teacher (empty for a clean store)."""
    bad = damaged_objects(path)
    if not bad:
        return {}
    units, unrepairable = repair_plan(bad, teacher_ids, overwrite)
    if unrepairable:
        shown = ", ".join(unrepairable[:8]) + (f" and {len(unrepairable) - 8} more" if len(unrepairable) > 8 else "")
        raise StoreError(f"{path}: {len(unrepairable)} object(s) changed or disappeared since the store was finalized "
                         f"and cannot be recomputed by this run: {shown}. Nothing was written. Fix: for a teacher "
                         "missing from this manifest, rerun with a manifest that includes it; for metadata or "
                         "samples/id|index|label, restore an intact copy of the store (or extract into a new --out).")
    for key in bad:   # the unit rewrites its whole shard; zarr would first try to read the damaged one
        if unit_of(key) is not None and (path / key).is_file():
            (path / key).unlink()
    root = fmt.open_group(str(path), mode="r+", consolidated=False)
    for teacher_id, reopened in units.items():
        done = root[f"teachers/{teacher_id}/done"]
        flags = np.asarray(done[:], dtype=bool)
        flags[sorted(u for u in reopened if u < flags.size)] = False
        done[:] = flags
    return {t: sorted(u) for t, u in units.items()}


def describe_repairs(reopened: dict[str, Any]) -> str:
    parts = [f"{tid} unit(s) {', '.join(map(str, units))}" for tid, units in sorted(reopened.items())]
    return ("damaged objects found since the last finalize; recomputing " + "; ".join(parts)) if parts else ""

