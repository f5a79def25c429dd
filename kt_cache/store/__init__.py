"""The ktc store: one Zarr v3 layout, defined once, with everything that reads, writes and checks it.

Modules (docs/store-format.md describes the format they implement):

- ``format``: the layout (array specs, chunks, units), the writer's primitives, the format's names and version;
- ``records``: the typed attribute records (``StoreMeta``, ``TeacherRecord``), the only writers and parsers of
  ``attrs["ktc"]`` / ``attrs["ktc_teacher"]``;
- ``checks``: what makes a store from another lab safe to open (shapes, dtypes, names, limits);
- ``reader``: ``StoreReader`` and the row reads every command goes through;
- ``location``: where a store lives (folder, ``file://``, ``zip://``, any fsspec URL), opened read-only;
- ``verify``, ``sharing`` (merge, subset, pack), ``upgrade``: the commands on whole stores.

``kt_cache.store`` re-exports the format's names and the reader (``from kt_cache.store import StoreReader``).
"""

from kt_cache.store.format import (  # the format's names and the reader, as ``format.__all__``
    DATASET_CLASSES, FEATURE_STATS, FORMAT_NAME, FORMAT_VERSION, OBJECT_MANIFEST, ROOT_ATTR, TEACHER_ATTR,
    ArraySpec, CheckedRows, StoreMeta, StoreReader, TeacherRecord, bad_objects, chunk_layout, class_names_attr,
    create_array, create_codec_arrays, create_done_array, encode_unit_arrays, index_dtype, is_parameter,
    missing_objects_error, n_units, object_key, open_group, open_root, read_rows, read_store_meta,
    read_teacher_record, sample_array_specs, teacher_array_specs, unit_slice, write_feature_stats,
    write_samples_unit, write_store_meta, write_teacher_record, write_unit,
)

__all__ = [
    "DATASET_CLASSES", "FEATURE_STATS", "FORMAT_NAME", "FORMAT_VERSION", "OBJECT_MANIFEST", "ROOT_ATTR",
    "TEACHER_ATTR", "ArraySpec", "CheckedRows", "StoreMeta", "StoreReader", "TeacherRecord", "bad_objects",
    "chunk_layout", "class_names_attr", "create_array", "create_codec_arrays", "create_done_array",
    "encode_unit_arrays", "index_dtype", "is_parameter", "missing_objects_error", "n_units", "object_key",
    "open_group", "open_root", "read_rows", "read_store_meta", "read_teacher_record", "sample_array_specs",
    "teacher_array_specs", "unit_slice", "write_feature_stats", "write_samples_unit", "write_store_meta",
    "write_teacher_record", "write_unit",
]
