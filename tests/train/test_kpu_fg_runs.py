"""``ktc train`` as users run KPU and FG: KPU on a store without spatial maps (the global terms, with a notice),
and FG from a pretrained student (the retain branch is active) versus a random one (plain KD, with a notice)."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from extract_helpers import cnn_teacher, make_image_folder, write_manifest
from kt_cache.cli import cli

COMMON = ["--student", "resnet10t", "--img-size", "32", "--batch-size", "4", "--workers", "0", "--no-progress"]
FEATURES = cnn_teacher(outputs=["features", "logits"], featmap=None)          # cnn32: no spatial map


def ktc(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], terminal_width=400)


def steps(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def train_ce(root, out, max_steps):
    """A student trained with CE from the labels alone (the store's teachers play no part)."""
    result = ktc("train", "--cache", root / "out.zarr", "--out", out, "--method", "ce", *COMMON, "--epochs", "50",
                 "--max-steps", max_steps, "--lr", "0.01")
    assert result.exit_code == 0, result.output
    return out / "student.safetensors"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """12 labelled images of 3 classes; cnn32 (features + top-k logits, no featmap) and ``trained``: a
    predictive teacher over all 3 classes with logits only, whose weights are a student trained 10 CE steps."""
    from safetensors.torch import load_file, save_file

    from kt_train.students import unwrap_student_state

    root = tmp_path_factory.mktemp("kpu_fg")
    make_image_folder(root / "images", per_class=4)
    for teachers in ([FEATURES], [FEATURES, cnn_teacher(id="trained", outputs=["logits"], featmap=None, logits={},
                                                      checkpoint="teacher.safetensors")]):
        if len(teachers) == 2:                       # the teacher's weights: a CE student, as a plain timm state
            state = load_file(str(train_ce(root, root / "teacher_run", 10)))
            save_file(unwrap_student_state(state), str(root / "teacher.safetensors"))
        result = ktc("extract", "--manifest", write_manifest(root / "teachers.yaml", teachers), "--workers", "0",
                     "--no-progress")
        assert result.exit_code == 0, result.output
    return root


def test_kpu_without_featmaps_trains_the_global_terms_and_says_so(store, tmp_path):
    out = tmp_path / "kpu"
    result = ktc("train", "--cache", store / "out.zarr", "--out", out, "--method", "kpu", "--teachers", "cnn32",
                 *COMMON, "--max-steps", "2", "--log-every", "1")
    assert result.exit_code == 0, result.output
    notice = "note: kpu: no selected teacher has a stored featmap; training the global (pooled-feature) terms only"
    first = result.output.splitlines()[0]
    assert first.startswith(notice) and "store `featmap` outputs for the spatial terms." in first
    records = steps(out)
    assert len(records) == 2 and all(math.isfinite(r[k]) for r in records for k in ("loss", "s2t_loss", "t2s_loss",
                                                                                         "rec_loss", "std_ratio"))


def test_kpu_refuses_a_teacher_with_neither_features_nor_featmap_by_name(store, tmp_path):
    result = ktc("train", "--cache", store / "out.zarr", "--out", tmp_path / "kpu", "--method", "kpu",
                 "--teachers", "cnn32,trained", *COMMON, "--max-steps", "2")
    assert result.exit_code == 2, result.output
    assert "teacher(s) trained have stored neither features nor spatial maps" in result.output
    assert "Fix: leave them out with --teachers cnn32" in result.output and "Traceback" not in result.output


def test_fg_retains_with_a_pretrained_student_and_is_kd_from_a_random_one(store, tmp_path):
    """The retain branch compares against the frozen initial student: a random one loses every row to the
    trained teacher (transfer_frac 1, with a note recommending a pretrained student); a student trained longer
    than the teacher keeps some rows (transfer_frac < 1)."""
    pretrained = train_ce(store, tmp_path / "ce", 30)
    fracs = {}
    for name, extra in (("random", []), ("pretrained", ["--student-checkpoint", pretrained])):
        result = ktc("train", "--cache", store / "out.zarr", "--out", tmp_path / name, "--method", "fg",
                     "--teachers", "trained", *COMMON, "--max-steps", "2", "--log-every", "1", *extra)
        assert result.exit_code == 0, result.output
        assert ("start from a pretrained student with --student-checkpoint" in result.output) is (name == "random")
        fracs[name] = [r["transfer_frac"] for r in steps(tmp_path / name)]
    assert min(fracs["random"]) >= 0.75, fracs
    assert max(fracs["pretrained"]) < 1.0 and sum(fracs["pretrained"]) < sum(fracs["random"]), fracs
