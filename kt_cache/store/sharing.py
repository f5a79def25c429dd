"""``ktc merge``, ``ktc subset`` and ``ktc pack``: combine, cut and ship stores without re-encoding a chunk.

Every stored object (chunk, shard, ``done`` flag, metadata document) is copied as bytes under the same
key, so outputs are bit-identical to their sources object by object. Only the root attributes are
written through zarr (last, as the coordinator does), a renamed teacher's attributes gain
``renamed_from``, and the output is finalized like any store: consolidated metadata, then
``ktc-objects.json``. Sources may be local folders, packed zips or URLs (read-only).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kt_cache.store import format as fmt
from kt_cache.store import checks
from kt_cache.errors import StoreError, StoreMismatchError, UsageError, did_you_mean
from kt_cache.store.location import get_many, list_keys
from kt_cache.staging import staged_output

BATCH = 64                          # objects per concurrent fetch
SAME = (("dataset fingerprint", ("dataset", "fingerprint")), ("--limit", ("dataset", "limit")),
        ("target classes", ("dataset", "classes")), ("views policy", ("views",)),
        ("row order (storage.order_seed)", ("order",)), ("number of samples", ("n_samples",)),
        ("number of views", ("n_views",)), ("storage.unit_rows", ("unit_rows",)))


@dataclass
class Part:
    """One source store and the teachers taken from it (stored id -> output id)."""

    reader: fmt.StoreReader
    teachers: dict[str, str]
    _samples: dict[str, np.ndarray] | None = None

    def samples(self) -> dict[str, np.ndarray]:
        """The source's samples arrays, read (and their ids checked) once."""
        if self._samples is None:
            self._samples = self.reader.samples()
        return self._samples


def subset_store(location: str, teachers: Sequence[str], out: str | Path) -> Path:
    """Write the teachers ``teachers`` of ``location`` (and its samples) into the new store ``out``."""
    reader = fmt.StoreReader(location)
    wanted = [t.strip() for item in teachers for t in str(item).split(",") if t.strip()]
    if not wanted:
        raise UsageError("ktc subset: no teacher given. Fix: pass --teachers ID[,ID…] "
                         f"(stored: {', '.join(reader.teacher_ids()) or 'none'}).")
    for teacher_id in wanted:
        if teacher_id not in reader.teacher_ids():
            raise UsageError(f"--teachers {teacher_id}: the store {reader.where} has no such teacher."
                             f"{did_you_mean(teacher_id, reader.teacher_ids())} Stored: {', '.join(reader.teacher_ids())}.")
    part = Part(reader, {t: t for t in dict.fromkeys(wanted)})
    validate_part(part)
    made_by = f"ktc subset {location} --teachers {','.join(part.teachers)} --out {out}"
    return write_store([part], [0] * reader.meta.n_units, Path(out), made_by)


def merge_stores(locations: Sequence[str], out: str | Path, renames: Sequence[str] = ()) -> Path:
    """Merge stores of the same dataset, views and row order into the new store ``out``.

    ``renames`` are ``OLD=NEW`` (renames OLD in every input after the first one holding it, or in the only
    one) or ``N:OLD=NEW`` (renames OLD in the N-th input, counting from 1).
    """
    if len(locations) < 2:
        raise UsageError("ktc merge needs at least two stores. Fix: ktc merge A.zarr B.zarr --out C.zarr.")
    readers = [fmt.StoreReader(location) for location in locations]
    parts = [Part(reader, {}) for reader in readers]
    check_compatible(parts)
    for part, mapping in zip(parts, plan_renames(readers, renames)):
        part.teachers = mapping
        validate_part(part)
    made_by = " ".join(["ktc merge", *map(str, locations), *(f"--rename {r}" for r in renames), "--out", str(out)])
    return write_store(parts, sample_owners(parts), Path(out), made_by)


def pack_store(location: str, out: str | Path) -> Path:
    """Copy every object of a finalized store into one ``ZIP_STORED`` file that zarr's ZipStore reads."""
    import zarr.storage
    from zarr.core.sync import sync

    reader, out = fmt.StoreReader(location), Path(out)
    if out.suffix.lower() != ".zip":
        raise UsageError(f"ktc pack: the output {out} must end in .zip (readers recognise packed stores by it).")
    if out.exists():
        raise UsageError(f"ktc pack: {out} already exists. Fix: choose a new output file or remove it.")
    validate_part(Part(reader, {t: t for t in reader.teacher_ids()}))
    keys = [(k, k) for k in source_keys(reader)] + [(fmt.OBJECT_MANIFEST, fmt.OBJECT_MANIFEST)]
    with staged_output(out, "ktc pack") as staging:
        zipped = sync(zarr.storage.ZipStore.open(staging, mode="w"))   # opened now, so close() always works
        try:
            copy_objects(reader, keys, zipped)
        finally:
            zipped.close()
    return out


def validate_part(part: Part) -> None:
    """Everything copied from a source is checked first: samples (ids included) and the chosen teachers."""
    part.samples()
    for teacher_id in part.teachers:
        part.reader.teacher_record(teacher_id)
    if part.reader.object_manifest() is None:
        raise StoreError(f"{part.reader.where}: has no {fmt.OBJECT_MANIFEST}, so its objects cannot be checked while "
                         "they are copied. Fix: rerun `ktc extract` with the store's manifest (it finalizes), then retry.")


def meta_value(meta: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        meta = meta.get(key) if isinstance(meta, dict) else None
    return meta


def check_compatible(parts: list[Part]) -> None:
    """Same dataset, views, row order and units in every input, and the same sample ids, indices and labels."""
    first = parts[0].reader
    for other in (p.reader for p in parts[1:]):
        for what, path in SAME:
            mine, theirs = meta_value(first.meta.to_attrs(), path), meta_value(other.meta.to_attrs(), path)
            if mine != theirs:
                raise StoreMismatchError(
                    f"cannot merge {first.where} and {other.where}: they differ in {what} ({fmt_value(mine)} vs "
                    f"{fmt_value(theirs)}). Rows of their teachers would not describe the same images and views. "
                    "Fix: merge only stores extracted from the same dataset with the same `views:` and `storage:` "
                    "settings; re-extract one of them with the other's manifest.")
    base = parts[0].samples()
    for part in parts[1:]:
        theirs = part.samples()
        for name in ("id", "index", "label"):
            if not np.array_equal(base[name], theirs[name]):
                raise StoreMismatchError(f"cannot merge {first.where} and {part.reader.where}: samples/{name} differs although "
                                         "their dataset fingerprints match. Fix: re-extract one store from the other's dataset.")
        check_same_digests(parts[0], part)


def check_same_digests(first: Part, other: Part) -> None:
    """Rows both stores decoded must come from the same file contents (the fingerprint sees names and sizes only)."""
    mine, theirs = content_digests(first.reader), content_digests(other.reader)
    if mine is None or theirs is None:
        return                           # a store made before content digests: names and sizes only
    both = mine.any(axis=1) & theirs.any(axis=1)
    changed = np.flatnonzero(both & (mine != theirs).any(axis=1))
    if changed.size:
        ids = first.samples()["id"][changed[:3]]
        raise StoreMismatchError(
            f"cannot merge {first.reader.where} and {other.reader.where}: {changed.size} row(s) were extracted from "
            f"different image contents under the same names and sizes (samples/digest differs), e.g. "
            f"{', '.join(map(str, ids))}. Their teachers did not see the same images. Fix: merge only stores "
            "extracted from the same image files; re-extract one store from the other's dataset.")


def content_digests(reader: fmt.StoreReader) -> np.ndarray | None:
    return reader.sample("digest") if "samples/digest" in reader.root else None


def fmt_value(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 70 else text[:67] + "..."


def plan_renames(readers: list[fmt.StoreReader], specs: Sequence[str]) -> list[dict[str, str]]:
    """Per input: stored teacher id -> output id; refuses colliding output ids."""
    maps = [{t: t for t in reader.teacher_ids()} for reader in readers]
    for spec in specs:
        target, old, new = parse_rename(spec, len(readers))
        holders = [i for i, m in enumerate(maps) if old in m] if target is None else [target]
        if not holders or old not in maps[holders[0]]:
            where = readers[target].where if target is not None else "any input"
            raise UsageError(f"--rename {spec}: no teacher '{old}' in {where}."
                             f"{did_you_mean(old, [t for m in maps for t in m])}")
        for index in holders[1:] if target is None and len(holders) > 1 else holders:
            maps[index][old] = new
    seen: dict[str, int] = {}
    for index, mapping in enumerate(maps):
        for old, new in mapping.items():
            if new in seen:
                raise UsageError(
                    f"teacher id '{new}' would come from both {readers[seen[new]].where} (input {seen[new] + 1}) and "
                    f"{readers[index].where} (input {index + 1}). Teacher ids of merged stores must be disjoint. Fix: "
                    f"--rename {old}=NEW_ID (renames it in the later input), or --rename {index + 1}:{old}=NEW_ID; or "
                    "drop one copy first with `ktc subset`.")
            seen[new] = index
    return maps


def parse_rename(spec: str, n_inputs: int) -> tuple[int | None, str, str]:
    """``[N:]OLD=NEW`` -> (input index or None, OLD, NEW), NEW checked to be a path-safe id."""
    target, _, pair = spec.partition(":") if ":" in spec.split("=")[0] else ("", "", spec)
    old, sep, new = pair.partition("=")
    if not sep or not old or not new or (target and not (target.isdigit() and 1 <= int(target) <= n_inputs)):
        raise UsageError(f"--rename {spec!r}: expected OLD=NEW or N:OLD=NEW with N in 1..{n_inputs}.")
    if not checks.ID_PATTERN.match(new) or ".." in new:
        raise UsageError(f"--rename {spec!r}: '{new}' is not a valid teacher id (letters, digits, '_', '.', '-').")
    return (int(target) - 1 if target else None), old, new


def processed_units(reader: fmt.StoreReader, teacher_ids: Sequence[str]) -> np.ndarray:
    """Units that some of ``teacher_ids`` completed (their samples/ok and samples/views were written)."""
    done = [reader.done(t) for t in teacher_ids]
    return np.any(np.stack(done), axis=0) if done else np.zeros(reader.meta.n_units, dtype=bool)


def sample_owners(parts: list[Part]) -> list[int]:
    """For each unit, the input whose samples/ok and samples/views objects are copied (the first that
    processed it); inputs that both processed a unit must agree on it."""
    meta = parts[0].reader.meta
    processed = [processed_units(p.reader, list(p.teachers)) for p in parts]
    values = [(s["ok"], s["views"]) for s in (p.samples() for p in parts)]
    owners = []
    for unit in range(meta.n_units):
        rows = fmt.unit_slice(unit, meta.n_samples, meta.unit_rows)
        holders = [i for i, done in enumerate(processed) if done[unit]] or [0]
        for other in holders[1:]:
            a, b = values[holders[0]], values[other]
            if not (np.array_equal(a[0][rows], b[0][rows]) and np.array_equal(a[1][rows], b[1][rows], equal_nan=True)):
                raise StoreMismatchError(
                    f"cannot merge {parts[holders[0]].reader.where} and {parts[other].reader.where}: rows {rows.start}-"
                    f"{rows.stop - 1} were decoded differently (samples/ok or samples/views differ), so their teachers "
                    "did not see the same pixels. Fix: re-extract one store from the same image files.")
        owners.append(holders[0])
    return owners


def source_keys(reader: fmt.StoreReader) -> list[str]:
    """Every object key of a source (listing when possible, else its object manifest), manifest excluded."""
    if reader.location is None or reader.location.listable:
        keys = list_keys(reader.store)
    else:
        manifest = reader.object_manifest()
        if manifest is None:
            raise StoreError(f"{reader.where}: cannot list the objects of this remote store and it has no "
                             f"{fmt.OBJECT_MANIFEST}. Fix: ask its producer to finalize it (`ktc extract`) or to pack it.")
        keys = sorted(manifest)
    keys = [k for k in keys if k != fmt.OBJECT_MANIFEST]
    absent = sorted(set(reader.listed_objects()) - set(keys))
    if absent:   # a copy without them would write an object list that hides the loss
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        raise StoreError(f"{reader.where}: {len(absent)} object(s) listed in its {fmt.OBJECT_MANIFEST} are missing "
                         f"(or hidden behind a symbolic link): {shown}. ktc copies only complete stores, so nothing "
                         f"was written. Fix: get an intact copy of the store (`ktc verify {reader.where}` lists "
                         "every damaged object); if you produced it, rerun `ktc extract` with its manifest first.")
    folder = reader.location.local_folder if reader.location else None
    for key in keys:
        checks.check_object_key(key, reader.where)
        if folder is not None and ((folder / key).is_symlink() or not (folder / key).resolve().is_relative_to(folder.resolve())):
            raise StoreError(f"{reader.where}: object {key} is a symbolic link; a store holds plain files only, and "
                             "ktc copies nothing from outside a store. Fix: replace the link by the file it names.")
    return keys


def unit_of(key: str) -> int | None:
    """Unit of a chunk key (``…/c/<unit>/…``), None for metadata documents."""
    _, sep, grid = key.partition("/c/")
    first = grid.split("/")[0]
    return int(first) if sep and first.isdigit() else None


def copy_plan(parts: list[Part], owners: list[int]) -> list[list[tuple[str, str]]]:
    """Per input: (source key, output key) of every object the output takes from it."""
    plans: list[list[tuple[str, str]]] = [[] for _ in parts]
    for index, part in enumerate(parts):
        for key in source_keys(part.reader):
            unit = unit_of(key)
            if key.startswith(("samples/ok/", "samples/views/", "samples/digest/")) and unit is not None:
                if owners[unit] == index:
                    plans[index].append((key, key))
            elif key.startswith("samples/") or key == "teachers/zarr.json":
                if index == 0:
                    plans[index].append((key, key))
            elif key.startswith("teachers/"):
                teacher_id, rest = key[len("teachers/"):].split("/", 1)
                if teacher_id in part.teachers:
                    plans[index].append((key, f"teachers/{part.teachers[teacher_id]}/{rest}"))
    return plans


def copy_objects(reader: fmt.StoreReader, pairs: list[tuple[str, str]], dest: Any) -> None:
    """Copy objects byte for byte (source key -> output key) into the zarr store ``dest``."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    prototype, manifest = default_buffer_prototype(), reader.object_manifest() or {}

    async def put(items: list[tuple[str, bytes]]) -> None:
        for key, data in items:      # LocalStore writes are atomic; ZipStore serialises writes anyway
            await dest.set(key, prototype.buffer.from_bytes(data))

    for start in range(0, len(pairs), BATCH):
        batch = pairs[start:start + BATCH]
        blobs = get_many(reader.store, [src for src, _ in batch])
        for (src, _), data in zip(batch, blobs):
            check_copied(reader, manifest, src, data)
        sync(put([(dst, data) for (_, dst), data in zip(batch, blobs)]))


def check_copied(reader: fmt.StoreReader, manifest: dict[str, Any], key: str, data: bytes | None) -> None:
    """A copied object must be the one the source's producer finalized (size and sha256 of its manifest)."""
    want = manifest.get(key)
    if key == fmt.OBJECT_MANIFEST:
        return
    got = None if data is None else {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if got is None or want is None or got != {"size": want["size"], "sha256": want["sha256"]}:
        state = "cannot be read" if got is None else "is not listed in" if want is None else "does not match"
        raise StoreError(f"{reader.where}: object {key} {state} the store's {fmt.OBJECT_MANIFEST}; ktc copies "
                         "only objects as their producer finalized them. Fix: run `ktc verify "
                         f"{reader.where}` for the full list and get an intact copy of the store.")


def prepare_output(out: Path, readers: Sequence[fmt.StoreReader]) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output {out} already exists. ktc merge and ktc subset write a new store and never "
                         "change an existing one. Fix: choose a new --out path or remove it.")
    for reader in readers:
        folder = reader.location.local_folder if reader.location else None
        if folder is not None and out.resolve().is_relative_to(folder.resolve()):
            raise UsageError(f"output {out} is inside the input store {reader.where}. Fix: write the new store elsewhere.")


def write_store(parts: list[Part], owners: list[int], out: Path, made_by: str, exclude: tuple[str, ...] = (),
                rewrite: Callable[[Any], None] | None = None) -> Path:
    """Create ``out`` (staged, renamed when whole), copy the planned objects, set attributes last,
    consolidate, write the manifest (recording ``made_by``, the command that can rebuild it).

    ``exclude``: key prefixes not copied; ``rewrite(root)`` then writes what replaces them (``ktc compact``).
    """
    import zarr
    import zarr.storage

    from kt_cache.finalize import consolidate, write_object_manifest

    prepare_output(out, [p.reader for p in parts])
    plans = [[(src, dst) for src, dst in plan if not dst.startswith(exclude)] for plan in copy_plan(parts, owners)]
    with staged_output(out, " ".join(made_by.split()[:2])) as staging:
        zarr.open_group(str(staging), mode="w", zarr_format=3)
        dest = zarr.storage.LocalStore(staging)
        for part, pairs in zip(parts, plans):
            copy_objects(part.reader, pairs, dest)
        root = zarr.open_group(str(staging), mode="r+", use_consolidated=False, zarr_format=3)
        if "teachers" not in root:
            root.create_group("teachers")
        record_renames(root, parts)
        if rewrite is not None:
            rewrite(root)
        fmt.write_store_meta(root, parts[0].reader.meta)   # last: unfinished until set
        consolidate(Path(staging))      # lists the teachers and records v3 (v1-layout teachers read alike)
        write_object_manifest(staging, made_by=made_by)
    return out


def record_renames(root: Any, parts: list[Part]) -> None:
    """A renamed teacher keeps its provenance and records its former id (``renamed_from``)."""
    for part in parts:
        for old, new in part.teachers.items():
            if old != new:
                group = fmt.teacher_group(root, new)
                record = fmt.read_teacher_record(group, new, part.reader.where)
                fmt.write_teacher_record(group, record.replace(renamed_from=old))
