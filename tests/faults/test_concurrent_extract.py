"""One writer per store: concurrent ``ktc extract`` runs on one store never compute a unit twice and leave
the store a single run makes, bit for bit; a lock whose holder is gone is taken over, a live one is named."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from extract_helpers import cnn_teacher, extract, finished_project, make_image_folder, store_files, vit_teacher, write_manifest
from kt_cache.lock import STALE_AFTER_S, lock_path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return finished_project(tmp_path_factory.mktemp("one"), [cnn_teacher(), vit_teacher()])


def fresh_copy(reference: Path, tmp_path: Path) -> Path:
    make_image_folder(tmp_path / "images", per_class=4)
    return write_manifest(tmp_path / "teachers.yaml", [cnn_teacher(), vit_teacher()])


@pytest.mark.slow
def test_four_concurrent_extracts_make_the_store_one_makes(reference, tmp_path, fault_log):
    manifest = fresh_copy(reference, tmp_path)
    command = [sys.executable, "-m", "kt_cache", "extract", "--manifest", str(manifest), "--workers", "0", "--no-progress"]
    env = dict(os.environ, KTC_NO_PROGRESS="1")
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(4)]
    outputs = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    for code, text in outputs:
        assert "Traceback" not in text, text
        assert code == 0 or (code == 1 and "another process is writing this store" in text), text
    created = sum(text.count(" created ") for _, text in outputs)
    assert created == 2, f"each of the 2 teachers is computed by exactly one process: {outputs}"
    assert store_files(tmp_path / "out.zarr") == store_files(reference / "out.zarr")
    assert not lock_path(tmp_path / "out.zarr").exists()
    refused = sum(code == 1 for code, _ in outputs)
    fault_log(10, "concurrency", "4 ktc extract processes started at once on one new store", "ktc extract",
              1 if refused else 0, f"{4 - refused} ran (one computed, the rest resumed), {refused} refused naming "
              "the holder; the store is bit-identical to a single run", bytes_lost=0)


def write_lock(store: Path, host: str, pid: int, age_s: float = 0.0) -> Path:
    path = lock_path(store)
    path.write_text(json.dumps({"pid": pid, "host": host, "command": "ktc extract --manifest other.yaml",
                                "started": "2026-12-02 10:00:00 UTC", "token": "abc"}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_live_lock_is_refused_naming_its_holder(reference, tmp_path, fault_log):
    manifest = fresh_copy(reference, tmp_path)
    write_lock(tmp_path / "out.zarr", socket.gethostname(), os.getppid())
    busy = extract(manifest)
    assert busy.exit_code == 1 and "Traceback" not in busy.output
    assert f"pid {os.getppid()} on host {socket.gethostname()}" in busy.output and "--force-unlock" in busy.output
    assert not (tmp_path / "out.zarr").exists(), "nothing is written while another process holds the lock"
    forced = extract(manifest, "--force-unlock")
    assert forced.exit_code == 0, forced.output
    assert store_files(tmp_path / "out.zarr") == store_files(reference / "out.zarr")
    fault_log(10, "concurrency", "ktc extract while another live process holds the store", "ktc extract", 1,
              "refused naming pid, host, start time and command; --force-unlock then runs")


@pytest.mark.parametrize("holder", ["dead process on this host", "silent process on another host"])
def test_stale_lock_is_taken_over(reference, tmp_path, holder, fault_log):
    manifest = fresh_copy(reference, tmp_path)
    if holder.startswith("dead"):
        write_lock(tmp_path / "out.zarr", socket.gethostname(), dead_pid())
    else:
        write_lock(tmp_path / "out.zarr", "elsewhere.example", 1, age_s=STALE_AFTER_S + 60)
    result = extract(manifest)
    assert result.exit_code == 0 and "taking over a stale lock" in result.output, result.output
    assert not lock_path(tmp_path / "out.zarr").exists()
    fault_log(10, "concurrency", f"lock left by a {holder}", "ktc extract", 0, "stale lock taken over with a message")


def test_fresh_lock_of_another_host_is_respected(reference, tmp_path):
    manifest = fresh_copy(reference, tmp_path)
    write_lock(tmp_path / "out.zarr", "elsewhere.example", 1, age_s=5)
    result = extract(manifest)
    assert result.exit_code == 1 and "host elsewhere.example" in result.output, result.output
