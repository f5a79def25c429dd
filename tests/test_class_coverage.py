"""Label spaces that say how well they map: every teacher's coverage of the target classes is shown by
--dry-run, the end-of-extraction table and ``ktc info`` (and --json); a predictive teacher that covers none
is a dry-run warning and a train error naming the fix; teacher classes map by name, synonym or WordNet id."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from extract_helpers import cnn_teacher, make_image_folder, write_manifest
from kt_cache.cli import cli
from kt_cache.store import StoreReader

TARGET = ("tabby cat", "n01440764", "cat")        # a synonym, a WordNet id, and a class ImageNet lacks


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("coverage")
    make_image_folder(base / "images", per_class=2, classes=TARGET)
    imagenet = cnn_teacher(id="imnet", classes="imagenet-1k", model_args={"num_classes": 1000})
    blind = cnn_teacher(id="blind", classes=["x", "y", "z"])
    write_manifest(base / "teachers.yaml", [imagenet, blind])
    return base


def test_dry_run_shows_coverage_and_warns_about_a_blind_teacher(project):
    result = run("extract", "--manifest", project / "teachers.yaml", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "covers 2/3 target classes (missing: cat)" in result.output
    assert "covers 0/3 target classes" in result.output and "warning: teacher blind is predictive" in result.output
    assert "role: descriptive" in result.output


def test_extraction_info_and_train_report_coverage(project):
    result = run("extract", "--manifest", project / "teachers.yaml", "--workers", "0", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "imnet: covers 2/3 target classes (missing: cat)" in result.output
    store = project / "out.zarr"
    assert "covers 0/3 target classes" in run("info", store).output
    teachers = {t["id"]: t["coverage"] for t in json.loads(run("info", "--json", store).output)["teachers"]}
    assert teachers["imnet"] == {"covered": 2, "classes": 3, "missing": ["cat"], "n_missing": 1}
    reader = StoreReader(str(store))
    labels, logit = reader.sample("label"), reader.read("imnet", "label_logit")[:, 0]
    cat = reader.class_names.index("cat")             # the one target class ImageNet has no logit for
    covered = labels != cat                            # tabby cat and the tench wnid map onto ImageNet classes
    assert np.isfinite(logit[covered]).all() and np.isnan(logit[~covered]).all()
    refused = run("train", "--cache", store, "--method", "kd", "--epochs", "1", "--out", project / "run")
    assert refused.exit_code == 2, refused.output
    assert "blind" in refused.output and "--teachers imnet" in refused.output and "role: descriptive" in refused.output
    chosen = run("train", "--cache", store, "--method", "kd", "--epochs", "1", "--teachers", "imnet", "--workers", "0",
                 "--no-progress", "--out", project / "run")
    assert chosen.exit_code == 0, chosen.output


def test_dry_run_warns_about_hub_weights_this_machine_cannot_get(tmp_path, teacher_offline_hub):
    make_image_folder(tmp_path / "images", per_class=1)
    hub = cnn_teacher(id="hubnet", model="resnet10t.c3_in1k", pretrained=None, model_args={},
                      classes="imagenet-1k")
    manifest = write_manifest(tmp_path / "teachers.yaml", [hub, cnn_teacher()])
    result = run("extract", "--manifest", manifest, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "warning: teacher hubnet loads its weights from the model hub" in result.output
    assert "checkpoint:" in result.output and "pretrained: none" in result.output
    assert "warning: teacher cnn32 loads" not in result.output, "random-init teachers need no hub"
