"""``ktc eval --probe``: a linear probe on the frozen student's features, and the kpu note."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from kt_cache.cli import cli
from kt_train.probe import fit_probe, probe_predict


def test_probe_separates_separable_classes_and_not_shuffled_labels():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 4
    y = rng.integers(0, 3, size=300)
    x = centres[y] + rng.normal(size=(300, 16))
    probe = fit_probe(x[:200], y[:200], 3)
    assert (probe_predict(probe, x[200:]) == y[200:]).mean() == 1.0
    shuffled = fit_probe(x[:200], rng.permutation(y[:200]), 3)
    assert (probe_predict(shuffled, x[200:]) == y[200:]).mean() < 0.7


def test_kpu_run_and_eval_say_what_to_measure_and_report_a_probe(two_teacher_store, tmp_path):
    run, images = tmp_path / "kpu", two_teacher_store.parent / "images"
    args = ["train", "--cache", str(two_teacher_store), "--out", str(run), "--method", "kpu", "--student", "resnet10t",
            "--img-size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-progress"]
    trained = CliRunner().invoke(cli, args)
    assert trained.exit_code == 0, trained.output
    assert "note: kpu trains the student's features, not its classifier" in trained.output
    result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run), "--data", str(images), "--probe", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    probe = metrics["probe"]
    assert metrics["note"].startswith("kpu trains the student's features, not its classifier")
    assert probe["n"] == 12 and probe["n_train"] == 12 and 0 <= probe["top1"] <= 1
    assert probe["store"] == str(two_teacher_store)
    missing = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run), "--probe"])
    assert missing.exit_code == 2 and "--probe scores a linear probe on a labelled folder" in missing.output
