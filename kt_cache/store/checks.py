"""Checks that make a store from another lab safe to open and read (used by ``kt_cache.store.StoreReader``).

A store is data from elsewhere: every size, dtype, codec, id and attribute is checked before it is used
to allocate memory, build a path or decode a chunk. Each failure is a ``StoreError`` naming the store,
the array or attribute, what was expected and what was found.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from kt_cache.errors import StoreError

MAX_SAMPLES = 1 << 32              # rows of a store
MAX_VIEWS = 4096
MAX_UNIT_ROWS = 1 << 24
MAX_ROW_ELEMENTS = 1 << 28         # values per row of one array
MAX_CHUNK_BYTES = 1 << 31          # decoded bytes of one inner chunk
CODECS = frozenset({"bytes", "zstd", "gzip", "blosc", "crc32c", "transpose", "sharding_indexed",
                    "vlen-utf8", "vlen-bytes"})   # Zarr v3 core codecs; no numcodecs.* plug-ins
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")   # teacher ids (same rule as manifests)
FLOATS = ("float16", "float32")
PARAMETER_PREFIXES = ("codec/", "stats/")  # per-teacher parameter arrays: not indexed by sample
CODES = (*FLOATS, "int8")         # int8: a compact store's quantised codes (kt_cache.codecs)
TEACHER_ARRAYS: dict[str, tuple[int, tuple[str, ...]]] = {
    "features": (3, CODES), "logits": (3, FLOATS), "logits_topk/values": (3, FLOATS),
    "logits_topk/index": (3, ("uint16", "int32")), "logits_lse": (2, ("float32",)),
    "label_logit": (2, ("float32",)), "featmap": (5, CODES), "done": (1, ("bool",)),
}
MAP_CODES = (3, ("uint8",))      # featmap under the tc codec: one code per map (kt_cache.transform_codec)
SAMPLE_ARRAYS: dict[str, tuple[int, tuple[str, ...]]] = {
    "id": (1, ("str",)), "index": (1, ("int64",)), "label": (1, ("int32",)), "ok": (1, ("bool",)),
    "views": (3, ("float32",)), "digest": (2, ("uint8",)),
}
DIGEST_BYTES = 16                 # blake2b-128 of an image file's bytes (kt_cache.decode)
FIX = "Fix: ask the store's producer for an intact copy (verify it with `ktc verify`), or re-create it with `ktc extract`."


def damaged(where: str, what: str) -> StoreError:
    return StoreError(f"{where}: {what}. The store is damaged or was not written by ktc. {FIX}")


def check_int(meta: dict[str, Any], key: str, low: int, high: int, where: str) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise damaged(where, f"attrs['ktc']['{key}'] must be an integer in [{low}, {high}], got {short(value)}")
    return value


def check_root_meta(meta: dict[str, Any], where: str) -> None:
    """Sizes within limits and consistent, dataset/views/classes of the right types."""
    n = check_int(meta, "n_samples", 0, MAX_SAMPLES, where)
    check_int(meta, "n_views", 1, MAX_VIEWS, where)
    unit = check_int(meta, "unit_rows", 1, MAX_UNIT_ROWS, where)
    if unit & (unit - 1):
        raise damaged(where, f"attrs['ktc']['unit_rows'] must be a power of two, got {unit}")
    expected = max(1, -(-n // unit))
    if meta.get("n_units") != expected:
        raise damaged(where, f"attrs['ktc']['n_units'] is {short(meta.get('n_units'))}, expected "
                             f"ceil(n_samples / unit_rows) = {expected}")
    dataset = meta.get("dataset")
    if not isinstance(dataset, dict):
        raise damaged(where, f"attrs['ktc']['dataset'] must be an object, got {short(dataset)}")
    classes = dataset.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise damaged(where, f"attrs['ktc']['dataset']['classes'] must be a list of names, got {short(classes)}")
    if not isinstance(dataset.get("fingerprint"), (str, type(None))):
        raise damaged(where, f"attrs['ktc']['dataset']['fingerprint'] must be a string, got {short(dataset.get('fingerprint'))}")
    if not isinstance(meta.get("views", {}), dict):
        raise damaged(where, f"attrs['ktc']['views'] must be an object, got {short(meta.get('views'))}")
    check_teacher_list(meta.get("teachers"), where)


def check_teacher_list(teachers: Any, where: str) -> None:
    """v3's ``teachers``: None (v1/v2), or distinct path-safe ids in sorted order."""
    if teachers is None:
        return
    names = isinstance(teachers, list) and all(isinstance(t, str) for t in teachers)
    if not names or teachers != sorted(set(teachers)):
        raise damaged(where, f"attrs['ktc']['teachers'] must be a sorted list of distinct teacher ids, got "
                             f"{short(teachers)}")
    for teacher_id in teachers:
        check_teacher_id(teacher_id, where)


def check_teacher_id(teacher_id: str, where: str) -> None:
    """Teacher ids become folder names (merge, subset): path-safe only."""
    if not isinstance(teacher_id, str) or not ID_PATTERN.match(teacher_id) or ".." in teacher_id:
        raise damaged(where, f"teacher group name {short(teacher_id)} is not a path-safe teacher id "
                             f"(letters, digits, '_', '.', '-'; no '..')")


def dtype_name(array: Any) -> str:
    dtype = np.dtype(array.dtype)
    return "str" if dtype.kind in "TUO" else str(dtype)


def codec_names(codecs: Sequence[Any]) -> Iterator[str]:
    """Every codec name in a v3 codec list, sharding's inner and index codecs included."""
    for codec in codecs:
        if not isinstance(codec, dict):
            yield str(codec)
            continue
        yield str(codec.get("name"))
        config = codec.get("configuration") or {}
        for key in ("codecs", "index_codecs"):
            yield from codec_names(config.get(key) or [])


def object_rows(array: Any) -> int:
    """Rows per storage object: a shard when sharded, else a chunk."""
    return int(array.shards[0] if array.shards else array.chunks[0])


def check_array(array: Any, path: str, name: str, meta: Any, where: str) -> None:
    """Shape, dtype, chunking and codecs of one array against the format.

    Args:
        path: the array's path in the store (for messages); ``name``: its path inside its group
            (``samples/*`` -> ``id``…, ``teachers/<id>/*`` -> ``features``, ``logits_topk/index``…).
    """
    at, shape = f"{where}: array {path}", tuple(int(s) for s in array.shape)
    if path.startswith("teachers/") and name.startswith(PARAMETER_PREFIXES):
        return check_codec_array(array, at, shape)
    known = SAMPLE_ARRAYS if path.startswith("samples/") else TEACHER_ARRAYS
    if name in known:
        ndim, dtypes = known[name]
        coded_map = name == "featmap" and (len(shape), dtype_name(array)) == (MAP_CODES[0], MAP_CODES[1][0])
        if (len(shape) != ndim or dtype_name(array) not in dtypes) and not coded_map:
            also = " (or 3 of uint8: tc map codes)" if name == "featmap" else ""
            raise damaged(at, f"expected {ndim} dimension(s) of dtype {'/'.join(dtypes)}{also}, got shape "
                              f"{list(shape)} of dtype {dtype_name(array)}")
    is_done = known is TEACHER_ARRAYS and name == "done"
    rows, what = (meta.n_units, "n_units") if is_done else (meta.n_samples, "n_samples")
    if not shape or shape[0] != rows:
        raise damaged(at, f"has shape {list(shape)}; its first dimension must be {what} = {rows}")
    per_view = not is_done and name not in ("id", "index", "label", "ok", "digest")
    if per_view and (len(shape) < 2 or shape[1] != meta.n_views):
        raise damaged(at, f"has shape {list(shape)}; its second dimension must be n_views = {meta.n_views}")
    if name == "digest" and known is SAMPLE_ARRAYS and shape[1:] != (DIGEST_BYTES,):
        raise damaged(at, f"has shape {list(shape)}; expected [n_samples, {DIGEST_BYTES}]")
    if name == "views" and known is SAMPLE_ARRAYS and shape[2:] != (5,):
        raise damaged(at, f"has shape {list(shape)}; expected [n_samples, n_views, 5]")
    if float(np.prod(shape[1:], dtype=np.float64)) > MAX_ROW_ELEMENTS:
        raise damaged(at, f"has shape {list(shape)}: more than {MAX_ROW_ELEMENTS} values per row")
    check_chunking(array, shape, at, 1 if is_done else meta.unit_rows)
    bad = sorted(set(codec_names(array.metadata.to_dict().get("codecs", []))) - CODECS)
    if bad:
        raise damaged(at, f"uses codec(s) {bad}; a ktc store uses only Zarr v3 core codecs ({', '.join(sorted(CODECS))})")


def check_codec_array(array: Any, at: str, shape: tuple[int, ...]) -> None:
    """A codec parameter (``codec/<output>/<name>``): a float vector or matrix, one object (or one per unit)."""
    if len(shape) not in (1, 2) or dtype_name(array) not in FLOATS + ("float64",) \
            or float(np.prod(shape)) > MAX_ROW_ELEMENTS:
        raise damaged(at, f"a codec parameter must be a float vector or matrix of at most {MAX_ROW_ELEMENTS} "
                          f"values, got shape {list(shape)} of dtype {dtype_name(array)}")
    chunks = tuple(int(c) for c in array.chunks)
    if array.shards or (chunks != shape and chunks != (1, *shape[1:])):
        raise damaged(at, f"a codec parameter is stored as one chunk or one per unit, got chunks {list(chunks)}")
    bad = sorted(set(codec_names(array.metadata.to_dict().get("codecs", []))) - CODECS)
    if bad:
        raise damaged(at, f"uses codec(s) {bad}; a ktc store uses only Zarr v3 core codecs ({', '.join(sorted(CODECS))})")


def check_chunking(array: Any, shape: tuple[int, ...], at: str, unit_rows: int) -> None:
    """Chunked along N (and, in stores since view-separable chunks, one view per inner chunk inside a unit
    shard); one storage object per unit; inner chunks of a bounded decoded size."""
    chunks = tuple(int(c) for c in array.chunks)
    one_view = len(shape) > 1 and shape[1] > 1 and chunks[1:2] == (1,) and bool(array.shards)
    if chunks[2 if one_view else 1:] != shape[2 if one_view else 1:] \
            or (array.shards and tuple(array.shards)[1:] != shape[1:]):
        raise damaged(at, f"is chunked {list(chunks)} (shards {list(array.shards or [])}) for shape {list(shape)}; "
                          "ktc arrays are chunked along the first dimension (and the view dimension inside a "
                          "shard of whole views) only")
    if object_rows(array) != unit_rows:
        raise damaged(at, f"stores {object_rows(array)} rows per object, expected one unit = {unit_rows} rows")
    item = np.dtype(array.dtype).itemsize if np.dtype(array.dtype).kind not in "TO" else 16
    if float(np.prod(chunks, dtype=np.float64)) * item > MAX_CHUNK_BYTES:      # an inner chunk, decoded
        raise damaged(at, f"has inner chunks of {list(chunks)}: over {MAX_CHUNK_BYTES >> 20} MiB each when decoded")


def check_sample_ids(ids: np.ndarray, where: str, first_row: int = 0) -> None:
    """Sample ids are relative POSIX paths below the dataset root: no absolute path, no '..', no NUL."""
    values = np.asarray(ids).astype(object)
    text = np.array(values, dtype=str) if values.size else np.array([], dtype=str)
    suspicious = (np.char.startswith(text, "/") | (np.char.find(text, "..") >= 0) | (np.char.find(text, "\\") >= 0)
                  | (np.char.find(text, ":") >= 0) | (np.char.str_len(text) == 0))
    if "\x00" in "".join(map(str, values.tolist())):    # numpy's fixed-width strings cannot search for NUL
        suspicious |= np.array(["\x00" in str(v) for v in values], dtype=bool)
    for row in np.flatnonzero(suspicious):
        value = str(values[row])
        if sample_id_problem(value):
            raise damaged(f"{where}: samples/id row {first_row + int(row)}", f"sample id {value[:200]!r} is not a "
                          "relative path inside the dataset root (absolute, '..', drive letter, backslash, NUL or empty)")


def sample_id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a sample id (the rule readers apply; the dataset listing applies it first)."""
    if not value:
        return "it is empty"
    if value.startswith("/") or ".." in value.split("/"):
        return "it is absolute or leaves the dataset root ('..')"
    if "\\" in value:
        return "it holds a backslash (a path separator on Windows)"
    if "\x00" in value:
        return "it holds a NUL byte"
    if re.match(r"^[A-Za-z]:", value):
        return "it starts with a drive letter ('c:')"
    if any(ord(c) < 32 for c in value):
        return "it holds a control character (tab, newline, ...), which breaks the dataset fingerprint's framing"
    return None


def check_teacher_arrays(record: Any, arrays: dict[str, Any], teacher_id: str, where: str) -> None:
    """A ``TeacherRecord`` (types checked by ``from_attrs``) agrees with the teacher's array shapes."""
    at, attr = f"{where}: teacher {teacher_id}", "attrs['ktc_teacher']"
    stats = record.feature_stats
    if isinstance(stats, dict) and "array" in stats and stats["array"] not in arrays:
        raise damaged(at, f"{attr}['feature_stats'] refers to the array {short(stats['array'])}, which is missing")
    expect = {"features": ("feature_dim", 2), "logits": ("num_classes", 2), "featmap": ("featmap_dim", 4)}
    for path, (key, axis) in expect.items():
        if path not in arrays:
            continue
        coded = check_codec(record, arrays, path, at) if path != "logits" else None
        width = coded if coded is not None else arrays[path].shape[axis]   # a codec's vectors decode to its dim
        if getattr(record, key) is not None and width != getattr(record, key):
            raise damaged(at, f"{attr}['{key}'] = {getattr(record, key)} but {path} has shape {list(arrays[path].shape)}"
                              + (f" and decodes to {coded} values" if coded is not None else ""))
    pair = [arrays.get("logits_topk/values"), arrays.get("logits_topk/index")]
    if any(a is not None for a in pair) and (None in pair or pair[0].shape != pair[1].shape):
        raise damaged(at, "logits_topk/values and logits_topk/index must both exist with the same shape")


def check_codec(teacher: Any, arrays: dict[str, Any], path: str, at: str) -> int | None:
    """A compacted array agrees with its codec record (name, widths, dtype, parameter shapes); returns the
    stored code width, or None for an array stored plainly (float16/float32, no record)."""
    from kt_cache.codecs import codec_record, parse_codec
    from kt_cache.errors import UsageError

    record = codec_record(teacher, path)
    where = f"attrs['ktc_teacher']['codec']['{path}']"
    if record is None:
        if dtype_name(arrays[path]) not in FLOATS:
            raise damaged(at, f"{path} is {dtype_name(arrays[path])} but {where} records no codec to decode it")
        return None
    try:
        codec = parse_codec(str(record.get("name")), where)
    except UsageError as err:
        raise damaged(at, str(err)) from err
    dim, width = record.get("dim"), record.get("code_dim")
    shapes = transform_shapes(record, arrays[path], codec.transform) if codec.transform else \
        {"mean": (dim,), "basis": (width, dim), "scale": (units_of(arrays), width), "offset": (units_of(arrays), width)}
    if not isinstance(dim, int) or shapes is None or (not codec.transform and width != codec.code_dim(dim)) \
            or arrays[path].shape[-1] != width or dtype_name(arrays[path]) != codec.code_dtype:
        raise damaged(at, f"{where} ({short(record)}) does not match {path} of shape {list(arrays[path].shape)}, "
                          f"dtype {dtype_name(arrays[path])}")
    for name in codec.param_names():
        got = arrays.get(f"codec/{path}/{name}")
        if got is None or tuple(got.shape) != shapes[name]:
            raise damaged(at, f"codec parameter codec/{path}/{name} must have shape {list(shapes[name])}, got "
                              f"{'nothing' if got is None else list(got.shape)}")
    return dim


def units_of(arrays: dict[str, Any]) -> int | None:
    return int(arrays["done"].shape[0]) if "done" in arrays else None


def transform_shapes(record: dict[str, Any], codes: Any, bytes_per_cell: int) -> dict[str, tuple[int, ...]] | None:
    """The parameter shapes a ``tc:B`` record implies, or None when the record cannot describe ``codes [N, V, W]``
    (``kt_cache.transform_codec``: W = 1 flag byte + the packed bits, at most B bytes per cell)."""
    from kt_cache.transform_codec import LEVELS

    grid, dim, n, k = record.get("grid"), record.get("dim"), record.get("coefficients"), record.get("components")
    bits, width = record.get("bits_per_map"), record.get("code_dim")
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(v, int) for v in [*grid, dim, n, k, bits])):
        return None
    cells = grid[0] * grid[1]
    if len(codes.shape) != 3 or width != 1 + -(-bits // 8) or width > bytes_per_cell * cells:
        return None
    return {"mean": (cells, dim), "spatial": (cells, cells), "basis": (k, dim), "coef": (n,), "depth": (n,),
            "spread": (n,), "levels": (n, LEVELS), "low": (dim,), "high": (dim,)}


def short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def locate_bad_node(root_doc: bytes | None, prefix: str = "") -> str:
    """Name the first node of a group document's consolidated metadata that Zarr cannot parse ('' when none is
    found)."""
    from zarr.core.metadata.v3 import ArrayV3Metadata

    try:
        nodes = json.loads(root_doc or b"{}").get("consolidated_metadata", {}).get("metadata", {})
    except (ValueError, AttributeError):
        return "the zarr.json is not valid JSON"
    for key, node in sorted(nodes.items()) if isinstance(nodes, dict) else []:
        if isinstance(node, dict) and node.get("node_type") == "array":
            try:
                ArrayV3Metadata.from_dict(dict(node))
            except Exception as err:   # noqa: BLE001 - any parse failure names the node
                return f"array {prefix}{key}: {type(err).__name__}: {err}"
    return ""


SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_object_key(key: Any, where: str) -> None:
    """An object key is a relative POSIX path inside the store: never absolute, never '..'."""
    parts = key.split("/") if isinstance(key, str) else [""]
    if (not isinstance(key, str) or key.startswith("/") or "\\" in key or "\x00" in key
            or any(part in ("", ".", "..") for part in parts)):
        raise damaged(where, f"ktc-objects.json names the object key {short(key)}, which is not a relative path "
                             "inside the store")


def parse_object_manifest(raw: bytes, where: str) -> dict[str, dict[str, Any]]:
    """The ``objects`` table of ``ktc-objects.json``, every key, size and sha256 checked."""
    try:
        doc = json.loads(raw)
    except ValueError as err:
        raise damaged(where, f"ktc-objects.json is not valid JSON ({err})") from err
    objects = doc.get("objects") if isinstance(doc, dict) else None
    if not isinstance(objects, dict):
        raise damaged(where, "ktc-objects.json has no 'objects' table")
    for key, entry in objects.items():
        check_object_key(key, where)
        size = entry.get("size") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(digest, str) \
                or not SHA256.match(digest):
            raise damaged(where, f"ktc-objects.json entry for {key} must hold a size and a sha256, got {short(entry)}")
    return objects
