"""File names that are legal on Linux but cannot be sample ids (a backslash, a leading drive letter, a
newline) are refused when the dataset is listed, naming the file, before a store exists."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from extract_helpers import cnn_teacher, make_image_folder, write_manifest
from kt_cache.cli import cli

ODD = {"backslash": "ant/cat\\img.jpg", "drive letter": "c:img.jpg", "newline": "ant/img\n2.jpg",
       "tab": "ant/img\t2.jpg"}   # a drive letter matters at the start of the id: a top-level file


@pytest.mark.parametrize("kind", sorted(ODD))
@pytest.mark.parametrize("command", [("extract", "--dry-run"), ("extract",)])
def test_odd_file_name_refused_at_listing(tmp_path, kind, command, fault_log):
    images = make_image_folder(tmp_path / "images", per_class=2)
    shutil.copy(images / "ant" / "img000.jpg", images / ODD[kind])
    write_manifest(tmp_path / "teachers.yaml", [cnn_teacher()])
    result = CliRunner().invoke(cli, [*command, "--manifest", str(tmp_path / "teachers.yaml"), "--workers", "0",
                                      "--no-progress"])
    assert result.exit_code == 2, result.output
    assert repr(str(images / ODD[kind])) in result.output and "rename the file" in result.output
    assert not (tmp_path / "out.zarr").exists(), "no half-created store"
    fault_log(7, "bad-input", f"an image file name with a {kind}", "ktc " + " ".join(command), 2,
              "refused at listing, naming the file; no store created")
