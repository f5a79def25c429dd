"""``ktc upgrade STORE``: convert an older store to the format this ktc writes, in place, re-encoding no chunk.

Every step changes metadata only (docs/store-format.md, "Versions"). v1 -> v2: a teacher's feature statistics move
from JSON lists in its attributes to the array ``stats/features``, and a class list equal to the dataset's target
classes becomes ``"dataset"``. v2 -> v3: the root lists its teachers and each teacher's ``zarr.json`` holds the
consolidated metadata of its nodes, instead of the root holding every node's. The root records version 3. Chunks are untouched, so their ``ktc-objects.json`` entries are kept
as they are (not re-hashed: a chunk damaged before the upgrade still fails ``ktc verify`` after it); the rewritten
metadata documents and the new statistics arrays get new entries. The metadata documents are checked against
their entries first, so an upgrade never vouches for metadata that changed since the store was finalized.

An interrupted upgrade leaves a readable store (every reader takes both teacher layouts) and a journal beside it
(``<store>.ktc-upgrade``: the version and manifest as they were); rerunning ``ktc upgrade`` finishes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kt_cache.store import format as fmt
from kt_cache.errors import StoreError, UsageError


def local_store(store: str) -> Path:
    """The store folder behind ``store``; an upgrade rewrites metadata, so URLs and packed stores are refused."""
    from kt_cache.store.location import parse_location

    folder = parse_location(store).local_folder
    if folder is None:
        raise UsageError(f"ktc upgrade {store}: only a store folder on this machine can be upgraded in place (this "
                         "is a URL or a packed .zip). Fix: download or unpack it, upgrade the folder, and pack or "
                         "publish that.")
    return Path(folder)


def journal_path(store: Path) -> Path:
    """Beside the store (like its lock): the manifest as it was before the upgrade began, kept until it ends."""
    return store.with_name(store.name + ".ktc-upgrade")


def upgrade_store(store: str) -> dict[str, Any]:
    """Upgrade the store folder ``store`` to ``FORMAT_VERSION``; returns what was done."""
    import json

    from kt_cache.finalize import consolidate
    from kt_cache.lock import store_lock

    path = local_store(store)
    journal = journal_path(path)
    with store_lock(path, "ktc upgrade"):
        reader = fmt.StoreReader(str(path))
        before = reader.meta.version
        if before == fmt.FORMAT_VERSION and not journal.is_file():
            return {"store": str(path), "from": before, "to": before, "teachers": []}
        if journal.is_file():          # an interrupted upgrade: its own rewrites are not checked against the old list
            saved = json.loads(journal.read_text())
            before, listed = int(saved["version"]), saved["objects"]
        else:
            listed = reader.object_manifest()
            if listed is None:
                raise UsageError(f"{path}: has no {fmt.OBJECT_MANIFEST} (it was never finalized), so an upgrade could "
                                 "not keep its integrity record. Fix: rerun `ktc extract` with its manifest (it "
                                 "finalizes), then `ktc upgrade` it.")
            check_metadata(path, listed)
            journal.write_text(json.dumps({"version": before, "objects": listed}))
        root = fmt.open_group(str(path), mode="r+", consolidated=False)
        changed = [tid for tid in reader.teacher_ids() if upgrade_teacher(root, tid, reader)]
        fmt.write_store_meta(root, reader.meta.replace(version=fmt.FORMAT_VERSION))
        consolidate(path)
        rewrite_manifest(path, listed)
        journal.unlink()              # last: until then a rerun resumes
    return {"store": str(path), "from": before, "to": fmt.FORMAT_VERSION, "teachers": changed}


def upgrade_teacher(root: Any, teacher_id: str, reader: fmt.StoreReader) -> bool:
    """Move one teacher's attributes to the v2 layout; False when it already has it (a rerun after an interruption)."""
    group = fmt.teacher_group(root, teacher_id)
    record = fmt.read_teacher_record(group, teacher_id, reader.where)
    stats = record.feature_stats
    names = fmt.class_names_attr(record.names(reader.class_names, teacher_id, reader.where), reader.class_names)
    if (stats is None or "array" in stats) and names == record.class_names:
        return False
    if stats is not None and "array" not in stats:
        stats = fmt.write_feature_stats(group, {"mean": stats["mean"], "std": stats["std"], "count": stats.get("count", 0)})
    fmt.write_teacher_record(group, record.replace(feature_stats=stats, class_names=names))
    return True


def check_metadata(path: Path, listed: dict[str, dict[str, Any]]) -> None:
    """Every metadata document the upgrade rewrites still has the bytes its manifest entry records."""
    from kt_cache.finalize import object_digest

    for key, entry in listed.items():
        if key.endswith("zarr.json") and object_digest(path / key) != entry:
            raise StoreError(f"{path}: {key} differs from its entry in {fmt.OBJECT_MANIFEST} (changed since the store "
                             "was finalized), and an upgrade would record the changed bytes as intact. Fix: run "
                             f"`ktc verify {path}`, restore an intact copy of the store, then upgrade that.")


def rewrite_manifest(path: Path, listed: dict[str, dict[str, Any]]) -> None:
    """Chunks keep their entries; metadata documents and statistics arrays (rewritten or new) are hashed."""
    import json

    from kt_cache.finalize import object_digest, object_keys, save_object_manifest

    made_by = json.loads((path / fmt.OBJECT_MANIFEST).read_text()).get("made_by", "ktc extract")
    objects = {}
    for key in object_keys(path):
        fresh = key.endswith("zarr.json") or f"/{fmt.FEATURE_STATS}/" in f"/{key}"
        if fresh or key in listed:
            objects[key] = object_digest(path / key) if fresh else listed[key]
    save_object_manifest(path, objects, made_by)
