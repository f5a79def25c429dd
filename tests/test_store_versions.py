"""Store format versions: this ktc writes v3 (the root lists the teachers, each teacher's ``zarr.json`` holds its
nodes' consolidated metadata; since v2 feature statistics are an array and class lists are referenced), reads
v1 and v2 stores made by the ktc before it (``tests/data/store-v1.zarr``, ``store-v2.zarr``, committed) exactly
as before, and refuses a version it does not know.

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

from kt_cache.cli import cli
from kt_cache.store import StoreReader

V1 = Path(__file__).parent / "data" / "store-v1.zarr"
V2 = Path(__file__).parent / "data" / "store-v2.zarr"
TRAIN = ("--method", "kd", "--student", "resnet10t", "--img-size", "32", "--epochs", "1", "--batch-size", "2",
         "--workers", "0", "--no-progress")


FP16 = {"rtol": 2.0**-9, "atol": 1e-6}        # one float16 rounding step, either way


def upgraded_copy(old: Path, out: Path, says: str = "v1 -> v3 (1 teacher(s) rewritten: cnn32)") -> Path:
    """``ktc upgrade`` of a copy of an older store: the same arrays, v3 metadata."""
    shutil.copytree(old, out)
    result = CliRunner().invoke(cli, ["upgrade", str(out)])
    assert result.exit_code == 0 and f"upgraded format {says}" in result.output, result.output
    return out


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The committed v1 store (copied) and a v3 store extracted now from the same images and manifest (kept
    under the key "v2" for the v2 teacher layout it shares)."""
    base = tmp_path_factory.mktemp("versions")
    make_image_folder(base / "images", per_class=2)          # the images the v1 store was made from (seeded)
    write_manifest(base / "teachers.yaml", [cnn_teacher(featmap={"grid": 1})], views=2, unit_rows=2, store="v2.zarr")
    assert extract(base / "teachers.yaml").exit_code == 0
    shutil.copytree(V1, base / "v1.zarr")
    return {"base": base, "v1": base / "v1.zarr", "v2": base / "v2.zarr"}


def test_v2_keeps_statistics_in_an_array_and_refers_to_the_dataset_classes(both):
    v1, v2 = StoreReader(str(both["v1"])), StoreReader(str(both["v2"]))
    assert (v1.meta.version, v2.meta.version) == (1, 3)
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


def test_consolidated_nodes_leave_out_the_specs_defaults_and_parse_like_their_own_documents(both):
    """v3: the root lists the teachers and holds no node's metadata; each teacher's document consolidates its own
    nodes, spec defaults zarr writes in full left out, each still parsing to exactly its own ``zarr.json``."""
    from zarr.core.metadata import ArrayV3Metadata

    store = both["v2"]
    root = json.loads((store / "zarr.json").read_text())
    assert "consolidated_metadata" not in root and root["attributes"]["ktc"]["teachers"] == ["cnn32"]
    assert "consolidated_metadata" not in json.loads((store / "teachers/zarr.json").read_text())
    nodes = json.loads((store / "teachers/cnn32/zarr.json").read_text())["consolidated_metadata"]["metadata"]
    assert {"done", "features", "featmap", "logits_topk/values", "stats/features"} <= set(nodes)
    text = json.dumps(nodes)
    assert '"attributes": {}' not in text and '"storage_transformers"' not in text and '"index_location"' not in text
    assert '"separator"' not in text
    arrays = {k: v for k, v in nodes.items() if v["node_type"] == "array"}
    assert any(v["codecs"][0]["name"] == "sharding_indexed" for v in arrays.values())
    for key, node in arrays.items():
        own = json.loads((store / "teachers/cnn32" / key / "zarr.json").read_text())
        parsed = [json.dumps(ArrayV3Metadata.from_dict(dict(doc)).to_dict(), default=str, sort_keys=True)
                  for doc in (node, own)]
        assert parsed[0] == parsed[1], key
    lse = zarr.open_group(str(store), mode="r")["teachers/cnn32/logits_lse"]
    assert lse.shards is None and lse.chunks == (2, 2)      # per-view scalars: one plain chunk per unit


def test_each_group_consolidates_what_zarr_consolidates(both, tmp_path):
    """finalize builds every group's consolidated metadata from the documents it reads once; zarr's own
    ``consolidate_metadata`` of the same group parses to the same metadata."""
    import warnings

    from zarr.core.group import GroupMetadata

    from kt_cache.finalize import children_by_group, minimal_consolidated, node_documents

    store = shutil.copytree(both["v2"], tmp_path / "s.zarr")
    ours = node_documents(store)
    groups = children_by_group(ours)
    assert {"samples", "teachers/cnn32", "teachers/cnn32/logits_topk", "teachers/cnn32/stats"} <= set(groups)
    for group in sorted(groups, reverse=True):     # children first: a parent's copy of a child has no copies
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(str(store), path=group)
    for group in groups:
        theirs = minimal_consolidated(json.loads((store / group / "zarr.json").read_text()))
        parsed = [GroupMetadata.from_dict(dict(doc)).to_dict() for doc in (ours[group], theirs)]
        assert json.dumps(parsed[0], sort_keys=True, default=str) == json.dumps(parsed[1], sort_keys=True, default=str), group


def test_every_command_reads_a_v2_store_and_the_upgrade_to_v3_rewrites_only_metadata(both):
    runner, base = CliRunner(), both["base"]
    v2 = base / "v2-committed.zarr"
    shutil.copytree(V2, v2)
    info = runner.invoke(cli, ["info", str(v2)])
    assert info.exit_code == 0 and "ktc store v2" in info.output, info.output
    assert runner.invoke(cli, ["verify", str(v2)]).exit_code == 0
    assert "consolidated_metadata" in json.loads((v2 / "zarr.json").read_text())
    up = upgraded_copy(v2, base / "v2-upgraded.zarr", says="v2 -> v3 (0 teacher(s) rewritten")
    old, new = StoreReader(str(v2)), StoreReader(str(up))
    assert (old.meta.version, new.meta.version, new.meta.teachers) == (2, 3, ("cnn32",))
    for path in ("features", "featmap", "logits_topk/values", "logits_topk/index", "logits_lse", "stats/features"):
        np.testing.assert_array_equal(old.read("cnn32", path), new.read("cnn32", path))
    before, after = (json.loads((s / "ktc-objects.json").read_text())["objects"] for s in (v2, up))
    assert {k: v for k, v in before.items() if "zarr.json" not in k} == {k: v for k, v in after.items() if "zarr.json" not in k}
    assert len((up / "zarr.json").read_bytes()) < len((v2 / "zarr.json").read_bytes()) / 2
    assert runner.invoke(cli, ["verify", str(up)]).exit_code == 0
    for name, store in (("v2", v2), ("v3", up)):
        result = runner.invoke(cli, ["train", "--cache", str(store), "--out", str(base / f"run2-{name}"),
                                     "--data", str(base / "images"), *TRAIN])
        assert result.exit_code == 0, result.output
    assert (base / "run2-v2" / "student.safetensors").read_bytes() == (base / "run2-v3" / "student.safetensors").read_bytes()


def test_every_command_reads_a_v1_store_and_trains_the_same_student(both):
    runner, base = CliRunner(), both["base"]
    info = runner.invoke(cli, ["info", str(both["v1"])])
    assert info.exit_code == 0 and "ktc store v1" in info.output, info.output
    assert runner.invoke(cli, ["verify", str(both["v1"])]).exit_code == 0
    same = upgraded_copy(both["v1"], base / "v1-upgraded.zarr")
    assert StoreReader(str(same)).meta.version == 3
    for name, store in (("v1", both["v1"]), ("v2", same)):
        result = runner.invoke(cli, ["train", "--cache", str(store), "--out", str(base / f"run-{name}"),
                                     "--data", str(base / "images"), *TRAIN])
        assert result.exit_code == 0, result.output
    assert (base / "run-v1" / "student.safetensors").read_bytes() == (base / "run-v2" / "student.safetensors").read_bytes()
    merged = runner.invoke(cli, ["merge", str(both["v1"]), str(both["v2"]), "--rename", "1:cnn32=cnn32_v2",
                                 "--out", str(base / "merged.zarr")])
    assert merged.exit_code == 0, merged.output
    reader = StoreReader(str(base / "merged.zarr"))
    assert reader.meta.version == 3 and reader.meta.teachers == ("cnn32", "cnn32_v2")
    np.testing.assert_allclose(reader.feature_stats("cnn32")["mean"], reader.feature_stats("cnn32_v2")["mean"],
                               rtol=1e-3, atol=1e-5)


def test_a_newer_version_is_refused_with_the_fix(tmp_path):
    store = tmp_path / "future.zarr"
    shutil.copytree(V1, store)
    document = json.loads((store / "zarr.json").read_text())
    document["attributes"]["ktc"]["version"] = 4
    (store / "zarr.json").write_text(json.dumps(document))
    result = CliRunner().invoke(cli, ["info", str(store)])
    assert result.exit_code != 0 and "version 4" in result.output and "reads versions 1..3" in result.output
    assert "upgrade ktc" in result.output and "Traceback" not in result.output


def test_upgrade_rewrites_metadata_only_and_keeps_every_chunk_entry(tmp_path):
    store = upgraded_copy(V1, tmp_path / "up.zarr")
    old, new = StoreReader(str(V1)), StoreReader(str(store))
    assert (old.meta.version, new.meta.version) == (1, 3)
    raw = zarr.open_group(str(store), mode="r")["teachers/cnn32"].attrs["ktc_teacher"]
    assert raw["class_names"] == "dataset" and raw["feature_stats"] == {"array": "stats/features", "count": 12}
    for path in ("features", "featmap", "logits_topk/values", "logits_topk/index", "logits_lse"):
        np.testing.assert_array_equal(old.read("cnn32", path), new.read("cnn32", path))
    a, b = old.feature_stats("cnn32"), new.feature_stats("cnn32")
    np.testing.assert_array_equal(a["mean"], b["mean"])
    assert new.teacher_record("cnn32").class_names == ("ant", "bee", "cat")
    before, after = (json.loads((s / "ktc-objects.json").read_text())["objects"] for s in (V1, store))
    chunks = [k for k in before if "/c/" in k]
    assert chunks and all(after[k] == before[k] for k in chunks)
    assert "teachers/cnn32/stats/features/c/0/0" in after
    assert CliRunner().invoke(cli, ["verify", str(store)]).exit_code == 0
    again = CliRunner().invoke(cli, ["upgrade", str(store)])
    assert again.exit_code == 0 and "already format v3; nothing to do" in again.output


def test_upgrade_never_vouches_for_damage(tmp_path):
    chunk = tmp_path / "chunk.zarr"
    shutil.copytree(V1, chunk)
    target = next(p for p in sorted((chunk / "teachers/cnn32/features").rglob("*")) if p.is_file() and "/c/" in str(p))
    target.write_bytes(target.read_bytes()[:-7] + b"\x00" * 7)
    assert CliRunner().invoke(cli, ["upgrade", str(chunk)]).exit_code == 0      # metadata only: chunks are not read
    failed = CliRunner().invoke(cli, ["verify", str(chunk)])
    assert failed.exit_code == 1 and str(target.relative_to(chunk)) in failed.output
    meta = tmp_path / "meta.zarr"
    shutil.copytree(V1, meta)
    document = meta / "teachers/cnn32/zarr.json"
    document.write_text(document.read_text().replace('"predictive"', '"descriptive"'))
    refused = CliRunner().invoke(cli, ["upgrade", str(meta)])
    assert refused.exit_code == 1 and "teachers/cnn32/zarr.json differs from its entry" in refused.output
    assert "ktc verify" in refused.output and StoreReader(str(meta)).meta.version == 1
    url = CliRunner().invoke(cli, ["upgrade", "http://127.0.0.1:9/store.zarr"])
    assert url.exit_code == 2 and "only a store folder on this machine" in url.output


def test_an_interrupted_upgrade_is_finished_by_a_rerun(tmp_path, monkeypatch):
    import kt_cache.store.upgrade as upgrade

    store = tmp_path / "up.zarr"
    shutil.copytree(V1, store)

    def killed(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(upgrade, "rewrite_manifest", killed)     # after every rewrite, before the integrity record
    with pytest.raises(KeyboardInterrupt):
        upgrade.upgrade_store(str(store))
    assert upgrade.journal_path(store).is_file() and StoreReader(str(store)).meta.version == 3
    assert CliRunner().invoke(cli, ["verify", str(store)]).exit_code == 1       # the record is stale: not done yet
    monkeypatch.undo()
    result = CliRunner().invoke(cli, ["upgrade", str(store)])
    assert result.exit_code == 0 and "upgraded" in result.output, result.output
    assert not upgrade.journal_path(store).exists()
    assert CliRunner().invoke(cli, ["verify", str(store)]).exit_code == 0
