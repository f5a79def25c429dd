"""Finalize a store after a run: per-teacher stats and timings, consolidated metadata, object manifest.

Single-process (the coordinator's job). Consolidation is redone after every run, so a teacher added
later is never hidden from remote readers by stale consolidated metadata. It writes format v3: the root lists
the teachers, and each group below the root holds the consolidated metadata of the nodes under it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from kt_cache.store import format as fmt


def feature_stats(group: Any, ok: np.ndarray, unit_rows: int) -> dict[str, Any] | None:
    """Per-dimension mean and std of ``features`` over decoded rows of done units and all views."""
    if "features" not in group:
        return None
    features, done = group["features"], np.asarray(group["done"][:], dtype=bool)
    total = None
    count = 0
    for unit in np.flatnonzero(done):
        rows = fmt.unit_slice(int(unit), features.shape[0], unit_rows)
        block = np.asarray(features[rows], dtype=np.float64)[ok[rows]]
        block = block.reshape(-1, block.shape[-1])
        sums = np.stack([block.sum(0), (block**2).sum(0)])
        total = sums if total is None else total + sums
        count += block.shape[0]
    if not count:
        return None
    mean = total[0] / count
    std = np.sqrt(np.maximum(total[1] / count - mean**2, 0.0))
    return {"mean": mean.astype(np.float32), "std": std.astype(np.float32), "count": count}


def update_teacher_attrs(group: Any, timing: Any, ok: np.ndarray, unit_rows: int, weights_sha256: str | None) -> None:
    teacher = fmt.read_teacher_record(group, group.basename, "store")
    if weights_sha256 and not teacher.weights_sha256:    # hub weights: known only once loaded
        teacher = teacher.replace(weights_sha256=weights_sha256)
    done = np.asarray(group["done"][:], dtype=bool)
    if timing is not None:
        before, now = teacher.timing or {}, timing.as_dict()
        merged = {k: round(before.get(k, 0) + now[k], 4) for k in ("load_s", "forward_s", "images")}
        merged["images_per_s"] = round(merged["images"] / merged["forward_s"], 2) if merged["forward_s"] else 0.0
        teacher = teacher.replace(timing=merged, seconds=round(merged["load_s"] + merged["forward_s"], 4))
        if "features" not in teacher.codec:    # int8 codes: the statistics come from each unit's sums
            teacher = teacher.replace(feature_stats=fmt.write_feature_stats(group, feature_stats(group, ok, unit_rows)))
        teacher = record_codec_errors(group, teacher, done)
    fmt.write_teacher_record(group, teacher.replace(units_done=int(done.sum()), complete=bool(done.all())))


def record_codec_errors(group: Any, teacher: fmt.TeacherRecord, done: np.ndarray) -> fmt.TeacherRecord:
    """An extraction-time codec: each done unit's error sums (``codec/<output>/moments``) added up into the
    record's ``error``, and the decoded features' statistics as ``feature_stats``."""
    from kt_cache.codecs import ErrorMeter

    for output, record in teacher.codec.items():
        path = f"codec/{output}/moments"
        if path not in group:
            continue
        meter, moments = ErrorMeter(int(record["dim"])), np.asarray(group[path][:], dtype=np.float64)
        for unit in np.flatnonzero(done):
            meter.add_vector(moments[unit])
        teacher = teacher.replace(codec={**teacher.codec, output: dict(record, error=meter.error())})
        if output == "features":
            teacher = teacher.replace(feature_stats=fmt.write_feature_stats(group, meter.decoded_stats() if meter.count else None))
    return teacher


def finalize_store(path: Path, timings: dict[str, Any], ids: np.ndarray,
                   weights_sha256: dict[str, str] | None = None) -> None:
    """Record stats/timings of the teachers of this run, consolidate, remove killed writers' temp files, and
    write the object manifest."""
    root = fmt.open_group(str(path), mode="r+", consolidated=False)
    meta = fmt.read_store_meta(root, str(path))
    ok = np.asarray(root["samples/ok"][:], dtype=bool)
    for teacher_id, timing in timings.items():
        update_teacher_attrs(fmt.teacher_group(root, teacher_id), timing, ok, meta.unit_rows,
                             (weights_sha256 or {}).get(teacher_id))
    failed = failed_rows(root, ok, meta)     # the whole store's, not this run's: a resumed run decodes a part
    meta = meta.replace(failed_samples=tuple(str(ids[row]) for row in failed[:1000]), n_failed_samples=int(failed.size))
    fmt.write_store_meta(root, meta)
    consolidate(Path(path))
    remove_orphan_temps(Path(path))
    write_object_manifest(Path(path))


def remove_orphan_temps(path: Path) -> list[str]:
    """Remove the temp files killed writers left (zarr's ``<key>.<32 hex>.partial``, a killed finalize's
    ``*.json.partial``). Finalize runs under the store's lock after every writer of the run has ended (a cluster
    worker killed mid-write included), so none of them can still be written; returns their keys."""
    from kt_cache.store.location import TEMP_FILE

    removed = []
    for folder, _, files in os.walk(path):
        for name in files:
            if TEMP_FILE.search(name):
                (Path(folder) / name).unlink()
                removed.append((Path(folder) / name).relative_to(path).as_posix())
    return removed


def consolidate(path: Path) -> None:
    """Format v3's consolidated metadata: each group's ``zarr.json`` below the root (``samples``, each teacher,
    and groups inside a teacher such as ``logits_topk``) holds the metadata of every node under it, and the root
    lists the teachers (``StoreMeta.teachers``) and records version 3. A reader parses the root and the teachers
    it opens, not every node of every teacher (v2 consolidated all of them into the root: 5.5 KB per teacher
    that every reader parsed, ``benchmarks/bench_metadata.py``), and over https any group opens without a
    listing (xarray lists a group's arrays). Each node is written as zarr's ``consolidate_metadata`` writes it,
    without the spec defaults (``minimal_node``; ``tests/test_store_versions.py`` pins the two equal), built
    from the documents read once: zarr's call per group took 21 s at 1000 teachers. A v2 root's consolidated
    copy of every node is removed (zarr would look nowhere else for a node)."""
    docs = {node: without_copies(doc) for node, doc in node_documents(path).items()}
    ids = sorted(node.split("/")[1] for node, doc in docs.items()
                 if node.startswith("teachers/") and node.count("/") == 1 and doc.get("node_type") == "group")
    for group, children in children_by_group(docs).items():
        nodes = {child[len(group) + 1:]: minimal_node(docs[child]) for child in sorted(children)}
        consolidated = {"kind": "inline", "must_understand": False, "metadata": nodes}
        rewrite_document(path / group / "zarr.json", lambda doc, c=consolidated: {**without_copies(doc),
                                                                                   "consolidated_metadata": c})
    for top in ("", "teachers"):
        if top in docs:
            rewrite_document(path / top / "zarr.json", without_copies)
    root = fmt.open_group(str(path), mode="r+", consolidated=False)
    meta = fmt.read_store_meta(root, str(path))
    fmt.write_store_meta(root, meta.replace(version=fmt.FORMAT_VERSION, teachers=tuple(ids)))
    rewrite_document(path / "zarr.json", lambda doc: doc)         # zarr indents it: compact, as every document


def node_documents(path: Path) -> dict[str, dict[str, Any]]:
    """Every node's ``zarr.json`` in the store folder, parsed, by node path (``""`` for the root)."""
    found = {}
    for document in sorted(path.rglob("zarr.json")):
        key = document.parent.relative_to(path).as_posix()
        found["" if key == "." else key] = json.loads(document.read_text())
    return found


def children_by_group(docs: dict[str, dict[str, Any] | None]) -> dict[str, list[str]]:
    """Every group below the root but ``teachers`` itself (whose children are the root's list), with the nodes
    under it at any depth; one pass over the nodes' ancestors."""
    groups: dict[str, list[str]] = {node: [] for node, doc in docs.items()
                                    if (doc or {}).get("node_type") == "group" and node not in ("", "teachers")}
    for node in docs:
        parts = node.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in groups:
                groups[parent].append(node)
    return groups


def without_copies(doc: Any) -> Any:
    """A node's metadata without its consolidated copy of its children."""
    return {k: v for k, v in doc.items() if k != "consolidated_metadata"} if isinstance(doc, dict) else doc


def minimal_consolidated(doc: dict[str, Any]) -> dict[str, Any]:
    """A document consolidated by zarr, each node as ``minimal_node`` writes it (how v2 wrote its root)."""
    nodes = (doc.get("consolidated_metadata") or {}).get("metadata") or {}
    doc["consolidated_metadata"]["metadata"] = {key: minimal_node(node) for key, node in nodes.items()}
    return doc


def rewrite_document(document: Path, change: Any) -> None:
    """``document`` (a ``zarr.json``) changed by ``change(doc)``, written without indentation, atomically."""
    compact = json.dumps(change(json.loads(document.read_text())), separators=(",", ":"))
    tmp = document.with_name("zarr.json.partial")
    tmp.write_text(compact)
    os.replace(tmp, document)


DEFAULT_KEY_ENCODING = {"name": "default", "configuration": {"separator": "/"}}


def minimal_node(node: dict[str, Any]) -> dict[str, Any]:
    """A consolidated node's metadata without the values the Zarr v3 spec defines as defaults, which zarr
    writes out in full: empty ``attributes`` and ``storage_transformers``, a child group's empty consolidated
    copy, the default key encoding's ``"/"`` separator, a shard index at the ``end``. Zarr parses both
    forms to the same metadata; at 1000 teachers of 10 nodes each this is ~0.9 MB of every reader's parse."""
    out = {k: v for k, v in node.items() if not (k in ("attributes", "storage_transformers") and not v)}
    if out.get("node_type") == "group" and not ((out.get("consolidated_metadata") or {}).get("metadata")):
        out.pop("consolidated_metadata", None)
    if out.get("chunk_key_encoding") == DEFAULT_KEY_ENCODING:
        out["chunk_key_encoding"] = {"name": "default"}
    for codec in out.get("codecs") or ():
        config = codec.get("configuration") if isinstance(codec, dict) else None
        if isinstance(config, dict) and codec.get("name") == "sharding_indexed" and config.get("index_location") == "end":
            codec["configuration"] = {k: v for k, v in config.items() if k != "index_location"}
    return out


def failed_rows(root: Any, ok: np.ndarray, meta: fmt.StoreMeta) -> np.ndarray:
    """Rows of units some teacher finished (so their images were decoded) whose image could not be decoded."""
    teachers = root["teachers"]
    done = [np.asarray(teachers[f"{t}/done"][:], dtype=bool) for t in sorted(teachers.group_keys())]
    processed = np.any(np.stack(done), axis=0) if done else np.zeros(meta.n_units, dtype=bool)
    decoded = np.repeat(processed, meta.unit_rows)[: ok.size]
    return np.flatnonzero(decoded & ~ok)


def object_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def write_object_manifest(path: Path, made_by: str = "ktc extract") -> dict[str, Any]:
    """``ktc-objects.json``: size and sha256 of every stored object (key = path relative to the store),
    and ``made_by``, the command that rebuilds the store (verify's advice for damage names it)."""
    return save_object_manifest(path, {key: object_digest(path / key) for key in object_keys(path)}, made_by)


def object_keys(path: Path) -> list[str]:
    """Every stored object of the store folder ``path`` (the manifest itself and temp files excluded)."""
    keys = []
    for folder, _, files in os.walk(path):
        for name in files:
            key = (Path(folder) / name).relative_to(path).as_posix()
            if key != fmt.OBJECT_MANIFEST and not name.endswith(".partial"):
                keys.append(key)
    return keys


def save_object_manifest(path: Path, objects: dict[str, Any], made_by: str) -> dict[str, Any]:
    manifest = {"format": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION, "made_by": made_by,
                "objects": dict(sorted(objects.items()))}
    tmp = path / (fmt.OBJECT_MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path / fmt.OBJECT_MANIFEST)
    return manifest
