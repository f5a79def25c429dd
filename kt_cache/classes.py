"""Class-name lists: inline names, the built-in "imagenet-1k" list, or a text file (one name a line);
and ``ClassLookup``, which finds a class by the name, WordNet id or synonym a dataset writes it with."""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from kt_cache.errors import ManifestError

BUILTIN_CLASS_LISTS = ("imagenet-1k",)


@functools.lru_cache(maxsize=1)
def imagenet_1k_wnids() -> tuple[str, ...]:
    """WordNet ids of the 1000 ImageNet-1k classes, in logit order (``n01440764`` = tench = 0)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_label_name(i) for i in range(info.num_classes()))


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


class ClassLookup:
    """Label index of a class written the way datasets write it.

    For a list of names: the exact name, then the name in any case, then any of its comma-separated
    synonyms in any case (``"tabby cat"`` -> ``"tabby, tabby cat"``). For the built-in ImageNet-1k list also
    its WordNet id (``n02123045``), the form of ImageNet's folders. A form shared by several classes is
    ambiguous and refused, with the classes it could mean.
    """

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = tuple(classes)
        self.exact = {name: i for i, name in enumerate(self.classes)}
        self.forms: dict[str, set[int]] = {}
        wnids = imagenet_1k_wnids() if self.classes == imagenet_1k_names() else ()
        for index, name in enumerate(self.classes):
            for form in class_forms(name, wnids[index] if wnids else None):
                self.forms.setdefault(form, set()).add(index)

    def index(self, label: str) -> int | None:
        """The class index of ``label``; None when no class has that form; AmbiguousClass when several do."""
        if label in self.exact:
            return self.exact[label]
        found = self.forms.get(label.strip().lower(), set())
        if len(found) > 1:
            raise AmbiguousClass(label, [self.classes[i] for i in sorted(found)])
        return next(iter(found)) if found else None


class AmbiguousClass(Exception):
    """A class form (a synonym) that several classes share."""

    def __init__(self, label: str, candidates: list[str]) -> None:
        super().__init__(label)
        self.label, self.candidates = label, candidates

    def hint(self) -> str:
        return (f"{self.label!r} is ambiguous: it names {len(self.candidates)} classes ({self.candidates[:4]}). "
                "Fix: use the full class name or the WordNet id.")


def class_forms(name: str, wnid: str | None) -> set[str]:
    """Lower-case forms a class is recognised by: its name, its synonyms, its WordNet id."""
    base = re.sub(r"\s*\((n\d{8})\)$", "", name)        # "crane (n02012849)": the id made it unique
    forms = {name.lower(), base.lower(), *(part.strip().lower() for part in base.split(",") if part.strip())}
    return forms | ({wnid.lower()} if wnid else set())


def target_to_teacher(target: Sequence[str], teacher: Sequence[str]) -> list[int]:
    """For each target class, the index of the teacher's logit for it, or -1: by exact name, then by any
    form ``ClassLookup`` knows (a folder ``tabby cat`` finds ImageNet's ``tabby, tabby cat``; an ambiguous
    form counts as not covered). Extraction and training both map classes through this one function."""
    exact = {name: i for i, name in enumerate(teacher)}
    lookup: ClassLookup | None = None
    found = []
    for name in target:
        if name not in exact:
            lookup = lookup or ClassLookup(teacher)
            try:
                index = lookup.index(name)
            except AmbiguousClass:
                index = None
            found.append(-1 if index is None else index)
        else:
            found.append(exact[name])
    return found


def coverage(target: Sequence[str], teacher: Sequence[str] | None) -> tuple[int, list[str]]:
    """(how many target classes the teacher has a logit for, the uncovered ones in target order)."""
    mapped = target_to_teacher(target, teacher) if teacher is not None else [-1] * len(target)
    return sum(i >= 0 for i in mapped), [name for name, i in zip(target, mapped) if i < 0]


def read_class_map(value: tuple[tuple[str, str], ...] | str, where: str, base: Path | None = None) -> list[tuple[str, str]]:
    """A teacher's ``class_map:`` as (teacher class, target class) pairs: inline, or a CSV file with the
    columns ``teacher_class,target_class`` (a header row naming them is skipped)."""
    import csv

    if not isinstance(value, str):
        return list(value)
    path = Path(value) if base is None or Path(value).is_absolute() else base / value
    if not path.is_file():
        raise ManifestError(f"{where}: class map file {value!r} does not exist (looked for {path}). Fix: give the path "
                            "of a CSV file with the columns teacher_class,target_class, or an inline mapping.")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    if rows and [c.strip() for c in rows[0]] == ["teacher_class", "target_class"]:
        rows = rows[1:]
    bad = [i for i, row in enumerate(rows, 1) if len(row) != 2 or not all(c.strip() for c in row)]
    if bad or not rows:
        raise ManifestError(f"{where}: {path} must hold rows 'teacher_class,target_class' (two non-empty columns); "
                            f"{'it is empty' if not rows else f'row {bad[0]} is not'}. Fix: write one pair per line.")
    return [(a.strip(), b.strip()) for a, b in rows]


def apply_class_map(teacher: Sequence[str], pairs: list[tuple[str, str]], target: Sequence[str], where: str) -> tuple[str, ...]:
    """The teacher's logit names with each mapped class renamed to its target class (canonical target name);
    unmapped classes keep their names. Refuses unknown teacher or target classes and two logits for one class."""
    from kt_cache.errors import did_you_mean

    if not target:
        raise ManifestError(f"{where}: a class map needs the dataset's target classes, and this dataset has none. "
                            "Fix: use a labelled dataset (class folders, a CSV with labels, or dataset.classes).")
    own, lookup, renamed, seen = list(teacher), ClassLookup(list(target)), {}, {}
    for source, wanted in pairs:
        if source not in own:
            raise ManifestError(f"{where}: {source!r} is not one of the teacher's {len(own)} classes."
                                f"{did_you_mean(source, own)} Fix: use the teacher's class names (its `classes:`).")
        try:
            index = lookup.index(wanted)
        except AmbiguousClass as err:
            raise ManifestError(f"{where}: {source!r} -> {err.hint()}") from err
        if index is None:
            raise ManifestError(f"{where}: target class {wanted!r} (for {source!r}) is not a class of the dataset."
                                f"{did_you_mean(wanted, list(target))} Fix: name a target class, its WordNet id or a synonym.")
        if index in seen:
            raise ManifestError(f"{where}: {seen[index]!r} and {source!r} both map to the target class "
                                f"{target[index]!r}; one target class takes one logit. Fix: map only one of them.")
        seen[index], renamed[source] = source, target[index]
    names = tuple(renamed.get(name, name) for name in own)
    clash = repeated_names(names)
    if clash:
        raise ManifestError(f"{where}: after mapping, the teacher would have two logits named {sorted(clash)[:3]}. "
                            "Fix: map the teacher class of that name too, or leave the other one out of the map.")
    return names
