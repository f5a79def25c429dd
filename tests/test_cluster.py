"""Extraction on a dask LocalCluster: same store as the single-process path, even when a worker dies.

``--cluster local:2`` starts a LocalCluster inside ``ktc extract``; the first test and the killed run of the
whole-run kill test use it (starting and killing that cluster is what they check). The other runs join one
LocalCluster that this module starts once (``shared_cluster``) with ``--scheduler``: it saves a cluster
start per test, and a worker killed in it is replaced by its nanny, so the next test finds two workers again.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr

from extract_helpers import cnn_teacher, make_image_folder, store_files, vit_teacher, write_manifest

UNITS = 12
WORKERS = 2


def extract(manifest: Path, out: Path, *extra: str, cwd: Path | None = None,
            own_group: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kt_cache", "extract", "--manifest", str(manifest), "--out", str(out),
           "--workers", "0", "--no-progress", "--batch-size", "2", *extra]
    env = dict(os.environ)       # no thread pinning: the engine computes with the store's recorded thread count
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=own_group)


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


@pytest.fixture(scope="module")
def shared_cluster():
    """One LocalCluster for the module (2 worker processes, 1 thread each, on 127.0.0.1) and a client of it.

    A nanny copies ``distributed.nanny.pre-spawn-environ`` (OMP_NUM_THREADS=1, ...) into *this* process's
    os.environ whenever it starts a worker; every later ``ktc extract`` subprocess would inherit it and
    record a store of 1 CPU thread, unlike ``single.zarr``. So those variables go to the workers through
    ``env=`` instead, and os.environ is put back as it was when the cluster closes.
    """
    import dask
    from dask.distributed import Client, LocalCluster

    environ = dict(os.environ)
    worker_env = {k: str(v) for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()}
    worker_env["OMP_NUM_THREADS"] = "1"
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": {k: None for k in worker_env}}):
            cluster = LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address=None, env=worker_env)
        with cluster, Client(cluster.scheduler_address) as client:
            yield client
    finally:
        os.environ.clear()
        os.environ.update(environ)


@pytest.fixture()
def running_cluster(shared_cluster):
    """The shared cluster with all its workers up (a test before may have killed one; its nanny restarts it)."""
    shared_cluster.wait_for_workers(WORKERS, timeout=120)
    assert len(worker_pids(shared_cluster)) == WORKERS
    return shared_cluster


def worker_pids(client) -> dict[str, int]:
    return client.run(os.getpid)


def assert_same_store(a: Path, b: Path) -> None:
    first, second = store_files(a), store_files(b)
    assert sorted(first) == sorted(second)
    assert [k for k in first if first[k] != second[k]] == []


def cluster_line(output: str) -> dict[str, int]:
    """The run's task summary: tasks, workers that ran them, teacher loads, most loads of one worker and wave."""
    match = re.search(r"cluster: (\d+) tasks on (\d+) workers; wave teachers loaded (\d+) times "
                      r"\((\d+) at most per worker and wave\)", output)
    assert match, output
    return dict(zip(("tasks", "workers", "loads", "most"), map(int, match.groups())))


def test_local_cluster_store_is_bit_identical_to_single_process(project):
    root, manifest = project
    output = finished(extract(manifest, root / "cluster.zarr", "--cluster", "local:2"))
    assert "dask dashboard: http" in output and "(2 workers)" in output
    assert_same_store(root / "single.zarr", root / "cluster.zarr")
    # one wave (both teachers fit the default memory budget): each worker loads it once, for all its tasks
    summary = cluster_line(output)
    assert summary["tasks"] == UNITS and 1 <= summary["workers"] <= 2
    assert summary["loads"] == summary["workers"] and summary["most"] == 1


def worker_wave_keys() -> list[str]:
    """Run on a worker: the keys of the waves it still holds teachers for."""
    from kt_cache import cluster

    return [cluster._WORKER_WAVE["key"]] if "key" in cluster._WORKER_WAVE else []


def test_scheduler_address_joins_a_running_cluster(project, running_cluster):
    """--scheduler: a cluster started elsewhere (another working directory); relative paths still work."""
    root, manifest = project
    address = running_cluster.scheduler.address
    assert Path.cwd() != root
    output = finished(extract(Path(manifest.name), Path("scheduler.zarr"), "--scheduler", address, cwd=root))
    assert "(2 workers)" in output
    summary = cluster_line(output)
    assert summary["tasks"] == UNITS and summary["loads"] == summary["workers"] and summary["most"] == 1
    assert list(running_cluster.run(worker_wave_keys).values()) == [[], []]      # the run gave its teachers back
    assert_same_store(root / "single.zarr", root / "scheduler.zarr")


def dask_workers(proc: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(proc.pid).children(recursive=True)
    return [c for c in children if "spawn_main" in " ".join(c.cmdline())]


def done_units(out: Path, teacher: str = "cnn32") -> int:
    return len(done_chunks(out, teacher))


def done_chunks(out: Path, teacher: str) -> set[str]:
    folder = out / "teachers" / teacher / "done" / "c"
    return {f.name for f in folder.glob("*")} if folder.exists() else set()


def test_a_worker_killed_mid_run_is_replaced_and_the_store_is_identical(project, running_cluster):
    root, manifest = project
    out = root / "killed.zarr"
    before = worker_pids(running_cluster)
    proc = extract(manifest, out, "--scheduler", running_cluster.scheduler.address)
    deadline = time.time() + 120
    while done_units(out) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    done_at_kill = done_units(out)
    assert 0 < done_at_kill < UNITS, f"the kill must land mid-run (done units: {done_at_kill})"
    killed = next(iter(before.values()))
    os.kill(killed, signal.SIGKILL)
    finished(proc)
    assert_same_store(root / "single.zarr", out)
    running_cluster.wait_for_workers(WORKERS, timeout=120)       # its nanny started a new worker process
    after = worker_pids(running_cluster)
    assert len(after) == WORKERS and killed not in after.values()


def pending_units(out: Path) -> int:
    teachers = zarr.open_group(str(out), mode="r")["teachers"]
    done = np.stack([np.asarray(teachers[f"{t}/done"][:], dtype=bool) for t in ("cnn32", "vit48")])
    return int((~done.all(axis=0)).sum())


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie has exited; its parent died too, so nobody reaps it here)."""
    living = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                living.append(proc)
        except psutil.NoSuchProcess:
            pass
    return living


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


def test_the_whole_cluster_run_killed_then_rerun_resumes(project, running_cluster):
    root, manifest = project
    out = root / "resumed.zarr"
    proc = extract(manifest, out, "--cluster", "local:2", own_group=True)
    deadline = time.time() + 120
    while ((not done_chunks(out, "cnn32") & done_chunks(out, "vit48")) or len(dask_workers(proc)) < 2) \
            and proc.poll() is None and time.time() < deadline:   # a unit done by both teachers, 2 workers up
        time.sleep(0.02)
    everyone = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(dask_workers(proc)) == 2
    os.killpg(proc.pid, signal.SIGKILL)                 # the client, its LocalCluster and every worker
    proc.wait()
    deadline = time.time() + 30
    while (alive(everyone) or alive(group_members(proc.pid))) and time.time() < deadline:
        time.sleep(0.1)
    assert alive(everyone) == [] and alive(group_members(proc.pid)) == []
    done_at_kill, pending = done_units(out), pending_units(out)
    assert 0 < done_at_kill < UNITS and 0 < pending < UNITS, f"the kill must land mid-run ({done_at_kill} done)"

    output = finished(extract(manifest, out, "--scheduler", running_cluster.scheduler.address))   # rerun anywhere
    assert "resumed" in output
    assert cluster_line(output)["tasks"] == pending       # only the units left undone are rerun
    assert_same_store(root / "single.zarr", out)


def test_bad_cluster_spec_is_a_usage_error(project):
    from click.testing import CliRunner

    from kt_cache.cli import cli

    root, manifest = project
    result = CliRunner().invoke(cli, ["extract", "--manifest", str(manifest), "--out", str(root / "bad.zarr"),
                                      "--workers", "0", "--no-progress", "--cluster", "remote:2"])
    assert result.exit_code == 2 and "local:N" in result.output, result.output
    assert result.exception.__class__ is SystemExit and "Traceback" not in result.output   # click's usage error
    assert not (root / "bad.zarr").exists()
