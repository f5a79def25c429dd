"""An object that ``ktc-objects.json`` lists but the store lost is an error for every reader and every
copy (zarr alone would read it as fill values), never NaN-zeroed rows or a shrunken run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from kt_cache.cli import cli

TRAIN = ["--student", "resnet10t", "--img-size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0",
         "--no-progress", "--method", "kd"]


@pytest.fixture()
def store(two_teacher_store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(two_teacher_store, tmp_path / "in" / "s.zarr"))


def chunk(store: Path, array: str) -> Path:
    found = sorted(p for p in (store / array / "c").rglob("*") if p.is_file())
    assert found, f"no chunk objects under {array}"
    return found[0]


def invoke(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("array", ["teachers/vit48/logits", "samples/ok", "teachers/cnn32/featmap"])
def test_train_refuses_a_store_that_lost_a_listed_chunk(store, tmp_path, array, fault_log):
    lost = chunk(store, array)
    lost.unlink()
    result = invoke("train", "--cache", store, "--out", tmp_path / "run", *TRAIN,
                    *(["--method", "kpu"] if "featmap" in array else []))
    key = lost.relative_to(store).as_posix()
    assert result.exit_code == 1, result.output
    assert "are missing" in result.output and key in result.output and array in result.output, result.output
    assert "Traceback" not in result.output and "rerun `ktc extract`" in result.output
    fault_log(1, "damage", f"one {array} chunk deleted", "ktc train", 1,
              "refused before training: names the array, the chunk key and the fix")


@pytest.mark.parametrize("command", ["subset", "merge", "pack"])
def test_copies_refuse_a_source_that_lost_a_listed_object(store, tmp_path, command, fault_log):
    chunk(store, "teachers/cnn32/features").unlink()
    out = tmp_path / ("out.zip" if command == "pack" else "out.zarr")
    args = {"subset": ["subset", store, "--teachers", "cnn32", "--out", out],
            "merge": ["merge", store, store, "--rename", "2:cnn32=cnn32b", "--rename", "2:vit48=vit48b", "--out", out],
            "pack": ["pack", store, out]}[command]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "are missing" in result.output and "teachers/cnn32/features/c/" in result.output
    assert not out.exists() or not any(out.iterdir() if out.is_dir() else [1]), "a partial output was left"
    fault_log(1, "damage", f"source lost a features chunk -> ktc {command}", f"ktc {command}", 1,
              "refused; nothing written (no object list that hides the loss)")


def test_copies_refuse_a_symlinked_chunk_folder(store, tmp_path, fault_log):
    folder = store / "teachers" / "cnn32" / "features" / "c"
    moved = tmp_path / "elsewhere"
    shutil.move(str(folder), moved)
    os.symlink(moved, folder)
    out = tmp_path / "out.zarr"
    result = invoke("subset", store, "--teachers", "cnn32", "--out", out)
    assert result.exit_code == 1 and "teachers/cnn32/features/c" in result.output, result.output
    assert not out.exists() or not any(out.iterdir())
    fault_log(1, "damage", "a chunk folder replaced by a symbolic link -> ktc subset", "ktc subset", 1,
              "refused; names the objects behind the link")


def test_reader_reads_complete_store_and_checks_each_object_once(store):
    from kt_cache.store import StoreReader

    reader = StoreReader(str(store))
    first = reader.read("vit48", "logits")
    assert reader._present and reader.read("vit48", "logits").tobytes() == first.tobytes()
