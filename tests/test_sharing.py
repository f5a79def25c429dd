"""``ktc merge``, ``ktc subset``, ``ktc pack``: bit-identical round trips and clear refusals."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from kt_cache.cli import cli
from kt_cache.finalize import write_object_manifest
from kt_cache.store import StoreReader


@pytest.fixture(scope="session")
def share_source(two_teacher_store: Path) -> Path:
    return two_teacher_store


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args: str):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def all_files(store: Path) -> dict[str, bytes]:
    """Every stored object, metadata documents and the object manifest's table included (its ``made_by``
    names the command that wrote the store, so it differs between a source and its copy by design)."""
    files = {f.relative_to(store).as_posix(): f.read_bytes() for f in sorted(store.rglob("*")) if f.is_file()}
    if "ktc-objects.json" in files:
        files["ktc-objects.json"] = json.dumps(json.loads(files["ktc-objects.json"])["objects"]).encode()
    return files


def test_subset_then_merge_is_bit_identical(share_source: Path, tmp_path: Path) -> None:
    ok("subset", share_source, "--teachers", "cnn32", "--out", tmp_path / "a.zarr")
    ok("subset", share_source, "--teachers", "vit48", "--out", tmp_path / "b.zarr")
    assert StoreReader(str(tmp_path / "a.zarr")).teacher_ids() == ["cnn32"]
    assert not (tmp_path / "a.zarr" / "teachers" / "vit48").exists()
    ok("merge", tmp_path / "a.zarr", tmp_path / "b.zarr", "--out", tmp_path / "c.zarr")
    assert all_files(tmp_path / "c.zarr") == all_files(share_source)
    listing = json.loads((tmp_path / "c.zarr" / "ktc-objects.json").read_text())
    assert listing["made_by"] == f"ktc merge {tmp_path / 'a.zarr'} {tmp_path / 'b.zarr'} --out {tmp_path / 'c.zarr'}"
    assert ok("verify", tmp_path / "c.zarr").output.startswith("OK")


def test_pack_is_bit_identical_and_readable_by_plain_zarr(share_source: Path, tmp_path: Path) -> None:
    packed = tmp_path / "store.zip"
    ok("pack", share_source, packed)
    with zipfile.ZipFile(packed) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
    assert members == {f.relative_to(share_source).as_posix(): f.read_bytes()   # the object list too, byte for byte
                       for f in share_source.rglob("*") if f.is_file()}
    root = zarr.open_group(zarr.storage.ZipStore(packed, mode="r"), mode="r")
    np.testing.assert_array_equal(root["teachers/cnn32/features"][:],
                                  zarr.open_group(str(share_source), mode="r")["teachers/cnn32/features"][:])
    ok("verify", f"zip://{packed}")
    ok("subset", f"zip://{packed}", "--teachers", "cnn32,vit48", "--out", tmp_path / "back.zarr")
    assert all_files(tmp_path / "back.zarr") == all_files(share_source)
    assert run("pack", share_source, packed).exit_code == 2, "an existing output is never overwritten"
    assert run("pack", share_source, tmp_path / "store.tar").exit_code == 2


def test_merge_needs_disjoint_ids_or_a_rename(share_source: Path, tmp_path: Path) -> None:
    ok("subset", share_source, "--teachers", "cnn32", "--out", tmp_path / "a.zarr")
    refused = run("merge", share_source, tmp_path / "a.zarr", "--out", tmp_path / "c.zarr")
    assert refused.exit_code == 2 and "'cnn32' would come from both" in refused.output and "--rename" in refused.output
    assert not (tmp_path / "c.zarr").exists()
    ok("merge", share_source, tmp_path / "a.zarr", "--out", tmp_path / "c.zarr", "--rename", "cnn32=cnn32_lab_b")
    reader = StoreReader(str(tmp_path / "c.zarr"))
    assert reader.teacher_ids() == ["cnn32", "cnn32_lab_b", "vit48"]
    attrs = reader.teacher_attrs("cnn32_lab_b")
    assert attrs["renamed_from"] == "cnn32" and "renamed_from" not in reader.teacher_attrs("cnn32")
    source, merged = all_files(share_source), all_files(tmp_path / "c.zarr")
    copied = {k.replace("cnn32_lab_b", "cnn32"): v for k, v in merged.items()
              if k.startswith("teachers/cnn32_lab_b/") and k != "teachers/cnn32_lab_b/zarr.json"}
    assert copied and all(source[k] == v for k, v in copied.items()), "renamed chunks are copied byte for byte"
    ok("verify", tmp_path / "c.zarr")


def test_rename_by_input_number_and_bad_specs(share_source: Path, tmp_path: Path) -> None:
    ok("subset", share_source, "--teachers", "vit48", "--out", tmp_path / "b.zarr")
    ok("merge", share_source, tmp_path / "b.zarr", "--out", tmp_path / "c.zarr", "--rename", "1:vit48=vit_a")
    assert StoreReader(str(tmp_path / "c.zarr")).teacher_ids() == ["cnn32", "vit48", "vit_a"]
    for spec, message in (("vit48", "expected OLD=NEW"), ("3:vit48=x", "N in 1..2"), ("vit48=../x", "not a valid"),
                          ("nope=x", "no teacher 'nope'")):
        result = run("merge", share_source, tmp_path / "b.zarr", "--out", tmp_path / "d.zarr", "--rename", spec)
        assert result.exit_code == 2 and message in result.output, (spec, result.output)
    assert not (tmp_path / "d.zarr").exists()


def edit_root_attrs(store: Path, **changes) -> None:
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    meta = dict(root.attrs["ktc"])
    for dotted, value in changes.items():
        target = meta
        *parents, last = dotted.split("__")
        for parent in parents:
            child = dict(target[parent])
            target[parent] = child
            target = child
        target[last] = value
    root.attrs["ktc"] = meta


@pytest.mark.parametrize(("change", "message"), [
    ({"dataset__fingerprint": "0" * 64}, "dataset fingerprint"),
    ({"views__seed": 7}, "views policy"),
    ({"order__seed": 3}, "row order"),
])
def test_merge_refuses_other_datasets_views_and_orders(share_source: Path, tmp_path: Path, change: dict, message: str) -> None:
    other = Path(shutil.copytree(share_source, tmp_path / "other.zarr"))
    ok("subset", share_source, "--teachers", "cnn32", "--out", tmp_path / "a.zarr")
    shutil.rmtree(other / "teachers" / "cnn32")
    edit_root_attrs(other, **change)
    result = run("merge", tmp_path / "a.zarr", other, "--out", tmp_path / "c.zarr")
    assert result.exit_code == 2 and f"differ in {message}" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "c.zarr").exists()


def test_merge_takes_samples_of_a_unit_from_the_store_that_processed_it(share_source: Path, tmp_path: Path) -> None:
    ok("subset", share_source, "--teachers", "vit48", "--out", tmp_path / "b.zarr")
    ok("subset", share_source, "--teachers", "cnn32", "--out", tmp_path / "a.zarr")
    b = tmp_path / "b.zarr"
    zarr.open_group(str(b), mode="r+")["teachers/vit48/done"][2] = False    # b never processed unit 2
    for key in ("samples/ok/c/2", "samples/views/c/2/0/0"):
        (b / key).unlink()
    write_object_manifest(b)   # as finalized by a run that never processed unit 2
    ok("merge", b, tmp_path / "a.zarr", "--out", tmp_path / "c.zarr")
    merged, source = all_files(tmp_path / "c.zarr"), all_files(share_source)
    assert merged["samples/views/c/2/0/0"] == source["samples/views/c/2/0/0"]
    assert merged["samples/ok/c/2"] == source["samples/ok/c/2"]
    assert not StoreReader(str(tmp_path / "c.zarr")).is_complete("vit48")


def test_subset_errors(share_source: Path, tmp_path: Path) -> None:
    unknown = run("subset", share_source, "--teachers", "vit4", "--out", tmp_path / "x.zarr")
    assert unknown.exit_code == 2 and 'Did you mean "vit48"' in unknown.output
    (tmp_path / "busy.zarr").mkdir()
    (tmp_path / "busy.zarr" / "keep.txt").write_text("mine")
    busy = run("subset", share_source, "--teachers", "vit48", "--out", tmp_path / "busy.zarr")
    assert busy.exit_code == 2 and "already exists" in busy.output
    assert (tmp_path / "busy.zarr" / "keep.txt").read_text() == "mine"
    inside = run("subset", share_source, "--teachers", "vit48", "--out", share_source / "teachers" / "copy")
    assert inside.exit_code == 2 and "inside the input store" in inside.output
    assert json.loads((share_source / "ktc-objects.json").read_text())["objects"]


def test_docs_example_reads_a_store_with_plain_zarr(share_source: Path, capsys: pytest.CaptureFixture) -> None:
    """The 'Reading a store without ktc' example of docs/store-format.md runs as written (no ktc import)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "store-format.md").read_text()
    section = text.split("## Reading a store without ktc", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "kt_cache" not in code and len(code.strip().splitlines()) <= 25
    exec(compile(code.replace('"train.zarr"', repr(str(share_source))), "store-format.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "cnn32 resnet10t (12, 3, 512)" in printed and "vit48" in printed
