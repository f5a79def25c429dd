"""A manifest teacher with ``codec: int8``: features and maps written as int8 codes at extraction."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from extract_helpers import cnn_teacher, extract, finished_project, make_image_folder, write_manifest
from kt_cache.cli import cli
from kt_cache.store import StoreReader


@pytest.fixture(scope="module")
def projects(tmp_path_factory):
    """The same teacher (same id, so the same random init) extracted plainly and with ``codec: int8``."""
    base = tmp_path_factory.mktemp("codec_extract")
    return {"plain": finished_project(base / "plain", [cnn_teacher()]),
            "int8": finished_project(base / "int8", [cnn_teacher(codec="int8")])}


def test_codes_decode_to_the_plain_store_with_the_recorded_error(projects):
    plain, coded = StoreReader(projects["plain"] / "out.zarr"), StoreReader(projects["int8"] / "out.zarr")
    attrs = coded.teacher_attrs("cnn32")
    for output in ("features", "featmap"):
        original = plain.read("cnn32", output).astype(np.float64)
        codes, params = coded.read("cnn32", output), coded.codec_params("cnn32", output)
        assert codes.dtype == np.int8 and codes.shape == original.shape
        assert params.arrays["scale"].shape == (coded.meta.n_units, original.shape[-1])   # one row per unit
        decoded = params.decode(codes).astype(np.float64)
        x, xh = original.reshape(-1, original.shape[-1]), decoded.reshape(-1, original.shape[-1])
        cos = (x * xh).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(xh, axis=1))
        error = attrs["codec"][output]["error"]
        assert error["vectors"] == len(x) and error["mean_cosine"] == pytest.approx(cos.mean(), abs=2e-6)
        assert error["rel_mse"] == pytest.approx(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), rel=1e-3, abs=1e-7)
        assert error["mean_cosine"] > 0.9999        # 8 bits per value over each unit's own range
    stats = coded.feature_stats("cnn32")
    decoded = coded.codec_params("cnn32", "features").decode(coded.read("cnn32", "features"))
    np.testing.assert_allclose(stats["mean"], decoded.reshape(-1, decoded.shape[-1]).mean(0), rtol=1e-4, atol=1e-6)
    for path in ("logits_topk/values", "logits_lse"):
        np.testing.assert_array_equal(coded.read("cnn32", path), plain.read("cnn32", path))


def test_a_coded_store_verifies_and_shows_its_codec(projects):
    """(Training reads these per-unit int8 codes as it reads a compacted store's: tests/test_compact.py.)"""
    store = projects["int8"] / "out.zarr"
    runner = CliRunner()
    assert runner.invoke(cli, ["verify", str(store)]).exit_code == 0
    info = runner.invoke(cli, ["info", str(store)])
    assert "features encoded int8 (512 -> 512 int8): mean cosine" in info.output
    dry = extract(projects["int8"] / "teachers.yaml", "--dry-run")
    assert dry.exit_code == 0 and "features             [12, 3, 512]             int8" in dry.output


def test_a_lost_unit_of_codec_parameters_is_recomputed_on_rerun(projects, tmp_path):
    import shutil

    project = tmp_path / "p"
    shutil.copytree(projects["int8"], project)
    store = project / "out.zarr"
    before = StoreReader(store).read("cnn32", "features")
    lost = next((store / "teachers/cnn32/codec/features/scale/c/1").rglob("*"))
    lost.unlink()
    assert CliRunner().invoke(cli, ["verify", str(store)]).exit_code == 1
    result = extract(project / "teachers.yaml")
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(cli, ["verify", str(store)]).exit_code == 0
    np.testing.assert_array_equal(StoreReader(store).read("cnn32", "features"), before)


@pytest.mark.parametrize("entry, message", [
    ({"codec": "pca:8"}, "expected int8"),
    ({"codec": "int8", "outputs": ["logits"], "featmap": None}, "codec: int8 applies to features and featmap"),
])
def test_other_codecs_at_extraction_are_refused(tmp_path, entry, message):
    make_image_folder(tmp_path / "images", per_class=1)
    teacher = {k: v for k, v in cnn_teacher(**entry).items() if v is not None}
    write_manifest(tmp_path / "teachers.yaml", [teacher])
    result = extract(tmp_path / "teachers.yaml", "--dry-run")
    assert result.exit_code == 2, result.output
    assert message in result.output and "teachers.yaml:teachers[0].codec" in result.output


def test_the_manifest_entry_of_a_plain_teacher_is_unchanged(projects):
    entry = StoreReader(projects["plain"] / "out.zarr").teacher_attrs("cnn32")["entry"]
    assert "codec" not in entry        # stores made before `codec:` resume without --overwrite
    coded = StoreReader(projects["int8"] / "out.zarr").teacher_attrs("cnn32")["entry"]
    assert coded["codec"] == "int8" and json.dumps(coded)


def test_extraction_int8_equals_ktc_compact_int8_of_the_plain_store(projects, tmp_path):
    out = tmp_path / "compact.zarr"
    result = CliRunner().invoke(cli, ["compact", str(projects["plain"] / "out.zarr"), "--out", str(out),
                                      "--features", "int8", "--featmap", "int8"])
    assert result.exit_code == 0, result.output
    extracted, compacted = StoreReader(projects["int8"] / "out.zarr"), StoreReader(out)
    for output in ("features", "featmap"):
        np.testing.assert_array_equal(extracted.read("cnn32", output), compacted.read("cnn32", output))
        for name in ("scale", "offset"):
            np.testing.assert_array_equal(extracted.codec_params("cnn32", output).arrays[name],
                                          compacted.codec_params("cnn32", output).arrays[name])
        mine, theirs = (r.teacher_attrs("cnn32")["codec"][output]["error"] for r in (extracted, compacted))
        assert mine == pytest.approx(theirs, abs=2e-6)
