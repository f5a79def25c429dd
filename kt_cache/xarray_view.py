"""A ktc store as an ``xarray.DataTree`` with meaning: sample ids, views and class names as coordinates.

``open_datatree(store)`` checks the store with ``StoreReader`` (so a damaged or hostile store is refused the
same way every command refuses it), then opens every group lazily (dask arrays, nothing is read yet):

- the root node holds ``samples/*`` (``label``, ``ok``, ``index``, ``views``) with coordinates ``sample`` (the
  sample ids), ``view`` (0..V-1) and ``target_class`` (the target class names), and ``attrs["ktc"]``;
- ``teachers/<id>`` holds that teacher's arrays on the same ``sample``/``view`` coordinates, with the top-k
  pair as ``logits_topk_values`` / ``logits_topk_index`` and, for full logits, ``class`` = the teacher's
  class names. ``done`` (per unit) and compact codec parameters (``codec/…``) are left out; a compacted
  array holds codes along ``feature_code``, ``channel_code`` or ``map_code`` (decode them with
  ``StoreReader.codec_params``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kt_cache.errors import UsageError


def open_datatree(store: str | Path) -> Any:
    """The store at ``store`` (path or URL, as every command takes it) as an ``xarray.DataTree``."""
    from kt_cache.store import StoreReader

    try:
        import xarray as xr
    except ImportError as err:
        raise UsageError("open_datatree needs xarray. Fix: pip install xarray (>= 2024.10, which has DataTree).") from err
    reader = StoreReader(store)
    samples = reader.samples()
    coords = {"sample": np.array([str(i) for i in samples["id"].tolist()]), "view": np.arange(reader.n_views)}
    root = open_group(xr, reader.store, "samples", ("id",)).assign_coords(
        {**coords, "target_class": np.array(reader.class_names, dtype=str)})
    root.attrs = {"ktc": reader.meta.to_attrs()}
    nodes = {"/": root}
    for tid in reader.teacher_ids():
        nodes[f"/teachers/{tid}"] = teacher_dataset(xr, reader, tid).assign_coords(coords)
    return xr.DataTree.from_dict(nodes)


def open_group(xr: Any, store: Any, group: str, drop: tuple[str, ...] = ()) -> Any:
    """``group`` as an xarray Dataset. xarray looks for consolidated metadata at the root only and warns when
    there is none (a v3 store keeps it in each group's own document, which zarr then reads): a known fallback."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to open Zarr store with consolidated metadata")
        return xr.open_zarr(store, group=group, consolidated=None, zarr_format=3, drop_variables=list(drop))


def teacher_dataset(xr: Any, reader: Any, tid: str) -> Any:
    """One teacher's arrays (top-k pair lifted out of its sub-group), with ``class`` names for full logits.
    Compacted arrays are opened one at a time; a last dimension named ``code`` (stores written before
    ``kt_cache.codecs.code_axis``) gets that name: features and maps may hold codes of different widths."""
    from kt_cache.codecs import code_axis, codec_record

    arrays, attrs = reader.teacher_arrays(tid), reader.teacher_attrs(tid)
    names = [path for path in arrays if "/" not in path]
    coded = [o for o in ("features", "featmap") if o in names and codec_record(reader.teacher_record(tid), o)]
    ds = open_group(xr, reader.store, f"teachers/{tid}", ("done", *coded))
    for output in coded:
        alone = open_group(xr, reader.store, f"teachers/{tid}", tuple(n for n in names if n != output))[output]
        if "code" in alone.dims:
            alone = alone.rename({"code": code_axis(output, alone.ndim == 3 and output == "featmap")})
        ds = ds.assign({output: alone})
    if "logits_topk/values" in arrays:
        topk = open_group(xr, reader.store, f"teachers/{tid}/logits_topk")
        ds = ds.assign(logits_topk_values=topk["values"], logits_topk_index=topk["index"])
    if "logits" in arrays and attrs.get("class_names"):
        ds = ds.assign_coords({"class": np.asarray(attrs["class_names"], dtype=str)})
    ds.attrs = {"ktc_teacher": {k: v for k, v in attrs.items() if k not in ("class_names", "feature_stats")}}
    return ds
