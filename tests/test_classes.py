"""Class-name lists: the ImageNet-1k list is built once and cannot be changed by a caller; duplicates are refused."""

from __future__ import annotations

import pytest
import timm.data

from kt_cache.classes import imagenet_1k_names, repeated_names, resolve_class_names
from kt_cache.errors import ManifestError


@pytest.fixture
def info_builds(monkeypatch):
    """Counts the timm ``ImageNetInfo`` objects made (each re-reads timm's class files), on a cold cache."""
    built = []
    real = timm.data.ImageNetInfo
    monkeypatch.setattr(timm.data, "ImageNetInfo", lambda *a, **k: built.append(1) or real(*a, **k))
    imagenet_1k_names.cache_clear()
    yield built
    imagenet_1k_names.cache_clear()         # later callers get a list built by the real timm class


def test_imagenet_list_is_read_once_for_every_teacher(info_builds):
    lists = [resolve_class_names("imagenet-1k", f"teacher t{i}: classes") for i in range(5)]
    lists.append(imagenet_1k_names())
    assert len(info_builds) == 1
    assert all(names is lists[0] for names in lists)
    assert len(lists[0]) == 1000 and len(set(lists[0])) == 1000


def test_callers_cannot_change_the_cached_list(info_builds):
    names = imagenet_1k_names()
    assert isinstance(names, tuple)
    with pytest.raises(TypeError):
        names[0] = "changed"                 # type: ignore[index]
    mine = list(resolve_class_names("imagenet-1k", "dataset.classes"))
    mine[0] = "changed"
    assert imagenet_1k_names()[0] == "tench, Tinca tinca" and imagenet_1k_names() == names


def test_imagenet_repeated_short_names_carry_their_wordnet_id():
    names = imagenet_1k_names()
    assert names[134] == "crane (n02012849)" and names[517] == "crane (n03126707)"


def test_repeated_names_counts_each_name_once():
    names = ["b", "a", "c", "a", "b", "a", "d"]
    assert repeated_names(names) == {n for n in names if names.count(n) > 1} == {"a", "b"}
    assert repeated_names(()) == set() and repeated_names(["x", "y"]) == set()


def test_duplicate_error_lists_the_first_five_sorted():
    names = [f"c{i}" for i in (7, 3, 9, 1, 5, 8, 2)] * 2 + ["unique"]
    with pytest.raises(ManifestError) as err:
        resolve_class_names(names, "teachers[0].classes")
    assert str(err.value) == ("teachers[0].classes: duplicate class names ['c1', 'c2', 'c3', 'c5', 'c7']. "
                              "Fix: class names must be unique.")


def test_duplicates_in_a_class_file_are_refused(tmp_path):
    (tmp_path / "classes.txt").write_text("cat\ndog\n\ncat\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"dataset\.classes: duplicate class names \['cat'\]"):
        resolve_class_names("classes.txt", "dataset.classes", base=tmp_path)
    assert resolve_class_names(["cat", "dog"], "x") == ("cat", "dog")
