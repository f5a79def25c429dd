"""WebDataset-style tar shards as a dataset (``dataset: {shards: "train-{000000..000146}.tar"}``).

A shard is a POSIX tar file. Its members are grouped into samples by *key*, the WebDataset convention:
the member's path up to the first dot of its file name (``n01440764/n01440764_10026.JPEG`` -> key
``n01440764/n01440764_10026``, extension ``JPEG``). A sample has exactly one image member (an extension in
``IMAGE_EXTENSIONS``, any case) and optionally a ``.cls`` member holding its label: an integer class index,
or a class name, WordNet id or synonym. Other members (``.json``, ``.txt`` …) are ignored and reported.

Sample ids are ``<shard>/<key>``, ``<shard>`` being the shard's path relative to the shards' common folder
(``train-000003.tar/n01440764_10026``): unique across shards, and they say where the image is.

Listing reads each shard once, front to back: only its headers for a local file (``tarfile`` seeks over
member data), one sequential stream for an fsspec URL. What it learns is the shard's *index*: every
sample's key, the offset and size of its image bytes, and its label text. The index is cached as JSON under
``$KTC_DATA_DIR/shard-index/`` (default ``~/.cache/ktc/shard-index/``), keyed by the shard's location, size
and modification time (ETag for HTTP), so a resumed extraction and training never scan a shard again;
reading one image is then one seek and one read (one ranged request remotely). See docs/manifest.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kt_cache.classes import ClassLookup
from kt_cache.datasets import IMAGE_EXTENSIONS, DatasetListing, check_ids_storable, csv_label
from kt_cache.errors import DatasetError, did_you_mean

INDEX_FORMAT = "ktc-shard-index"
INDEX_VERSION = 1
LABEL_EXTENSION = "cls"
MAX_LABEL_BYTES = 4096


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample of one shard is: ``keys[i]``'s image bytes are ``size[i]`` bytes at ``offset[i]``."""

    keys: tuple[str, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    labels: tuple[str, ...]          # the ``.cls`` text, "" when the sample has none
    ignored: tuple[str, ...]         # member names that are neither an image nor a label


def is_url(location: str) -> bool:
    return "://" in location


def expand_shards(pattern: str | list[str] | tuple[str, ...], base: Path | None) -> list[str]:
    """Shard locations of ``dataset.shards``: brace patterns expanded (``{000..146}``, ``{a,b}``), local paths
    made absolute against ``base`` (the manifest's folder), URLs kept as written; each shard once."""
    from braceexpand import braceexpand

    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    found: list[str] = []
    for item in patterns:
        for location in braceexpand(item):
            if not is_url(location):
                path = Path(location).expanduser()
                location = str((Path(base) / path if base is not None and not path.is_absolute() else path).absolute())
            if location in found:
                raise DatasetError(f"dataset.shards: the shard {location!r} is named twice by {patterns}. "
                                   "Fix: list every shard once.")
            found.append(location)
    if not found:
        raise DatasetError(f"dataset.shards: {patterns} names no shard. Fix: give a tar path, a brace pattern "
                           "such as train-{000000..000146}.tar, or a list of them.")
    return found


def shard_folder(locations: list[str]) -> tuple[str, list[str]]:
    """The shards' common folder (a path or URL) and each shard's name relative to it (POSIX)."""
    remote = {is_url(loc) for loc in locations}
    if len(remote) > 1:
        raise DatasetError("dataset.shards: mixes local paths and URLs. Fix: keep all shards in one place.")
    if remote == {False}:
        root = os.path.commonpath([os.path.dirname(loc) for loc in locations])
        return root, [Path(os.path.relpath(loc, root)).as_posix() for loc in locations]
    parents = [loc.rsplit("/", 1)[0] for loc in locations]
    root = os.path.commonprefix(parents)
    root = root if all(p == root or p.startswith(root + "/") for p in parents) else root.rsplit("/", 1)[0]
    return root, [loc[len(root) + 1:] for loc in locations]


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_url(root) else os.path.join(root, name)


# ----------------------------------------------------------------------------------- listing


def list_shards(pattern: str | tuple[str, ...], classes: tuple[str, ...] | None, base: Path | None = None) -> DatasetListing:
    """The ``DatasetListing`` of a set of shards: ids ``<shard>/<key>`` sorted, labels from ``.cls``, and a
    fingerprint of (id, image size) framed like a folder's."""
    locations = expand_shards(pattern, base)
    root, names = shard_folder(locations)
    rows: list[tuple[str, str, str, int]] = []            # id, label text, where, image size
    ignored: list[str] = []
    for location, name, index in zip(locations, names, shard_indexes(locations)):
        rows += [(f"{name}/{key}", label, f"{location}: {key}.{LABEL_EXTENSION}", size)
                 for key, label, size in zip(index.keys, index.labels, index.sizes)]
        ignored += [f"{name}/{member}" for member in index.ignored]
    if not rows:
        raise DatasetError(f"dataset.shards: the {len(locations)} shard(s) of {pattern!r} hold no images "
                           f"(saw {len(ignored)} other member(s), e.g. {ignored[:3]}). Fix: point at WebDataset "
                           f"shards whose samples have an image member ({' '.join(IMAGE_EXTENSIONS)}).")
    rows.sort(key=lambda row: row[0])
    classes = classes if classes is not None else label_space([row[1] for row in rows])
    lookup = ClassLookup(classes)
    labels = np.asarray([shard_label(lookup, text, where) for _, text, where, _ in rows], dtype=np.int32)
    ids = tuple(row[0] for row in rows)
    check_ids_storable(Path(root), ids)
    description = {"kind": "shards", "root": root, "shards": names,
                   "pattern": pattern if isinstance(pattern, str) else list(pattern)}
    return DatasetListing(root=root, ids=ids, labels=labels.reshape(len(ids)), class_names=tuple(classes),
                          fingerprint=fingerprint(ids, [row[3] for row in rows]), description=description,
                          ignored=tuple(sorted(ignored)))


def label_space(texts: list[str]) -> tuple[str, ...]:
    """Classes when ``dataset.classes`` is not given: ``"0" … "max"`` for integer labels, else the sorted names."""
    given = sorted({t for t in texts if t})
    if given and all(t.isdigit() for t in given):
        return tuple(str(i) for i in range(max(int(t) for t in given) + 1))
    return tuple(given)


def shard_label(lookup: ClassLookup, text: str, where: str) -> int:
    if not text:
        return -1
    found = csv_label(lookup, text, where)
    if found is None:
        raise DatasetError(f"{where}: label {text!r} is not in dataset.classes.{did_you_mean(text, lookup.classes)} "
                           "Fix: correct the label (a class name, WordNet id, synonym or 0-based index) or add "
                           "it to dataset.classes.")
    return found


def fingerprint(ids: tuple[str, ...], sizes: list[int]) -> str:
    digest = hashlib.sha256()
    for sample_id, size in zip(ids, sizes):
        digest.update(f"{sample_id}\t{size}\n".encode("utf-8"))
    return digest.hexdigest()


# ----------------------------------------------------------------------------------- scanning


def split_member(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name (WebDataset rule); None for a hidden file."""
    folder, base = posixpath.split(name[2:] if name.startswith("./") else name)
    if not base or base.startswith("."):
        return None
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem), extension


def scan_shard(location: str) -> ShardIndex:
    """Read one shard's headers (and its ``.cls`` members) front to back; see the module docstring."""
    images = {ext.lstrip(".") for ext in IMAGE_EXTENSIONS}
    found: dict[str, list[Any]] = {}
    ignored: list[str] = []
    with open_tar(location) as (tar, total):
        for info in tar:
            parts = split_member(info.name) if info.isfile() else None
            if parts is None:
                continue
            key, extension = parts
            entry = found.setdefault(key, [None, 0, "", 0])     # image name, size, label, offset
            if extension.lower() in images:
                if entry[0] is not None:
                    raise DatasetError(f"dataset.shards: {location}: the sample {key!r} has two image members "
                                       f"({entry[0]!r} and {info.name!r}). Fix: keep one image per key in the shard.")
                if info.offset_data + info.size > total:
                    raise DatasetError(f"dataset.shards: {location}: member {info.name!r} ends at byte "
                                       f"{info.offset_data + info.size}, but the shard has {total} bytes (truncated). "
                                       "Fix: re-download or rewrite the shard.")
                entry[0], entry[1], entry[3] = info.name, info.size, info.offset_data
            elif extension == LABEL_EXTENSION:
                entry[2] = read_label(tar, info, location)
            else:
                ignored.append(info.name)
    return index_of(found, ignored, location)


def index_of(found: dict[str, list[Any]], ignored: list[str], location: str) -> ShardIndex:
    """Samples with an image, sorted by key; a label without an image is reported as ignored."""
    keys = sorted(k for k, entry in found.items() if entry[0] is not None)
    ignored += [f"{k}.{LABEL_EXTENSION}" for k, entry in found.items() if entry[0] is None]
    return ShardIndex(tuple(keys), tuple(found[k][3] for k in keys), tuple(found[k][1] for k in keys),
                      tuple(found[k][2] for k in keys), tuple(sorted(ignored)))


def read_label(tar: tarfile.TarFile, info: tarfile.TarInfo, location: str) -> str:
    where = f"dataset.shards: {location}: member {info.name!r}"
    if info.size > MAX_LABEL_BYTES:
        raise DatasetError(f"{where} is {info.size} bytes; a .cls label is a class index or name. "
                           "Fix: write the label as text, e.g. '281' or 'n02123045'.")
    try:
        return tar.extractfile(info).read().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise DatasetError(f"{where} is not UTF-8 text. Fix: write the label as text, e.g. '281'.") from None


class open_tar:
    """``with open_tar(location) as (tar, size)``: seekable for a local file, one stream for a URL."""

    def __init__(self, location: str):
        self.location = location
        self.handles: list[Any] = []

    def __enter__(self) -> tuple[tarfile.TarFile, int]:
        try:
            if is_url(self.location):
                import fsspec

                handle = fsspec.open(self.location, "rb", block_size=8 << 20).open()
                self.handles.append(handle)
                size = int(handle.size) if getattr(handle, "size", None) is not None else 1 << 62
                tar = tarfile.open(fileobj=handle, mode="r|")
            else:
                size = os.stat(self.location).st_size
                tar = tarfile.open(self.location, mode="r:")
        except FileNotFoundError:
            raise DatasetError(f"dataset.shards: the shard {self.location} does not exist. Fix: correct the path "
                               "or pattern (relative paths are resolved against the manifest's folder).") from None
        except (tarfile.TarError, OSError) as exc:
            raise not_a_tar(self.location, exc) from None
        self.handles.insert(0, tar)
        return tar, size

    def __exit__(self, kind: Any, exc: Any, trace: Any) -> None:
        for handle in self.handles:
            handle.close()
        if isinstance(exc, (tarfile.TarError, EOFError)):
            raise not_a_tar(self.location, exc) from None


def not_a_tar(location: str, exc: BaseException) -> DatasetError:
    return DatasetError(f"dataset.shards: {location} is not a readable tar file ({exc}). Fix: re-download or "
                        "rewrite the shard (an uncompressed POSIX tar, as WebDataset writes).")


# ----------------------------------------------------------------------------------- the cached index


def index_dir() -> Path:
    base = Path(os.environ["KTC_DATA_DIR"]) if os.environ.get("KTC_DATA_DIR") else Path.home() / ".cache" / "ktc"
    return base.expanduser() / "shard-index"


def shard_stamp(location: str) -> dict[str, Any]:
    """What identifies this version of the shard: location, size and mtime (or ETag); raises when missing."""
    if not is_url(location):
        try:
            stat = os.stat(location)
        except FileNotFoundError:
            raise DatasetError(f"dataset.shards: the shard {location} does not exist. Fix: correct the path or "
                               "pattern (relative paths are resolved against the manifest's folder).") from None
        return {"location": location, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    import fsspec

    fs, path = fsspec.core.url_to_fs(location)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise DatasetError(f"dataset.shards: the shard {location} does not exist on its server. Fix: correct "
                           "the URL or pattern.") from None
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return {"location": location, "size": info.get("size"), "version": str(version) if version else None}


MEMO: dict[str, ShardIndex] = {}      # stamp (JSON) -> index, for this process
PARALLEL_FROM = 4                     # shards to scan before a process pool pays for its start-up


def shard_index(location: str, stamp_json: str | None = None) -> ShardIndex:
    """The shard's index: from memory or the cache folder when its stamp still matches, else scanned and cached.
    ``stamp_json``: the shard's stamp when the caller already has it (one ``stat`` or HEAD per shard)."""
    stamp_json = stamp_json or stamp_key(location)
    if stamp_json not in MEMO:
        stamp, path = json.loads(stamp_json), cache_path(stamp_json)
        index = load_cached(path, stamp)
        if index is None:
            index = scan_shard(location)
            save_cached(path, stamp, index)
        MEMO[stamp_json] = index
    return MEMO[stamp_json]


def shard_indexes(locations: list[str]) -> list[ShardIndex]:
    """Every shard's index; shards not indexed yet are scanned in parallel processes (one per core)."""
    stamps = [stamp_key(loc) for loc in locations]
    pending = [(loc, key) for loc, key in zip(locations, stamps) if key not in MEMO and not cache_path(key).is_file()]
    workers = min(len(pending), os.cpu_count() or 1)
    if len(pending) >= PARALLEL_FROM and workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: the caller may hold torch threads or a dask client, which fork does not copy safely
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for (_, key), index in zip(pending, pool.map(shard_index, *zip(*pending))):
                MEMO[key] = index
    return [shard_index(loc, key) for loc, key in zip(locations, stamps)]


def stamp_key(location: str) -> str:
    return json.dumps(shard_stamp(location), sort_keys=True)


def clear_memo() -> None:
    MEMO.clear()


def cache_path(stamp_json: str) -> Path:
    return index_dir() / (hashlib.sha256(stamp_json.encode()).hexdigest()[:32] + ".json")


def load_cached(path: Path, stamp: dict[str, Any]) -> ShardIndex | None:
    try:
        data = json.loads(path.read_text())
        if data.get("format") != INDEX_FORMAT or data.get("version") != INDEX_VERSION or data.get("stamp") != stamp:
            return None
        return ShardIndex(*(tuple(data[k]) for k in ("keys", "offsets", "sizes", "labels", "ignored")))
    except (OSError, ValueError, KeyError, TypeError):
        return None                  # a missing or damaged cache file is only a cache miss


def save_cached(path: Path, stamp: dict[str, Any], index: ShardIndex) -> None:
    data = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "stamp": stamp,
            **{k: list(getattr(index, k)) for k in ("keys", "offsets", "sizes", "labels", "ignored")}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)
    except OSError:
        pass                         # a read-only cache folder costs a rescan next time, nothing else
