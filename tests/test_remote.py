"""Stores read over URLs: a local HTTP server (127.0.0.1, no listing, Range support), file:// and zip://."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from extract_helpers import store_files
from http_server import LoggingHandler, serve_folder
from kt_cache.cli import cli
from kt_cache.errors import StoreError
from kt_cache.store import StoreReader


@pytest.fixture(scope="session")
def remote_source(two_teacher_store: Path) -> Path:
    return two_teacher_store


@pytest.fixture()
def served(remote_source: Path, tmp_path: Path):
    """A private copy of the store, served over http for the duration of one test."""
    store = Path(shutil.copytree(remote_source, tmp_path / "site" / "store.zarr"))
    with serve_folder(tmp_path / "site") as server:
        yield server, store, f"{server.url}/store.zarr"


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_info_over_http(served) -> None:
    server, store, url = served
    result = run("info", url)
    assert result.exit_code == 0, result.output
    assert "cnn32" in result.output and "vit48" in result.output and "(remote or packed)" in result.output
    summary = json.loads(run("info", url, "--json").output)
    assert summary["n_samples"] == 12 and [t["id"] for t in summary["teachers"]] == ["cnn32", "vit48"]
    objects = json.loads((store / "ktc-objects.json").read_text())["objects"]
    assert summary["bytes"] == sum(o["size"] for o in objects.values()), "remote sizes come from ktc-objects.json"
    assert all(r.method in ("GET", "HEAD") for r in server.requests)


def test_verify_over_http_passes_then_names_a_flipped_chunk(served) -> None:
    server, store, url = served
    result = run("verify", url)
    assert result.exit_code == 0, result.output
    key = "teachers/vit48/featmap/c/0/0/0/0/0"
    data = bytearray((store / key).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (store / key).write_bytes(bytes(data))
    bad = run("verify", url)
    assert bad.exit_code == 1 and f"teachers/vit48/featmap  object {key}" in bad.output
    assert run("verify", url, "--quick").exit_code == 0


def test_one_teacher_is_read_without_touching_the_other(served, remote_source: Path) -> None:
    server, _, url = served
    reader = StoreReader(url)
    server.clear()
    local = StoreReader(str(remote_source))
    for path in reader.teacher_arrays("cnn32"):
        np.testing.assert_array_equal(reader.read("cnn32", path), local.read("cnn32", path))
    assert reader.is_complete("cnn32") and reader.teacher_attrs("cnn32")["model"] == "resnet10t"
    reader.samples()
    paths = server.paths()
    assert any(p.startswith("/store.zarr/teachers/cnn32/features/c/") for p in paths)
    assert not [p for p in paths if "/teachers/vit48" in p], "no object of another teacher is requested"


def test_partial_reads_use_ranges(served, remote_source: Path) -> None:
    server, _, url = served
    reader = StoreReader(url)
    server.clear()
    row = reader.read("cnn32", "featmap", slice(5, 6))
    np.testing.assert_array_equal(row, StoreReader(str(remote_source)).read("cnn32", "featmap", slice(5, 6)))
    assert any(r.status == 206 and r.range for r in server.requests), "a row of a shard is fetched by range"


def test_subset_over_http_fetches_only_its_teacher(served, remote_source: Path, tmp_path: Path) -> None:
    server, _, url = served
    server.clear()
    result = run("subset", url, "--teachers", "cnn32", "--out", tmp_path / "sub.zarr")
    assert result.exit_code == 0, result.output
    assert not [p for p in server.paths() if "/teachers/vit48/" in p and "/c/" in p]
    local = run("subset", remote_source, "--teachers", "cnn32", "--out", tmp_path / "local.zarr")
    assert local.exit_code == 0, local.output
    assert store_files(tmp_path / "sub.zarr") == store_files(tmp_path / "local.zarr")


def test_http_store_without_consolidated_metadata_is_refused_clearly(served) -> None:
    """No teacher list in the root, or a teacher document without its nodes' metadata: https cannot list them."""
    _, store, url = served
    teacher = json.loads((store / "teachers/cnn32/zarr.json").read_text())
    teacher.pop("consolidated_metadata")
    (store / "teachers/cnn32/zarr.json").write_text(json.dumps(teacher))
    with pytest.raises(StoreError, match="teachers/cnn32/zarr.json holds no consolidated metadata.*no listing"):
        StoreReader(url).teacher_arrays("cnn32")
    assert StoreReader(url).teacher_arrays("vit48")       # the other teacher still reads
    doc = json.loads((store / "zarr.json").read_text())
    del doc["attributes"]["ktc"]["teachers"]
    (store / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="no consolidated metadata.*no listing"):
        StoreReader(url)
    result = run("info", url)
    assert result.exit_code == 1 and "Traceback" not in result.output and "consolidated metadata" in result.output


def test_missing_url_is_a_clear_error(served) -> None:
    server, _, _ = served
    result = run("info", f"{server.url}/nothing.zarr")
    assert result.exit_code == 1 and "no Zarr v3 store there" in result.output


def test_file_url_zip_and_zip_over_http(served, remote_source: Path, tmp_path: Path) -> None:
    server, _, url = served
    assert StoreReader(f"file://{remote_source}").teacher_ids() == ["cnn32", "vit48"]
    packed = tmp_path / "site" / "store.zip"
    assert run("pack", remote_source, packed).exit_code == 0
    for location in (f"zip://{packed}", str(packed), f"zip::{server.url}/store.zip"):
        reader = StoreReader(location)
        assert reader.teacher_ids() == ["cnn32", "vit48"], location
        np.testing.assert_array_equal(reader.read("vit48", "logits"), StoreReader(url).read("vit48", "logits"))
    assert run("verify", f"zip::{server.url}/store.zip").exit_code == 0


def test_server_range_parsing() -> None:
    data = bytes(range(10))
    assert LoggingHandler.ranged(data, None) == (200, data, {})
    assert LoggingHandler.ranged(data, "bytes=2-4")[1] == data[2:5]
    assert LoggingHandler.ranged(data, "bytes=7-")[1] == data[7:]
    assert LoggingHandler.ranged(data, "bytes=-3")[1:] == (data[7:], {"Content-Range": "bytes 7-9/10"})
    assert LoggingHandler.ranged(data, "bytes=20-")[0] == 416


def test_one_epoch_train_over_http_reads_only_the_selected_teacher(served, remote_source: Path, tmp_path: Path) -> None:
    server, _, url = served
    server.clear()
    result = run("train", "--cache", url, "--data", remote_source.parent / "images", "--teachers", "cnn32",
                 "--method", "kd", "--student", "resnet10t", "--img-size", "32", "--epochs", "1", "--batch-size", "4",
                 "--workers", "0", "--no-progress", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["n"] == 12
    paths = server.paths()
    assert any(p.startswith("/store.zarr/teachers/cnn32/") for p in paths)
    assert not [p for p in paths if "/teachers/vit48/" in p], "training on cnn32 requests no object of vit48"


def test_one_epoch_train_from_a_packed_zip(remote_source: Path, tmp_path: Path) -> None:
    """`ktc pack` then `ktc train --cache zip://PATH`: the single-file store trains like the folder it came from."""
    packed = tmp_path / "store.zip"
    assert run("pack", remote_source, packed).exit_code == 0
    out = tmp_path / "run"
    result = run("train", "--cache", f"zip://{packed}", "--data", remote_source.parent / "images", "--method", "kd",
                 "--student", "resnet10t", "--img-size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                 "--no-progress", "--log-every", "1", "--out", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["n"] == 12 and 0 <= metrics["top1"] <= 1
    assert metrics["teacher_agreement"]["teachers"] == ["cnn32", "vit48"]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in steps if r["kind"] == "step")
    assert (out / "student.safetensors").is_file() and packed.stat().st_size > 0


def test_a_run_streamed_over_http_and_from_a_zip_trains_the_student_of_the_local_folder(served, remote_source: Path,
                                                                                         tmp_path: Path) -> None:
    """Under a budget far below the teacher arrays, every array is streamed in row blocks, read ahead, from
    wherever the store is: a local folder, an HTTP server, a packed zip. Same blocks, same batches, same student."""
    from safetensors.torch import load_file

    _, _, url = served
    packed = tmp_path / "store.zip"
    assert run("pack", remote_source, packed).exit_code == 0
    students = {}
    for name, cache in (("local", remote_source), ("http", url), ("zip", f"zip://{packed}")):
        out = tmp_path / name
        result = run("train", "--cache", cache, "--data", remote_source.parent / "images", "--method", "uniform",
                     "--student", "resnet10t", "--img-size", "32", "--epochs", "2", "--batch-size", "4",
                     "--workers", "0", "--no-progress", "--ram-budget-gb", "0.00001", "--window-blocks", "1",
                     "--out", out)
        assert result.exit_code == 0, result.output
        epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["kind"] == "epoch"]
        assert len(epochs) == 2 and all(r["read_bytes_per_sample_teacher"] > 0 for r in epochs), epochs
        students[name] = load_file(str(out / "student.safetensors"))
    for name in ("http", "zip"):
        assert students[name].keys() == students["local"].keys()
        assert all(np.array_equal(students[name][k].numpy(), students["local"][k].numpy()) for k in students["local"])
