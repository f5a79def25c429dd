"""Where a store's images are read back from, by row: a folder (``root/id``) or tar shards (one seek each).

``open_images(dataset, ids, root)`` takes the store's ``attrs["ktc"]["dataset"]`` (what the listing recorded),
the sample ids in row order and an optional new root (``--data``: the folder, or URL prefix, that now holds
the files or the shards). Both sources hold only numpy arrays and strings, so they pickle into DataLoader
workers; shard file handles are opened lazily in each process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from kt_cache.errors import DatasetError, ImageDecodeError
from kt_cache.images import read_image_bytes


def as_bytes(ids: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Ids as a compact ``bytes`` array (utf-8), fork- and pickle-friendly."""
    ids = ids if isinstance(ids, np.ndarray) and ids.dtype.kind == "S" else [str(i).encode("utf-8") for i in ids]
    return np.asarray(ids, dtype=bytes)


class FolderImages:
    """Images of a folder (or CSV) listing: row ``r`` is the file ``root/ids[r]``."""

    kind = "folder"

    def __init__(self, root: str, ids: Sequence[Any] | np.ndarray):
        self.root, self.ids = str(root), as_bytes(ids)

    def __len__(self) -> int:
        return int(self.ids.size)

    def name(self, row: int) -> str:
        return os.path.join(self.root, self.ids[row].decode("utf-8"))

    def read(self, row: int) -> bytes:
        return read_image_bytes(self.name(row))

    def missing(self, rows: np.ndarray) -> list[str]:
        return [p for p in (self.name(int(r)) for r in rows) if not os.path.isfile(p)]


class ShardImages:
    """Images inside tar shards: row ``r`` is ``size[r]`` bytes at ``offset[r]`` of shard ``shard[r]``.

    Rows whose shard is missing, or whose key the shard's index does not hold, have ``shard[r] == -1``.
    """

    kind = "shards"

    def __init__(self, root: str, shard_names: Sequence[str], ids: Sequence[Any] | np.ndarray):
        from kt_cache.shards import join

        self.root, self.ids = str(root), as_bytes(ids)
        self.locations = [join(self.root, name) for name in shard_names]
        self.shard, self.offset, self.size = locate(self.locations, list(shard_names), self.ids)
        self.handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.ids.size)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "handles": {}}     # file handles never cross a process boundary

    def name(self, row: int) -> str:
        from kt_cache.shards import join

        return join(self.root, self.ids[row].decode("utf-8"))

    def read(self, row: int) -> bytes:
        shard, start, size = int(self.shard[row]), int(self.offset[row]), int(self.size[row])
        if shard < 0:
            raise ImageDecodeError(f"{self.name(row)}: cannot decode: the sample is not in its shard's index "
                                   "(shard missing or rewritten). Fix: restore the shard, or pass --data.")
        if size == 0:
            raise ImageDecodeError(f"{self.name(row)}: cannot decode: the image member is empty (0 bytes). "
                                   "Fix: rewrite the shard without it.")
        try:
            data = self.read_range(shard, start, size)
        except OSError as exc:
            raise ImageDecodeError(f"{self.name(row)}: cannot read {size} bytes at offset {start} of "
                                   f"{self.locations[shard]} ({exc}). Fix: check the shard and its disk or server.") from exc
        if len(data) != size:
            raise ImageDecodeError(f"{self.name(row)}: the shard {self.locations[shard]} ended after {len(data)} "
                                   f"of {size} bytes (truncated). Fix: re-download or rewrite the shard.")
        return data

    def read_range(self, shard: int, start: int, size: int) -> bytes:
        handle = self.handles.get(shard)
        if handle is None:                  # per process, per shard: a file descriptor, or (filesystem, path)
            handle = self.handles[shard] = open_shard(self.locations[shard])
        if isinstance(handle, int):
            return os.pread(handle, size, start)
        fs, path = handle
        return fs.cat_file(path, start=start, end=start + size)

    def missing(self, rows: np.ndarray) -> list[str]:
        return [self.name(int(r)) for r in rows if self.shard[int(r)] < 0]

    def close(self) -> None:
        for handle in self.handles.values():
            if isinstance(handle, int):
                os.close(handle)
        self.handles = {}


def open_shard(location: str) -> Any:
    """A local shard's file descriptor, or an fsspec URL's ``(filesystem, path)`` for ranged reads."""
    if "://" not in location:
        return os.open(location, os.O_RDONLY)
    import fsspec

    return fsspec.core.url_to_fs(location)


def locate(locations: list[str], names: list[str], ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: shard number, image offset and size, from each shard's (cached) index; -1 where not found."""
    from kt_cache.shards import shard_index

    shard = np.full(ids.size, -1, dtype=np.int32)
    offset, size = np.zeros(ids.size, dtype=np.int64), np.zeros(ids.size, dtype=np.int64)
    by_name = {name: i for i, name in enumerate(names)}
    depths = sorted({name.count("/") + 1 for name in names})
    rows_of: dict[int, list[tuple[int, str]]] = {}
    for row, raw in enumerate(ids):
        parts = raw.decode("utf-8").split("/")
        for depth in depths:
            number = by_name.get("/".join(parts[:depth]))
            if number is not None:
                rows_of.setdefault(number, []).append((row, "/".join(parts[depth:])))
                break
    for number, rows in rows_of.items():
        try:
            index = shard_index(locations[number])
        except DatasetError:
            continue                         # a missing shard: its rows stay -1 (``missing`` names them)
        where = {key: i for i, key in enumerate(index.keys)}
        for row, key in rows:
            if key in where:
                shard[row], offset[row], size[row] = number, index.offsets[where[key]], index.sizes[where[key]]
    return shard, offset, size


def open_images(dataset: dict[str, Any], ids: Sequence[Any] | np.ndarray, root: Any = None) -> FolderImages | ShardImages:
    """The image source of a store's ``attrs["ktc"]["dataset"]``; ``root`` replaces the recorded root."""
    base = str(root) if root is not None else str(dataset.get("root", ""))
    if dataset.get("kind") == "shards":
        return ShardImages(base, [str(n) for n in dataset.get("shards", [])], ids)
    return FolderImages(base, ids)
