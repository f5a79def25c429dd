"""``ktc compact``: codec round trips, recorded error against a recomputation, every command on a compact store."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from extract_helpers import cnn_teacher, finished_project
from http_server import serve_folder
from kt_cache.cli import cli
from kt_cache.codecs import MISSING_CODE, Codec, parse_codec
from kt_cache.transform_codec import MISSING_FLAG
from kt_cache.finalize import write_object_manifest
from kt_cache.errors import StoreError
from kt_cache.store import StoreReader

OUTPUTS = ("features", "featmap")
TC_BYTES = 6                 # code bytes per grid cell of the test's tc codec
TRAIN = ["--student", "resnet10t", "--img-size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0",
         "--no-progress"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def compacted(two_teacher_store, tmp_path_factory):
    """The shared two-teacher store compacted with each codec (features and featmaps alike)."""
    base = tmp_path_factory.mktemp("compact")
    stores = {}
    for codec in ("int8", "pca:8", "pca:8,int8"):
        out = base / f"{codec.replace(':', '_').replace(',', '_')}.zarr"
        ok("compact", two_teacher_store, "--out", out, "--features", codec, "--featmap", codec)
        stores[codec] = out
    stores["tc"] = base / "tc.zarr"                # featmaps by the transform codec, features by pca:8,int8
    ok("compact", two_teacher_store, "--out", stores["tc"], "--features", "pca:8,int8", "--featmap", f"tc:{TC_BYTES}")
    return stores


def recomputed_error(original: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    x = original.reshape(-1, original.shape[-1]).astype(np.float64)
    xh = decoded.reshape(-1, decoded.shape[-1]).astype(np.float64)
    cos = (x * xh).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(xh, axis=1))
    variance = ((x - x.mean(0)) ** 2).sum()
    return {"mean_cosine": cos.mean(), "rel_mse": ((x - xh) ** 2).sum() / variance,
            "worst_decile_cosine": np.sort(cos)[int(np.ceil(0.1 * len(cos))) - 1], "vectors": len(cos)}


@pytest.mark.parametrize("codec", ["int8", "pca:8", "pca:8,int8"])
def test_codec_round_trip_records_the_error_a_recomputation_finds(two_teacher_store, compacted, codec):
    source, compact = StoreReader(two_teacher_store), StoreReader(compacted[codec])
    want = parse_codec(codec)
    for tid in source.teacher_ids():
        attrs = compact.teacher_attrs(tid)
        for output in OUTPUTS:
            original = source.read(tid, output)
            codes, params = compact.read(tid, output), compact.codec_params(tid, output)
            assert codes.shape == (*original.shape[:-1], want.code_dim(original.shape[-1]))
            assert codes.dtype == np.dtype(want.code_dtype) and params.codec == want
            record = attrs["codec"][output]
            assert record["name"] == codec and record["dim"] == original.shape[-1]
            decoded = params.decode(codes)
            assert decoded.shape == original.shape and decoded.dtype == np.float32
            expect = recomputed_error(original, decoded)
            got = record["error"]
            assert got["vectors"] == expect["vectors"]
            assert got["mean_cosine"] == pytest.approx(expect["mean_cosine"], abs=2e-6)
            assert got["rel_mse"] == pytest.approx(expect["rel_mse"], rel=1e-4, abs=2e-6)
            # the lower edge of the 1/32-decade bin of 1 - cos holding the 10th percentile: never above it
            assert 1.0 <= (1 - got["worst_decile_cosine"]) / (1 - expect["worst_decile_cosine"]) <= 10 ** (1 / 32) + 1e-6
            assert 0.5 < got["mean_cosine"] <= 1.0   # random-init teachers: quality is the benchmark's job
        stats = compact.feature_stats(tid)      # methods z-score with the decoded features' statistics
        decoded = compact.codec_params(tid, "features").decode(compact.read(tid, "features"))
        flat = decoded.reshape(-1, decoded.shape[-1])
        np.testing.assert_allclose(stats["mean"], flat.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats["std"], flat.std(0), rtol=1e-3, atol=1e-5)
        for path in ("logits_lse", "label_logit"):    # what is not re-encoded is copied exactly
            np.testing.assert_array_equal(compact.read(tid, path), source.read(tid, path))


def test_pca_with_every_component_is_exact_and_int8_is_close(two_teacher_store, tmp_path):
    out = tmp_path / "full.zarr"
    ok("compact", two_teacher_store, "--out", out, "--features", "pca:192", "--teachers", "vit48")
    record = StoreReader(out).teacher_attrs("vit48")["codec"]["features"]
    assert record["variance_kept"] == pytest.approx(1.0, abs=1e-6)
    assert record["error"]["mean_cosine"] > 0.9999 and record["error"]["rel_mse"] < 1e-4
    assert "codec" not in StoreReader(out).teacher_attrs("cnn32")     # the other teacher is copied unchanged


def test_fp16_of_a_float16_array_is_copied_byte_for_byte(two_teacher_store, tmp_path):
    out = tmp_path / "c.zarr"
    ok("compact", two_teacher_store, "--out", out, "--features", "fp16", "--featmap", "int8")
    for file in (two_teacher_store / "teachers/cnn32/features").rglob("*"):
        if file.is_file():
            assert (out / file.relative_to(two_teacher_store)).read_bytes() == file.read_bytes()
    assert set(StoreReader(out).teacher_attrs("cnn32")["codec"]) == {"featmap"}


def test_fp16_re_encodes_a_float32_store(tmp_path):
    base = finished_project(tmp_path / "p", [cnn_teacher(dtype="float32")])
    out = tmp_path / "half.zarr"
    ok("compact", base / "out.zarr", "--out", out, "--features", "fp16", "--featmap", "fp16")
    reader = StoreReader(out)
    assert reader.read("cnn32", "features").dtype == np.float16
    assert reader.teacher_attrs("cnn32")["codec"]["featmap"]["source_dtype"] == "float32"
    assert reader.teacher_attrs("cnn32")["codec"]["features"]["error"]["mean_cosine"] > 0.99999
    ok("verify", out)


def test_every_command_works_on_a_compact_store(two_teacher_store, compacted, tmp_path):
    store = compacted["pca:8,int8"]
    info = json.loads(ok("info", store, "--json").output)
    by_id = {t["id"]: t for t in info["teachers"]}
    assert by_id["vit48"]["codecs"]["features"]["name"] == "pca:8,int8"
    assert info["codec_sizes"]["pca:D/8,int8"] < info["codec_sizes"]["fp16"]
    vectors = [(path, count, dim) for t in info["teachers"] for path, (count, dim) in t["vectors"].items()]
    assert info["codec_sizes"]["pca:D/4,int8 + maps tc:D/8"] == sum(
        count * dim // (8 if path == "featmap" else 4) for path, count, dim in vectors)
    text = ok("info", store).output
    assert "features encoded pca:8,int8 (192 -> 8 int8): mean cosine" in text
    assert "pca:D/4,int8" in text
    ok("verify", store)
    ok("subset", store, "--teachers", "vit48", "--out", tmp_path / "sub.zarr")
    ok("subset", two_teacher_store, "--teachers", "cnn32", "--out", tmp_path / "plain.zarr")
    ok("merge", tmp_path / "sub.zarr", tmp_path / "plain.zarr", "--out", tmp_path / "merged.zarr")
    merged = StoreReader(tmp_path / "merged.zarr")
    assert merged.codec_params("vit48", "features").codec == Codec(8, True)
    assert merged.codec_params("cnn32", "features") is None
    ok("pack", store, tmp_path / "c.zip")
    ok("verify", f"zip://{tmp_path / 'c.zip'}")
    with serve_folder(store.parent) as server:
        remote = StoreReader(f"{server.url}/{store.name}")
        np.testing.assert_array_equal(remote.read("vit48", "features"), StoreReader(store).read("vit48", "features"))
        assert remote.codec_params("vit48", "featmap").arrays["basis"].shape == (8, 192)


@pytest.mark.parametrize("method", ["uniform", "kpu"])
def test_train_reads_a_compact_store_through_the_cli(compacted, tmp_path, method):
    out = tmp_path / method
    ok("train", "--cache", compacted["pca:8,int8"], "--out", out, "--method", method, *TRAIN, "--log-every", "1")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in steps if r["kind"] == "step")


def test_teacher_batch_holds_the_decoded_features(two_teacher_store, compacted):
    from kt_train.data import CachedTeachers

    store = StoreReader(compacted["pca:8,int8"])
    cached = CachedTeachers(store, ["cnn32", "vit48"], needs=("features", "featmaps"))
    rows, views = np.array([0, 5, 11]), np.array([2, 0, 1])
    batch = cached.to_teacher_batch(cached.gather(rows, views), None, "cpu")
    for tid in ("cnn32", "vit48"):
        for output, table in (("features", batch.features), ("featmap", batch.featmaps)):
            params = store.codec_params(tid, output)
            expect = params.decode(store.read(tid, output)[rows, views], rows)
            assert table[tid].dtype == torch.float32
            np.testing.assert_allclose(table[tid].numpy(), expect, rtol=1e-5, atol=1e-5)
        assert cached.teacher_infos()[cached.ids.index(tid)].feature_dim == store.teacher_attrs(tid)["feature_dim"]


@pytest.mark.parametrize("codec, tid, output, where, code", [
    ("int8", "vit48", "features", (3, 1, 5), MISSING_CODE),      # one vector's code
    ("tc", "cnn32", "featmap", (3, 1, 0), MISSING_FLAG),         # a tc map's flag byte
])
def test_a_missing_code_marks_the_row_invalid_is_zeroed_and_verify_names_it(compacted, tmp_path, codec, tid, output,
                                                                             where, code):
    from kt_train.data import CachedTeachers

    store = tmp_path / "c.zarr"
    shutil.copytree(compacted[codec], store)
    array = zarr.open_array(store / f"teachers/{tid}/{output}", mode="r+")
    codes = array[:]
    codes[where] = code
    array[:] = codes
    write_object_manifest(store)
    assert np.isnan(StoreReader(store).codec_params(tid, output).decode(codes[3, 1:2], np.array([3]))).any()
    field = "features" if output == "features" else "featmaps"
    cached = CachedTeachers(StoreReader(store), [tid], needs=(field,))
    batch = cached.to_teacher_batch(cached.gather(np.array([3, 3]), np.array([1, 0])), None, "cpu")
    values = getattr(batch, field)[tid]
    assert batch.valid[tid].tolist() == [False, True]
    assert (values[0] == 0).all() and values[1].abs().sum() > 0
    result = run("verify", store)
    assert result.exit_code == 1 and f"missing code {code}" in result.output
    assert f"teachers/{tid}/{output}" in result.output


@pytest.mark.parametrize("args, message", [
    (["--features", "pca:0"], "not a codec"),
    (["--features", "int4"], "Expected one of fp16, int8, pca:K, pca:K,int8 or (featmap) tc:B"),
    (["--featmap", "tc:0"], "--featmap 'tc:0': not a codec"),
    (["--features", "tc:16"], "the transform codec codes whole spatial maps (--featmap)"),
    (["--featmap", "pca:8,int16"], "--featmap 'pca:8,int16': not a codec"),
    (["--features", "pca:999"], "at most pca:512 components exist. Fix: choose K <= 512"),
    ([], "no codec given"),
    (["--features", "int8", "--teachers", "nope"], "no such teacher"),
])
def test_bad_codec_requests_are_usage_errors(two_teacher_store, tmp_path, args, message):
    result = run("compact", two_teacher_store, "--out", tmp_path / "x.zarr", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.zarr").exists()


def test_compacting_twice_is_refused(compacted, tmp_path):
    result = run("compact", compacted["int8"], "--out", tmp_path / "again.zarr", "--features", "pca:4")
    assert result.exit_code == 2 and "already compacted (int8)" in result.output


@pytest.mark.parametrize("codec, tid, output, key, value, shape", [
    ("pca:8,int8", "vit48", "features", "code_dim", 16, "[12, 3, 8]"),
    ("tc", "cnn32", "featmap", "bits_per_map", 8000, "[12, 3,"),        # more bits than the codes hold
])
def test_a_codec_record_that_disagrees_with_the_array_is_damage(compacted, tmp_path, codec, tid, output, key, value,
                                                                shape):
    store = tmp_path / "c.zarr"
    shutil.copytree(compacted[codec], store)
    group = zarr.open_group(store / f"teachers/{tid}", mode="r+")
    attrs = dict(group.attrs["ktc_teacher"])
    attrs["codec"] = dict(attrs["codec"], **{output: dict(attrs["codec"][output], **{key: value})})
    group.attrs["ktc_teacher"] = attrs
    write_object_manifest(store)
    result = run("info", store)
    assert result.exit_code == 1 and f"does not match {output} of shape {shape}" in result.output


def test_transform_codec_round_trip_records_the_error_a_recomputation_finds(two_teacher_store, compacted):
    source, compact = StoreReader(two_teacher_store), StoreReader(compacted["tc"])
    original, codes = source.read("cnn32", "featmap"), compact.read("cnn32", "featmap")
    n, views, gy, gx, channels = original.shape
    params = compact.codec_params("cnn32", "featmap")
    record = compact.teacher_attrs("cnn32")["codec"]["featmap"]
    assert params.codec == Codec(transform=TC_BYTES) and record["name"] == f"tc:{TC_BYTES}"
    assert codes.dtype == np.uint8 and codes.shape == (n, views, record["code_dim"])       # one code per map
    assert record["code_dim"] == 1 + -(-record["bits_per_map"] // 8) <= TC_BYTES * gy * gx
    assert record["grid"] == [gy, gx] and record["dim"] == channels
    decoded = params.decode(codes)
    assert decoded.shape == original.shape and decoded.dtype == np.float32
    expect, got = recomputed_error(original, decoded), record["error"]
    assert got["vectors"] == expect["vectors"] == n * views * gy * gx       # the error is over cell vectors
    assert got["mean_cosine"] == pytest.approx(expect["mean_cosine"], abs=2e-6)
    assert got["rel_mse"] == pytest.approx(expect["rel_mse"], rel=1e-4, abs=2e-6)
    assert got["mean_cosine"] > 0.5
    np.testing.assert_array_equal(compact.read("vit48", "features"), StoreReader(compacted["pca:8,int8"]).read(
        "vit48", "features"))                                   # the other option is unaffected


def test_transform_codec_store_works_with_every_command(two_teacher_store, compacted, tmp_path):
    store = compacted["tc"]
    text = ok("info", store).output
    assert f"featmap encoded tc:{TC_BYTES} (2x2 cells x 512 -> " in text and "uint8 bytes per map): mean cosine" in text
    by_id = {t["id"]: t for t in json.loads(ok("info", store, "--json").output)["teachers"]}
    assert by_id["cnn32"]["vectors"]["featmap"][0] == 12 * 3 * 4             # cell vectors, not map codes
    ok("verify", store)
    from kt_cache.xarray_view import open_datatree

    tree = open_datatree(store)["teachers/cnn32"]          # codes of different widths side by side
    assert tree["featmap"].dims == ("sample", "view", "map_code") and tree.sizes["feature_code"] == 8
    import xarray

    plain = xarray.open_zarr(store / "teachers/cnn32", zarr_format=3)      # without ktc, too (its own metadata)
    assert plain["featmap"].dims[-1] == "map_code" and plain["features"].dims[-1] == "feature_code"
    ok("subset", store, "--teachers", "cnn32", "--out", tmp_path / "sub.zarr")
    ok("subset", two_teacher_store, "--teachers", "vit48", "--out", tmp_path / "plain.zarr")
    ok("merge", tmp_path / "sub.zarr", tmp_path / "plain.zarr", "--out", tmp_path / "merged.zarr")
    merged = StoreReader(tmp_path / "merged.zarr")
    np.testing.assert_array_equal(merged.read("cnn32", "featmap"), StoreReader(store).read("cnn32", "featmap"))
    assert merged.codec_params("cnn32", "featmap").codec == Codec(transform=TC_BYTES)
    ok("pack", store, tmp_path / "c.zip")
    ok("verify", f"zip://{tmp_path / 'c.zip'}")
    with serve_folder(store.parent) as server:
        remote = StoreReader(f"{server.url}/{store.name}")
        np.testing.assert_array_equal(remote.read("cnn32", "featmap"), StoreReader(store).read("cnn32", "featmap"))
        assert remote.codec_params("cnn32", "featmap").bits == StoreReader(store).codec_params("cnn32", "featmap").bits
    for budget, streamed in (("4", False), ("0.0000001", True)):      # held in RAM, then streamed in blocks
        out = tmp_path / f"kpu-{budget}"
        ok("train", "--cache", store, "--out", out, "--method", "kpu", *TRAIN, "--log-every", "1",
           "--ram-budget-gb", budget)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "step")
        assert (records[0]["kind"], records[0]["streamed_arrays"] > 0) == ("memory", streamed)


def test_teacher_batch_holds_the_decoded_transform_coded_maps(compacted):
    from kt_train.data import CachedTeachers

    store = StoreReader(compacted["tc"])
    cached = CachedTeachers(store, ["cnn32", "vit48"], needs=("features", "featmaps"))
    rows, views = np.array([0, 5, 11]), np.array([2, 0, 1])
    batch = cached.to_teacher_batch(cached.gather(rows, views), None, "cpu")
    expect = store.codec_params("cnn32", "featmap").decode(store.read("cnn32", "featmap")[rows, views])
    np.testing.assert_allclose(batch.featmaps["cnn32"].numpy(), expect, rtol=1e-5, atol=1e-5)


def test_sizes_given_as_a_fraction_of_d_resolve_per_teacher(two_teacher_store, tmp_path):
    out = tmp_path / "relative.zarr"
    result = ok("compact", two_teacher_store, "--out", out, "--features", "pca:D/4,int8", "--featmap", "tc:D/64")
    reader = StoreReader(out)
    names = {tid: {o: r["name"] for o, r in reader.teacher_attrs(tid)["codec"].items()} for tid in ("cnn32", "vit48")}
    assert names == {"cnn32": {"features": "pca:128,int8", "featmap": "tc:8"},       # D = 512
                     "vit48": {"features": "pca:48,int8", "featmap": "tc:3"}}         # D = 192
    assert "cnn32/featmap: tc:8 (2x2 cells x 512 -> " in result.output
    assert "--features pca:D/4,int8 --featmap tc:D/64" in json.loads((out / "ktc-objects.json").read_text())["made_by"]
    ok("verify", out)


def test_a_transform_codec_with_no_readable_map_to_fit_on_is_refused(two_teacher_store, tmp_path):
    store = tmp_path / "nan.zarr"
    shutil.copytree(two_teacher_store, store)
    array = zarr.open_array(store / "teachers/cnn32/featmap", mode="r+")
    array[:] = np.full(array.shape, np.nan, dtype=array.dtype)
    write_object_manifest(store)
    result = run("compact", store, "--out", tmp_path / "x.zarr", "--featmap", "tc:4", "--teachers", "cnn32")
    assert result.exit_code == 2 and "teacher cnn32" in result.output and "holds no map without NaN" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.zarr").exists()


def test_tc_parameters_that_cannot_decode_the_codes_are_damage(compacted, tmp_path):
    store = tmp_path / "c.zarr"
    shutil.copytree(compacted["tc"], store)
    depth = zarr.open_array(store / "teachers/cnn32/codec/featmap/depth", mode="r+")
    depth[:] = np.minimum(depth[:] + 1, 7)           # more bits than the stored codes hold
    write_object_manifest(store)
    with pytest.raises(StoreError, match="cannot decode its codes: depth adds up to"):
        StoreReader(store).codec_params("cnn32", "featmap")
    result = run("verify", store)
    assert result.exit_code == 1 and "teachers/cnn32/codec/featmap" in result.output
    assert "depth adds up to" in result.output and "Traceback" not in result.output


def test_each_re_encoded_array_has_a_progress_bar_that_counts_every_pass(two_teacher_store, tmp_path, monkeypatch):
    import io

    import tqdm

    finished = {}

    class Recorded(tqdm.tqdm):
        def __init__(self, *args, **kwargs):        # shown as on a terminal (off when stderr is not one)
            super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})

        def close(self):
            finished.setdefault(self.desc, (self.n, self.total))      # tqdm closes again when collected
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    monkeypatch.delenv("KTC_NO_PROGRESS", raising=False)
    ok("compact", two_teacher_store, "--out", tmp_path / "c.zarr", "--features", "pca:8,int8", "--featmap", "tc:4")
    assert sorted(finished) == ["cnn32/featmap -> tc:4", "cnn32/features -> pca:8,int8",
                                "vit48/featmap -> tc:4", "vit48/features -> pca:8,int8"]
    assert all(n == total == 12 * 3 for n, total in finished.values())       # 12 rows, three passes each
