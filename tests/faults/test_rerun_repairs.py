"""A rerun of ``ktc extract`` never blesses damage: changed or lost objects of finished units are found
(size first, hash for objects newer than the object list), their units recomputed bit-identically, and
damage a rerun cannot repair stops the run before anything is written or re-listed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from extract_helpers import cnn_teacher, extract, finished_project, store_files, vit_teacher
from kt_cache.cli import cli


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return finished_project(tmp_path_factory.mktemp("rerun"), [cnn_teacher(), vit_teacher()])


def verify(store: Path, *extra: str):
    return CliRunner().invoke(cli, ["verify", str(store), *extra])


def chunk(store: Path, array: str, index: int = 1) -> Path:
    return sorted(p for p in (store / array / "c").rglob("*") if p.is_file())[index]


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip a byte"])
@pytest.mark.parametrize("array", ["teachers/cnn32/features", "teachers/vit48/logits", "samples/views"])
def test_rerun_recomputes_damaged_units_and_verify_passes(finished, tmp_path, damage, array, fault_log):
    base = Path(shutil.copytree(finished, tmp_path / "copy"))
    store, clean = base / "out.zarr", store_files(finished / "out.zarr")
    victim = chunk(store, array)
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        victim.unlink()
    else:
        victim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    result = extract(base / "teachers.yaml")
    assert result.exit_code == 0, result.output
    assert "damaged objects found since the last finalize; recomputing" in result.output
    assert store_files(store) == clean, "the recomputed units are bit-identical to the original"
    assert verify(store).exit_code == 0
    again = extract(base / "teachers.yaml")
    assert again.exit_code == 0 and "damaged objects found" not in again.output
    fault_log(2, "damage", f"{damage} one {array} chunk, rerun ktc extract", "ktc extract", 0,
              "damaged unit recomputed bit-identically; full verify passes", bytes_lost=0)


def test_rerun_stops_on_damage_it_cannot_repair(finished, tmp_path, fault_log):
    base = Path(shutil.copytree(finished, tmp_path / "copy"))
    store = base / "out.zarr"
    listing = (store / "ktc-objects.json").read_bytes()
    chunk(store, "samples/label", 0).unlink()
    result = extract(base / "teachers.yaml")
    assert result.exit_code == 1 and "samples/label/c/" in result.output and "cannot be recomputed" in result.output
    assert "Traceback" not in result.output
    assert (store / "ktc-objects.json").read_bytes() == listing, "the object list was not rewritten"
    assert verify(store, "--quick").exit_code != 0
    fault_log(2, "damage", "samples/label chunk deleted, rerun ktc extract", "ktc extract", 1,
              "stops before writing; the object list still exposes the loss")


@pytest.mark.parametrize("extra", [(), ("--overwrite", "cnn32")])
def test_run_killed_while_finalizing_then_plain_rerun(finished, tmp_path, monkeypatch, extra, fault_log):
    from kt_cache import finalize

    base = Path(shutil.copytree(finished, tmp_path / "copy"))
    store, clean = base / "out.zarr", store_files(finished / "out.zarr")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed after the attributes, before ktc-objects.json")

    monkeypatch.setattr(finalize, "write_object_manifest", killed)
    interrupted = extract(base / "teachers.yaml", *extra)
    assert interrupted.exit_code != 0
    monkeypatch.undo()
    rerun = extract(base / "teachers.yaml")
    assert rerun.exit_code == 0, rerun.output
    assert store_files(store) == clean and verify(store).exit_code == 0
    fault_log(2, "kill", f"ktc extract {' '.join(extra) or '(rerun)'} killed while finalizing, then a plain rerun",
              "ktc extract", 0, "resumes and re-finalizes; the store equals the original, verify passes", bytes_lost=0)
