"""``ktc verify``: object manifest digests, decodable chunks, done flags against data, inf, orphan temp files."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from kt_cache.cli import cli
from kt_cache.finalize import write_object_manifest
from kt_cache.store.verify import verify_store

TEMP = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="session")
def verify_source(two_teacher_store: Path) -> Path:
    return two_teacher_store


@pytest.fixture()
def store(verify_source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(verify_source, tmp_path / "s.zarr"))


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def flip(path: Path, at: float = 0.4) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def bad_lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.startswith("  ")]


def test_clean_store_passes_full_quick_and_json(store: Path) -> None:
    full = run("verify", store)
    assert full.exit_code == 0, full.output
    assert full.output.startswith("OK") and "objects hashed" in full.output
    assert run("verify", store, "--quick").exit_code == 0
    report = json.loads(run("verify", store, "--json").output)
    assert report["ok"] and report["objects_hashed"] > 50 and report["teachers"] == ["cnn32", "vit48"]


def test_flipped_bytes_name_the_array_and_chunk(store: Path) -> None:
    key = "teachers/cnn32/features/c/1/0/0"
    flip(store / key)
    result = run("verify", store)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = bad_lines(result.output)
    assert lines and all(line.startswith(f"teachers/cnn32/features  object {key}") for line in lines), result.output
    assert "unit 1, rows 4-7" in result.output and "sha256" in result.output
    assert "1 array(s): teachers/cnn32/features" in result.output


def test_truncated_chunk_of_a_done_unit_is_named(store: Path) -> None:
    key = "teachers/vit48/logits/c/2/0/0"
    assert zarr.open_group(str(store), mode="r")["teachers/vit48/done"][2]
    data = (store / key).read_bytes()
    (store / key).write_bytes(data[: len(data) // 2])
    result = run("verify", store)
    assert result.exit_code == 1
    assert f"teachers/vit48/logits  object {key}" in result.output
    assert "cannot be decoded" in result.output and "bytes differ" in result.output


def rewrite(store: Path, path: str, rows: slice, value: float) -> None:
    """Change data through zarr and re-finalize the object manifest (so only the value checks can object)."""
    array = zarr.open_group(str(store), mode="r+")[path]
    block = array[rows]
    block[...] = value
    array[rows] = block
    write_object_manifest(store)


def test_nan_rows_in_a_done_unit_are_reported(store: Path) -> None:
    rewrite(store, "teachers/cnn32/features", slice(5, 6), np.nan)
    result = run("verify", store)
    assert result.exit_code == 1
    assert "teachers/cnn32/features  object teachers/cnn32/features/c/1/0/0" in result.output
    assert "marked done but 1 decoded row(s) hold NaN (first row 5)" in result.output


def test_nan_is_expected_in_label_logit_and_failed_rows(store: Path) -> None:
    rewrite(store, "teachers/cnn32/label_logit", slice(0, 4), np.nan)
    root = zarr.open_group(str(store), mode="r+")
    root["samples/ok"][6] = False
    for path in ("teachers/cnn32/features", "teachers/vit48/logits", "samples/views"):
        rewrite(store, path, slice(6, 7), np.nan)
    result = run("verify", store)
    assert result.exit_code == 0, result.output


def test_inf_is_reported(store: Path) -> None:
    rewrite(store, "teachers/vit48/logits_lse", slice(9, 10), np.inf)
    result = run("verify", store)
    assert result.exit_code == 1
    assert "teachers/vit48/logits_lse  object teachers/vit48/logits_lse/c/2/0" in result.output
    assert "±inf (first row 9)" in result.output


def test_orphan_temp_files_are_removed(store: Path) -> None:
    orphans = [store / f"teachers/cnn32/features/c/0/0/0.{TEMP}.partial", store / f"teachers/vit48/zarr.{TEMP}.partial"]
    for orphan in orphans:
        orphan.write_bytes(b"half a shard")
    fresh = store / f"teachers/cnn32/done/c/0.{TEMP}.partial"
    fresh.write_bytes(b"being written right now")
    for orphan in orphans:
        os.utime(orphan, (time.time() - 3600, time.time() - 3600))   # left by a writer killed an hour ago
    kept = run("verify", store, "--keep-temp")
    assert kept.exit_code == 0 and "orphan temp file teachers/vit48/zarr" in kept.output
    assert all(orphan.exists() for orphan in orphans)
    result = run("verify", store)
    assert result.exit_code == 0, result.output
    assert "removed orphan temp file teachers/cnn32/features/c/0/0/0" in result.output
    assert not any(orphan.exists() for orphan in orphans)
    assert fresh.exists() and "a writer may still be running" in result.output


def test_quick_checks_metadata_only(store: Path) -> None:
    flip(store / "teachers/cnn32/featmap/c/0/0/0/0/0")
    assert run("verify", store, "--quick").exit_code == 0, "--quick reads no chunk"
    doc = json.loads((store / "teachers/vit48/logits/zarr.json").read_text())
    doc["attributes"] = {"note": "edited"}
    (store / "teachers/vit48/logits/zarr.json").write_text(json.dumps(doc))
    result = run("verify", store, "--quick")
    assert result.exit_code == 1 and "teachers/vit48/logits  object teachers/vit48/logits/zarr.json" in result.output
    assert "featmap" not in result.output


def test_missing_and_unlisted_objects(store: Path) -> None:
    (store / "teachers/cnn32/logits_lse/c/1/0").unlink()
    (store / "teachers/cnn32/extra.bin").write_bytes(b"x")
    result = run("verify", store, "--quick")
    assert result.exit_code == 1
    assert "teachers/cnn32/logits_lse/c/1/0: unit 1, rows 4-7: listed in ktc-objects.json but missing" in result.output
    assert "teachers/cnn32/extra.bin" in result.output and "not in ktc-objects.json" in result.output


def test_stale_consolidation_and_missing_manifest(store: Path) -> None:
    """v3: a node added or changed after finalize, or a teacher the root does not list, is reported stale."""
    import json

    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    group = zarr.open_group(str(store), path="teachers/vit48", mode="r+", use_consolidated=False)
    group.create_array("extra", shape=(2,), dtype="float32", fill_value=0.0)
    group["features"].attrs["note"] = "changed"
    meta = dict(root.attrs["ktc"])
    root.attrs["ktc"] = dict(meta, teachers=[t for t in meta["teachers"] if t != "cnn32"])
    write_object_manifest(store)
    stale = run("verify", store, "--quick")
    assert stale.exit_code == 1, stale.output
    assert "teachers/vit48/extra/zarr.json: stored but missing from teachers/vit48/zarr.json's consolidated" in stale.output
    assert "teachers/vit48/features/zarr.json: differs from its copy in teachers/vit48/zarr.json" in stale.output
    assert "teachers/cnn32/zarr.json: stored but missing from the root's teacher list" in stale.output
    doc = json.loads((store / "teachers/vit48/zarr.json").read_text())
    doc.pop("consolidated_metadata")
    (store / "teachers/vit48/zarr.json").write_text(json.dumps(doc))
    write_object_manifest(store)
    bare = run("verify", store, "--quick")
    assert bare.exit_code == 1 and "no consolidated metadata for the nodes under teachers/vit48" in bare.output, bare.output
    (store / "ktc-objects.json").unlink()
    result = run("verify", store, "--quick")
    assert result.exit_code == 1 and "never finalized" in result.output


def test_library_report_lists_every_bad_object(store: Path) -> None:
    keys = ["teachers/cnn32/logits_topk/values/c/0/0/0", "samples/label/c/2"]
    for key in keys:
        flip(store / key, at=0.9)
    report = verify_store(str(store))
    assert not report.ok
    assert {p.key for p in report.problems} >= set(keys)
    assert report.bad_arrays()[:2] == ["samples/label", "teachers/cnn32/logits_topk/values"]


def test_the_summary_names_ten_bad_arrays_then_counts_the_rest() -> None:
    """At 1000 teachers a damaged store can have thousands of bad arrays: the first line stays readable, and
    every problem still has its own line."""
    from kt_cache.store.verify import VerifyReport

    report = VerifyReport("s.zarr", quick=True)
    for i in range(12):
        report.add(f"teachers/t{i:02d}", f"teachers/t{i:02d}/zarr.json", "changed")
    first, *rest = report.summary().splitlines()
    assert first == ("s.zarr: 12 problem(s) in 12 array(s): " + ", ".join(f"teachers/t{i:02d}" for i in range(10))
                     + " and 2 more (each listed below)")
    assert len(rest) == 12 and rest[-1] == "  teachers/t11  object teachers/t11/zarr.json: changed"
    few = VerifyReport("s.zarr", quick=True)
    few.add("samples/id", None, "bad")
    assert few.summary().splitlines()[0] == "s.zarr: 1 problem(s) in 1 array(s): samples/id"
