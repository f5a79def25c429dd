"""Store format versions: this ktc writes v2 (feature statistics as an array, class lists referenced), reads
a v1 store made by the ktc before it (``tests/data/store-v1.zarr``, committed) exactly as before, and
refuses a version it does not know.

The committed store was computed on another machine: a fresh extraction of the same images agrees with it to
float16 rounding (CPU kernels differ in the last bit between instruction sets), not bit for bit. Bitwise claims
(the same student) compare the v1 store with a v2 copy of its own arrays (``as_v2``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from extract_helpers import cnn_teacher, extract, make_image_folder, write_manifest

from kt_cache import store as fmt
from kt_cache.cli import cli
from kt_cache.store import StoreReader

V1 = Path(__file__).parent / "data" / "store-v1.zarr"
TRAIN = ("--method", "kd", "--student", "resnet10t", "--img-size", "32", "--epochs", "1", "--batch-size", "2",
         "--workers", "0", "--no-progress")


FP16 = {"rtol": 2.0**-9, "atol": 1e-6}        # one float16 rounding step, either way


def as_v2(v1: Path, out: Path) -> Path:
    """A v2 store holding exactly the arrays of the v1 store ``v1``: statistics moved into ``stats/features``,
    class lists equal to the target classes referenced, version 2 (what a v2 extraction writes)."""
    shutil.copytree(v1, out)
    root = zarr.open_group(str(out), mode="r+", use_consolidated=False)
    meta = fmt.read_store_meta(root, str(out))
    for tid, group in root["teachers"].groups():
        record = fmt.read_teacher_record(group, tid, str(out))
        stats = fmt.write_feature_stats(group, record.feature_stats)
        fmt.write_teacher_record(group, record.replace(
            feature_stats=stats, class_names=fmt.class_names_attr(record.class_names, meta.classes)))
    fmt.write_store_meta(root, meta.replace(version=2))
    zarr.consolidate_metadata(str(out))
    return out


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The committed v1 store (copied) and a v2 store extracted now from the same images and manifest."""
    base = tmp_path_factory.mktemp("versions")
    make_image_folder(base / "images", per_class=2)          # the images the v1 store was made from (seeded)
    write_manifest(base / "teachers.yaml", [cnn_teacher(featmap={"grid": 1})], views=2, unit_rows=2, store="v2.zarr")
    assert extract(base / "teachers.yaml").exit_code == 0
    shutil.copytree(V1, base / "v1.zarr")
    return {"base": base, "v1": base / "v1.zarr", "v2": base / "v2.zarr"}


def test_v2_keeps_statistics_in_an_array_and_refers_to_the_dataset_classes(both):
    v1, v2 = StoreReader(str(both["v1"])), StoreReader(str(both["v2"]))
    assert (v1.meta.version, v2.meta.version) == (1, 2)
    raw = zarr.open_group(str(both["v2"]), mode="r")["teachers/cnn32"].attrs["ktc_teacher"]
    assert raw["class_names"] == "dataset" and raw["feature_stats"] == {"array": "stats/features", "count": 12}
    old = zarr.open_group(str(both["v1"]), mode="r")["teachers/cnn32"].attrs["ktc_teacher"]
    assert isinstance(old["feature_stats"]["mean"], list) and old["class_names"] == ["ant", "bee", "cat"]
    for path in ("features", "featmap", "logits_topk/values", "logits_lse"):      # same images, same teacher
        np.testing.assert_allclose(v1.read("cnn32", path), v2.read("cnn32", path), **FP16)
    a, b = v1.feature_stats("cnn32"), v2.feature_stats("cnn32")
    np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(a["std"], b["std"], rtol=1e-3, atol=1e-5)
    assert a["count"] == b["count"] == 12
    assert v1.teacher_attrs("cnn32")["class_names"] == v2.teacher_attrs("cnn32")["class_names"] == ["ant", "bee", "cat"]
    per_teacher = [len(json.dumps(zarr.open_group(str(both[v]), mode="r")["teachers/cnn32"].attrs.asdict()))
                   for v in ("v1", "v2")]
    assert per_teacher[1] < per_teacher[0] / 4            # 512 floats x 2 as JSON leave the attributes


def test_every_command_reads_a_v1_store_and_trains_the_same_student(both):
    runner, base = CliRunner(), both["base"]
    info = runner.invoke(cli, ["info", str(both["v1"])])
    assert info.exit_code == 0 and "ktc store v1" in info.output, info.output
    assert runner.invoke(cli, ["verify", str(both["v1"])]).exit_code == 0
    same = as_v2(both["v1"], base / "v1-as-v2.zarr")
    assert StoreReader(str(same)).meta.version == 2
    for name, store in (("v1", both["v1"]), ("v2", same)):
        result = runner.invoke(cli, ["train", "--cache", str(store), "--out", str(base / f"run-{name}"),
                                     "--data", str(base / "images"), *TRAIN])
        assert result.exit_code == 0, result.output
    assert (base / "run-v1" / "student.safetensors").read_bytes() == (base / "run-v2" / "student.safetensors").read_bytes()
    merged = runner.invoke(cli, ["merge", str(both["v1"]), str(both["v2"]), "--rename", "1:cnn32=cnn32_v2",
                                 "--out", str(base / "merged.zarr")])
    assert merged.exit_code == 0, merged.output
    reader = StoreReader(str(base / "merged.zarr"))
    assert reader.meta.version == 2 and sorted(reader.teacher_ids()) == ["cnn32", "cnn32_v2"]
    np.testing.assert_allclose(reader.feature_stats("cnn32")["mean"], reader.feature_stats("cnn32_v2")["mean"],
                               rtol=1e-3, atol=1e-5)


def test_a_newer_version_is_refused_with_the_fix(tmp_path):
    store = tmp_path / "future.zarr"
    shutil.copytree(V1, store)
    document = json.loads((store / "zarr.json").read_text())
    document["attributes"]["ktc"]["version"] = 3
    (store / "zarr.json").write_text(json.dumps(document))
    result = CliRunner().invoke(cli, ["info", str(store)])
    assert result.exit_code != 0 and "version 3" in result.output and "reads versions 1..2" in result.output
    assert "upgrade ktc" in result.output and "Traceback" not in result.output
