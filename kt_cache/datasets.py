"""List an image dataset: a folder of class sub-folders, a CSV of ``path[,label]`` rows, or a built-in set.

``list_dataset`` returns a ``DatasetListing``: sample ids (relative POSIX paths, sorted), labels, the
target class names and a fingerprint of (path, size) that a store records to refuse another dataset.
This module imports neither torch nor timm (it must stay light); see docs/manifest.md.

Decisions:
- Image extensions are a fixed list (a superset of timm's default ``.png .jpg .jpeg``), matched
  case-insensitively; a fixed list keeps the listing (and the fingerprint) independent of what else
  happens to be imported.
- Hidden files and folders (name starting with ".") are skipped silently; other non-image files are
  skipped and reported in ``DatasetListing.ignored``.
- Folder labels come from the *top-level* sub-folder (torchvision ``ImageFolder``); images deeper down
  belong to that class; images directly in the root get label -1.
- CSV rows are taken as written (no extension filter: an explicit list wins; decoding decides), then
  sorted by path like every listing.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from kt_cache.classes import AmbiguousClass, ClassLookup, resolve_class_names
from kt_cache.errors import DatasetError, did_you_mean
from kt_cache.manifest_types import DatasetSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
BUILTINS = ("skimage",)
# skimage.data photos bundled in the wheel (no pooch download): name -> loader attribute.
SKIMAGE_PHOTOS = (
    "astronaut", "camera", "chelsea", "clock", "coffee", "coins",
    "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle", "retina", "rocket",
)


@dataclass(frozen=True, eq=False)   # eq=False: ``labels`` is an array (no elementwise ==)
class DatasetListing:
    """A listed dataset, in deterministic (sorted by relative path) order.

    Attributes:
        root: folder the ids are relative to.
        ids: relative POSIX paths, never absolute, never containing "..".
        labels: int32 ``[N]`` indices into ``class_names``; -1 when unknown.
        class_names: the target label space (may be empty).
        fingerprint: sha256 hex of ``"relpath\\tsize\\n"`` for every sample in order.
        description: JSON-able provenance: kind "folder" | "csv" | "builtin", absolute paths, name.
        ignored: relative paths skipped because their extension is not an image extension.
    """

    root: Path | str                  # a URL for remote shards
    ids: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    fingerprint: str
    description: dict[str, Any] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)


def is_image_file(name: str) -> bool:
    """True when ``name`` has an image extension (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def dataset_fingerprint(root: Path, ids: tuple[str, ...] | list[str]) -> str:
    """sha256 hex of ``"relpath\\tsize\\n"`` for every id in order (sizes read from ``root / id``)."""
    digest, base = hashlib.sha256(), os.fspath(root)
    for rel in ids:
        size = os.stat(os.path.join(base, rel)).st_size      # os.path, not pathlib: 1.28 M ids
        digest.update(f"{rel}\t{size}\n".encode("utf-8"))
    return digest.hexdigest()


def list_dataset(spec: DatasetSpec, base_dir: Path | None = None) -> DatasetListing:
    """List the dataset a manifest's ``dataset:`` block describes.

    Args:
        spec: exactly one of ``root``, ``list``, ``shards`` or ``builtin`` set; ``classes`` optional.
        base_dir: folder relative paths in ``spec`` are resolved against (the manifest's folder).

    Raises:
        DatasetError: missing/empty folder, bad CSV row, unknown class (what, where, fix).
        ManifestError: a bad ``classes`` value (from ``resolve_class_names``).
    """
    given = [k for k in ("root", "list", "shards", "builtin") if getattr(spec, k) is not None]
    if len(given) != 1:
        raise DatasetError(
            f"dataset: exactly one of root, list, shards, builtin must be set, got {given or 'none'}. "
            "Fix: give an image folder (root:), a csv (list:), tar shards (shards:), or builtin: skimage."
        )
    classes = None
    if spec.classes is not None:
        classes = resolve_class_names(spec.classes, "dataset.classes", base_dir)
    if spec.builtin is not None:
        return _list_builtin(spec.builtin, classes)
    if spec.list is not None:
        return _list_csv(_resolve(spec.list, base_dir), classes)
    if spec.shards is not None:
        from kt_cache.shards import list_shards

        return list_shards(spec.shards, classes, base_dir)
    return _list_folder(_resolve(spec.root, base_dir), classes)


def _resolve(path: Path | str, base_dir: Path | None) -> Path:
    path = Path(path).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path.absolute()


def _finish(root: Path, entries: list[tuple[str, int]], classes: tuple[str, ...],
            description: dict[str, Any], ignored: list[str]) -> DatasetListing:
    """Sort ``(relpath, label)`` entries and build the listing with its fingerprint."""
    entries.sort(key=lambda e: e[0])
    ids = tuple(e[0] for e in entries)
    check_ids_storable(root, ids)
    labels = np.asarray([e[1] for e in entries], dtype=np.int32).reshape(len(entries))
    return DatasetListing(
        root=root, ids=ids, labels=labels, class_names=tuple(classes),
        fingerprint=dataset_fingerprint(root, ids), description=description,
        ignored=tuple(sorted(ignored)),
    )


SUSPECT_ID = re.compile(r"[\x00-\x1f\\]|^/|^[A-Za-z]:|(^|/)\.\.(/|$)|^$")


def check_ids_storable(root: Path, ids: tuple[str, ...]) -> None:
    """Refuse, before any store exists, a file name the store's readers would refuse as a sample id."""
    from kt_cache.store.checks import sample_id_problem

    for rel in filter(SUSPECT_ID.search, ids):     # one regex pass; the precise rule only for suspects
        problem = sample_id_problem(rel)
        if problem:
            raise DatasetError(f"dataset: the file {str(root / rel)!r} cannot be stored as a sample id: {problem}. "
                               "Fix: rename the file (or its folder), e.g. replace the character with '_', or move "
                               "it out of the dataset, then rerun.")


# ----------------------------------------------------------------------------------- image folder


def _walk_files(root: Path) -> list[str]:
    """Relative POSIX paths of every non-hidden file under ``root`` (symlinked folders followed once)."""
    found: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:          # a symlink loop or a folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if not name.startswith(".") and os.path.isfile(os.path.join(dirpath, name)):
                found.append(name if rel_dir == "." else f"{rel_dir}/{name}")
    return found


def _check_root(root: Path, what: str) -> None:
    if not root.exists():
        raise DatasetError(
            f"{what}: the dataset folder {root} does not exist. "
            "Fix: point dataset.root at an existing image folder (relative paths are resolved "
            "against the manifest's folder), or pass --data."
        )
    if not root.is_dir():
        raise DatasetError(
            f"{what}: {root} is a file, not a folder. Fix: dataset.root must be a folder of images "
            "(or class sub-folders); use dataset.list for a csv of paths."
        )


def class_of(lookup: ClassLookup, label: str, where: str) -> int | None:
    """The class index ``label`` names (name, WordNet id or synonym); None when none; ambiguous is an error."""
    try:
        return lookup.index(label)
    except AmbiguousClass as err:
        raise DatasetError(f"{where}: {err.hint()}") from None


def _folder_classes(root: Path, classes: tuple[str, ...] | None) -> tuple[tuple[str, ...], dict[str, int]]:
    """Class names and the label of each top-level sub-folder (a class name, WordNet id or synonym)."""
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = tuple(subdirs)
    lookup, index, unknown = ClassLookup(classes), {}, []
    for folder in subdirs:
        found = class_of(lookup, folder, f"dataset.root: sub-folder {str(root / folder)!r}")
        if found is None:
            unknown.append(folder)
        else:
            index[folder] = found
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(classes), n=3, cutoff=0.5)
        hint = f" Close class names: {close}." if close else ""
        raise DatasetError(
            f"dataset.root: sub-folder {str(root / unknown[0])!r} is not a name in dataset.classes "
            f"({len(unknown)} such folder(s): {unknown[:5]}).{hint} Fix: rename the folder to one of "
            "the class names, add it to dataset.classes, or remove dataset.classes to use the folder names."
        )
    return classes, index


def _list_folder(root: Path, classes: tuple[str, ...] | None, description: dict | None = None) -> DatasetListing:
    _check_root(root, "dataset.root")
    classes, index = _folder_classes(root, classes)
    entries: list[tuple[str, int]] = []
    ignored: list[str] = []
    for rel in _walk_files(root):
        if not is_image_file(rel):
            ignored.append(rel)
            continue
        top = rel.split("/", 1)[0] if "/" in rel else None
        entries.append((rel, index[top] if top is not None else -1))
    if not entries:
        shown = f" (e.g. {sorted(ignored)[:3]})" if ignored else ""
        raise DatasetError(
            f"dataset.root: no images found under {root}; saw {len(ignored)} non-image file(s){shown}. "
            f"Image extensions: {' '.join(IMAGE_EXTENSIONS)} (any case). Fix: point dataset.root at the "
            "folder that holds the images or their class sub-folders."
        )
    description = description or {"kind": "folder", "root": str(root)}
    return _finish(root, entries, classes, description, ignored)


# ----------------------------------------------------------------------------------- csv list


def _csv_rows(csv_path: Path) -> list[tuple[int, list[str]]]:
    """Non-empty rows with their 1-based line numbers, a header row (``path,label``, ``ImageId,label`` …) dropped."""
    if not csv_path.is_file():
        state = "is a folder" if csv_path.is_dir() else "does not exist"
        raise DatasetError(
            f"dataset.list: the csv {csv_path} {state}. Fix: give the path of a csv file with "
            "'path[,label]' rows (relative paths are resolved against the manifest's folder)."
        )
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if any(c.strip() for c in row)]
    if rows and is_header(rows[0][1]):
        rows = rows[1:]
    return rows


PATH_HEADERS = ("path", "imageid", "image", "file", "filename")   # ImageNet's validation CSVs say ImageId
LABEL_HEADERS = ("label", "class", "labelid", "wnid")


def is_header(cells: list[str]) -> bool:
    names = [c.strip().lower().replace("_", "") for c in cells]
    return bool(names) and names[0] in PATH_HEADERS and all(n in LABEL_HEADERS for n in names[1:])


def _csv_path(raw: str, where: str, folder: Path) -> str:
    """Validate one csv path cell: relative, inside the csv's folder, an existing file."""
    rel = PurePosixPath(raw.strip().replace("\\", "/"))
    if not raw.strip() or rel.is_absolute() or ".." in rel.parts or Path(raw.strip()).is_absolute():
        raise DatasetError(
            f"{where}: path {raw!r} must be relative to the csv's folder {folder} and stay inside it "
            "(no absolute paths, no '..'). Fix: move the csv next to the images or rewrite the path."
        )
    if not (folder / rel).is_file():
        raise DatasetError(
            f"{where}: image {str(folder / rel)!r} does not exist. "
            "Fix: correct the path (relative to the csv's folder) or remove the row."
        )
    return rel.as_posix()


def csv_label(lookup: ClassLookup, label: str, where: str) -> int | None:
    """A CSV label: a class form (``class_of``), else a 0-based class index (``281``)."""
    found = class_of(lookup, label, where)
    if found is None and label.isdigit() and int(label) < len(lookup.classes):
        return int(label)
    return found


def _list_csv(csv_path: Path, classes: tuple[str, ...] | None) -> DatasetListing:
    folder = csv_path.parent
    parsed: list[tuple[str, str]] = []
    first_line: dict[str, str] = {}
    for line, row in _csv_rows(csv_path):
        where = f"{csv_path}:{line}"
        if len(row) > 2:
            raise DatasetError(f"{where}: expected 'path[,label]', got {len(row)} columns {row}. "
                               "Fix: quote paths or labels that contain commas.")
        rel = _csv_path(row[0], where, folder)
        if rel in first_line:
            raise DatasetError(f"{where}: {rel!r} is listed twice (first at {first_line[rel]}). "
                               "Fix: list every image once.")
        first_line[rel] = where
        parsed.append((rel, row[1].strip() if len(row) == 2 else ""))
    if not parsed:
        raise DatasetError(f"dataset.list: {csv_path} lists no images. Fix: add 'path[,label]' rows.")
    if classes is None:
        classes = tuple(sorted({label for _, label in parsed if label}))
    lookup = ClassLookup(classes)
    entries = []
    for rel, label in parsed:
        found = csv_label(lookup, label, first_line[rel]) if label else -1
        if found is None:
            raise DatasetError(
                f"{first_line[rel]}: label {label!r} is not in dataset.classes.{did_you_mean(label, classes)} "
                "Fix: correct the label (a class name, WordNet id, synonym or 0-based index) or add it to dataset.classes."
            )
        entries.append((rel, found))
    return _finish(folder, entries, classes, {"kind": "csv", "list": str(csv_path), "root": str(folder)}, [])


# ----------------------------------------------------------------------------------- builtin


def builtin_dir(name: str = "skimage") -> Path:
    """Default folder of a built-in set: ``$KTC_DATA_DIR`` (else ``~/.cache/ktc``) ``/builtin/<name>-<version>``."""
    import skimage

    base = Path(os.environ["KTC_DATA_DIR"]) if os.environ.get("KTC_DATA_DIR") else Path.home() / ".cache" / "ktc"
    return (base / "builtin" / f"{name}-{skimage.__version__}").expanduser().absolute()


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]          # left image of the stereo pair
    return getattr(skimage.data, name)()


def _write_png_atomic(array: np.ndarray, target: Path) -> None:
    from PIL import Image

    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(array).save(f, format="PNG")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def materialize_builtin(name: str = "skimage", dest: Path | None = None) -> Path:
    """Write a built-in photo set as PNG files into ``dest`` (default ``builtin_dir(name)``); return it.

    Idempotent: existing files are kept untouched; each file is written to a temporary name and
    renamed, so a crash or a concurrent caller never leaves a partial image. ``skimage`` is the
    12 real photos ``SKIMAGE_PHOTOS`` that scikit-image ships inside its wheel (no download).
    """
    if name not in BUILTINS:
        raise DatasetError(f"dataset.builtin: unknown built-in set {name!r}.{did_you_mean(name, BUILTINS)} "
                           f"Fix: use one of {list(BUILTINS)}.")
    folder = Path(dest).absolute() if dest is not None else builtin_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    for photo in SKIMAGE_PHOTOS:
        target = folder / f"{photo}.png"
        if not target.is_file():
            _write_png_atomic(_skimage_photo(photo), target)
    return folder


def _list_builtin(name: str, classes: tuple[str, ...] | None) -> DatasetListing:
    folder = materialize_builtin(name)
    ids = [f"{photo}.png" for photo in SKIMAGE_PHOTOS]
    import skimage

    description = {"kind": "builtin", "builtin": name, "root": str(folder), "version": skimage.__version__}
    return _finish(folder, [(rel, -1) for rel in ids], classes or (), description, [])
