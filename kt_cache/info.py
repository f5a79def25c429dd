"""``ktc info``: what a store holds, as a dict (``--json``) or a human summary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from kt_cache.store import format as fmt


def folder_bytes(path: Path) -> int | None:
    """Bytes on disk below a local folder; None for remote stores."""
    if not path.is_dir():
        return None
    return sum((Path(d) / f).stat().st_size for d, _, files in os.walk(path) for f in files)


def object_sizes(reader: fmt.StoreReader) -> dict[str, int] | None:
    """Object key -> bytes: one walk of a local folder, or ``ktc-objects.json``'s sizes for a remote or packed
    store; None when neither is available."""
    from kt_cache.errors import StoreError

    folder = reader.location.local_folder if reader.location else None
    if folder is not None:
        return {(Path(d) / f).relative_to(folder).as_posix(): (Path(d) / f).stat().st_size
                for d, _, files in os.walk(folder) for f in files}
    try:
        manifest = reader.object_manifest()
    except StoreError:
        return None
    return None if manifest is None else {key: entry["size"] for key, entry in manifest.items()}


def teacher_bytes(sizes: dict[str, int] | None) -> dict[str, int] | None:
    """Bytes of each teacher, from ``object_sizes`` (one walk for all: a walk per teacher took 2.5 s at 1000)."""
    if sizes is None:
        return None
    found: dict[str, int] = {}
    for key, size in sizes.items():
        parts = key.split("/")
        if len(parts) > 2 and parts[0] == "teachers":
            found[parts[1]] = found.get(parts[1], 0) + size
    return found


def teacher_summary(reader: fmt.StoreReader, teacher_id: str, sizes: dict[str, int] | None = None) -> dict[str, Any]:
    teacher = reader.teacher_record(teacher_id)
    done = reader.done(teacher_id)
    arrays = {name: {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks),
                     "shards": list(a.shards) if a.shards else None}
              for name, a in reader.teacher_arrays(teacher_id).items()}
    return {
        "id": teacher_id, "source": teacher.source, "model": teacher.model, "role": teacher.role,
        "weights": teacher.weights, "weights_sha256": teacher.weights_sha256,
        "preprocess": teacher.preprocess, "outputs": list(teacher.outputs), "arrays": arrays,
        "units_done": int(done.sum()), "units": int(done.size), "complete": bool(done.all()),
        "bytes": sizes.get(teacher_id, 0) if sizes is not None else None, "timing": teacher.timing,
        "coverage": class_coverage(reader.class_names, teacher),
        "codecs": teacher.codec, "vectors": feature_vectors(reader, teacher_id, teacher),
    }


def feature_vectors(reader: fmt.StoreReader, teacher_id: str, teacher: fmt.TeacherRecord) -> dict[str, list[int]]:
    """``features``/``featmap`` -> [number of vectors, decoded width]: what a codec's size depends on."""
    from kt_cache.codecs import codec_record

    found = {}
    for path, array in reader.teacher_arrays(teacher_id).items():
        if path in ("features", "featmap"):
            record = codec_record(teacher, path)
            cells = int(np.prod(record["grid"])) if record and "grid" in record else 1    # tc: one code per map
            found[path] = [int(np.prod(array.shape[:-1], dtype=np.int64)) * cells,
                           int(record["dim"]) if record else int(array.shape[-1])]
    return found


def codec_sizes(teachers: list[dict[str, Any]]) -> dict[str, int]:
    """Bytes (before zstd) of every teacher's features and featmaps under fp32, fp16 and each codec family."""
    from kt_cache.codecs import size_table

    return size_table({f"{t['id']}/{p}": tuple(v) for t in teachers for p, v in t["vectors"].items()})


def class_coverage(target: list[str], teacher: fmt.TeacherRecord) -> dict[str, Any] | None:
    """How many target classes a teacher's logits cover, and the first uncovered ones (None: no logits)."""
    from kt_cache.classes import coverage

    if not target or "logits" not in teacher.outputs:
        return None
    names = teacher.class_names
    covered, missing = coverage(target, list(names) if names else None)
    return {"covered": covered, "classes": len(target), "missing": missing[:20], "n_missing": len(missing)}


def store_summary(store: str) -> dict[str, Any]:
    reader = fmt.StoreReader(store)
    meta = reader.meta
    samples = reader.samples()
    sizes = object_sizes(reader)
    per_teacher = teacher_bytes(sizes)
    summary = {
        "store": store, "format": fmt.FORMAT_NAME, "version": meta.version,
        "n_samples": meta.n_samples, "n_views": meta.n_views, "unit_rows": meta.unit_rows,
        "n_units": meta.n_units, "views": meta.views,
        "dataset": {k: v for k, v in meta.dataset.items() if k != "classes"},
        "n_classes": len(meta.classes),
        "samples_ok": int(np.asarray(samples["ok"]).sum()),
        "labelled": int((np.asarray(samples["label"]) >= 0).sum()),
        "bytes": sum(sizes.values()) if sizes is not None else None, "remote": reader.location is None or reader.location.local_folder is None,
        "teachers": [teacher_summary(reader, t, per_teacher) for t in open_all(reader)],
    }
    summary["codec_sizes"] = codec_sizes(summary["teachers"])
    return summary


def shard_count(dataset: dict[str, Any]) -> str:
    shards = dataset.get("shards")
    return f" ({len(shards)} tar shards)" if dataset.get("kind") == "shards" and isinstance(shards, list) else ""


def format_summary(info: dict[str, Any]) -> str:
    from kt_cache.cli_extract import human_bytes

    ds = info["dataset"]
    size = human_bytes(info["bytes"]) if info["bytes"] is not None else "unknown size"
    size += " (remote or packed)" if info.get("remote") else " on disk"
    lines = [f"{info['store']}  ktc store v{info['version']}, {size}",
             f"dataset  {ds.get('kind')} {ds.get('root') or ds.get('list') or ds.get('builtin')}{shard_count(ds)}  "
             f"fingerprint {str(ds.get('fingerprint'))[:16]}…",
             f"samples  {info['n_samples']} ({info['samples_ok']} decoded, {info['labelled']} labelled, "
             f"{info['n_classes']} classes), {info['n_views']} views each, {info['n_units']} units of {info['unit_rows']} rows",
             f"teachers {len(info['teachers'])}"]
    for t in info["teachers"]:
        state = "complete" if t["complete"] else f"{t['units_done']}/{t['units']} units"
        tb = human_bytes(t["bytes"]) if t["bytes"] is not None else "?"
        lines.append(f"  {t['id']}  [{t['source']} {t['model']}, {t['role']}]  {state}, {tb}")
        cov = t.get("coverage")
        if cov is not None:
            shown = f" (missing: {', '.join(cov['missing'][:5])}{', …' if cov['n_missing'] > 5 else ''})" if cov["n_missing"] else ""
            lines.append(f"      covers {cov['covered']}/{cov['classes']} target classes{shown}")
        for name, a in t["arrays"].items():
            lines.append(f"      {name:<20} {str(a['shape']):<24} {a['dtype']}")
        lines += [f"      {codec_line(output, r)}" for output, r in t["codecs"].items()]
    if info["codec_sizes"]["fp32"]:
        lines.append(f"features and featmaps under each codec (before zstd): {sizes_line(info['codec_sizes'])}")
    return "\n".join(lines)


def codec_line(output: str, record: dict[str, Any]) -> str:
    e = record.get("error") or {}
    return (f"{output} encoded {record.get('name')} ({code_widths(record)}): mean cosine {e.get('mean_cosine')}, "
            f"worst decile {e.get('worst_decile_cosine')}, relative MSE {e.get('rel_mse')} over {e.get('vectors')} "
            "vectors")


def code_widths(record: dict[str, Any]) -> str:
    """What one code holds: ``192 -> 8 int8`` values per vector, or for ``tc`` the bytes of a whole map."""
    if "grid" in record:
        grid = "x".join(str(g) for g in record["grid"])
        return f"{grid} cells x {record.get('dim')} -> {record.get('code_dim')} uint8 bytes per map"
    return f"{record.get('dim')} -> {record.get('code_dim')} {record.get('code_dtype')}"


def sizes_line(sizes: dict[str, int]) -> str:
    from kt_cache.cli_extract import human_bytes

    return " · ".join(f"{name} {human_bytes(n)}" for name, n in sizes.items())


def open_all(reader: fmt.StoreReader) -> list[str]:
    """Every teacher id, each group opened (concurrently: one metadata read each in v3)."""
    reader.open_teachers(reader.teacher_ids())
    return reader.teacher_ids()
