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

from kt_cache.store.format import *  # noqa: F401,F403  (``format.__all__``: the format's names and the reader)
from kt_cache.store.format import __all__  # noqa: F401
