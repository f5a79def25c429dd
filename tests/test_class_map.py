"""A teacher's ``class_map:``: its own class names mapped onto the dataset's target classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from extract_helpers import cnn_teacher, extract, make_image_folder, write_manifest
from kt_cache.cli import cli
from kt_cache.store import StoreReader

OWN = ["formica", "apis", "felis"]     # the lab's names for the teacher's 3 logits


def project(tmp_path, class_map):
    make_image_folder(tmp_path / "images", per_class=2)
    teacher = cnn_teacher(classes=OWN, class_map=class_map)
    return write_manifest(tmp_path / "teachers.yaml", [teacher], unit_rows=2)


@pytest.mark.parametrize("form", ["mapping", "csv"])
def test_mapped_classes_cover_the_targets_they_name(tmp_path, form):
    if form == "csv":
        (tmp_path / "map.csv").write_text("teacher_class,target_class\nformica,ant\napis,bee\n")
        class_map = "map.csv"
    else:
        class_map = {"formica": "ant", "apis": "BEE"}        # any form ClassLookup knows: case-insensitive
    manifest = project(tmp_path, class_map)
    dry = extract(manifest, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "covers 2/3 target classes (missing: cat)" in dry.output
    assert extract(manifest).exit_code == 0
    reader = StoreReader(tmp_path / "out.zarr")
    attrs = reader.teacher_attrs("cnn32")
    assert attrs["class_names"] == ["ant", "bee", "felis"]
    assert attrs["entry"]["class_map"] == (class_map if form == "csv" else [list(p) for p in class_map.items()])
    labels, label_logit = reader.sample("label"), reader.read("cnn32", "label_logit")
    names = np.array(reader.class_names)[labels]
    assert np.isfinite(label_logit[names != "cat"]).all() and np.isnan(label_logit[names == "cat"]).all()
    info = json.loads(CliRunner().invoke(cli, ["info", str(tmp_path / "out.zarr"), "--json"]).output)
    assert info["teachers"][0]["coverage"]["covered"] == 2


@pytest.mark.parametrize("class_map, message", [
    ({"formika": "ant"}, "'formika' is not one of the teacher's 3 classes. Did you mean \"formica\"?"),
    ({"formica": "wasp"}, "target class 'wasp' (for 'formica') is not a class of the dataset"),
    ({"formica": "ant", "apis": "ant"}, "'formica' and 'apis' both map to the target class 'ant'"),
    ({"formica": "felis"}, "is not a class of the dataset"),
    ("missing.csv", "class map file 'missing.csv' does not exist"),
])
def test_bad_class_maps_are_usage_errors_naming_the_key(tmp_path, class_map, message):
    result = extract(project(tmp_path, class_map), "--dry-run")
    assert result.exit_code == 2, result.output
    assert message in result.output and "teachers.yaml:teachers[0].class_map" in result.output


def test_a_class_map_needs_logits(tmp_path):
    make_image_folder(tmp_path / "images", per_class=1)
    teacher = {k: v for k, v in cnn_teacher(outputs=["features"], class_map={"a": "ant"}).items()
               if k not in ("logits", "featmap")}
    write_manifest(tmp_path / "teachers.yaml", [teacher])
    result = extract(tmp_path / "teachers.yaml", "--dry-run")
    assert result.exit_code == 2 and "class_map: names the teacher's logits" in result.output
