"""The typed attribute records (``kt_cache.store.records``): ``StoreMeta`` and ``TeacherRecord`` read every attribute a
store holds and write it back unchanged, keep keys they do not model through every rewrite, refuse damaged
types naming the key, and are the only code that writes the attributes."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner
from extract_helpers import cnn_teacher, extract, make_image_folder, write_manifest

from kt_cache.cli import cli
from kt_cache.errors import StoreError
from kt_cache.store.records import StoreMeta, TeacherRecord
from kt_cache.store import StoreReader

V1 = Path(__file__).parent / "data" / "store-v1.zarr"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("records")
    make_image_folder(base / "images", per_class=2)
    write_manifest(base / "teachers.yaml", [cnn_teacher()], views=2, unit_rows=2)
    assert extract(base / "teachers.yaml").exit_code == 0
    return base


@pytest.mark.parametrize("which", ["v2", "v1"])
def test_records_read_and_write_back_every_stored_attribute(project, which):
    root = zarr.open_group(str(project / "out.zarr" if which == "v2" else V1), mode="r")
    raw_meta, raw_teacher = root.attrs["ktc"], root["teachers/cnn32"].attrs["ktc_teacher"]
    meta = StoreMeta.from_attrs(root.attrs, "store")
    assert meta.to_attrs() == raw_meta and meta.classes == ["ant", "bee", "cat"]
    teacher = TeacherRecord.from_attrs(raw_teacher, "cnn32", "store")
    assert teacher.to_attrs() == raw_teacher and teacher.outputs == tuple(raw_teacher["outputs"])
    assert teacher.keys == frozenset(raw_teacher) and not teacher.unknown
    assert StoreReader(str(root.store.root)).teacher_record("cnn32").class_names == ("ant", "bee", "cat")


def test_keys_this_ktc_does_not_model_survive_a_resumed_extraction(project, tmp_path):
    shutil.copytree(project, tmp_path / "p")
    store = tmp_path / "p" / "out.zarr"
    root = zarr.open_group(str(store), mode="r+")
    root.attrs["ktc"] = {**root.attrs["ktc"], "future_root_key": {"a": 1}}
    group = root["teachers/cnn32"]
    group.attrs["ktc_teacher"] = {**group.attrs["ktc_teacher"], "future_teacher_key": [1, 2]}
    manifest = (tmp_path / "p" / "teachers.yaml")
    manifest.write_text(manifest.read_text().replace(str(project), str(tmp_path / "p")))
    assert extract(manifest).exit_code == 0                          # resume: finalize rewrites both records
    root = zarr.open_group(str(store), mode="r")
    assert root.attrs["ktc"]["future_root_key"] == {"a": 1}
    assert root["teachers/cnn32"].attrs["ktc_teacher"]["future_teacher_key"] == [1, 2]
    assert StoreReader(str(store)).teacher_record("cnn32").unknown == {"future_teacher_key": [1, 2]}
    assert CliRunner().invoke(cli, ["verify", str(store)]).exit_code == 0


@pytest.mark.parametrize(("where", "key", "value", "says"), [
    ("teacher", "feature_dim", "12", "['feature_dim'] must be a non-negative integer or null, got \"12\""),
    ("teacher", "role", 5, "['role'] must be str or null, got 5"),
    ("teacher", "outputs", ["features", 3], "['outputs'] must be a list of output names"),
    ("teacher", "class_names", {"a": 1}, "['class_names'] must be a list of names, 'dataset' or null"),
    ("root", "chunk_bytes", "big", "attrs['ktc']['chunk_bytes'] must be int, got \"big\""),
    ("root", "cpu_threads", True, "attrs['ktc']['cpu_threads'] must be int, got true"),
])
def test_a_damaged_type_is_refused_naming_the_key(project, tmp_path, where, key, value, says):
    store = tmp_path / "bad.zarr"
    shutil.copytree(project / "out.zarr", store)
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    node, attr = (root, "ktc") if where == "root" else (root["teachers/cnn32"], "ktc_teacher")
    node.attrs[attr] = {**node.attrs[attr], key: value}
    with pytest.raises(StoreError) as err:
        StoreReader(str(store)).teacher_record("cnn32")
    assert says in str(err.value) and "Fix:" in str(err.value)
    result = CliRunner().invoke(cli, ["info", str(store)])
    assert result.exit_code == 1 and says in result.output and "Traceback" not in result.output


def test_only_the_records_module_writes_store_attributes():
    """Every write of ``attrs["ktc"]`` / ``attrs["ktc_teacher"]`` goes through ``kt_cache.store.records``."""
    package = Path(__file__).resolve().parents[1] / "kt_cache"
    write = re.compile(r"\.attrs\[[^\]]*(ROOT_ATTR|TEACHER_ATTR|\"ktc\"|\"ktc_teacher\")[^\]]*\]\s*=")
    writers = [f"{path.name}:{n}" for path in sorted(package.rglob("*.py")) if path.name != "records.py"
               for n, line in enumerate(path.read_text().splitlines(), 1) if write.search(line)]
    assert writers == []
