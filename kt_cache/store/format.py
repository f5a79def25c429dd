"""Store format v3: the single definition of the ktc Zarr v3 layout, with its writer (reader: ``kt_cache.store.reader``).

Layout (docs/store-format.md is the user-facing description of exactly this)::

    <store>/                        attrs["ktc"]: format, version, samples, views, units, dataset, order, teachers
      samples/id        [N]         str, path relative to the dataset root, in row order
      samples/index     [N]         int64, position of the sample in the sorted dataset listing
      samples/label     [N]         int32, -1 when unknown
      samples/ok        [N]         bool, image decoded (written with each unit's first pass)
      samples/views     [N, V, 5]   float32 (x0, y0, w, h, flip), normalised
      samples/digest    [N, 16]     uint8 blake2b-128 of the image file's bytes (0: not recorded)
      teachers/<id>/                attrs["ktc_teacher"]: provenance, preprocessing, outputs, stats; its
                                    zarr.json (as every group's below the root) holds the consolidated
                                    metadata of the nodes under it (v3)
        features        [N, V, D]   float16|float32
        logits          [N, V, C]   float16|float32 (full logits), or
        logits_topk/values [N, V, k], logits_topk/index [N, V, k] (uint16 | int32)
        logits_lse      [N, V]      float32 logsumexp over all C_t logits (always with logits)
        label_logit     [N, V]      float32 logit of the true class, NaN when unknown / not covered
        featmap         [N, V, g, g, d]
        done            [n_units]   bool, one object per unit, written after the unit's data
        stats/features  [2, D]      float32 mean and std of the (decoded) features over decoded rows (v2)
        codec/<output>/*            a compact store's codec parameters (kt_cache.codecs)

v3 (this ktc writes it; v1 and v2 stay readable): the root lists its teachers (``attrs["ktc"]["teachers"]``) and
each teacher's own ``zarr.json`` holds the consolidated metadata of its nodes, so a reader parses the metadata
of the teachers it opens and the root document stays small at 1000 teachers (v1/v2 consolidate every node in the
root). v2: feature statistics are the array ``stats/features`` (v1: JSON lists in
``attrs["ktc_teacher"]["feature_stats"]``), and a teacher whose logits are the dataset's classes records
``class_names: "dataset"`` instead of repeating the list. ``StoreReader`` reads all three.
The attributes themselves are typed records (``kt_cache.store.records``: ``StoreMeta``, ``TeacherRecord``), the only
code that parses or writes them.

Rules: arrays are chunked along N, teacher outputs also along V (one view per inner chunk, so a reader
of one view reads only its chunks; stores written before that hold every view in a chunk and stay
readable); a *unit* of ``unit_rows`` rows is exactly one shard (or one chunk) of every array, so each
storage object has one writer. Only the coordinator creates arrays and
writes ``zarr.json``/attrs; writers only write unit data and then ``done``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kt_cache.store import checks
from kt_cache.codecs import MISSING_CODE, code_axis
from kt_cache.errors import StoreError
from kt_cache.store.records import (  # the attribute records and their names are part of the format (re-exported)
    DATASET_CLASSES, FORMAT_NAME, FORMAT_VERSION, ROOT_ATTR, TEACHER_ATTR, StoreMeta, TeacherRecord, read_store_meta,
    read_teacher_record, write_store_meta, write_teacher_record,
)

FEATURE_STATS = "stats/features"          # v2: [2, D] float32, rows mean and std
PARAMETER_PREFIXES = checks.PARAMETER_PREFIXES


def is_parameter(name: str) -> bool:
    """``name`` (a path inside a teacher group) is a parameter array, not a ``[N, V, …]`` output."""
    return name.startswith(PARAMETER_PREFIXES)


def class_names_attr(names: Any, dataset_classes: Any) -> Any:
    """What ``attrs["ktc_teacher"]["class_names"]`` holds: None, ``"dataset"`` when equal to the target classes
    (the list is stored once, in the root's ``dataset.classes``), else the list itself."""
    if not names:
        return None
    return DATASET_CLASSES if dataset_classes and list(names) == list(dataset_classes) else list(names)


def write_feature_stats(group: Any, stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """Write ``stats/features`` (mean, std) and return the attrs record ``{"array", "count"}`` (None: no stats)."""
    from zarr.codecs import ZstdCodec

    if stats is None:
        return None
    values = np.stack([np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)])
    group.create_array(FEATURE_STATS, data=values, chunks=values.shape, compressors=ZstdCodec(level=1),
                       dimension_names=("stat", "feature"), overwrite=True)
    return {"array": FEATURE_STATS, "count": int(stats["count"])}
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
        ArraySpec("digest", (checks.DIGEST_BYTES,), "uint8", 0, ("sample", "byte")),
    ]


def index_dtype(num_classes: int) -> str:
    """Top-k class indices: uint16 while every index fits, else int32 (never a float)."""
    return "uint16" if num_classes <= 65535 else "int32"


def teacher_array_specs(plan: Any, n_views: int, coded: bool = True) -> list[ArraySpec]:
    """Arrays of one teacher group, from its ``TeacherPlan`` (outputs, dims, dtype, top-k, grid). With a
    manifest ``codec: int8`` (and ``coded``), features and featmap hold int8 codes (``kt_cache.codecs``);
    ``coded=False`` gives the float arrays a unit is computed in before it is encoded."""
    spec, dtype, nan = plan.spec, plan.spec.dtype, float("nan")
    code = coded and getattr(spec, "codec", None) == "int8"
    vec_dtype, vec_fill = ("int8", MISSING_CODE) if code else (dtype, nan)
    out: list[ArraySpec] = []
    if "features" in spec.outputs:
        out.append(ArraySpec("features", (n_views, plan.feature_dim), vec_dtype, vec_fill,
                             ("sample", "view", code_axis("features") if code else "feature")))
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
        out.append(ArraySpec("featmap", row, vec_dtype, vec_fill,
                             ("sample", "view", "grid_y", "grid_x", code_axis("featmap") if code else "channel")))
    return out


def coded_outputs(plan: Any) -> dict[str, int]:
    """Output -> width of the arrays a manifest ``codec: int8`` encodes at extraction (empty without one)."""
    if getattr(plan.spec, "codec", None) != "int8":
        return {}
    dims = {"features": plan.feature_dim, "featmap": plan.featmap_dim}
    return {name: int(dims[name]) for name in ("features", "featmap") if name in plan.spec.outputs}


def create_codec_arrays(group: Any, plan: Any, units: int) -> dict[str, Any]:
    """``codec/<output>/{scale,offset,moments}``, one row (and one object) per unit, written by the unit's
    writer; returns the ``codec`` record of the teacher attributes (``error`` is added at finalize)."""
    from zarr.codecs import ZstdCodec

    from kt_cache.codecs import ErrorMeter

    records = {}
    for output, dim in coded_outputs(plan).items():
        axis = "channel" if output == "featmap" else "feature"
        for name, width, dtype, dims in (("scale", dim, "float32", ("unit", axis)), ("offset", dim, "float32", ("unit", axis)),
                                         ("moments", ErrorMeter.width(dim), "float64", ("unit", "moment"))):
            group.create_array(f"codec/{output}/{name}", shape=(units, width), chunks=(1, width), dtype=dtype,
                               fill_value=float("nan"), compressors=ZstdCodec(level=1), dimension_names=dims)
        records[output] = {"name": "int8", "dim": dim, "code_dim": dim, "code_dtype": "int8",
                           "source_dtype": plan.spec.dtype, "params": "per unit, from the unit's own range, at extraction"}
    return records


def encode_unit_arrays(arrays: dict[str, np.ndarray], plan: Any) -> dict[str, np.ndarray]:
    """A computed unit's float blocks -> what is stored: int8 codes plus the unit's codec rows (``codec: int8``)."""
    from kt_cache.codecs import Codec, ErrorMeter, encode_unit

    out = dict(arrays)
    for output, dim in coded_outputs(plan).items():
        meter = ErrorMeter(dim)
        out[output], params = encode_unit(arrays[output], Codec(int8=True), meter)
        out[f"codec/{output}/scale"], out[f"codec/{output}/offset"] = params["scale"][None], params["offset"][None]
        out[f"codec/{output}/moments"] = meter.to_vector()[None]
    return out


def chunk_rows_for(row_bytes: int, unit_rows: int, chunk_bytes: int) -> int:
    """Largest power of two <= unit_rows whose chunk stays within ``chunk_bytes`` (at least one row)."""
    rows = max(1, chunk_bytes // max(1, row_bytes))
    return min(unit_rows, 1 << int(math.floor(math.log2(rows))))


def n_units(n_samples: int, unit_rows: int) -> int:
    return max(1, -(-n_samples // unit_rows))


def unit_slice(unit: int, n_samples: int, unit_rows: int) -> slice:
    return slice(unit * unit_rows, min(n_samples, (unit + 1) * unit_rows))


# New teacher arrays get one view per inner chunk (``chunk_layout``); False writes the layout of ktc before it
# (every view in each chunk), which readers still read: benchmarks and tests set it to make such stores.
VIEW_CHUNKS = True


def chunk_layout(spec: ArraySpec, unit_rows: int, chunk_bytes: int, per_view: bool = False
                 ) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(inner chunk, shard or None) of an array ``[N, *row_shape]``.

    ``per_view`` (teacher outputs ``[N, V, ...]``): an inner chunk holds one view, so a reader of one view
    decodes 1/V of the bytes, and holds V times more rows for the same ``chunk_bytes``. The shard (or the
    single chunk) is always one whole unit of every view: each storage object still belongs to one unit.
    Per-view scalars (``[N, V]``: LSE, label logit) keep every view in one chunk: splitting 4 bytes per view
    saves no reading, and their unsharded metadata is ~250 bytes smaller in every reader's root document.
    """
    views = int(spec.row_shape[0]) if per_view and VIEW_CHUNKS and len(spec.row_shape) > 1 else 1
    inner = (1, *spec.row_shape[1:]) if views > 1 else spec.row_shape
    chunks = (chunk_rows_for(spec.row_bytes // views, unit_rows, chunk_bytes), *inner)
    unit = (unit_rows, *spec.row_shape)
    return chunks, (unit if chunks != unit else None)


def create_array(group: Any, spec: ArraySpec, n_samples: int, unit_rows: int, chunk_bytes: int,
                 per_view: bool = False) -> Any:
    """Create one row-chunked array: a unit is one shard when chunks are smaller than a unit, else one chunk
    (``per_view``: one view per inner chunk, see ``chunk_layout``)."""
    from zarr.codecs import ZstdCodec

    chunks, shards = chunk_layout(spec, unit_rows, chunk_bytes, per_view)
    shape = (n_samples, *spec.row_shape)
    dtype = str if spec.dtype == "str" else spec.dtype
    return group.create_array(
        spec.path, shape=shape, chunks=chunks, shards=shards, dtype=dtype, fill_value=spec.fill,
        compressors=ZstdCodec(level=1), dimension_names=spec.dims,
    )


def create_done_array(group: Any, units: int) -> Any:
    """``done[u]``: one object per unit so concurrent writers of different units never share one."""
    return group.create_array("done", shape=(units,), chunks=(1,), dtype="bool", fill_value=False,
                              dimension_names=("unit",))


def write_unit(teacher_group: Any, unit: int, rows: slice, arrays: dict[str, np.ndarray]) -> None:
    """Write one unit's rows of every array of a teacher, then (and only then) its ``done`` flag.

    Args:
        teacher_group: the opened ``teachers/<id>`` group (mode r+).
        unit: unit number; ``rows`` is its row range.
        arrays: array path -> block ``[rows, ...]``; must cover every array of the group.
    """
    for path, block in arrays.items():
        where = slice(unit, unit + 1) if is_parameter(path) else rows    # codec parameters: a row per unit
        teacher_group[path][where] = block
    teacher_group["done"][unit] = True


def write_samples_unit(root: Any, rows: slice, ok: np.ndarray, views: np.ndarray, digests: np.ndarray) -> None:
    """Write the decode results of one unit. Every pass over the unit writes identical bytes; image files
    whose content changed since an earlier pass are refused first (``check_same_images``)."""
    if "digest" in root["samples"]:        # stores made before content digests have none to compare
        check_same_images(root, rows, digests)
        root["samples/digest"][rows] = digests
    root["samples/ok"][rows] = ok
    root["samples/views"][rows] = views


def check_same_images(root: Any, rows: slice, digests: np.ndarray) -> None:
    """Refuse a pass that read other bytes than an earlier pass for the same rows (0 = not recorded)."""
    from kt_cache.errors import StoreMismatchError

    stored = np.asarray(root["samples/digest"][rows])
    known = stored.any(axis=1) & digests.any(axis=1)
    changed = np.flatnonzero(known & (stored != digests).any(axis=1))
    if changed.size:
        ids = np.asarray(root["samples/id"][rows])[changed]
        raise StoreMismatchError(
            f"{changed.size} image file(s) changed since this store recorded them (content digest differs), e.g. "
            f"{', '.join(map(str, ids[:3]))} (rows {', '.join(str(rows.start + int(i)) for i in changed[:3])}). "
            "Teacher outputs of different images cannot share one store. Fix: restore the original files, or "
            "extract the changed dataset into a new store (--out NEW.zarr).")


def open_group(store: Any, mode: str = "r", consolidated: bool | None = None) -> Any:
    """Open a store's root group (Zarr v3 only): a local path, a URL (read-only, see ``kt_cache.store.location``) or a Store."""
    from kt_cache.store.location import open_store

    target = open_store(store) if mode == "r" and isinstance(store, (str, Path)) else store
    return open_root(target, str(store), mode, consolidated)


def teacher_group(root: Any, teacher_id: str, consolidated: bool | None = False) -> Any:
    """``teachers/<id>`` of an opened root, in the root's mode. v3 keeps a teacher's nodes consolidated in its own
    ``zarr.json``, and zarr never looks past a group's consolidated metadata: code that adds an array or changes
    a node must open the group with ``consolidated=False`` (the default) to see the store as it is."""
    import zarr

    path = "/".join(part for part in (root.path, "teachers", teacher_id) if part)
    return zarr.open_group(root.store, path=path, mode="r" if root.read_only else "r+", use_consolidated=consolidated,
                           zarr_format=3)


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
    from kt_cache.store.location import get_bytes

    try:
        return get_bytes(target, "zarr.json")
    except Exception:   # noqa: BLE001 - only used to improve an error message
        return None


# The reader lives in its own module beside this one; ``kt_cache.store.StoreReader`` stays its public name.
from kt_cache.store.reader import (  # noqa: E402,F401
    CheckedRows, StoreReader, bad_objects, missing_objects_error, object_key, read_rows,
)

# Re-exported: the format, its records and its reader are one public module (``kt_cache.store``).
__all__ = [
    "DATASET_CLASSES", "FEATURE_STATS", "FORMAT_NAME", "FORMAT_VERSION", "OBJECT_MANIFEST", "ROOT_ATTR", "TEACHER_ATTR",
    "ArraySpec", "CheckedRows", "StoreMeta", "StoreReader", "TeacherRecord", "bad_objects", "chunk_layout",
    "class_names_attr", "create_array", "create_codec_arrays", "create_done_array", "encode_unit_arrays", "index_dtype",
    "is_parameter", "missing_objects_error", "n_units", "object_key", "open_group", "open_root", "read_rows",
    "read_store_meta", "read_teacher_record", "sample_array_specs", "teacher_array_specs", "teacher_group", "unit_slice",
    "write_feature_stats",
    "write_samples_unit", "write_store_meta", "write_teacher_record", "write_unit",
]
