"""Manifest inputs that used to bypass provenance, claim more than the store holds, or get a misleading
message: each is refused (or clamped) with a message naming the key, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

from extract_helpers import cnn_teacher, extract, make_image_folder, write_manifest
from kt_cache.cli import cli


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images", per_class=2)


def manifest_with(tmp_path: Path, teacher: dict, views: int = 2) -> Path:
    return write_manifest(tmp_path / "teachers.yaml", [teacher], views=views)


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg_overlay"])
def test_weight_loading_model_args_are_refused_before_any_load(images, tmp_path, key, fault_log):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not read")
    value = str(weights) if key == "checkpoint_path" else {"file": str(weights)}
    manifest = manifest_with(tmp_path, cnn_teacher(model_args={"num_classes": 3, key: value}))
    for extra in (("--dry-run",), ()):
        result = extract(manifest, *extra)
        assert result.exit_code == 2, result.output
        assert f"teachers[0].model_args.{key}" in result.output and "`checkpoint:`" in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "out.zarr").exists()
    fault_log(5, "bad-input", f"model_args.{key} pointing at a weights file", "ktc extract [--dry-run]", 2,
              "refused before any load: says to use checkpoint: (recorded with sha256)")


def test_topk_larger_than_the_classes_is_recorded_as_stored(images, tmp_path, fault_log):
    manifest = manifest_with(tmp_path, cnn_teacher(logits={"topk": 5000}))
    result = extract(manifest)
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(tmp_path / "out.zarr" / "teachers" / "cnn32"), mode="r")
    assert group["logits_topk/values"].shape[-1] == 3
    assert group.attrs["ktc_teacher"]["logits_topk"] == 3
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "out.zarr"), "--json"])
    assert info.exit_code == 0 and '"logits_topk": 5000' not in info.output
    rerun = extract(manifest)
    assert rerun.exit_code == 0, rerun.output   # the same manifest still resumes
    fault_log(12, "bad-input", "logits: {topk: 5000} on a 3-class teacher", "ktc extract", 0,
              "k clamped to 3; attrs record 3 (the stored k); rerun resumes")


def test_views_count_has_the_readers_upper_bound(images, tmp_path, fault_log):
    manifest = manifest_with(tmp_path, cnn_teacher(), views=100_000_000)
    result = extract(manifest, "--dry-run")
    assert result.exit_code == 2
    assert "views.count" in result.output and "<= 4096" in result.output and "100000000" in result.output
    fault_log(12, "bad-input", "views.count: 100000000", "ktc extract --dry-run", 2,
              "refused at once: expected an integer >= 1 and <= 4096 (the store reader's limit)")


@pytest.mark.parametrize("bad,hint", [("a..b", "'a_b'"), ("../../x", "'x'")])
def test_id_hint_suggests_a_valid_id(images, tmp_path, bad, hint, fault_log):
    result = extract(manifest_with(tmp_path, cnn_teacher(id=bad)), "--dry-run")
    assert result.exit_code == 2 and f"Fix: use e.g. {hint}." in result.output, result.output
    ok = extract(manifest_with(tmp_path, cnn_teacher(id=hint.strip("'"))), "--dry-run")
    assert ok.exit_code == 0, ok.output
    fault_log(14, "bad-input", f"teacher id {bad!r}", "ktc extract --dry-run", 2, f"refused; suggests {hint}, which is valid")


@pytest.mark.parametrize("target,kind", [(".", "is a folder"), ("/dev/null", "is not a regular file")])
def test_checkpoint_that_is_a_folder_or_device_is_named_as_such(images, tmp_path, target, kind, fault_log):
    teacher = cnn_teacher(checkpoint=target)
    teacher.pop("pretrained")
    result = extract(manifest_with(tmp_path, teacher), "--dry-run")
    assert result.exit_code == 2 and kind in result.output and "does not exist" not in result.output, result.output
    fault_log(14, "bad-input", f"checkpoint: {target}", "ktc extract --dry-run", 2, f"'{kind}', with the fix")


def test_negative_num_classes_is_reported_as_given(images, tmp_path, fault_log):
    result = extract(manifest_with(tmp_path, cnn_teacher(model_args={"num_classes": -3})), "--dry-run")
    assert result.exit_code == 2 and "model_args.num_classes" in result.output and "-3" in result.output
    assert "num_classes=0" not in result.output
    fault_log(14, "bad-input", "model_args: {num_classes: -3}", "ktc extract --dry-run", 2,
              "expected an integer >= 0, got int -3")


@pytest.mark.parametrize("word", ["yes", "on", "no"])
def test_yaml_1_1_booleans_are_refused_where_true_false_is_expected(images, tmp_path, word, fault_log):
    manifest = manifest_with(tmp_path, cnn_teacher())
    manifest.write_text(manifest.read_text().replace("seed: 0", f"seed: 0\n  flip: {word}"))
    result = extract(manifest, "--dry-run")
    assert result.exit_code == 2 and "views.flip" in result.output and "true or false" in result.output
    assert f"'{word}'" in result.output
    fault_log(14, "bad-input", f"views.flip: {word}", "ktc extract --dry-run", 2, "expected true or false, got str")
