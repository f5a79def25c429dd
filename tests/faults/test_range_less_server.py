"""A store served by a server that ignores ``Range`` (``python -m http.server``: 200 with the whole object)
reads exactly like one served with ranges, and like the local folder: verify, info and train.

The store has 9 samples in units of 512 rows, so every array's one shard is mostly empty and zarr reads
it piecewise (a suffix range for its index, byte ranges for its chunks), logits included (what kd reads);
that is where a range-less server used to hand back whole objects as if they were the ranges asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from extract_helpers import cnn_teacher, make_image_folder, vit_teacher, write_manifest
from http_server import serve_folder
from kt_cache.cli import cli

NOTE = "ignores HTTP Range requests"
TRAIN = ["--method", "kd", "--student", "resnet10t", "--img-size", "32", "--epochs", "1", "--batch-size", "4",
         "--workers", "0", "--no-progress", "--seed", "0"]
SERVERS = [pytest.param(False, id="range-less"), pytest.param(True, id="ranged")]


def invoke(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def partial_shard_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two teachers over 9 images in one unit of 512 rows: each shard holds 9 rows of its chunks' 512."""
    base = tmp_path_factory.mktemp("range_less")
    make_image_folder(base / "images", per_class=3)
    manifest = write_manifest(base / "teachers.yaml", [cnn_teacher(), vit_teacher()], unit_rows=512)
    result = invoke("extract", "--manifest", manifest, "--workers", "0", "--no-progress")
    assert result.exit_code == 0, result.output
    return base / "out.zarr"


@pytest.fixture(scope="module")
def local_run(partial_shard_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch trained from the local folder: what every served copy must reproduce."""
    out = tmp_path_factory.mktemp("local_run") / "run"
    result = invoke("train", "--cache", partial_shard_store, "--data", partial_shard_store.parent / "images",
                    *TRAIN, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def check_requests(server, ranges: bool) -> None:
    """Ranged servers stay ranged (206s); a range-less one was asked for ranges and only ever sent 200s."""
    statuses = {r.status for r in server.requests if r.range}
    assert statuses == ({206} if ranges else {200}), statuses


@pytest.mark.parametrize("ranges", SERVERS)
def test_verify_and_info_of_a_clean_store(partial_shard_store: Path, ranges: bool, fault_log) -> None:
    with serve_folder(partial_shard_store.parent, ranges=ranges) as server:
        url = f"{server.url}/{partial_shard_store.name}"
        verify, info = invoke("verify", url), invoke("info", url)
        check_requests(server, ranges)
    assert verify.exit_code == 0 and f"OK {url}" in verify.output, verify.output
    assert "problem" not in verify.output and "Traceback" not in verify.output
    assert info.exit_code == 0 and "cnn32" in info.output and "vit48" in info.output, info.output
    assert (NOTE in verify.output) is not ranges, verify.output
    fault_log(15, "remote", f"store served by a server that {'honours' if ranges else 'ignores'} Range",
              "ktc verify", 0, "OK" + ("" if ranges else "; a note that ranges are ignored and whole objects read"))


@pytest.mark.parametrize("ranges", SERVERS)
def test_train_over_http_matches_the_local_store(partial_shard_store: Path, local_run: Path, ranges: bool,
                                                 tmp_path: Path, fault_log) -> None:
    with serve_folder(partial_shard_store.parent, ranges=ranges) as server:
        url = f"{server.url}/{partial_shard_store.name}"
        result = invoke("train", "--cache", url, "--data", partial_shard_store.parent / "images", *TRAIN,
                        "--out", tmp_path / "run")
        check_requests(server, ranges)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "student.safetensors").read_bytes() == (local_run / "student.safetensors").read_bytes()
    served, local = (json.loads((run / "eval.json").read_text()) for run in (tmp_path / "run", local_run))
    assert served.pop("checkpoint") != local.pop("checkpoint") and served == local   # all but the run folder
    fault_log(15, "remote", f"store served by a server that {'honours' if ranges else 'ignores'} Range",
              "ktc train --cache URL", 0, "trains to the same weights and metrics as from the local store")
