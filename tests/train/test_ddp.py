"""``ktc train`` under torchrun: with ``--ddp-split strided``, 2 CPU ranks (gloo) take the same steps as one process
with the same global batch; with the default (each rank its own blocks) a run trains and resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from extract_helpers import cnn_teacher, make_image_folder, vit_teacher, write_manifest
from kt_cache.cli import cli

# A LayerNorm student (ViT): BatchNorm statistics would differ between a batch of 8 and two of 4.
ARGS = ["--student", "vit_tiny_patch16_224", "--img-size", "32", "--method", "kd", "--max-steps", "3",
        "--log-every", "1", "--workers", "0", "--no-progress"]
TOLERANCE = 1e-5        # relative; measured differences are ~1e-7 (float32 reduction order)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    make_image_folder(root / "images", per_class=4)
    manifest = write_manifest(root / "teachers.yaml", [cnn_teacher(), vit_teacher()])
    assert CliRunner().invoke(cli, ["extract", "--manifest", str(manifest), "--workers", "0", "--no-progress"]).exit_code == 0
    return root / "out.zarr"


def steps(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def torchrun(store, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kt_cache",
           "train", "--cache", str(store), "--out", str(out), "--batch-size", "4", *ARGS, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_two_ranks_match_one_process_with_the_same_global_batch(store, tmp_path):
    output = torchrun(store, tmp_path / "ddp", "--ddp-split", "strided")
    assert output.count("run saved in") == 1, "only rank 0 reports"
    single = CliRunner().invoke(cli, ["train", "--cache", str(store), "--out", str(tmp_path / "one"),
                                      "--batch-size", "8", *ARGS])
    assert single.exit_code == 0, single.output
    ddp, one = steps(tmp_path / "ddp"), steps(tmp_path / "one")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [1, 2]          # 12 images: batches 8 + 4
    for a, b in zip(ddp, one):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert a[key] == pytest.approx(b[key], rel=TOLERANCE), (key, a[key], b[key])
    assert (tmp_path / "ddp" / "student.safetensors").is_file() and (tmp_path / "ddp" / "eval.json").is_file()


def test_resume_under_torchrun(store, tmp_path):
    torchrun(store, tmp_path / "run", "--epochs", "1")
    torchrun(store, tmp_path / "run", "--epochs", "2", "--resume", "--max-steps", "10")
    epochs = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1] and epochs[-1]["step"] == 4
