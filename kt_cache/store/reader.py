"""The store reader: ``StoreReader`` and the row reads every command goes through.

Everything taken from a store (sizes, dtypes, codecs, ids, attributes) is checked before use
(``kt_cache.store.checks``); a listed object that is missing, or one that does not decode, is a
``StoreError`` naming the array, the object key and the fix, never fill values passed off as data.
The layout itself is defined in ``kt_cache.store``, which re-exports these names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kt_cache.store import checks
from kt_cache.errors import StoreError
from kt_cache.store.records import StoreMeta, TeacherRecord, read_store_meta, read_teacher_record
from kt_cache.store.format import OBJECT_MANIFEST, open_root


def read_rows(array: Any, path: str, where: str, rows: slice = slice(None), view: int | None = None) -> np.ndarray:
    """``array[rows]`` (``[rows, ...]``), or ``array[rows, view]`` (one view, ``[rows, ...]`` without the view axis)
    as numpy; an undecodable object becomes a StoreError naming its key and rows."""
    try:
        return np.asarray(array[rows] if view is None else array[rows, int(view)])
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

    def __getitem__(self, key: slice | tuple[slice, int]) -> np.ndarray:
        """``[rows]`` or ``[rows, view]`` (one view: only its chunks are decoded when chunks are per view)."""
        rows, view = key if isinstance(key, tuple) and len(key) == 2 else (key, None)
        if not isinstance(rows, slice) or not (view is None or isinstance(view, (int, np.integer))):
            raise TypeError(f"CheckedRows reads [row slice] or [row slice, view] only, got {key!r}")
        return self.reader.read(self.teacher_id, self.path, rows, view)


class StoreReader:
    """Read-only, validated view of a ktc store: root metadata, samples, teachers and their arrays.

    ``store`` is a local path, ``file://``, ``zip://`` or any fsspec URL (``kt_cache.store.location``), or a zarr Store.
    Everything taken from the store (sizes, dtypes, codecs, ids, attributes) is checked before use.
    """

    def __init__(self, store: Any, consolidated: bool | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        from kt_cache.store.location import open_store, parse_location

        self.where = str(store)
        self.location = parse_location(store) if isinstance(store, (str, Path)) else None
        self.store = open_store(self.location, storage_options) if self.location else store
        self.root = open_root(self.store, self.where, "r", consolidated)
        self.meta: StoreMeta = read_store_meta(self.root, self.where)
        # ``consolidated``: teachers are found without a listing (v3: the root's list; v1/v2: the root's copy of
        # every node); ``listed``: the v3 list is used (``consolidated=False`` lists the store, e.g. mid-run)
        self.listed = self.meta.teachers is not None and consolidated is not False
        self.consolidated = self.listed or self.root.metadata.consolidated_metadata is not None
        if self.location is not None and not self.location.listable and not self.consolidated:
            raise StoreError(f"{self.where}: this store has no consolidated metadata, and {self.location.protocol}:// "
                             "offers no listing, so its teachers cannot be discovered remotely. Fix: ask its producer "
                             "to finalize it (every `ktc extract` run does; `ktc verify` reports a missing or stale "
                             "consolidation) or to publish it packed (`ktc pack`), or download it and open it locally.")
        self._teacher_consolidated = consolidated
        self._ids: list[str] | None = None
        self._checked: dict[str, dict[str, Any]] = {}
        self._records: dict[str, TeacherRecord] = {}
        self._listed: dict[str, dict[str, Any]] | None = None
        self._present: set[str] = set()
        self._groups: dict[str, Any] = {}
        self._nodes: dict[str, list[tuple[str, Any]]] = {}

    @property
    def location_listable(self) -> bool:
        return self.location is None or self.location.listable

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
        return self.meta.n_samples

    @property
    def n_views(self) -> int:
        return self.meta.n_views

    @property
    def class_names(self) -> list[str]:
        return self.meta.classes

    def teacher_ids(self) -> list[str]:
        """Every teacher's id, sorted: from the root's list (v3), else by listing ``teachers/``."""
        if self._ids is None:
            if self.listed:
                ids = list(self.meta.teachers or ())
            else:
                ids = sorted(self.root["teachers"].group_keys()) if "teachers" in self.root else []
            for teacher_id in ids:
                checks.check_teacher_id(teacher_id, self.where)
            self._ids = ids
        return list(self._ids)

    def teacher(self, teacher_id: str) -> Any:
        if teacher_id not in self.teacher_ids():
            from kt_cache.errors import did_you_mean

            raise StoreError(f"{self.where}: no teacher '{teacher_id}' (has: {', '.join(self.teacher_ids()) or 'none'})."
                             f"{did_you_mean(teacher_id, self.teacher_ids())} Fix: pick a stored teacher id.")
        if teacher_id not in self._groups:
            self.open_teachers([teacher_id])
        return self._groups[teacher_id]

    def open_teachers(self, teacher_ids: list[str]) -> None:
        """Open the groups of ``teacher_ids`` (v3: one read each, its nodes' metadata included), concurrently:
        at 1000 teachers over https a sequential open would wait 1000 round trips. v1/v2 stores hold every node
        in the root's consolidated metadata, listed in one call (a lookup per teacher would rescan it)."""
        todo = [tid for tid in dict.fromkeys(teacher_ids) if tid not in self._groups]
        if not todo:
            return
        if self.meta.teachers is None:
            members = dict(self.root["teachers"].members(max_depth=None)) if "teachers" in self.root else {}
            for key, node in members.items():
                owner, _, name = key.partition("/")
                if name:
                    self._nodes.setdefault(owner, []).append((name, node))
                else:
                    self._groups[owner] = node
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(32, len(todo))) as pool:
            groups = list(pool.map(self.open_teacher_group, todo))
        for teacher_id, group in zip(todo, groups):
            if group.metadata.consolidated_metadata is None and not self.location_listable:
                raise StoreError(f"{self.where}: teachers/{teacher_id}/zarr.json holds no consolidated metadata, and "
                                 f"{self.location.protocol}:// offers no listing, so the teacher's arrays cannot be "
                                 "found. Fix: ask the store's producer to finalize it (every `ktc extract` run does; "
                                 "`ktc verify` reports it) or to publish it packed (`ktc pack`).")
            self._groups[teacher_id] = group
            self._nodes[teacher_id] = list(group.members(max_depth=None))

    def open_teacher_group(self, teacher_id: str) -> Any:
        """The teacher's group (v3: with its nodes' consolidated metadata); a missing or damaged document is a
        StoreError naming it."""
        from kt_cache.store.format import network_errors, teacher_group, unreachable_message
        from kt_cache.store.location import get_bytes

        document = f"teachers/{teacher_id}/zarr.json"
        try:
            return teacher_group(self.root, teacher_id, consolidated=self._teacher_consolidated)
        except FileNotFoundError as err:
            raise checks.damaged(self.where, f"the root lists teacher {teacher_id}, but {document} is missing") from err
        except network_errors() as err:
            raise StoreError(unreachable_message(self.where, err)) from err
        except (ValueError, KeyError, TypeError) as err:
            detail = (checks.locate_bad_node(get_bytes(self.store, document), f"teachers/{teacher_id}/")
                      or f"{type(err).__name__}: {err}")
            raise checks.damaged(self.where, f"{document} cannot be parsed: {detail.rstrip('.')}") from err

    def teacher_record(self, teacher_id: str) -> TeacherRecord:
        """The teacher's ``TeacherRecord``, its types and its agreement with the arrays checked (read once);
        ``class_names`` resolved (v2 stores ``"dataset"`` for the target classes)."""
        if teacher_id not in self._records:
            record = read_teacher_record(self.teacher(teacher_id), teacher_id, self.where)
            checks.check_teacher_arrays(record, self.checked_arrays(teacher_id), teacher_id, self.where)
            names = record.names(self.class_names, teacher_id, self.where)
            self._records[teacher_id] = record.replace(class_names=tuple(names) if names is not None else None)
        return self._records[teacher_id]

    def teacher_attrs(self, teacher_id: str) -> dict[str, Any]:
        """The teacher's checked attributes as stored (JSON), ``class_names`` resolved: for display and export;
        code that uses a value reads ``teacher_record``."""
        return self.teacher_record(teacher_id).to_attrs()

    def feature_stats(self, teacher_id: str) -> dict[str, Any] | None:
        """``{"mean": float32 [D], "std": float32 [D], "count": int}`` of the teacher's (decoded) features, or None.

        v2 keeps them in the array ``stats/features`` (rows mean, std); v1 as JSON lists in the attributes.
        """
        record = self.teacher_record(teacher_id).feature_stats
        if record is None:
            return None
        if "array" not in record:
            return {"mean": np.asarray(record["mean"], np.float32), "std": np.asarray(record["std"], np.float32),
                    "count": int(record.get("count", 0))}
        values = read_rows(self.checked_arrays(teacher_id)[record["array"]], f"teachers/{teacher_id}/{record['array']}",
                           self.where)
        if values.ndim != 2 or values.shape[0] != 2:
            raise checks.damaged(self.where, f"teacher {teacher_id}: {record['array']} must be [2, D] (mean, std), "
                                             f"got shape {list(values.shape)}")
        return {"mean": values[0].astype(np.float32), "std": values[1].astype(np.float32), "count": int(record["count"])}

    def checked_arrays(self, teacher_id: str) -> dict[str, Any]:
        """Every array of the teacher group (``done`` included), each validated once."""
        if teacher_id not in self._checked:
            self.teacher(teacher_id)
            found: dict[str, Any] = {}
            for name, member in sorted(self._nodes.get(teacher_id, []), key=lambda pair: pair[0]):
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
        self.teacher_record(teacher_id)
        return {name: array for name, array in arrays.items() if name != "done"}

    def read(self, teacher_id: str, path: str, rows: slice = slice(None), view: int | None = None) -> np.ndarray:
        """Rows of one teacher array (of one ``view`` when given); a missing, truncated or corrupt object is a
        StoreError naming its key."""
        array = self.checked_arrays(teacher_id)[path]
        self.require_objects(array, f"teachers/{teacher_id}/{path}", rows)
        return read_rows(array, f"teachers/{teacher_id}/{path}", self.where, rows, view)

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
        from kt_cache.store.location import exists_many

        found = exists_many(self.store, todo)
        self._present.update(key for key, ok in zip(todo, found) if ok)
        missing = [key for key, ok in zip(todo, found) if not ok]
        if missing:
            raise missing_objects_error(self.where, path, [(k, blocks[k] * step) for k in missing], step)

    def codec_params(self, teacher_id: str, output: str) -> Any:
        """The ``kt_cache.codecs.CodecParams`` that decode ``output`` (features, featmap) of a compacted
        teacher, or None when the array holds plain float values."""
        from kt_cache.codecs import CodecParams, codec_record, parse_codec

        record = codec_record(self.teacher_record(teacher_id), output)
        if record is None:
            return None
        codec = parse_codec(record["name"])
        arrays = {name: self.read(teacher_id, f"codec/{output}/{name}").astype(np.float32)
                  for name in codec.param_names()}
        if codec.transform:
            from kt_cache.transform_codec import TransformParams

            params = TransformParams(arrays, codec)
            problem = params.problem(int(record["code_dim"]))
            if problem:
                raise checks.damaged(self.where, f"teacher {teacher_id}: the tc parameters at codec/{output}/ cannot "
                                                 f"decode its codes: {problem}")
            return params
        return CodecParams(codec, arrays, self.meta.unit_rows)

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
        from kt_cache.store.location import get_bytes

        raw = get_bytes(self.store, OBJECT_MANIFEST)
        return None if raw is None else checks.parse_object_manifest(raw, self.where)
