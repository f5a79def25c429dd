"""``ktc train`` reads ``samples/*`` through the same checks as info/verify: a hostile shape or dtype is a
clear StoreError (exit 1) before any allocation, never terabytes of RAM or a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from extract_helpers import edit_metadata

from kt_cache.cli import cli

TRAIN = ["--student", "resnet10t", "--img-size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0",
         "--no-progress", "--method", "kd"]


def edit_label_array(store: Path, change) -> None:
    """Change every stored copy of samples/label's metadata, as an attacker would."""
    edit_metadata(store, "samples/label", change)


@pytest.mark.parametrize("case,change,expect", [
    ("shape 2^40 rows", lambda d: d.update(shape=[1 << 40]), "shape"),
    ("float64 dtype", lambda d: d.update(data_type="float64", fill_value=-1.0), "float64"),
])
def test_train_refuses_hostile_sample_arrays(two_teacher_store, tmp_path, case, change, expect, fault_log):
    store = Path(shutil.copytree(two_teacher_store, tmp_path / "s.zarr"))
    edit_label_array(store, change)
    result = CliRunner().invoke(cli, ["train", "--cache", str(store), "--out", str(tmp_path / "run"), *TRAIN])
    assert result.exit_code == 1, result.output
    assert "samples/label" in result.output and expect in result.output and "Traceback" not in result.output
    assert not isinstance(result.exception, MemoryError)
    fault_log(3, "bad-input", f"hostile samples/label: {case}", "ktc train", 1,
              "StoreError naming samples/label, expected vs got, before any allocation")
