"""``ktc extract`` failures that must not pin anything: a teacher that failed before any of its units
finished (bad checkpoint, wrong architecture) is re-created from the corrected manifest without
``--overwrite``, because nothing would be lost; a teacher with finished units stays protected."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from extract_helpers import cnn_teacher, extract, make_image_folder, vit_teacher, write_manifest
from kt_cache.cli import cli


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images", per_class=2)


@pytest.mark.parametrize("fault", ["corrupt checkpoint", "wrong architecture"])
def test_teacher_failed_before_any_unit_reruns_without_overwrite(tmp_path, images, fault, fault_log):
    if fault == "corrupt checkpoint":
        (tmp_path / "weights.safetensors").write_bytes(b"not a safetensors file at all")
        broken = vit_teacher(checkpoint="weights.safetensors")
    else:
        broken = vit_teacher(model_args={"img_size": 48, "num_classes": 3, "depth": 2, "embed_dim": 7})
    write_manifest(tmp_path / "teachers.yaml", [cnn_teacher(), broken])
    failed = extract(tmp_path / "teachers.yaml")
    assert failed.exit_code in (1, 2), failed.output
    assert "Traceback" not in failed.output
    write_manifest(tmp_path / "teachers.yaml", [cnn_teacher(), vit_teacher()])
    fixed = extract(tmp_path / "teachers.yaml")
    assert fixed.exit_code == 0, fixed.output
    assert "--overwrite" not in fixed.output
    assert CliRunner().invoke(cli, ["verify", str(tmp_path / "out.zarr")]).exit_code == 0
    fault_log(13, "bad-input", f"{fault}: the teacher fails before any unit, then the manifest is corrected",
              "ktc extract", 0, "the corrected entry runs without --overwrite; the other teacher resumes",
              bytes_lost=0)


def test_teacher_with_finished_units_stays_pinned(tmp_path, images, fault_log):
    write_manifest(tmp_path / "teachers.yaml", [cnn_teacher()])
    assert extract(tmp_path / "teachers.yaml").exit_code == 0
    write_manifest(tmp_path / "teachers.yaml", [cnn_teacher(logits={"topk": 3})])
    changed = extract(tmp_path / "teachers.yaml")
    assert changed.exit_code != 0 and "--overwrite" in changed.output, changed.output
    fault_log(13, "bad-input", "a finished teacher's manifest entry is changed", "ktc extract",
              changed.exit_code, "refused, naming --overwrite: finished units are never dropped silently")


def test_complete_store_rerun_says_nothing_to_do(tmp_path, images):
    write_manifest(tmp_path / "teachers.yaml", [cnn_teacher()])
    assert extract(tmp_path / "teachers.yaml").exit_code == 0
    again = CliRunner().invoke(cli, ["extract", "--manifest", str(tmp_path / "teachers.yaml"), "--workers", "0"])
    assert again.exit_code == 0, again.output
    assert "complete, nothing to do" in again.output and "0img" not in again.output and "wave 1/1" not in again.output
