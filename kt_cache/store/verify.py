"""``ktc verify STORE``: is this store what its producer finalized, and does every ``done`` flag hold?

Checks, in order (``--quick`` stops after the metadata checks, reading no chunk):

1. the store opens and its metadata is valid (``StoreReader``: sizes, dtypes, codecs, ids, attributes);
2. orphan temp files of killed writers (zarr LocalStore's ``<key>.<32 hex>.partial``) are removed;
3. ``ktc-objects.json`` exists; every listed object exists and nothing unlisted is stored (listable stores);
   with ``--quick``, each listed object's size matches (local folders and zips: a stat, no read);
   consolidated metadata exists and lists every node as stored (v3: the root's teacher list and each teacher's
   document; v1/v2: the root's document);
4. metadata documents (``zarr.json``) match their sha256 (all objects without ``--quick``);
5. every object decodes; rows of decoded samples (``samples/ok``) in ``done`` units hold no NaN
   (``label_logit`` may be NaN: unknown label or class not covered); no array holds ±inf; top-k indices
   are below the teacher's class count; labels are valid class indices.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kt_cache.store import format as fmt
from kt_cache.store import checks
from kt_cache.codecs import MISSING_CODE
from kt_cache.transform_codec import MISSING_FLAG
from kt_cache.errors import StoreError
from kt_cache.store.location import TEMP_FILE, get_bytes, get_many, list_keys
from kt_cache.store.verify_consolidation import check_consolidation

BATCH_BYTES = 256 << 20          # objects hashed / rows decoded per step
TEMP_MIN_AGE_S = 60              # younger temp files may belong to a running writer


@dataclass
class Problem:
    array: str            # array or node path ("store" for the whole store)
    key: str | None       # the stored object, when one is to blame
    message: str

    def line(self) -> str:
        return f"  {self.array}" + (f"  object {self.key}" if self.key else "") + f": {self.message}"


@dataclass
class VerifyReport:
    store: str
    quick: bool
    teachers: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    objects_hashed: int = 0
    arrays_scanned: int = 0
    made_by: str = "ktc extract"          # ktc-objects.json's record of the command that built the store
    packed: bool = False

    @property
    def repair(self) -> str:
        """The command that repairs damage in this store: the one that built it, from intact inputs."""
        if self.packed:
            return ("get an intact copy of the packed file from the producer, or pack it again from an intact "
                    "store: `ktc pack STORE OUT.zip`")
        if not self.made_by.startswith("ktc extract"):
            return (f"get an intact copy from the producer, or rebuild the store from intact inputs: remove it "
                    f"and rerun `{self.made_by}`")
        return ("get an intact copy of this object from the producer; or, where you have the images, rerun "
                "`ktc extract` with the store's manifest: it recomputes every unit whose objects changed")

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, array: str, key: str | None, message: str) -> None:
        self.problems.append(Problem(array, key, message))

    def bad_arrays(self) -> list[str]:
        return sorted({p.array for p in self.problems})

    def as_dict(self) -> dict[str, Any]:
        return dict(asdict(self), ok=self.ok, bad_arrays=self.bad_arrays(), repair=self.repair)

    def summary(self) -> str:
        what = "metadata checked" if self.quick else f"{self.objects_hashed} objects hashed, {self.arrays_scanned} arrays scanned"
        bad = self.bad_arrays()
        named = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more (each listed below)" if len(bad) > 10 else "")
        lines = [f"OK {self.store}: {len(self.teachers)} teacher(s), {what}" if self.ok else
                 f"{self.store}: {len(self.problems)} problem(s) in {len(bad)} array(s): {named}"]
        lines += [p.line() for p in self.problems]
        lines += [f"removed orphan temp file {key}" for key in self.removed]
        lines += [f"warning: {text}" for text in self.warnings]
        return "\n".join(lines)


def verify_store(location: str, quick: bool = False, clean: bool = True,
                 storage_options: dict[str, Any] | None = None) -> VerifyReport:
    """Verify the store at ``location`` (local path or URL); see the module docstring for the checks."""
    reader = fmt.StoreReader(location, storage_options=storage_options)
    packed = reader.location is not None and (reader.location.kind == "zip" or (reader.location.url or "").startswith("zip:"))
    reader.open_teachers(reader.teacher_ids())        # concurrently: one metadata read each in v3
    report = VerifyReport(reader.where, quick, teachers=reader.teacher_ids(), packed=packed)
    handle_orphans(reader, report, clean)
    manifest = load_manifest(reader, report)
    arrays = check_layout(reader, report)
    check_consolidation(reader, manifest, report)
    if manifest is not None:
        check_keys(reader, manifest, report)
        keys = [k for k in manifest if quick is False or k.endswith("zarr.json")]
        check_digests(reader, {k: manifest[k] for k in keys}, report)
    if not quick:
        check_values(reader, arrays, report)
    return report


def describe_key(key: str, unit_rows: int) -> tuple[str, str]:
    """(array path, where in it) for an object key: ``a/b/c/3/0`` -> (``a/b``, ``unit 3, rows …``)."""
    if "/c/" in key:
        array, _, grid = key.partition("/c/")
        first = grid.split("/")[0]
        if first.isdigit() and not array.endswith("/done"):
            unit = int(first)
            return array, f"unit {unit}, rows {unit * unit_rows}-{(unit + 1) * unit_rows - 1}"
        return array, f"unit {first}"
    if key.endswith("zarr.json"):
        return key[: -len("zarr.json")].rstrip("/") or "store", "metadata document"
    return (key.rsplit("/", 1)[0] if "/" in key else "store"), "file"


def handle_orphans(reader: fmt.StoreReader, report: VerifyReport, clean: bool) -> None:
    """Temp files a killed writer left behind (local folders only): removed, or listed with ``clean=False``.
    A temp file younger than ``TEMP_MIN_AGE_S`` may belong to a running writer and is left in place."""
    folder = reader.location.local_folder if reader.location else None
    if folder is None:
        return
    for base, _, files in os.walk(folder):
        for name in files:
            if not TEMP_FILE.search(name):
                continue
            path = Path(base) / name
            key = path.relative_to(folder).as_posix()
            if time.time() - path.lstat().st_mtime < TEMP_MIN_AGE_S:
                report.warnings.append(f"temp file {key} is recent: a writer may still be running; left in place")
            elif clean:
                path.unlink()
                report.removed.append(key)
            else:
                report.warnings.append(f"orphan temp file {key} (a killed writer's; remove it or rerun without --keep-temp)")


def load_manifest(reader: fmt.StoreReader, report: VerifyReport) -> dict[str, dict[str, Any]] | None:
    raw = get_bytes(reader.store, fmt.OBJECT_MANIFEST)
    try:
        manifest = None if raw is None else checks.parse_object_manifest(raw, reader.where)
    except StoreError as err:
        report.add("store", fmt.OBJECT_MANIFEST, str(err))
        return None
    if manifest is not None:
        made_by = json.loads(raw).get("made_by")
        report.made_by = made_by if isinstance(made_by, str) and made_by.startswith("ktc ") else report.made_by
    else:
        report.add("store", fmt.OBJECT_MANIFEST, "no object manifest: the store was never finalized (an interrupted "
                   "run?). Fix: rerun `ktc extract` with the same manifest; it resumes and finalizes.")
    return manifest


def check_layout(reader: fmt.StoreReader, report: VerifyReport) -> dict[str, Any]:
    """Validate every array's metadata and every teacher's attributes; returns path -> array of valid ones."""
    arrays: dict[str, Any] = {}
    optional = ("digest",) if "samples/digest" in reader.root else ()     # stores before content digests lack it
    for name in ("id", "index", "label", "ok", "views", *optional):
        try:
            arrays[f"samples/{name}"] = reader.sample_array(name)
        except StoreError as err:
            report.add(f"samples/{name}", None, str(err))
    for teacher_id in reader.teacher_ids():
        try:
            found = reader.checked_arrays(teacher_id)
            teacher = reader.teacher_record(teacher_id)
        except StoreError as err:
            report.add(f"teachers/{teacher_id}", None, str(err))
            continue
        arrays.update({f"teachers/{teacher_id}/{name}": array for name, array in found.items()})
        report.warnings += provenance_gaps(teacher_id, teacher)
        check_transform_params(reader, teacher_id, teacher, report)
    return arrays


def check_transform_params(reader: fmt.StoreReader, teacher_id: str, teacher: fmt.TeacherRecord,
                           report: VerifyReport) -> None:
    """A ``tc`` codec's parameter values can decode its codes (indices in range, bits adding up to the width)."""
    for output, record in (teacher.codec or {}).items():
        if isinstance(record, dict) and str(record.get("name", "")).startswith("tc:"):
            try:
                reader.codec_params(teacher_id, output)
            except StoreError as err:
                report.add(f"teachers/{teacher_id}/codec/{output}", None, str(err))


PROVENANCE = ("source", "model", "pretrained", "weights", "weights_sha256", "preprocess", "library_versions",
              "seconds", "timing", "class_names")


def provenance_gaps(teacher_id: str, teacher: fmt.TeacherRecord) -> list[str]:
    """Provenance keys the producer did not record (``keys``: those the stored attributes hold)."""
    gaps = [key for key in PROVENANCE if key not in teacher.keys]
    if teacher.weights_sha256 is None and teacher.weights not in (None, "random") and "weights_sha256" in teacher.keys:
        gaps.append("weights_sha256 (null: hub weights whose file was not hashed)")
    if "features" in teacher.outputs and not teacher.feature_stats:
        gaps.append("feature_stats")
    return [f"teacher {teacher_id}: provenance lacks {', '.join(gaps)}"] if gaps else []


def check_keys(reader: fmt.StoreReader, manifest: dict[str, Any], report: VerifyReport) -> None:
    """Listed objects exist and nothing unlisted is stored (on stores that can be listed)."""
    if reader.location is not None and not reader.location.listable:
        return
    unit_rows = reader.meta.unit_rows
    stored = set(list_keys(reader.store)) - {fmt.OBJECT_MANIFEST}
    for key in sorted(set(manifest) - stored):
        array, where = describe_key(key, unit_rows)
        report.add(array, key, f"{where}: listed in {fmt.OBJECT_MANIFEST} but missing from the store. Fix: {report.repair}.")
    for key in sorted(stored - set(manifest)):
        array, where = describe_key(key, unit_rows)
        finish = ("rerun `ktc extract` to finish and finalize the store" if report.made_by.startswith("ktc extract")
                  and not report.packed else report.repair)
        report.add(array, key, f"{where}: stored but not in {fmt.OBJECT_MANIFEST} (written after the last finalize; "
                   f"{finish})")
    if report.quick:
        check_sizes(reader, manifest, stored & set(manifest), report)
    folder = reader.location.local_folder if reader.location else None
    for key in sorted(stored & set(manifest)) if folder else []:
        path = folder / key
        if path.is_symlink() or not path.resolve().is_relative_to(folder.resolve()):
            report.add(describe_key(key, unit_rows)[0], key, "is a symbolic link; a store holds plain files only")


def check_sizes(reader: fmt.StoreReader, manifest: dict[str, Any], keys: set[str], report: VerifyReport) -> None:
    """--quick: each listed object's size (a stat per file, the zip's directory): catches truncation
    and most damage without reading a chunk; a same-size rewrite needs the full verify's hashes."""
    sizes = stored_sizes(reader)
    unit_rows = reader.meta.unit_rows
    for key in sorted(keys & set(sizes)):
        if sizes[key] != manifest[key]["size"]:
            array, where = describe_key(key, unit_rows)
            report.add(array, key, f"{where}: size differs from {fmt.OBJECT_MANIFEST} ({manifest[key]['size']} -> "
                       f"{sizes[key]} bytes): truncated or changed after finalize. Fix: {report.repair}.")


def stored_sizes(reader: fmt.StoreReader) -> dict[str, int]:
    """Object key -> size in bytes, for local folders and local zip files (empty elsewhere)."""
    loc = reader.location
    if loc is None or loc.kind not in ("local", "zip"):
        return {}
    if loc.kind == "zip":
        import zipfile

        with zipfile.ZipFile(loc.path) as packed:
            return {info.filename: info.file_size for info in packed.infolist()}
    folder = loc.path
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def check_digests(reader: fmt.StoreReader, expected: dict[str, dict[str, Any]], report: VerifyReport) -> None:
    """Size and sha256 of each object against the manifest, fetched in batches of ~BATCH_BYTES."""
    unit_rows, keys = reader.meta.unit_rows, sorted(expected)
    batch: list[str] = []
    size = 0
    for index, key in enumerate(keys):
        batch.append(key)
        size += expected[key]["size"]
        if index + 1 == len(keys) or size >= BATCH_BYTES or len(batch) >= 256:
            for name, data in zip(batch, fetch_batch(reader, batch, report)):
                if data is not BAD_MEMBER:
                    compare_digest(name, data, expected[name], unit_rows, report)
            batch, size = [], 0


BAD_MEMBER = b"\0damaged zip member"       # stands for an object a packed store cannot return intact


def fetch_batch(reader: fmt.StoreReader, keys: list[str], report: VerifyReport) -> list[bytes | None]:
    """Bytes of ``keys``; in a packed store, a member whose CRC fails is reported, not raised."""
    import zipfile

    try:
        return get_many(reader.store, keys)
    except zipfile.BadZipFile:
        found: list[bytes | None] = []
        for key in keys:
            try:
                found.append(get_bytes(reader.store, key))
            except zipfile.BadZipFile as err:
                array, where = describe_key(key, reader.meta.unit_rows)
                report.add(array, key, f"{where}: the zip member is damaged ({err}). Fix: {report.repair}.")
                found.append(BAD_MEMBER)
        return found


def compare_digest(key: str, data: bytes | None, want: dict[str, Any], unit_rows: int, report: VerifyReport) -> None:
    array, where = describe_key(key, unit_rows)
    if data is None:
        report.add(array, key, f"{where}: missing (listed in {fmt.OBJECT_MANIFEST})")
        return
    report.objects_hashed += 1
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != want["size"] or digest != want["sha256"]:
        report.add(array, key, f"{where}: bytes differ from {fmt.OBJECT_MANIFEST} (size {want['size']} -> {len(data)}, "
                   f"sha256 {want['sha256'][:12]}… -> {digest[:12]}…): changed or truncated after finalize. "
                   f"Fix: {report.repair}.")


def check_values(reader: fmt.StoreReader, arrays: dict[str, Any], report: VerifyReport) -> None:
    """Decode every object; NaN-free done units of ok rows; no inf; valid top-k indices and labels."""
    meta = reader.meta
    ok = scan_array(reader, "samples/ok", arrays.get("samples/ok"), report, {})
    ok = np.zeros(reader.n_samples, dtype=bool) if ok is None else ok.astype(bool)
    done = {tid: scan_array(reader, f"teachers/{tid}/done", arrays.get(f"teachers/{tid}/done"), report, {})
            for tid in reader.teacher_ids()}
    done = {tid: (d.astype(bool) if d is not None else np.zeros(meta.n_units, bool)) for tid, d in done.items()}
    any_done = np.any(np.stack(list(done.values())), axis=0) if done else np.zeros(meta.n_units, bool)
    context = {"ok": ok, "n_classes": len(reader.class_names)}
    for path, array in arrays.items():
        if path in ("samples/ok",) or path.endswith("/done"):
            continue
        teacher_id = path.split("/")[1] if path.startswith("teachers/") else None
        units_done = done.get(teacher_id, any_done) if teacher_id else any_done
        num_classes = reader.teacher_record(teacher_id).num_classes if teacher_id else None
        scan_array(reader, path, array, report, dict(context, done=units_done, num_classes=num_classes))


def scan_array(reader: fmt.StoreReader, path: str, array: Any, report: VerifyReport,
               context: dict[str, Any]) -> np.ndarray | None:
    """Decode ``array`` block by block and check each block; returns the whole array when it is 1-D."""
    if array is None:
        return None
    report.arrays_scanned += 1
    unit_rows = checks.object_rows(array)
    row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * np.dtype(array.dtype).itemsize)
    fit = max(1, BATCH_BYTES // row_bytes)   # powers of two: a block never straddles two objects
    step = min(unit_rows, max(int(array.chunks[0]), 1 << (fit.bit_length() - 1)))
    parts, failed = [], set()
    for start in range(0, int(array.shape[0]), step):
        rows, unit = slice(start, min(start + step, int(array.shape[0]))), start // unit_rows
        key = fmt.object_key(array, path, unit)
        try:
            block = np.asarray(array[rows])
        except Exception as err:   # noqa: BLE001 - codec errors differ (zstd, crc32c, UTF-8)
            if key not in failed:
                failed.add(key)
                report.add(path, key, f"{describe_key(key, unit_rows)[1]}: cannot be decoded ({type(err).__name__}: "
                           f"{str(err)[:160]}): truncated or corrupt")
            parts.append(None)
            continue
        check_block(path, key, rows, unit, block, context, report)
        parts.append(block if array.ndim == 1 else None)
    if array.ndim != 1 or any(p is None for p in parts):
        return None
    return np.concatenate(parts) if parts else np.zeros(0, dtype=array.dtype)


def nan_repair(report: VerifyReport, path: str) -> str:
    """Hashes match, so a rerun sees no damage: only recomputing the whole teacher rewrites these rows."""
    if report.packed or not report.made_by.startswith("ktc extract"):
        return report.repair
    teacher = path.split("/")[1] if path.startswith("teachers/") else "ID"
    return (f"recompute the teacher: rerun `ktc extract --overwrite {teacher}` with the store's manifest, or get an "
            "intact copy from the producer")


def check_block(path: str, key: str, rows: slice, unit: int, block: np.ndarray, context: dict[str, Any],
                report: VerifyReport) -> None:
    name = path.split("/", 2)[-1]
    flat = block.reshape(block.shape[0], -1) if block.ndim > 1 else block.reshape(-1, 1)
    where = f"unit {unit}"
    if fmt.is_parameter(name):     # parameters: global, or one row per unit (checked once it is done)
        per_unit = name.rsplit("/", 1)[-1] in ("scale", "offset", "moments")
        done = context.get("done")
        if (not per_unit or (done is not None and unit < len(done) and done[unit])) and not np.isfinite(flat).all():
            report.add(path, key, f"{where if per_unit else 'the array'}: a codec parameter holds NaN or ±inf, so "
                       f"decoded values would be wrong. Fix: {report.repair}.")
        return
    coded = block.dtype == np.int8 or (block.dtype == np.uint8 and name in ("features", "featmap"))
    if coded and context.get("done") is not None and context["done"][unit]:
        code = MISSING_CODE if block.dtype == np.int8 else MISSING_FLAG     # uint8: a tc map code, flag byte first
        flags = flat == code if block.dtype == np.int8 else block[..., 0].reshape(len(block), -1) == code
        missing = flags.any(1) & context["ok"][rows]
        if missing.any():
            report.add(path, key, f"{where} is marked done but {int(missing.sum())} decoded row(s) hold the missing "
                       f"code {code} (first row {rows.start + int(np.argmax(missing))}). Fix: {report.repair}.")
    if block.dtype.kind == "f":
        inf = np.isinf(flat).any(1)
        if inf.any():
            report.add(path, key, f"{where}: {int(inf.sum())} row(s) hold ±inf (first row {rows.start + int(np.argmax(inf))})")
        done = context.get("done")
        if done is not None and done[unit] and name != "label_logit":
            nan = np.isnan(flat).any(1) & context["ok"][rows]
            if nan.any():
                report.add(path, key, f"{where} is marked done but {int(nan.sum())} decoded row(s) hold NaN (first row "
                           f"{rows.start + int(np.argmax(nan))}): data lost after the done flag was set. "
                           f"Fix: {nan_repair(report, path)}.")
    limit = context.get("num_classes")
    if name == "logits_topk/index" and isinstance(limit, int) and context["done"][unit] and (flat >= limit).any():
        report.add(path, key, f"{where}: top-k indices reach {int(flat.max())}, the teacher has {limit} classes")
    if path == "samples/id":
        try:
            checks.check_sample_ids(block, report.store, rows.start)
        except StoreError as err:
            report.add(path, key, str(err))
    if path == "samples/label" and ((flat < -1) | (flat >= context["n_classes"])).any():
        report.add(path, key, f"{where}: labels outside -1..{context['n_classes'] - 1}")
