"""Store locations: a local folder, ``file://``, a packed ``zip://`` file, or any fsspec URL, opened read-only.

Accepted forms (``location`` below)::

    cache/train.zarr  /abs/train.zarr  file:///abs/train.zarr      a local store folder
    zip://cache/train.zip  zip:///abs/train.zip  train.zip          a store packed by `ktc pack` (local file)
    zip::https://host/train.zip                                    a packed store behind a URL (fsspec chaining)
    https://host/train.zarr  s3://bucket/train.zarr  gs://…         any fsspec URL (Zarr's FsspecStore)

Plain ``https://`` has no listing, so a reader discovers teachers only from consolidated metadata; the
reader refuses such a store without it (``kt_cache.store.StoreReader``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kt_cache.errors import StoreError, UsageError

UNLISTABLE = ("http", "https")            # protocols whose servers offer no object listing
TEMP_FILE = re.compile(r"(\.[0-9a-f]{32}\.partial|\.json\.partial)$")   # zarr LocalStore / finalize temp files


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
        return zarr.storage.FsspecStore.from_url(loc.url, storage_options=storage_options, read_only=True)
    except ImportError as err:
        raise UsageError(f"{loc.text}: reading '{loc.protocol}://' URLs needs an fsspec driver that is not "
                         f"installed ({err}). Fix: pip install the driver (s3fs for s3://, gcsfs for gs://).") from err
    except ValueError as err:
        raise UsageError(f"{loc.text}: cannot open this URL with fsspec ({err}). Fix: use a local path, "
                         "file://, zip://, https:// or another protocol fsspec knows.") from err
    except (FileNotFoundError, OSError) as err:
        raise StoreError(f"{loc.text}: cannot be reached ({err}). Fix: check the URL.") from err


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
