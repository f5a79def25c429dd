"""A store's rows are bound to the image contents, not just to names and sizes: every decode pass records a
content digest per sample (from the bytes it reads anyway) and a later pass or a merge that meets other
contents under the same name and size is refused, naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from extract_helpers import CLASSES, cnn_teacher, extract, vit_teacher, write_manifest
from kt_cache.cli import cli
from kt_cache.store import StoreReader


def bmp_folder(root: Path, seed: int = 0) -> Path:
    """Class folders of 24x24 BMPs: a BMP's size depends on its dimensions only, never on its pixels."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(root / name / f"img{i}.bmp")
    return root


def repaint(path: Path) -> None:
    before = path.stat().st_size
    Image.fromarray(np.full((24, 24, 3), 7, dtype=np.uint8)).save(path)
    assert path.stat().st_size == before, "same name, same size: the fingerprint cannot tell"


def test_added_teacher_over_changed_images_is_refused(tmp_path, fault_log):
    bmp_folder(tmp_path / "images")
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher(), vit_teacher()])
    assert extract(manifest, "--only", "cnn32").exit_code == 0
    assert StoreReader(str(tmp_path / "out.zarr")).sample("digest").any(axis=1).all()
    repaint(tmp_path / "images" / "bee" / "img1.bmp")
    result = extract(manifest)
    assert result.exit_code == 2, result.output
    assert "changed since this store recorded them" in result.output and "bee/img1.bmp" in result.output
    assert not StoreReader(str(tmp_path / "out.zarr"), consolidated=False).done("vit48").any(), \
        "no unit of the new teacher is written over other images"
    fault_log(6, "bad-input", "an image replaced by another of the same name and size, then a teacher is added",
              "ktc extract", 2, "refused before a unit is written, naming the file")


def test_unchanged_images_add_a_teacher(tmp_path):
    bmp_folder(tmp_path / "images")
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher(), vit_teacher()])
    assert extract(manifest, "--only", "cnn32").exit_code == 0
    assert extract(manifest).exit_code == 0
    assert CliRunner().invoke(cli, ["verify", str(tmp_path / "out.zarr")]).exit_code == 0


def test_merge_of_stores_of_different_contents_is_refused(tmp_path, fault_log):
    bmp_folder(tmp_path / "a" / "images")
    shutil.copytree(tmp_path / "a" / "images", tmp_path / "b" / "images")
    repaint(tmp_path / "b" / "images" / "cat" / "img0.bmp")
    assert extract(write_manifest(tmp_path / "a" / "t.yaml", [cnn_teacher()])).exit_code == 0
    assert extract(write_manifest(tmp_path / "b" / "t.yaml", [vit_teacher()])).exit_code == 0
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "a" / "out.zarr"), str(tmp_path / "b" / "out.zarr"),
                                      "--out", str(tmp_path / "c.zarr")])
    assert result.exit_code == 2, result.output
    assert "samples/digest differs" in result.output and "cat/img0.bmp" in result.output
    assert not (tmp_path / "c.zarr").exists()
    fault_log(6, "bad-input", "merge of two stores whose images share names and sizes but not contents",
              "ktc merge", 2, "refused naming the file; no output written")
