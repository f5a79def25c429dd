"""The same store from every engine: a unit's bytes do not depend on how units were scheduled. The store
records its CPU thread count at creation (``cpu_threads``) and every process that computes a unit (a
resumed run, a dask worker started with ``OMP_NUM_THREADS`` of its own) computes with it."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from extract_helpers import cnn_teacher, make_image_folder, store_files, vit_teacher, write_manifest
from kt_cache.cli import cli
from kt_cache.store import StoreReader


def extract(manifest: Path, *extra: str):
    result = CliRunner().invoke(cli, ["extract", "--manifest", str(manifest), "--workers", "0", "--no-progress", *extra])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_cluster_store_equals_single_process_store_without_thread_pinning(tmp_path, fault_log):
    import torch

    make_image_folder(tmp_path / "images", per_class=4)
    teachers = [cnn_teacher(), vit_teacher()]
    single = write_manifest(tmp_path / "single.yaml", teachers, unit_rows=2, store="single.zarr")
    cluster = write_manifest(tmp_path / "cluster.yaml", teachers, unit_rows=2, store="cluster.zarr")
    extract(single)
    extract(cluster, "--cluster", "local:2")
    assert StoreReader(str(tmp_path / "cluster.zarr")).meta.cpu_threads == torch.get_num_threads()
    assert store_files(tmp_path / "cluster.zarr") == store_files(tmp_path / "single.zarr")
    fault_log(16, "concurrency", "--cluster local:2 (workers with another thread count) vs one process",
              "ktc extract --cluster local:2", 0, "bit-identical stores: every unit computed with the recorded "
              "thread count", bytes_lost=0)
