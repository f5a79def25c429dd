"""kill -9 in the middle of a run, then resume: the store ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr

from extract_helpers import cnn_teacher, make_image_folder, store_files, vit_teacher, write_manifest

UNITS = 12


def ktc_extract(manifest: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kt_cache", "extract", "--manifest", str(manifest), "--out", str(out),
           "--workers", "0", "--no-progress", "--batch-size", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def done_count(out: Path) -> int:
    return len(list((out / "teachers" / "cnn32" / "done" / "c").glob("*"))) if out.exists() else 0


def kill_after_some_units(manifest: Path, out: Path, min_done: int = 2, timeout: float = 120) -> int:
    proc = ktc_extract(manifest, out)
    deadline = time.time() + timeout
    while done_count(out) < min_done and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return done_count(out)


def test_kill_9_then_resume_is_bit_identical(tmp_path):
    make_image_folder(tmp_path / "images", per_class=8)          # 24 images -> 12 units of 2 rows
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher(), vit_teacher()], unit_rows=2)

    clean = ktc_extract(manifest, tmp_path / "clean.zarr")
    assert clean.wait(timeout=300) == 0, clean.stdout.read().decode()

    killed = tmp_path / "killed.zarr"
    done_at_kill = kill_after_some_units(manifest, killed)
    assert 0 < done_at_kill < UNITS, f"the kill must land mid-run (done units at kill: {done_at_kill})"
    partial = zarr.open_group(str(killed), mode="r")
    assert not partial["teachers/cnn32/done"][:].all()

    resumed = ktc_extract(manifest, killed)
    output = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, output
    assert "resumed" in output

    a, b = store_files(tmp_path / "clean.zarr"), store_files(killed)
    assert sorted(a) == sorted(b)
    different = [key for key in a if a[key] != b[key]]
    assert not different, f"objects differ after resume: {different[:5]}"
    for path in ("teachers/cnn32/features", "teachers/vit48/logits", "samples/views"):
        x = zarr.open_group(str(tmp_path / "clean.zarr"), mode="r")[path][:]
        y = zarr.open_group(str(killed), mode="r")[path][:]
        np.testing.assert_array_equal(x, y)


def test_a_rerun_removes_the_temp_files_killed_writers_left(tmp_path):
    """A writer killed mid-write (a process, or a cluster worker) leaves zarr's ``<key>.<hex>.partial``; the next
    run's finalize, which holds the store's lock after all its writers ended, removes them: the store then holds
    exactly what an uninterrupted run writes."""
    from click.testing import CliRunner

    from extract_helpers import extract
    from kt_cache.cli import cli

    make_image_folder(tmp_path / "images", per_class=2)
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher()], unit_rows=2)
    assert extract(manifest).exit_code == 0
    store = tmp_path / "out.zarr"
    before = store_files(store)
    orphans = [store / "teachers/cnn32/features/c/0/0.0123456789abcdef0123456789abcdef.partial",
               store / "samples/ok/c/0.fedcba9876543210fedcba9876543210.partial"]
    for orphan in orphans:
        orphan.write_bytes(b"half an object")
    rerun = extract(manifest)
    assert rerun.exit_code == 0 and "nothing to do" in rerun.output, rerun.output
    assert not any(orphan.exists() for orphan in orphans)
    after = store_files(store)
    assert sorted(after) == sorted(before) and all(after[k] == before[k] for k in before if k != "ktc-objects.json")
    verified = CliRunner().invoke(cli, ["verify", str(store)])
    assert verified.exit_code == 0 and "orphan" not in verified.output, verified.output
