"""Ordinary failures end in one paragraph (what, where, fix) and exit 1, never a traceback: a store server
that is down, a file given as zip:// that is not a zip, a truncated chunk met by ``ktc train``, and a full
disk during extract, pack, subset and merge (which lose nothing finished and leave no partial output)."""

from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from extract_helpers import cnn_teacher, finished_project, store_files, write_manifest
from kt_cache.store import sharing
from kt_cache.store import format as fmt
from kt_cache.cli import cli


def run(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_clean_failure(result, *phrases: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    for phrase in phrases:
        assert phrase in result.output, result.output


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("command", [("info",), ("verify",), ("train", "--out", "RUN")])
def test_store_server_down(tmp_path, command, fault_log):
    url = f"http://127.0.0.1:{free_port()}/store.zarr"
    args = [a.replace("RUN", str(tmp_path / "run")) for a in command[1:]]
    result = run(command[0], *(["--cache", url] if command[0] == "train" else [url]), *args)
    assert_clean_failure(result, "cannot be read", "server is running")
    fault_log(9, "remote", "store server down (connection refused)", f"ktc {command[0]}", 1,
              "one-paragraph error naming the URL and the fix; no traceback")


@pytest.mark.parametrize("command", ["info", "verify", "train", "subset"])
def test_zip_url_that_is_not_a_zip(tmp_path, command, fault_log):
    bogus = tmp_path / "store.zip"
    bogus.write_text("dataset: {root: images}\n")
    location = f"zip://{bogus}"
    extra = {"info": [location], "verify": [location], "train": ["--cache", location, "--out", tmp_path / "run"],
             "subset": [location, "--teachers", "cnn32", "--out", tmp_path / "sub.zarr"]}[command]
    assert_clean_failure(run(command, *extra), "is not a zip file", "ktc pack")
    fault_log(9, "bad-input", "zip:// pointing at a file that is not a zip", f"ktc {command}", 1,
              "one-paragraph error: not a zip file, how to fix; no traceback")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return finished_project(tmp_path_factory.mktemp("clean"), [cnn_teacher()])


def test_truncated_chunk_in_train(finished, tmp_path, fault_log):
    store = Path(shutil.copytree(finished / "out.zarr", tmp_path / "out.zarr"))
    victim = sorted(p for p in (store / "teachers/cnn32/features/c").rglob("*") if p.is_file())[0]
    victim.write_bytes(victim.read_bytes()[:-40])
    result = run("train", "--cache", store, "--method", "uniform", "--epochs", "1", "--out", tmp_path / "run")
    assert_clean_failure(result, "teachers/cnn32/features", "cannot be decoded", "ktc verify")
    fault_log(9, "damage", "truncated zstd chunk read by ktc train", "ktc train", 1,
              "error names the array, object and rows; no traceback, no training on damaged rows")


def disk_full(after: int):
    """A stand-in for a writer that runs out of disk after ``after`` successful calls."""
    calls = {"n": 0}

    def wrap(real):
        def write(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > after:
                raise OSError(errno.ENOSPC, "No space left on device", "out.zarr/teachers/cnn32/logits/c/1/0")
            return real(*args, **kwargs)
        return write
    return wrap


def test_disk_full_during_extract_then_rerun(finished, tmp_path, monkeypatch, fault_log):
    base = tmp_path / "run"
    shutil.copytree(finished / "images", base / "images")
    write_manifest(base / "teachers.yaml", [cnn_teacher()])
    monkeypatch.setattr(fmt, "write_unit", disk_full(after=1)(fmt.write_unit))
    full = run("extract", "--manifest", base / "teachers.yaml", "--workers", "0", "--no-progress")
    assert_clean_failure(full, "disk is full", "rerun the same command")
    monkeypatch.undo()
    again = run("extract", "--manifest", base / "teachers.yaml", "--workers", "0", "--no-progress")
    assert again.exit_code == 0, again.output
    assert store_files(base / "out.zarr") == store_files(finished / "out.zarr")
    fault_log(9, "resource", "disk full (ENOSPC) while extract writes a unit, then rerun", "ktc extract", 1,
              "clean error; the rerun resumes and the store equals an uninterrupted one", bytes_lost=0)


@pytest.mark.parametrize("command", ["pack", "subset", "merge"])
def test_disk_full_while_copying_leaves_no_output(finished, tmp_path, monkeypatch, command, fault_log):
    source = finished / "out.zarr"
    out = tmp_path / ("out.zip" if command == "pack" else "out.zarr")
    args = {"pack": [source, out], "subset": [source, "--teachers", "cnn32", "--out", out],
            "merge": [source, source, "--rename", "cnn32=twin", "--out", out]}[command]
    monkeypatch.setattr(sharing, "copy_objects", disk_full(after=0)(sharing.copy_objects))
    assert_clean_failure(run(command, *args), "disk is full")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no partial output of any kind is left"
    monkeypatch.undo()
    assert run(command, *args).exit_code == 0
    assert run("verify", out).exit_code == 0
    fault_log(9, "resource", f"disk full (ENOSPC) during ktc {command}", f"ktc {command}", 1,
              "clean error; no partial output left; rerun succeeds and verifies", bytes_lost=0)


def test_library_warnings_are_one_line(finished, tmp_path, fault_log):
    workers = (os.cpu_count() or 1) + 2          # more than the cores: torch's DataLoader warns
    result = CliRunner().invoke(cli, ["train", "--cache", str(finished / "out.zarr"), "--method", "kd", "--epochs", "1",
                                      "--workers", str(workers), "--no-progress", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "UserWarning" not in result.output and "site-packages" not in result.output, result.output
    assert "Cosine annealing scheduler will have no effect" not in result.output
    assert result.output.count(f"warning (torch): This DataLoader will create {workers} worker processes") == 1, result.output
    fault_log(14, "bad-input", "--workers above the core count; a 1-step schedule", "ktc train", 0,
              "library warnings shown once as one line, no source paths; no scheduler warning")
