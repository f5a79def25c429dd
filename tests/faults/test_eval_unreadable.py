"""Unreadable images at evaluation time: the final evaluation of ``ktc train`` and ``ktc eval`` skip them,
say how many (stderr and the metrics) and score the readable images; they never fail the run.

An image is unreadable because extraction recorded it so (``samples/ok`` false) or because it fails to
decode only at evaluation (a ``--val`` file never extracted, a file changed since extraction).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from extract_helpers import cnn_teacher, make_image_folder, write_manifest
from kt_cache.cli import cli

COMMON = ["--student", "resnet10t", "--img-size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0",
          "--no-progress", "--method", "kd"]
READABLE = 6          # make_image_folder(per_class=2): 3 classes x 2 images; bad.jpg comes on top


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def build(root: Path) -> Path:
    """Images with one undecodable file, extracted (which records it as samples/ok = false) and trained on."""
    make_image_folder(root / "images", per_class=2)
    (root / "images" / "ant" / "bad.jpg").write_bytes(b"not an image")
    manifest = write_manifest(root / "teachers.yaml", [cnn_teacher()], views=2)
    extracted = invoke("extract", "--manifest", manifest, "--workers", "0", "--no-progress")
    assert extracted.exit_code == 0 and "1 images could not be decoded" in extracted.output, extracted.output
    return root


def train(root: Path, out: Path, *extra: str):
    return invoke("train", "--cache", root / "out.zarr", "--out", out, *COMMON, *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, object]:
    root = build(tmp_path_factory.mktemp("eval_unreadable"))
    return root, train(root, root / "run")


def assert_skipped(result, where: str, count: int, first: str) -> None:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and result.exception is None
    assert f"evaluation on {where}: skipped {count} unreadable image(s): " in result.stderr, result.stderr
    assert first in result.stderr


def test_train_final_eval_skips_images_recorded_unreadable(trained, fault_log):
    root, result = trained
    assert_skipped(result, str(root / "images"), 1, "ant/bad.jpg")
    assert_skipped(result, f"the store {root / 'out.zarr'}", 1, "ant/bad.jpg")
    saved = json.loads((root / "run" / "eval.json").read_text())
    assert saved["skipped"] == 1 and saved["skipped_images"] == ["ant/bad.jpg"]
    assert saved["n"] == READABLE and sum(map(sum, saved["confusion"])) == READABLE
    agree = saved["teacher_agreement"]
    assert agree["skipped"] == 1 and agree["n"] == READABLE and agree["consensus"] is not None
    fault_log(8, "bad-input", "image recorded unreadable at extraction, then ktc train's final evaluation",
              "ktc train", 0, "skipped and counted (stderr, eval.json); metrics over the readable images")


def test_eval_skips_images_recorded_unreadable(trained, fault_log):
    root, _ = trained
    result = invoke("eval", "--checkpoint", root / "run", "--data", root / "images", "--cache", root / "out.zarr",
                    "--json")
    assert_skipped(result, str(root / "images"), 1, "ant/bad.jpg")
    metrics = json.loads(result.stdout)
    assert metrics == json.loads((root / "run" / "eval.json").read_text())
    assert metrics["skipped"] == 1 and metrics["n"] == READABLE
    assert metrics["teacher_agreement"]["skipped"] == 1 and metrics["teacher_agreement"]["n"] == READABLE
    fault_log(8, "bad-input", "image recorded unreadable at extraction, then ktc eval", "ktc eval", 0,
              "skipped and counted; metrics over the readable images")


def test_train_final_eval_skips_an_undecodable_val_image(trained, tmp_path, fault_log):
    root, _ = trained
    val = make_image_folder(tmp_path / "val", per_class=2, seed=1)
    (val / "cat" / "img001.png").write_bytes((val / "cat" / "img001.png").read_bytes()[:60])   # truncated
    result = train(root, tmp_path / "run", "--val", val)
    assert_skipped(result, str(val), 1, "cat/img001.png")
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["skipped"] == 1 and saved["skipped_images"] == ["cat/img001.png"] and saved["n"] == READABLE - 1
    fault_log(8, "bad-input", "--val image that does not decode (never extracted)", "ktc train --val", 0,
              "skipped and counted with its path; metrics over the readable images")


def test_eval_skips_an_image_changed_since_extraction(tmp_path, fault_log):
    root = build(tmp_path)
    assert train(root, root / "run").exit_code == 0
    changed = root / "images" / "bee" / "img001.png"
    changed.write_bytes(changed.read_bytes()[:60])      # decoded at extraction, truncated since
    result = invoke("eval", "--checkpoint", root / "run", "--data", root / "images", "--cache", root / "out.zarr",
                    "--json")
    assert_skipped(result, str(root / "images"), 2, "bee/img001.png")
    assert_skipped(result, f"the store {root / 'out.zarr'}", 2, "bee/img001.png")
    metrics = json.loads(result.stdout)
    assert metrics["skipped"] == 2 and set(metrics["skipped_images"]) == {"ant/bad.jpg", "bee/img001.png"}
    assert metrics["n"] == READABLE - 1 and metrics["teacher_agreement"]["n"] == READABLE - 1
    assert metrics["teacher_agreement"]["skipped"] == 2
    fault_log(8, "bad-input", "image changed (truncated) since extraction, then ktc eval", "ktc eval", 0,
              "skipped and counted with its path; metrics over the readable images")


def test_eval_on_a_folder_with_no_readable_image_reports_only_the_skips(trained, tmp_path, fault_log):
    root, _ = trained
    data = tmp_path / "broken"
    shutil.copytree(root / "images", data)
    for image in data.rglob("img*"):
        image.write_bytes(b"")
    result = invoke("eval", "--checkpoint", root / "run", "--data", data)
    assert_skipped(result, str(data), READABLE + 1, "ant/bad.jpg")
    assert "no readable image" in result.stdout
    fault_log(8, "bad-input", "--data folder where no image decodes", "ktc eval", 0,
              "every image skipped and counted; no accuracy claimed")
