"""``ktc train --labels ignore``: the labels never train the student, but they score the teachers' target.

A label-free kd / avg / uniform run on a labelled store logs ``pseudo_acc`` (the accuracy of the target it
trains on: KD's averaged probabilities, UNIFORM's pseudo-class ĉ), so a user sees how good the vote is next to
the student's accuracy. Training does not see the labels: the student is byte-identical to one trained from
the same store with every label removed.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from kt_cache.cli import cli
from kt_cache.finalize import write_object_manifest

COMMON = ["--student", "resnet10t", "--img-size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0",
          "--no-progress", "--log-every", "1", "--labels", "ignore"]


def train(store, out, *extra):
    result = CliRunner().invoke(cli, ["train", "--cache", str(store), "--out", str(out), *COMMON, *extra])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "step"]


@pytest.mark.parametrize("method, opts", [("kd", []), ("uniform", []), ("uniform", ["--opt", "vote_norm=soft_coverage"])])
def test_label_free_runs_report_the_vote_accuracy(two_teacher_store, tmp_path, method, opts):
    steps = train(two_teacher_store, tmp_path / "run", "--method", method, *opts)
    assert steps and all(0.0 <= r["pseudo_acc"] <= 1.0 for r in steps)


def test_labels_are_scored_never_trained_on(two_teacher_store, tmp_path):
    unlabelled = tmp_path / "unlabelled.zarr"
    shutil.copytree(two_teacher_store, unlabelled)
    labels = zarr.open_array(str(unlabelled / "samples" / "label"), mode="r+")
    labels[:] = np.full(labels.shape, -1, dtype=labels.dtype)
    write_object_manifest(unlabelled)   # as a store of unlabelled images would be finalized
    with_labels = train(two_teacher_store, tmp_path / "a", "--method", "uniform")
    without = train(unlabelled, tmp_path / "b", "--method", "uniform", "--val", str(two_teacher_store.parent / "images"))
    assert [r["loss"] for r in with_labels] == [r["loss"] for r in without]
    assert 0.0 <= with_labels[0]["pseudo_acc"] <= 1.0
    assert (tmp_path / "a" / "student.safetensors").read_bytes() == (tmp_path / "b" / "student.safetensors").read_bytes()
