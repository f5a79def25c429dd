"""Class-name lists: inline names, the built-in "imagenet-1k" list, or a text file (one name a line)."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

from kt_cache.errors import ManifestError

BUILTIN_CLASS_LISTS = ("imagenet-1k",)


@functools.lru_cache(maxsize=1)   # asked once per teacher and for the dataset; timm re-reads its files each time
def imagenet_1k_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in logit order (timm's packaged synset descriptions).

    A tuple: the one cached object is shared by every caller, so it must not be mutable.
    """
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = [info.index_to_description(i) for i in range(info.num_classes())]
    # Two classes share the short name "crane" (bird 134, machine 517): names must be unique labels,
    # so a repeated name carries its WordNet id.
    repeated = repeated_names(names)
    return tuple(f"{n} ({info.index_to_label_name(i)})" if n in repeated else n for i, n in enumerate(names))


def resolve_class_names(value: tuple[str, ...] | list[str] | str, where: str, base: Path | None = None) -> tuple[str, ...]:
    """Turn a manifest ``classes:`` value into a tuple of names.

    Args:
        value: a list of names, "imagenet-1k", or a path to a UTF-8 text file with one name per line.
        where: "file:key" used in error messages.
        base: folder relative paths are resolved against (the manifest's folder).
    """
    if isinstance(value, (list, tuple)):
        names = tuple(str(v) for v in value)
    elif value == "imagenet-1k":
        names = imagenet_1k_names()
    else:
        path = Path(value) if base is None or Path(value).is_absolute() else base / value
        if not path.is_file():
            raise ManifestError(
                f"{where}: class list {value!r} is neither a built-in list ({', '.join(BUILTIN_CLASS_LISTS)}) "
                f"nor an existing file (looked for {path}). Fix: give a list of names, 'imagenet-1k', "
                "or the path of a text file with one class name per line."
            )
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not names:
        raise ManifestError(f"{where}: the class list is empty. Fix: give at least one class name.")
    dupes = sorted(repeated_names(names))
    if dupes:
        raise ManifestError(f"{where}: duplicate class names {dupes[:5]}. Fix: class names must be unique.")
    return names


def repeated_names(names: tuple[str, ...] | list[str]) -> set[str]:
    """The names occurring more than once; one counting pass (``names.count`` per name is O(C²))."""
    return {n for n, count in Counter(names).items() if count > 1}
