"""Store format v1: the single definition of the ktc Zarr v3 layout, with its writer and reader.

Layout (docs/store-format.md is the user-facing description of exactly this)::

    <store>/                        attrs["ktc"]: format, version, samples, views, units, dataset, order
      samples/id        [N]         str, path relative to the dataset root, in row order
      samples/index     [N]         int64, position of the sample in the sorted dataset listing
      samples/label     [N]         int32, -1 when unknown
      samples/ok        [N]         bool, image decoded (written with each unit's first pass)
      samples/views     [N, V, 5]   float32 (x0, y0, w, h, flip), normalised
      teachers/<id>/                attrs["ktc_teacher"]: provenance, preprocessing, outputs, stats
        features        [N, V, D]   float16|float32
        logits          [N, V, C]   float16|float32 (full logits), or
        logits_topk/values [N, V, k], logits_topk/index [N, V, k] (uint16 | int32)
        logits_lse      [N, V]      float32 logsumexp over all C_t logits (always with logits)
        label_logit     [N, V]      float32 logit of the true class, NaN when unknown / not covered
        featmap         [N, V, g, g, d]
        done            [n_units]   bool, one object per unit, written after the unit's data

Rules: arrays are chunked along N only; a *unit* of ``unit_rows`` rows is exactly one shard (or one
chunk) of every array, so each storage object has one writer. Only the coordinator creates arrays and
writes ``zarr.json``/attrs; writers only write unit data and then ``done``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kt_cache import store_checks as checks
from kt_cache.errors import StoreError

FORMAT_NAME = "ktc"
FORMAT_VERSION = 1
ROOT_ATTR = "ktc"
TEACHER_ATTR = "ktc_teacher"
OBJECT_MANIFEST = "ktc-objects.json"


@dataclass(frozen=True)
class ArraySpec:
    """One array of the layout: path below its group, per-row shape, dtype, fill and dimension names."""

    path: str
    row_shape: tuple[int, ...]
    dtype: str
    fill: Any
    dims: tuple[str, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def sample_array_specs(n_views: int) -> list[ArraySpec]:
    """The ``samples/*`` arrays (row-aligned with every teacher array)."""
    return [
        ArraySpec("id", (), "str", "", ("sample",)),
        ArraySpec("index", (), "int64", -1, ("sample",)),
        ArraySpec("label", (), "int32", -1, ("sample",)),
        ArraySpec("ok", (), "bool", False, ("sample",)),
        ArraySpec("views", (n_views, 5), "float32", float("nan"), ("sample", "view", "box")),
    ]


def index_dtype(num_classes: int) -> str:
    """Top-k class indices: uint16 while every index fits, else int32 (never a float)."""
    return "uint16" if num_classes <= 65535 else "int32"


def teacher_array_specs(plan: Any, n_views: int) -> list[ArraySpec]:
    """Arrays of one teacher group, from its ``TeacherPlan`` (outputs, dims, dtype, top-k, grid)."""
    spec, dtype, nan = plan.spec, plan.spec.dtype, float("nan")
    out: list[ArraySpec] = []
    if "features" in spec.outputs:
        out.append(ArraySpec("features", (n_views, plan.feature_dim), dtype, nan, ("sample", "view", "feature")))
    if "logits" in spec.outputs:
        if spec.logits_topk is None:
            out.append(ArraySpec("logits", (n_views, plan.num_classes), dtype, nan, ("sample", "view", "class")))
        else:
            k = min(spec.logits_topk, plan.num_classes)
            dims = ("sample", "view", "rank")
            out.append(ArraySpec("logits_topk/values", (n_views, k), dtype, nan, dims))
            out.append(ArraySpec("logits_topk/index", (n_views, k), index_dtype(plan.num_classes), 0, dims))
        out.append(ArraySpec("logits_lse", (n_views,), "float32", nan, ("sample", "view")))
        out.append(ArraySpec("label_logit", (n_views,), "float32", nan, ("sample", "view")))
    if "featmap" in spec.outputs:
        g = spec.featmap_grid
        row = (n_views, g, g, plan.featmap_dim)
        out.append(ArraySpec("featmap", row, dtype, nan, ("sample", "view", "grid_y", "grid_x", "channel")))
    return out


def chunk_rows_for(row_bytes: int, unit_rows: int, chunk_bytes: int) -> int:
    """Largest power of two <= unit_rows whose chunk stays within ``chunk_bytes`` (at least one row)."""
    rows = max(1, chunk_bytes // max(1, row_bytes))
    return min(unit_rows, 1 << int(math.floor(math.log2(rows))))


def n_units(n_samples: int, unit_rows: int) -> int:
    return max(1, -(-n_samples // unit_rows))


def unit_slice(unit: int, n_samples: int, unit_rows: int) -> slice:
    return slice(unit * unit_rows, min(n_samples, (unit + 1) * unit_rows))


def create_array(group: Any, spec: ArraySpec, n_samples: int, unit_rows: int, chunk_bytes: int) -> Any:
    """Create one row-chunked array: a unit is one shard when chunks are smaller than a unit, else one chunk."""
    from zarr.codecs import ZstdCodec

    rows = chunk_rows_for(spec.row_bytes, unit_rows, chunk_bytes)
    shape = (n_samples, *spec.row_shape)
    chunks = (rows, *spec.row_shape)
    shards = (unit_rows, *spec.row_shape) if rows < unit_rows else None
    dtype = str if spec.dtype == "str" else spec.dtype
    return group.create_array(
        spec.path, shape=shape, chunks=chunks, shards=shards, dtype=dtype, fill_value=spec.fill,
        compressors=ZstdCodec(level=1), dimension_names=spec.dims,
    )


def create_done_array(group: Any, units: int) -> Any:
    """``done[u]``: one object per unit so concurrent writers of different units never share one."""
    return group.create_array("done", shape=(units,), chunks=(1,), dtype="bool", fill_value=False,
                              dimension_names=("unit",))


def check_root_attrs(attrs: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate ``attrs["ktc"]`` of a store: present, our format, a version we can read."""
    meta = attrs.get(ROOT_ATTR)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise StoreError(f"{where} is a Zarr group but not a ktc store (no attrs['{ROOT_ATTR}'] with format "
                         f"'{FORMAT_NAME}'). Fix: point at a store written by `ktc extract`.")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise StoreError(f"{where} has ktc store format version {version!r}; this ktc reads versions 1..{FORMAT_VERSION}. "
                         "Fix: upgrade ktc (pip install -U ktc) or ask for a store in a format this version reads.")
    for key, kind in (("n_samples", int), ("n_views", int), ("unit_rows", int), ("n_units", int)):
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or value < 0:
            raise StoreError(f"{where}: attrs['{ROOT_ATTR}']['{key}'] must be a non-negative integer, got {value!r}. "
                             "The store metadata is damaged; Fix: re-create the store with `ktc extract`.")
    return meta


def write_unit(teacher_group: Any, unit: int, rows: slice, arrays: dict[str, np.ndarray]) -> None:
    """Write one unit's rows of every array of a teacher, then (and only then) its ``done`` flag.

    Args:
        teacher_group: the opened ``teachers/<id>`` group (mode r+).
        unit: unit number; ``rows`` is its row range.
        arrays: array path -> block ``[rows, ...]``; must cover every array of the group.
    """
    for path, block in arrays.items():
        teacher_group[path][rows] = block
    teacher_group["done"][unit] = True


def write_samples_unit(root: Any, rows: slice, ok: np.ndarray, views: np.ndarray) -> None:
    """Write the decode results of one unit. Every pass over the unit writes identical bytes."""
    root["samples/ok"][rows] = ok
    root["samples/views"][rows] = views


def open_group(store: Any, mode: str = "r", consolidated: bool | None = None) -> Any:
    """Open a store's root group (Zarr v3 only): a local path, a URL (read-only, see ``kt_cache.remote``) or a Store."""
    from kt_cache.remote import open_store

    target = open_store(store) if mode == "r" and isinstance(store, (str, Path)) else store
    return open_root(target, str(store), mode, consolidated)


def open_root(target: Any, where: str, mode: str = "r", consolidated: bool | None = None) -> Any:
    import zarr

    warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", module="zarr")
    try:   # zarr_format=3: a v2 store could carry pickled object codecs; v3 has no code-running codec
        return zarr.open_group(target, mode=mode, use_consolidated=consolidated, zarr_format=3)
    except FileNotFoundError as err:
        raise StoreError(f"{where}: no Zarr v3 store there ({err}). Fix: check the path or URL "
                         "(a ktc store is a folder holding zarr.json; use zip:// for a packed store).") from err
    except network_errors() as err:
        raise StoreError(unreachable_message(where, err)) from err
    except (ValueError, KeyError, TypeError) as err:
        node = checks.locate_bad_node(root_document(target)) if not isinstance(target, str) else ""
        detail = str(node or err).rstrip(".")
        raise StoreError(f"{where}: cannot be opened as a Zarr v3 group: {detail}. The metadata is damaged or "
                         "not written by ktc. Fix: point at a store written by `ktc extract`, or ask its producer "
                         "for an intact copy.") from err


def network_errors() -> tuple[type[BaseException], ...]:
    """What a failed read raises: OSError (disk, refused connection), and aiohttp's errors (HTTP stores)."""
    try:
        import aiohttp
    except ImportError:
        return (OSError,)
    return (OSError, aiohttp.ClientError)


def unreachable_message(where: str, err: BaseException) -> str:
    return (f"{where}: cannot be read ({type(err).__name__}: {err}). A server that is down or unreachable, or a "
            "failing disk. Fix: check that the server is running and the URL is right (or the disk), then rerun.")


def root_document(target: Any) -> bytes | None:
    from kt_cache.remote import get_bytes

    try:
        return get_bytes(target, "zarr.json")
    except Exception:   # noqa: BLE001 - only used to improve an error message
        return None


def read_rows(array: Any, path: str, where: str, rows: slice = slice(None)) -> np.ndarray:
    """``array[rows]`` as numpy; an undecodable object becomes a StoreError naming its key and rows."""
    try:
        return np.asarray(array[rows])
    except Exception as err:   # noqa: BLE001 - zstd/crc/UTF-8 errors of damaged objects differ by codec
        bad = bad_objects(array, path, rows)
        named = "; ".join(f"{key} (rows {a}-{b - 1}): {type(e).__name__}: {e}" for key, a, b, e in bad[:5])
        raise StoreError(f"{where}: array {path}: {len(bad) or 'some'} stored object(s) cannot be decoded: "
                         f"{named or err}. The object is truncated or corrupt. Fix: run `ktc verify {where}` "
                         "for the full list; get an intact copy of the object, or re-extract that unit.") from err


def bad_objects(array: Any, path: str, rows: slice = slice(None)) -> list[tuple[str, int, int, Exception]]:
    """(key, first row, end row, error) of every storage object in ``rows`` that fails to decode."""
    step = checks.object_rows(array)
    start, stop, _ = rows.indices(int(array.shape[0]))
    found = []
    for block in range(start // step, -(-stop // step)):
        a, b = block * step, min((block + 1) * step, int(array.shape[0]))
        try:
            array[a:b]
        except Exception as err:   # noqa: BLE001
            found.append((object_key(array, path, block), a, b, err))
    return found


def object_key(array: Any, path: str, block: int) -> str:
    """Store key of the object (shard or chunk) holding row block ``block`` of the array at ``path``."""
    return f"{path}/{array.metadata.encode_chunk_key((block,) + (0,) * (array.ndim - 1))}"


def missing_objects_error(where: str, path: str, missing: list[tuple[str, int]], step: int) -> StoreError:
    named = "; ".join(f"{key} (rows {a}-{a + step - 1})" for key, a in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return StoreError(f"{where}: array {path}: {len(missing)} object(s) listed in {OBJECT_MANIFEST} are missing: "
                      f"{named}{more}. The store lost them after it was finalized (a deleted file, an incomplete copy "
                      "or download, a server answering 404); reading on would pass fill values off as data. Fix: "
                      f"get an intact copy of those objects or of the store; if you produced it, rerun `ktc extract` "
                      f"with its manifest, which recomputes the units whose objects are missing (`ktc verify {where}` "
                      "lists them all).")


class CheckedRows:
    """One store array, sliced by rows through ``StoreReader.read`` (so missing and corrupt objects are
    StoreErrors); every other attribute (shape, dtype, chunks, nbytes) is the zarr array's."""

    def __init__(self, reader: StoreReader, teacher_id: str, path: str, array: Any) -> None:
        self.reader, self.teacher_id, self.path, self.array = reader, teacher_id, path, array

    def __getattr__(self, name: str) -> Any:
        return getattr(self.array, name)

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice):
            raise TypeError(f"CheckedRows reads row slices only, got {type(rows).__name__}")
        return self.reader.read(self.teacher_id, self.path, rows)


class StoreReader:
    """Read-only, validated view of a ktc store: root metadata, samples, teachers and their arrays.

    ``store`` is a local path, ``file://``, ``zip://`` or any fsspec URL (``kt_cache.remote``), or a zarr Store.
    Everything taken from the store (sizes, dtypes, codecs, ids, attributes) is checked before use.
    """

    def __init__(self, store: Any, consolidated: bool | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        from kt_cache.remote import open_store, parse_location

        self.where = str(store)
        self.location = parse_location(store) if isinstance(store, (str, Path)) else None
        self.store = open_store(self.location, storage_options) if self.location else store
        self.root = open_root(self.store, self.where, "r", consolidated)
        self.meta = check_root_attrs(dict(self.root.attrs), self.where)
        checks.check_root_meta(self.meta, self.where)
        self.consolidated = self.root.metadata.consolidated_metadata is not None
        if self.location is not None and not self.location.listable and not self.consolidated:
            raise StoreError(f"{self.where}: this store has no consolidated metadata, and {self.location.protocol}:// "
                             "offers no listing, so its teachers cannot be discovered remotely. Fix: ask its producer "
                             "to finalize it (every `ktc extract` run does; `ktc verify` reports a missing or stale "
                             "consolidation) or to publish it packed (`ktc pack`), or download it and open it locally.")
        self._ids: list[str] | None = None
        self._checked: dict[str, dict[str, Any]] = {}
        self._listed: dict[str, dict[str, Any]] | None = None
        self._present: set[str] = set()

    def close(self) -> None:
        """Release the store (a packed store keeps its zip file open until then)."""
        if hasattr(self.store, "close"):
            self.store.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def n_samples(self) -> int:
        return int(self.meta["n_samples"])

    @property
    def n_views(self) -> int:
        return int(self.meta["n_views"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["dataset"].get("classes", []))

    def teacher_ids(self) -> list[str]:
        if self._ids is None:
            ids = sorted(name for name, _ in self.root["teachers"].groups()) if "teachers" in self.root else []
            for teacher_id in ids:
                checks.check_teacher_id(teacher_id, self.where)
            self._ids = ids
        return list(self._ids)

    def teacher(self, teacher_id: str) -> Any:
        if teacher_id not in self.teacher_ids():
            from kt_cache.errors import did_you_mean

            raise StoreError(f"{self.where}: no teacher '{teacher_id}' (has: {', '.join(self.teacher_ids()) or 'none'})."
                             f"{did_you_mean(teacher_id, self.teacher_ids())} Fix: pick a stored teacher id.")
        return self.root[f"teachers/{teacher_id}"]

    def teacher_attrs(self, teacher_id: str) -> dict[str, Any]:
        attrs = self.teacher(teacher_id).attrs.get(TEACHER_ATTR, {})
        checks.check_teacher_attrs(attrs, self.checked_arrays(teacher_id), teacher_id, self.where)
        return dict(attrs)

    def checked_arrays(self, teacher_id: str) -> dict[str, Any]:
        """Every array of the teacher group (``done`` included), each validated once."""
        if teacher_id not in self._checked:
            group, found = self.teacher(teacher_id), {}
            for name, member in group.members(max_depth=None):
                if hasattr(member, "shape"):
                    checks.check_array(member, f"teachers/{teacher_id}/{name}", name, self.meta, self.where)
                    found[name] = member
            if "done" not in found:
                raise checks.damaged(self.where, f"teacher {teacher_id} has no 'done' array")
            self._checked[teacher_id] = dict(sorted(found.items()))
        return self._checked[teacher_id]

    def teacher_arrays(self, teacher_id: str) -> dict[str, Any]:
        """Array path (``features``, ``logits_topk/values`` …) -> zarr array, ``done`` excluded."""
        arrays = self.checked_arrays(teacher_id)
        checks.check_teacher_attrs(self.teacher(teacher_id).attrs.get(TEACHER_ATTR, {}), arrays, teacher_id, self.where)
        return {name: array for name, array in arrays.items() if name != "done"}

    def read(self, teacher_id: str, path: str, rows: slice = slice(None)) -> np.ndarray:
        """Rows of one teacher array; a missing, truncated or corrupt object is a StoreError naming its key."""
        array = self.checked_arrays(teacher_id)[path]
        self.require_objects(array, f"teachers/{teacher_id}/{path}", rows)
        return read_rows(array, f"teachers/{teacher_id}/{path}", self.where, rows)

    def rows(self, teacher_id: str, path: str) -> CheckedRows:
        """The array at ``path`` as a row-sliceable object whose every read goes through ``read``."""
        return CheckedRows(self, teacher_id, path, self.checked_arrays(teacher_id)[path])

    def listed_objects(self) -> dict[str, dict[str, Any]]:
        """``ktc-objects.json``'s objects, read once (empty for a store that was never finalized)."""
        if self._listed is None:
            self._listed = self.object_manifest() or {}
        return self._listed

    def require_objects(self, array: Any, path: str, rows: slice = slice(None)) -> None:
        """Every object of ``rows`` that ``ktc-objects.json`` lists must exist: zarr would silently read an
        absent one as fill values (NaN features, label -1, ok False), i.e. lost data passed off as data."""
        listed = self.listed_objects()
        if not listed:
            return
        step = checks.object_rows(array)
        start, stop, _ = rows.indices(int(array.shape[0]))
        blocks = {object_key(array, path, b): b for b in range(start // step, -(-stop // step))}
        todo = [key for key in blocks if key in listed and key not in self._present]
        from kt_cache.remote import exists_many

        found = exists_many(self.store, todo)
        self._present.update(key for key, ok in zip(todo, found) if ok)
        missing = [key for key, ok in zip(todo, found) if not ok]
        if missing:
            raise missing_objects_error(self.where, path, [(k, blocks[k] * step) for k in missing], step)

    def done(self, teacher_id: str) -> np.ndarray:
        return np.asarray(self.read(teacher_id, "done"), dtype=bool)

    def is_complete(self, teacher_id: str) -> bool:
        return bool(self.done(teacher_id).all())

    def sample_array(self, name: str) -> Any:
        path = f"samples/{name}"
        if path not in self.root:
            raise checks.damaged(self.where, f"array {path} is missing")
        array = self.root[path]
        checks.check_array(array, path, name, self.meta, self.where)
        return array

    def sample(self, name: str) -> np.ndarray:
        """One ``samples/*`` array, checked (shape, dtype, sizes) before it is read, and its objects present."""
        array = self.sample_array(name)
        self.require_objects(array, f"samples/{name}")
        return read_rows(array, f"samples/{name}", self.where)

    def samples(self) -> dict[str, np.ndarray]:
        found = {name: self.sample(name) for name in ("id", "index", "label", "ok", "views")}
        checks.check_sample_ids(found["id"], self.where)
        return found

    def object_manifest(self) -> dict[str, dict[str, Any]] | None:
        """``ktc-objects.json`` (key -> size, sha256), validated; None when the store has none."""
        from kt_cache.remote import get_bytes

        raw = get_bytes(self.store, OBJECT_MANIFEST)
        return None if raw is None else checks.parse_object_manifest(raw, self.where)
