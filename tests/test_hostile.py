"""Hostile stores: crafted metadata, ids, codecs, versions, chunks and links each give a clear error,
run no code and write nothing outside the requested output."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner
from extract_helpers import edit_metadata

from kt_cache.cli import cli
from kt_cache.errors import StoreError
from kt_cache.store import StoreReader


@pytest.fixture(scope="session")
def hostile_source(two_teacher_store: Path) -> Path:
    return two_teacher_store


@pytest.fixture()
def store(hostile_source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(hostile_source, tmp_path / "in" / "s.zarr"))


def edit_node(store: Path, node: str, change: Callable[[dict], None]) -> None:
    """Apply ``change`` to every stored copy of a node's metadata (as an attacker would)."""
    edit_metadata(store, node, change)


def set_keys(**values) -> Callable[[dict], None]:
    return lambda doc: doc.update(values)


def set_root(**values) -> Callable[[dict], None]:
    return lambda doc: doc["attributes"]["ktc"].update(values)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


def open_everything(location: str) -> None:
    reader = StoreReader(location)
    for teacher_id in reader.teacher_ids():
        reader.teacher_attrs(teacher_id)
        for path in reader.teacher_arrays(teacher_id):
            reader.read(teacher_id, path)
    reader.samples()


def assert_clear_everywhere(store: Path, tmp_path: Path, pattern: str, teacher: str = "cnn32") -> None:
    """The library, ``info``, ``verify --keep-temp`` and ``subset`` (of the damaged ``teacher``) all fail
    clearly and write nothing."""
    with pytest.raises(StoreError, match=pattern):
        open_everything(str(store))
    before = snapshot(tmp_path)
    subset = ["subset", store, "--teachers", teacher, "--out", tmp_path / "out.zarr"]
    for args in (["info", store], ["verify", store, "--keep-temp"], subset):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 1, (args, result.output)
        assert "Traceback" not in result.output and result.output.startswith("Error:"), result.output
    assert snapshot(tmp_path) == before, "a hostile store makes ktc write nothing"


def test_huge_first_dimension(store: Path, tmp_path: Path) -> None:
    edit_node(store, "teachers/cnn32/features", set_keys(shape=[10**15, 3, 512]))
    assert_clear_everywhere(store, tmp_path, r"teachers/cnn32/features: has shape \[1000000000000000.*n_samples = 12")


def test_huge_row_shape(store: Path, tmp_path: Path) -> None:
    def change(doc: dict) -> None:
        doc["shape"] = [12, 3, 2**30]
        doc["chunk_grid"]["configuration"]["chunk_shape"] = [4, 3, 2**30]
        for codec in doc["codecs"]:            # one view per inner chunk: the shard's inner chunks grow too
            if codec["name"] == "sharding_indexed":
                codec["configuration"]["chunk_shape"] = [4, 1, 2**30]
    edit_node(store, "teachers/vit48/logits", change)
    assert_clear_everywhere(store, tmp_path, "teachers/vit48/logits: has shape .*values per row", "vit48")


def test_negative_shape(store: Path, tmp_path: Path) -> None:
    edit_node(store, "teachers/cnn32/features", set_keys(shape=[-12, 3, 512]))
    assert_clear_everywhere(store, tmp_path, "array teachers/cnn32/features: .*non-negative")


def test_huge_sample_count_in_attrs(store: Path, tmp_path: Path) -> None:
    edit_node(store, "", set_root(n_samples=10**12, n_units=10**12 // 4))
    assert_clear_everywhere(store, tmp_path, r"\['n_samples'\] must be an integer in \[0, 4294967296\], got 1000000000000")


@pytest.mark.parametrize(("node", "dtype", "fill", "expected"), [
    ("teachers/cnn32/features", "int16", 0, "float16/float32/int8"),
    ("teachers/cnn32/logits_topk/index", "float32", 0.0, "uint16/int32"),
    ("teachers/vit48/done", "uint8", 0, "bool"),
    ("samples/label", "float64", 0.0, "int32"),
])
def test_wrong_dtypes(store: Path, tmp_path: Path, node: str, dtype: str, fill, expected: str) -> None:
    edit_node(store, node, set_keys(data_type=dtype, fill_value=fill))
    assert_clear_everywhere(store, tmp_path, f"{node}: expected .* dtype {expected}, got .* dtype {dtype}",
                            node.split("/")[1] if node.startswith("teachers/") else "cnn32")


def test_wrong_attribute_types(store: Path, tmp_path: Path) -> None:
    edit_node(store, "teachers/vit48", lambda doc: doc["attributes"]["ktc_teacher"].update(num_classes="3"))
    assert_clear_everywhere(store, tmp_path, r"teacher vit48: attrs\['ktc_teacher'\]\['num_classes'\] must be", "vit48")


@pytest.mark.parametrize("bad_id", ["/etc/passwd", "ant/../../../outside.jpg", "C:\\images\\x.jpg"])
def test_unsafe_sample_ids(store: Path, tmp_path: Path, bad_id: str) -> None:
    zarr.open_group(str(store), mode="r+")["samples/id"][6] = bad_id
    with pytest.raises(StoreError, match="samples/id row 6: sample id .* is not a relative path"):
        StoreReader(str(store)).samples()
    result = CliRunner().invoke(cli, ["verify", str(store)])
    assert result.exit_code == 1 and "samples/id  object samples/id/c/1" in result.output and "row 6" in result.output


@pytest.mark.parametrize("version", [4, 0, "1", True, None])
def test_unknown_format_version(store: Path, tmp_path: Path, version) -> None:
    edit_node(store, "", set_root(version=version))
    assert_clear_everywhere(store, tmp_path, f"format version {json.dumps(version) if version is not True else 'True'}"
                            .replace('"', "'").replace("null", "None"))


def test_truncated_chunk(store: Path, tmp_path: Path) -> None:
    key = store / "samples/id/c/1"
    key.write_bytes(key.read_bytes()[:5])
    assert_clear_everywhere(store, tmp_path, r"samples/id/c/1 \(rows 4-7\).*truncated or corrupt")


def test_truncated_teacher_chunk_names_its_key(store: Path) -> None:
    key = store / "teachers/cnn32/featmap/c/2/0/0/0/0"
    key.write_bytes(key.read_bytes()[:40])
    with pytest.raises(StoreError, match=r"teachers/cnn32/featmap/c/2/0/0/0/0 \(rows 8-11\)"):
        StoreReader(str(store)).read("cnn32", "featmap")


def test_plugin_codec_is_refused_before_decoding(store: Path, tmp_path: Path) -> None:
    codecs = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "numcodecs.zlib", "configuration": {"level": 1}}]
    edit_node(store, "teachers/vit48/logits", set_keys(codecs=codecs))
    assert_clear_everywhere(store, tmp_path, r"teachers/vit48/logits: uses codec\(s\) \['numcodecs.zlib'\]", "vit48")


def test_zarr_v2_store_is_not_opened(store: Path, tmp_path: Path) -> None:
    (store / "zarr.json").unlink()
    (store / ".zgroup").write_text('{"zarr_format": 2}')
    (store / ".zattrs").write_text(json.dumps({"ktc": {"format": "ktc", "version": 1}}))
    assert_clear_everywhere(store, tmp_path, "no Zarr v3 store there")


def test_unsafe_teacher_id(store: Path, tmp_path: Path) -> None:
    (store / "teachers" / "cnn32").rename(store / "teachers" / "cnn 32")
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["ktc"]["teachers"] = ["cnn 32", "vit48"]
    (store / "zarr.json").write_text(json.dumps(doc))
    assert_clear_everywhere(store, tmp_path, "teacher group name \"cnn 32\" is not a path-safe teacher id")


@pytest.mark.parametrize("listed,says", [
    (["cnn32", "cnn32", "vit48"], "must be a sorted list of distinct teacher ids"),
    (["vit48", "cnn32"], "must be a sorted list of distinct teacher ids"),
    ("cnn32", "must be a sorted list of distinct teacher ids"),
    (["../x", "cnn32"], "is not a path-safe teacher id"),
])
def test_a_damaged_teacher_list(store: Path, tmp_path: Path, listed, says) -> None:
    edit_node(store, "", set_root(teachers=listed))
    assert_clear_everywhere(store, tmp_path, says)


def test_a_listed_teacher_whose_group_is_gone(store: Path, tmp_path: Path) -> None:
    shutil.rmtree(store / "teachers" / "cnn32")
    assert_clear_everywhere(store, tmp_path, "the root lists teacher cnn32, but teachers/cnn32/zarr.json is missing")


def test_a_teacher_document_that_is_not_json(store: Path, tmp_path: Path) -> None:
    (store / "teachers/cnn32/zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attrib')
    assert_clear_everywhere(store, tmp_path, "teachers/cnn32/zarr.json cannot be parsed: the zarr.json is not valid JSON")


def test_object_manifest_with_escaping_keys(store: Path, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("not yours")
    doc = json.loads((store / "ktc-objects.json").read_text())
    doc["objects"]["../../secret.txt"] = {"size": 9, "sha256": "0" * 64}
    (store / "ktc-objects.json").write_text(json.dumps(doc))
    result = CliRunner().invoke(cli, ["verify", str(store)])
    assert result.exit_code == 1 and "'../../secret.txt'" not in result.output
    assert 'object key "../../secret.txt", which is not a relative path inside the store' in result.output


def test_symlinked_object_is_never_copied(store: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"private data outside the store")
    chunk = store / "teachers/cnn32/logits_lse/c/0/0"
    chunk.unlink()
    chunk.symlink_to(secret)
    result = CliRunner().invoke(cli, ["subset", str(store), "--teachers", "cnn32", "--out", str(tmp_path / "out.zarr")])
    assert result.exit_code == 1 and "is a symbolic link" in result.output
    assert not (tmp_path / "out.zarr").exists()
    verify = CliRunner().invoke(cli, ["verify", str(store)])
    assert verify.exit_code == 1 and "teachers/cnn32/logits_lse  object teachers/cnn32/logits_lse/c/0/0" in verify.output
