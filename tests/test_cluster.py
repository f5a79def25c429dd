"""Extraction on a dask LocalCluster: same store as the single-process path, even when a worker dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from extract_helpers import cnn_teacher, make_image_folder, store_files, vit_teacher, write_manifest

UNITS = 12


def extract(manifest: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kt_cache", "extract", "--manifest", str(manifest), "--out", str(out),
           "--workers", "0", "--no-progress", "--batch-size", "2", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")       # same thread count in every process: same float results
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def finished(proc: subprocess.Popen) -> str:
    output = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    make_image_folder(root / "images", per_class=8)               # 24 images -> 12 units of 2 rows
    manifest = write_manifest(root / "teachers.yaml", [cnn_teacher(), vit_teacher()], unit_rows=2)
    finished(extract(manifest, root / "single.zarr"))
    return root, manifest


def test_local_cluster_store_is_bit_identical_to_single_process(project):
    root, manifest = project
    output = finished(extract(manifest, root / "cluster.zarr", "--cluster", "local:2"))
    assert "dask dashboard: http" in output and "(2 workers)" in output
    single, cluster = store_files(root / "single.zarr"), store_files(root / "cluster.zarr")
    assert sorted(single) == sorted(cluster)
    assert [k for k in single if single[k] != cluster[k]] == []


def dask_workers(proc: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(proc.pid).children(recursive=True)
    return [c for c in children if "spawn_main" in " ".join(c.cmdline())]


def done_units(out: Path) -> int:
    folder = out / "teachers" / "cnn32" / "done" / "c"
    return len(list(folder.glob("*"))) if folder.exists() else 0


def test_a_worker_killed_mid_run_is_replaced_and_the_store_is_identical(project):
    root, manifest = project
    out = root / "killed.zarr"
    proc = extract(manifest, out, "--cluster", "local:2")
    deadline = time.time() + 120
    while (done_units(out) < 1 or len(dask_workers(proc)) < 2) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    done_at_kill = done_units(out)
    assert 0 < done_at_kill < UNITS, f"the kill must land mid-run (done units: {done_at_kill})"
    os.kill(dask_workers(proc)[0].pid, signal.SIGKILL)
    finished(proc)
    single, killed = store_files(root / "single.zarr"), store_files(out)
    assert sorted(single) == sorted(killed)
    assert [k for k in single if single[k] != killed[k]] == []


def test_bad_cluster_spec_is_a_usage_error(project):
    root, manifest = project
    proc = extract(manifest, root / "bad.zarr", "--cluster", "remote:2")
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 2 and "local:N" in output and "Traceback" not in output
    assert not (root / "bad.zarr").exists()
