"""list_dataset: folders, csv lists, the built-in skimage set, fingerprints and every error path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kt_cache.datasets import (
    SKIMAGE_PHOTOS, dataset_fingerprint, is_image_file, list_dataset, materialize_builtin,
)
from kt_cache.errors import DatasetError
from kt_cache.manifest_types import DatasetSpec


def _img(path: Path, value: int = 0, size: tuple[int, int] = (4, 3)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


@pytest.fixture
def class_folder(tmp_path) -> Path:
    root = tmp_path / "train"
    _img(root / "dog" / "b.png")
    _img(root / "dog" / "a.JPG")
    _img(root / "cat" / "z.png")
    _img(root / "cat" / "deep" / "y.png")
    (root / "cat" / "notes.txt").write_text("x")
    (root / "dog" / ".hidden.png").write_bytes(b"x")
    return root


def test_module_stays_light():
    code = "import sys, kt_cache.datasets; print('torch' in sys.modules, 'timm' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["False", "False"]


def test_folder_with_classes(class_folder):
    listing = list_dataset(DatasetSpec(root=class_folder))
    assert listing.class_names == ("cat", "dog")
    assert listing.ids == ("cat/deep/y.png", "cat/z.png", "dog/a.JPG", "dog/b.png")
    assert listing.labels.dtype == np.int32
    assert listing.labels.tolist() == [0, 0, 1, 1]
    assert listing.ignored == ("cat/notes.txt",)
    assert listing.root == class_folder
    assert listing.description == {"kind": "folder", "root": str(class_folder)}
    assert len(listing.fingerprint) == 64


def test_relative_root_resolved_against_base_dir(class_folder):
    listing = list_dataset(DatasetSpec(root=Path("train")), base_dir=class_folder.parent)
    assert listing.root == class_folder and len(listing.ids) == 4


def test_explicit_classes_give_label_space(class_folder):
    listing = list_dataset(DatasetSpec(root=class_folder, classes=("dog", "bird", "cat")))
    assert listing.class_names == ("dog", "bird", "cat")
    assert listing.labels.tolist() == [2, 2, 0, 0]


def test_explicit_classes_missing_folder_name(class_folder):
    with pytest.raises(DatasetError) as info:
        list_dataset(DatasetSpec(root=class_folder, classes=("dog", "cats")))
    msg = str(info.value)
    assert str(class_folder / "cat") in msg and "cats" in msg and "Fix" in msg


def test_flat_folder_unlabelled(tmp_path):
    for name in ("b.jpeg", "a.png", "c.webp"):
        _img(tmp_path / name)
    listing = list_dataset(DatasetSpec(root=tmp_path))
    assert listing.ids == ("a.png", "b.jpeg", "c.webp")
    assert listing.labels.tolist() == [-1, -1, -1]
    assert listing.class_names == ()


def test_order_and_fingerprint(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    first = list_dataset(DatasetSpec(root=tmp_path))
    assert list_dataset(DatasetSpec(root=tmp_path)).fingerprint == first.fingerprint
    assert first.fingerprint == dataset_fingerprint(tmp_path, first.ids)
    _img(tmp_path / "b.png", size=(40, 30))                     # same name, other size
    resized = list_dataset(DatasetSpec(root=tmp_path))
    assert resized.ids == first.ids and resized.fingerprint != first.fingerprint
    _img(tmp_path / "c.png")
    added = list_dataset(DatasetSpec(root=tmp_path))
    assert added.fingerprint not in (first.fingerprint, resized.fingerprint)


def test_extensions():
    assert is_image_file("x.JPEG") and is_image_file("a/b.tiff") and is_image_file("p.PGM")
    assert not is_image_file("x.txt") and not is_image_file("x")


def test_empty_folder_error(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "labels.json").write_text("{}")
    with pytest.raises(DatasetError, match="no images.*2 non-image"):
        list_dataset(DatasetSpec(root=tmp_path))


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        list_dataset(DatasetSpec(root=tmp_path / "nope"))


def test_root_is_a_file(tmp_path):
    path = _img(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="is a file"):
        list_dataset(DatasetSpec(root=path))


# ------------------------------------------------------------------------------------------- csv


@pytest.fixture
def csv_folder(tmp_path) -> Path:
    _img(tmp_path / "img" / "b.png")
    _img(tmp_path / "img" / "a.png")
    _img(tmp_path / "c.png")
    return tmp_path


def test_csv_with_header_and_labels(csv_folder):
    (csv_folder / "train.csv").write_text("path,label\nimg/b.png,dog\nimg/a.png,cat\nc.png,\n")
    listing = list_dataset(DatasetSpec(list=csv_folder / "train.csv"))
    assert listing.ids == ("c.png", "img/a.png", "img/b.png")
    assert listing.class_names == ("cat", "dog")
    assert listing.labels.tolist() == [-1, 0, 1]
    assert listing.root == csv_folder
    assert listing.description["kind"] == "csv"
    assert listing.description["list"] == str(csv_folder / "train.csv")


def test_csv_without_header_or_labels(csv_folder):
    (csv_folder / "l.csv").write_text("img/b.png\n\n./c.png\n")
    listing = list_dataset(DatasetSpec(list=csv_folder / "l.csv"))
    assert listing.ids == ("c.png", "img/b.png")
    assert listing.labels.tolist() == [-1, -1] and listing.class_names == ()


def test_csv_explicit_classes(csv_folder):
    (csv_folder / "l.csv").write_text("img/b.png,dog\nimg/a.png,cat\n")
    listing = list_dataset(DatasetSpec(list=csv_folder / "l.csv", classes=("dog", "cat", "cow")))
    assert listing.class_names == ("dog", "cat", "cow")
    assert listing.labels.tolist() == [1, 0]
    with pytest.raises(DatasetError, match=r"l\.csv:2.*'cat'"):
        list_dataset(DatasetSpec(list=csv_folder / "l.csv", classes=("dog", "cow")))


@pytest.mark.parametrize("bad", ["../outside.png", "img/../../outside.png", "/etc/passwd"])
def test_csv_escaping_path(csv_folder, bad):
    (csv_folder / "l.csv").write_text(f"path,label\nc.png,x\n{bad},x\n")
    with pytest.raises(DatasetError, match=r"l\.csv:3.*relative"):
        list_dataset(DatasetSpec(list=csv_folder / "l.csv"))


def test_csv_missing_image(csv_folder):
    (csv_folder / "l.csv").write_text("c.png\nimg/gone.png\n")
    with pytest.raises(DatasetError, match=r"l\.csv:2.*does not exist"):
        list_dataset(DatasetSpec(list=csv_folder / "l.csv"))


def test_csv_duplicate_and_missing_csv(csv_folder):
    (csv_folder / "l.csv").write_text("c.png\nc.png\n")
    with pytest.raises(DatasetError, match="twice"):
        list_dataset(DatasetSpec(list=csv_folder / "l.csv"))
    with pytest.raises(DatasetError, match="does not exist"):
        list_dataset(DatasetSpec(list=csv_folder / "none.csv"))


# ------------------------------------------------------------------------------------------- builtin


def test_builtin_skimage(tmp_path, monkeypatch):
    monkeypatch.setenv("KTC_DATA_DIR", str(tmp_path))
    listing = list_dataset(DatasetSpec(builtin="skimage"))
    assert listing.root.is_relative_to(tmp_path / "builtin")
    assert listing.ids == tuple(sorted(f"{n}.png" for n in SKIMAGE_PHOTOS))
    assert len(listing.ids) >= 10 and (listing.labels == -1).all()
    assert listing.description["kind"] == "builtin" and listing.description["builtin"] == "skimage"
    with Image.open(listing.root / "astronaut.png") as im:
        assert im.size == (512, 512) and im.mode == "RGB"
        assert np.asarray(im).std() > 20                          # a real photo, not a blank
    mtimes = {p.name: p.stat().st_mtime_ns for p in listing.root.iterdir()}
    again = list_dataset(DatasetSpec(builtin="skimage"))
    assert again.fingerprint == listing.fingerprint
    assert {p.name: p.stat().st_mtime_ns for p in listing.root.iterdir()} == mtimes   # nothing rewritten
    assert not [p for p in listing.root.iterdir() if p.name.startswith(".")]          # no temp leftovers


def test_builtin_dest_and_unknown(tmp_path):
    folder = materialize_builtin("skimage", dest=tmp_path / "sk")
    assert folder == tmp_path / "sk" and len(list(folder.glob("*.png"))) == len(SKIMAGE_PHOTOS)
    with pytest.raises(DatasetError, match="skimage"):
        materialize_builtin("skimag")
