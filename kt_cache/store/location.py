"""Store locations: a local folder, ``file://``, a packed ``zip://`` file, or any fsspec URL, opened read-only.

Accepted forms (``location`` below)::

    cache/train.zarr  /abs/train.zarr  file:///abs/train.zarr      a local store folder
    zip://cache/train.zip  zip:///abs/train.zip  train.zip          a store packed by `ktc pack` (local file)
    zip::https://host/train.zip                                    a packed store behind a URL (fsspec chaining)
    https://host/train.zarr  s3://bucket/train.zarr  gs://…         any fsspec URL (Zarr's FsspecStore)

Plain ``https://`` has no listing, so a reader discovers teachers only from the root's teacher list (v3; the
root's consolidated metadata in v1/v2) and a group's arrays only from its consolidated metadata; the reader
refuses a store or teacher without them (``kt_cache.store.StoreReader``).

Zarr sharding reads a shard's index with a suffix range and its chunks with byte ranges. Some servers
(``python -m http.server``, a few CDNs) ignore ``Range`` and answer 200 with the whole object; fsspec
passes that body on as if it were the range, so every partly read shard decodes as garbage. Every fsspec
store is therefore wrapped in ``RangeCheckedStore``: a body longer than asked marks the server as
range-less, and from then on ranges are cut locally from whole objects (the last few kept, bounded).
"""

from __future__ import annotations

import asyncio
import functools
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kt_cache.errors import StoreError, UsageError

UNLISTABLE = ("http", "https")            # protocols whose servers offer no object listing
TEMP_FILE = re.compile(r"(\.[0-9a-f]{32}\.partial|\.json\.partial)$")   # zarr LocalStore / finalize temp files
RECENT_BYTES = 64 << 20                   # whole objects kept for a range-less server (a shard is read piecewise)


@dataclass(frozen=True)
class Location:
    """A parsed store location: ``kind`` is ``local``, ``zip`` (a local zip file) or ``fsspec``."""

    text: str
    kind: str
    path: Path | None = None
    url: str | None = None

    @property
    def protocol(self) -> str:
        return self.url.split("::")[-1].split("://", 1)[0] if self.url and "://" in self.url else "file"

    @property
    def listable(self) -> bool:
        """True when object keys can be listed (local folders, zip files, object stores; not https)."""
        if self.kind == "fsspec" and self.url.startswith("zip:"):
            return True                   # a zip's central directory lists its members wherever it lives
        return not (self.kind == "fsspec" and self.protocol in UNLISTABLE)

    @property
    def local_folder(self) -> Path | None:
        return self.path if self.kind == "local" else None


def parse_location(location: str | Path) -> Location:
    """Classify ``location`` without touching it."""
    text = str(location)
    if text.startswith("file://"):
        return Location(text, "local", path=Path(text[len("file://"):]))
    if text.startswith("zip://"):
        rest = text[len("zip://"):]
        if "::" in rest:
            return Location(text, "fsspec", url=text)
        return Location(text, "zip", path=Path(rest))
    if text.startswith("zip::"):
        return Location(text, "fsspec", url=text)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) or "::" in text:
        return Location(text, "fsspec", url=text)
    path = Path(text)
    if path.suffix.lower() == ".zip" and path.is_file():
        return Location(text, "zip", path=path)
    return Location(text, "local", path=path)


def open_store(location: str | Path | Location, storage_options: dict[str, Any] | None = None) -> Any:
    """A read-only zarr ``Store`` for ``location``.

    Raises:
        StoreError: nothing is there (missing folder or zip file).
        UsageError: an unknown URL protocol, or one whose fsspec driver is not installed.
    """
    import zipfile

    import zarr.storage

    loc = location if isinstance(location, Location) else parse_location(location)
    if loc.kind == "local":
        if not loc.path.is_dir():
            raise StoreError(f"{loc.text}: no store folder there. Fix: check the path (a store is a folder "
                             "holding zarr.json), or use zip:// for a packed store.")
        return zarr.storage.LocalStore(loc.path, read_only=True)
    if loc.kind == "zip":
        if not loc.path.is_file():
            raise StoreError(f"{loc.text}: no zip file at {loc.path}. Fix: check the path of the packed store.")
        if not zipfile.is_zipfile(loc.path):
            raise StoreError(f"{loc.text}: {loc.path} is not a zip file (no zip directory found; truncated, or "
                             "another kind of file). Fix: point at a store packed by `ktc pack`, or fetch the "
                             "packed file again if its download was cut short.")
        return zarr.storage.ZipStore(loc.path, mode="r")
    return open_fsspec(loc, storage_options)


def open_fsspec(loc: Location, storage_options: dict[str, Any] | None) -> Any:
    import zarr.storage

    try:
        store = zarr.storage.FsspecStore.from_url(loc.url, storage_options=storage_options, read_only=True)
        return range_checked_store_class()(store)
    except ImportError as err:
        raise UsageError(f"{loc.text}: reading '{loc.protocol}://' URLs needs an fsspec driver that is not "
                         f"installed ({err}). Fix: pip install the driver (s3fs for s3://, gcsfs for gs://).") from err
    except ValueError as err:
        raise UsageError(f"{loc.text}: cannot open this URL with fsspec ({err}). Fix: use a local path, "
                         "file://, zip://, https:// or another protocol fsspec knows.") from err
    except (FileNotFoundError, OSError) as err:
        raise StoreError(f"{loc.text}: cannot be reached ({err}). Fix: check the URL.") from err


def asked_length(byte_range: Any) -> int | None:
    """Bytes a range asks for; ``None`` for an offset range, whose length needs the object's size."""
    from zarr.abc.store import RangeByteRequest, SuffixByteRequest

    if isinstance(byte_range, RangeByteRequest):
        return byte_range.end - byte_range.start
    return byte_range.suffix if isinstance(byte_range, SuffixByteRequest) else None


def cut(data: bytes, byte_range: Any) -> bytes:
    """The part of a whole object's bytes that ``byte_range`` asks for."""
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest

    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start:byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset:]
    return data[len(data) - min(byte_range.suffix, len(data)):]     # not data[-0:], the whole object


@functools.cache
def range_checked_store_class() -> type:
    """``RangeChecks`` over zarr's ``WrapperStore``, built on first use so importing this module skips zarr."""
    from zarr.storage import WrapperStore

    return type("RangeCheckedStore", (RangeChecks, WrapperStore), {"__module__": __name__})


def __getattr__(name: str) -> Any:
    # lets pickle find the class built above as kt_cache.store.location.RangeCheckedStore
    if name == "RangeCheckedStore":
        return range_checked_store_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class RangeChecks:
    """A read-only fsspec store (mixed into zarr's ``WrapperStore``) that notices a server ignoring ``Range``
    and then cuts ranges locally. While the server honours ranges every read passes through unchanged.
    """

    def __init__(self, store: Any, recent_bytes: int = RECENT_BYTES) -> None:
        super().__init__(store)
        self.ranges_ignored = False
        self.recent: OrderedDict[str, bytes] = OrderedDict()   # key -> whole object, oldest first
        self.recent_bytes = recent_bytes

    def _with_store(self, store: Any) -> Any:
        return type(self)(store, self.recent_bytes)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        if byte_range is None:
            return await self._store.get(key, prototype)
        if self.ranges_ignored:
            data = await self.whole(key, prototype)
            return None if data is None else prototype.buffer.from_bytes(cut(data, byte_range))
        return await self.checked_get(key, prototype, byte_range)

    async def checked_get(self, key: str, prototype: Any, byte_range: Any) -> Any:
        """A ranged read; a body longer than asked is the whole object from a server that ignored Range."""
        byte_range = await self.measurable(key, byte_range)
        value = None if byte_range is None else await self._store.get(key, prototype, byte_range)
        if value is None or len(value) <= asked_length(byte_range):
            return value
        self.range_ignored(key, value.to_bytes())
        return prototype.buffer.from_bytes(cut(value.to_bytes(), byte_range))

    async def measurable(self, key: str, byte_range: Any) -> Any:
        """``byte_range`` as a range of known length (``None`` when an offset's object is absent)."""
        from zarr.abc.store import OffsetByteRequest, RangeByteRequest

        if isinstance(byte_range, OffsetByteRequest):   # a whole body would pass for "offset to the end"
            if not await self._store.exists(key):
                return None
            byte_range = RangeByteRequest(byte_range.offset, max(byte_range.offset, await self._store.getsize(key)))
        # fsspec sends a 0-byte suffix as "bytes=0-", which any server answers with the whole object
        return RangeByteRequest(0, 0) if asked_length(byte_range) == 0 else byte_range

    def range_ignored(self, key: str, data: bytes) -> None:
        if not self.ranges_ignored:       # once per opened store: the reads that follow are whole objects
            print(f"note: {self._store.path} ignores HTTP Range requests (answers with whole objects); "
                  "reading whole objects and slicing them locally, which is slower", file=sys.stderr)
        self.ranges_ignored = True
        self.remember(key, data)

    async def whole(self, key: str, prototype: Any) -> bytes | None:
        if key in self.recent:
            self.recent.move_to_end(key)
            return self.recent[key]
        value = await self._store.get(key, prototype)
        data = None if value is None else value.to_bytes()
        if data is not None:
            self.remember(key, data)
        return data

    def remember(self, key: str, data: bytes) -> None:
        """Keep ``data``; drop the oldest objects beyond ``recent_bytes`` (the newest always stays)."""
        self.recent[key] = data
        self.recent.move_to_end(key)
        while len(self.recent) > 1 and sum(map(len, self.recent.values())) > self.recent_bytes:
            self.recent.popitem(last=False)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
        # fsspec's _cat_ranges has the same blind spot, so each range goes through get()'s check
        return list(await asyncio.gather(*(self.get(key, prototype, rng) for key, rng in key_ranges)))

    def __repr__(self) -> str:
        return f"RangeCheckedStore({self._store!r})"


def get_bytes(store: Any, key: str) -> bytes | None:
    """One stored object's bytes through the store (``None`` when absent)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    value = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if value is None else value.to_bytes()


def get_many(store: Any, keys: list[str], concurrency: int = 16) -> list[bytes | None]:
    """Bytes of many objects, fetched concurrently (one round trip each on remote stores)."""
    import asyncio

    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    async def run() -> list[bytes | None]:
        gate = asyncio.Semaphore(concurrency)

        async def one(key: str) -> bytes | None:
            async with gate:
                value = await store.get(key, prototype=default_buffer_prototype())
            return None if value is None else value.to_bytes()

        return list(await asyncio.gather(*(one(k) for k in keys)))

    return sync(run()) if keys else []


def exists_many(store: Any, keys: list[str], concurrency: int = 16) -> list[bool]:
    """Whether each object exists (a stat locally, a HEAD-like request remotely), checked concurrently."""
    import asyncio

    from zarr.core.sync import sync

    async def run() -> list[bool]:
        gate = asyncio.Semaphore(concurrency)

        async def one(key: str) -> bool:
            async with gate:
                return bool(await store.exists(key))

        return list(await asyncio.gather(*(one(k) for k in keys)))

    return sync(run()) if keys else []


def list_keys(store: Any, prefix: str = "") -> list[str]:
    """Every object key below ``prefix`` of a listable store, orphan temp files excluded, sorted."""
    from zarr.core.sync import sync

    async def run() -> list[str]:
        return [key async for key in store.list_prefix(prefix)]

    return sorted(k for k in sync(run()) if not TEMP_FILE.search(k))
