"""WebDataset tar shards as a dataset: listing and its cached index, extraction and training identical to
the same images as a folder, moved and missing shards, bad shards, and shards served over HTTP."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner
from extract_helpers import cnn_teacher, extract, make_image_folder, write_manifest, write_shards
from http_server import serve_folder

from kt_cache import shards as shard_module
from kt_cache.cli import cli
from kt_cache.datasets import list_dataset
from kt_cache.errors import DatasetError
from kt_cache.manifest_types import DatasetSpec

COMPARED = ("samples/id", "samples/views", "samples/ok", "samples/digest", "samples/label",
            "teachers/cnn32/features", "teachers/cnn32/featmap", "teachers/cnn32/logits_topk/values")
TRAIN = ("--method", "kd", "--student", "resnet10t", "--img-size", "32", "--epochs", "1", "--batch-size", "4",
         "--workers", "0", "--no-progress")


@pytest.fixture(autouse=True)
def fresh_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each test has its own index cache folder and an empty in-process memo."""
    monkeypatch.setenv("KTC_DATA_DIR", str(tmp_path / "ktc-data"))
    shard_module.clear_memo()
    yield
    shard_module.clear_memo()


def shard_manifest(base: Path, shards: str, store: str = "shards.zarr", teachers: list | None = None,
                   classes: list | None = None) -> Path:
    path = write_manifest(base / f"{store}.yaml", teachers or [cnn_teacher()], store=store)
    manifest = yaml.safe_load(path.read_text())
    manifest["dataset"] = {"shards": shards, **({"classes": classes} if classes else {})}
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def ids_of(store: Path) -> list[str]:
    return [str(i) for i in zarr.open_group(str(store), mode="r")["samples/id"][:]]


def train(store: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["train", "--cache", str(store), "--out", str(out), *TRAIN, *extra])


def student_bytes(run: Path) -> bytes:
    return (run / "student.safetensors").read_bytes()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    make_image_folder(tmp_path / "images", per_class=4)
    write_shards(tmp_path / "images", tmp_path / "shards", n_shards=2)
    return tmp_path


def test_listing_names_samples_by_shard_and_key_and_caches_the_index(project: Path, monkeypatch: pytest.MonkeyPatch):
    with tarfile.open(project / "shards" / "train-001.tar", "a") as tar:     # a member that is not a sample
        info = tarfile.TarInfo("cat/img003.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    listing = list_dataset(DatasetSpec(shards=(str(project / "shards" / "train-{000..001}.tar"),)))
    assert listing.ids[:2] == ("train-000.tar/ant/img000", "train-000.tar/ant/img001")
    assert len(listing.ids) == 12 and listing.class_names == ("ant", "bee", "cat")
    assert listing.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert listing.ignored == ("train-001.tar/cat/img003.json",)
    assert listing.description["kind"] == "shards" and listing.description["shards"] == ["train-000.tar", "train-001.tar"]

    shard_module.clear_memo()
    monkeypatch.setattr(shard_module, "scan_shard", lambda location: pytest.fail(f"rescanned {location}"))
    again = list_dataset(DatasetSpec(shards=(str(project / "shards" / "train-{000..001}.tar"),)))
    assert again.ids == listing.ids and again.fingerprint == listing.fingerprint      # from the cached index


def test_integer_labels_make_an_index_label_space(tmp_path: Path):
    make_image_folder(tmp_path / "images", per_class=2, classes=("0", "2"))
    write_shards(tmp_path / "images", tmp_path / "shards", n_shards=1)
    listing = list_dataset(DatasetSpec(shards=(str(tmp_path / "shards" / "train-000.tar"),)))
    assert listing.class_names == ("0", "1", "2") and listing.labels.tolist() == [0, 0, 2, 2]


def test_extract_and_train_from_shards_equal_the_same_images_as_a_folder(project: Path):
    write_manifest(project / "folder.yaml", [cnn_teacher()], store="folder.zarr")
    assert extract(project / "folder.yaml").exit_code == 0
    result = extract(shard_manifest(project, "shards/train-{000..001}.tar"))
    assert result.exit_code == 0, result.output
    folder, sharded = (zarr.open_group(str(project / s), mode="r") for s in ("folder.zarr", "shards.zarr"))
    assert ids_of(project / "shards.zarr")[0].startswith("train-00")
    for path in COMPARED[1:]:
        assert np.array_equal(folder[path][:], sharded[path][:], equal_nan=True), path
    info = CliRunner().invoke(cli, ["info", str(project / "shards.zarr")])
    assert "dataset  shards" in info.output and "2 tar shards" in info.output, info.output
    assert CliRunner().invoke(cli, ["verify", str(project / "shards.zarr")]).exit_code == 0

    for store in ("folder", "shards"):
        result = train(project / f"{store}.zarr", project / f"run-{store}")
        assert result.exit_code == 0, result.output
    assert student_bytes(project / "run-shards") == student_bytes(project / "run-folder")   # same pixels read back
    assert "tar shards" in (project / "run-shards" / "eval.json").read_text()               # says why no top-1

    rerun = extract(shard_manifest(project, "shards/train-{000..001}.tar"))
    assert rerun.exit_code == 0 and "nothing to do" in rerun.output, rerun.output


def test_moved_shards_need_data_and_a_missing_shard_is_named(project: Path):
    assert extract(shard_manifest(project, "shards/train-{000..001}.tar")).exit_code == 0
    shutil.move(project / "shards", project / "moved")
    result = train(project / "shards.zarr", project / "run")
    assert result.exit_code == 2 and "--data" in result.output and "12 of 12 images" in result.output
    result = train(project / "shards.zarr", project / "run", "--data", str(project / "moved"), "--max-steps", "1")
    assert result.exit_code == 0, result.output

    (project / "moved" / "train-001.tar").unlink()
    result = train(project / "shards.zarr", project / "run2", "--data", str(project / "moved"))
    assert result.exit_code == 2 and "6 of 12 images" in result.output and "train-001.tar/" in result.output


def test_an_added_teacher_reuses_the_index_and_refuses_changed_images(project: Path, monkeypatch: pytest.MonkeyPatch):
    manifest = shard_manifest(project, "shards/train-{000..001}.tar")
    assert extract(manifest).exit_code == 0
    shard_module.clear_memo()
    monkeypatch.setattr(shard_module, "scan_shard", lambda location: pytest.fail(f"rescanned {location}"))
    two = shard_manifest(project, "shards/train-{000..001}.tar", teachers=[cnn_teacher(), cnn_teacher(id="cnn32b")])
    result = extract(two)
    assert result.exit_code == 0, result.output
    store = zarr.open_group(str(project / "shards.zarr"), mode="r")
    assert not np.isnan(store["teachers/cnn32b/features"][:]).any()        # every row read back by its offset

    monkeypatch.undo()
    shard_module.clear_memo()
    tar_path = project / "shards" / "train-000.tar"
    data = bytearray(tar_path.read_bytes())
    with tarfile.open(tar_path) as tar:
        member = tar.getmember("ant/img000.jpg")
    data[member.offset_data + member.size // 2] ^= 0xFF           # same names, same sizes, other bytes
    tar_path.write_bytes(bytes(data))
    three = shard_manifest(project, "shards/train-{000..001}.tar",
                           teachers=[cnn_teacher(), cnn_teacher(id="cnn32b"), cnn_teacher(id="cnn32c")])
    result = extract(three)
    assert result.exit_code == 2 and "train-000.tar/ant/img000" in result.output, result.output


def bad_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def two_images(path: Path) -> None:
    bad_tar(path, {"a/x.jpg": b"1", "a/x.png": b"2"})


def truncated(path: Path) -> None:
    bad_tar(path, {"a/x.jpg": b"1" * 5000})
    path.write_bytes(path.read_bytes()[:2048])


def unknown_label(path: Path) -> None:
    bad_tar(path, {"a/x.jpg": b"1", "a/x.cls": b"zebra"})


def binary_label(path: Path) -> None:
    bad_tar(path, {"a/x.jpg": b"1", "a/x.cls": b"\xff\xfe"})


def not_a_tar(path: Path) -> None:
    path.write_text("<html>not found</html>")


def no_images(path: Path) -> None:
    bad_tar(path, {"a/x.txt": b"caption"})


@pytest.mark.parametrize("make, expected", [
    (two_images, "two image members"), (truncated, "truncated"), (unknown_label, "label 'zebra'"),
    (binary_label, "not UTF-8"), (not_a_tar, "not a readable tar"), (no_images, "hold no images"),
])
def test_bad_shards_are_refused_naming_the_shard(tmp_path: Path, make, expected):
    make(tmp_path / "bad-0.tar")
    manifest = shard_manifest(tmp_path, "bad-{0..0}.tar", classes=["ant", "bee", "cat"])
    result = extract(manifest, "--dry-run")
    assert result.exit_code == 2, result.output
    assert expected in result.output and "bad-0.tar" in result.output and "Fix:" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("value, expected", [
    ("missing-{0..1}.tar", "does not exist"), ([], "a non-empty list"), (7, "a tar path or brace pattern"),
])
def test_bad_shard_patterns_are_refused(tmp_path: Path, value, expected):
    result = extract(shard_manifest(tmp_path, value), "--dry-run")
    assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output, result.output


def test_shards_over_http_give_the_local_store_and_train(project: Path):
    assert extract(shard_manifest(project, "shards/train-{000..001}.tar", store="local.zarr")).exit_code == 0
    with serve_folder(project / "shards") as server:
        result = extract(shard_manifest(project, f"{server.url}/train-{{000..001}}.tar", store="remote.zarr"))
        assert result.exit_code == 0, result.output
        assert any(r.range for r in server.requests if r.path.endswith(".tar"))   # one seek per image
        result = train(project / "remote.zarr", project / "run", "--max-steps", "1")
        assert result.exit_code == 0, result.output
    local, remote = (zarr.open_group(str(project / s), mode="r") for s in ("local.zarr", "remote.zarr"))
    for path in COMPARED:
        assert np.array_equal(local[path][:], remote[path][:], equal_nan=True), path


def test_index_cache_follows_a_rewritten_shard(project: Path):
    spec = DatasetSpec(shards=(str(project / "shards" / "train-{000..001}.tar"),))
    before = list_dataset(spec)
    make_image_folder(project / "more", per_class=5)
    write_shards(project / "more", project / "shards", n_shards=2)
    shard_module.clear_memo()
    after = list_dataset(spec)
    assert len(after.ids) == 15 and after.fingerprint != before.fingerprint
    with pytest.raises(DatasetError, match="does not exist"):
        list_dataset(DatasetSpec(shards=(str(project / "shards" / "train-{000..002}.tar"),)))


def test_many_new_shards_are_scanned_in_parallel_processes_to_the_same_listing(tmp_path: Path, monkeypatch):
    make_image_folder(tmp_path / "images", per_class=3)
    write_shards(tmp_path / "images", tmp_path / "shards", n_shards=4)
    spec = DatasetSpec(shards=(str(tmp_path / "shards" / "train-{000..003}.tar"),))
    monkeypatch.setattr(shard_module, "PARALLEL_FROM", 1000)
    serial = list_dataset(spec)
    shutil.rmtree(tmp_path / "ktc-data")
    shard_module.clear_memo()
    monkeypatch.setattr(shard_module, "PARALLEL_FROM", 2)
    monkeypatch.setattr(shard_module.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(shard_module, "scan_shard", lambda location: pytest.fail("scanned in this process"))
    parallel = list_dataset(spec)                 # spawned workers run the real scan and write the cache
    assert parallel.ids == serial.ids and parallel.fingerprint == serial.fingerprint
    assert parallel.labels.tolist() == serial.labels.tolist()
    assert len(list((tmp_path / "ktc-data" / "shard-index").glob("*.json"))) == 4


def test_an_interrupted_extraction_resumes_by_unit_to_the_same_store(project: Path, monkeypatch):
    from extract_helpers import store_files

    import kt_cache.store.format as store_format

    manifest = shard_manifest(project, "shards/train-{000..001}.tar", store="clean.zarr")
    assert extract(manifest).exit_code == 0
    real_write, written = store_format.write_unit, []

    def fail_on_third_unit(group, unit, rows, arrays):
        written.append(unit)
        if len(written) == 3:
            raise OSError(28, "No space left on device (simulated)")
        real_write(group, unit, rows, arrays)

    monkeypatch.setattr(store_format, "write_unit", fail_on_third_unit)
    assert extract(manifest, "--out", project / "cut.zarr").exit_code == 1
    monkeypatch.undo()
    resumed = extract(manifest, "--out", project / "cut.zarr")
    assert resumed.exit_code == 0 and "resumed" in resumed.output, resumed.output
    assert store_files(project / "cut.zarr") == store_files(project / "clean.zarr")
