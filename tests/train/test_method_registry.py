"""Methods describe themselves: the CLI's choices and help, the config check and the store requirements all
come from the registry (``kt_train.methods.METHODS``), so a new method is one file plus one registry line."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from extract_helpers import cnn_teacher, make_image_folder, write_manifest
from kt_cache.cli import cli
from kt_cache.errors import UsageError
from kt_cache.store import StoreReader
from kt_train.config import TrainConfig
from kt_train.methods import METHODS, Method, MethodConfigError, MethodDims, MethodOptions, register_method
from kt_train.methods.base import BATCH_FIELDS, REFUSALS, REQUIREMENTS
from kt_train.requirements import check_requirements


class Toy(Method):
    """A method that needs spatial maps and labels (and nothing else exists of it)."""

    name = "toy"
    summary = "a toy method for this test"
    requires: ClassVar[frozenset[str]] = frozenset({"featmap"})

    @classmethod
    def labels_required(cls, options: MethodOptions) -> bool:
        return True


def test_help_lists_every_registered_method_with_its_summary():
    text = CliRunner().invoke(cli, ["train", "--help"], terminal_width=400).output
    for name, cls in METHODS.items():
        assert cls.summary and f"{name}: {cls.summary}" in " ".join(text.split())


def test_a_new_method_is_checked_from_what_it_declares(monkeypatch, two_teacher_store):
    monkeypatch.setitem(METHODS, "toy", Toy)
    config = TrainConfig(cache=str(two_teacher_store), method="toy", teachers=["vit48"]).check()
    reader = StoreReader(two_teacher_store)
    check_requirements(config, reader, ["vit48"], MethodOptions(), use_labels=True)      # vit48 stores featmaps
    with pytest.raises(UsageError, match="this method needs the true labels"):
        check_requirements(config, reader, ["vit48"], MethodOptions(), use_labels=False)
    monkeypatch.setattr(Toy, "requires", frozenset({"featmap", "predictive_logits", "all_classes"}))
    check_requirements(config, reader, ["vit48"], MethodOptions(), use_labels=True)      # full logits over 3/3
    with pytest.raises(UsageError, match='unknown method. Did you mean "toy"'):
        TrainConfig(cache="x", method="toyy").check()


@pytest.mark.parametrize("name, requires, live, reference", [
    ("kd", {"predictive_logits"}, False, False), ("uniform", {"predictive_logits", "features"}, False, False),
    ("avg", {"features"}, False, False), ("kpu", {"features_or_featmap"}, False, False),
    ("bikd", {"predictive_logits", "all_classes"}, True, False), ("fg", {"predictive_logits", "all_classes"}, False, True),
])
def test_shipped_methods_declare_their_ingredients(name, requires, live, reference):
    cls = METHODS[name]
    assert cls.requires == requires and cls.live_students is live and cls.reference_student is reference
    if name == "uniform":
        assert "predictive_logits" not in cls.requirements(cls.Options(logit_vote=False))


@dataclass(frozen=True)
class TinyOptions(MethodOptions):
    weight: float = 1.0


class Tiny(Method):
    """A method that exists only in this test: CE on the labels, but it requires the teachers' spatial maps."""

    name = "tiny"
    summary = "a tiny test method that requires spatial maps"
    Options = TinyOptions
    needs = frozenset({"featmaps", "labels"})
    requires = frozenset({"featmap"})
    note = "tiny is a test method."

    def __init__(self, options: TinyOptions, dims: MethodDims) -> None:
        super().__init__(options, dims)
        self.map_ids = [t.id for t in dims.teachers if t.featmap_dim]
        self.scale = torch.nn.Parameter(torch.ones(()))          # an owned head, trained with the student

    def forward(self, student, teachers):
        s = self.single_student(student)
        maps = [teachers.require("featmaps", tid) for tid in self.map_ids]   # `needs` reached the reader
        y = teachers.labels
        loss = self.options.weight * F.cross_entropy(s.logits[y >= 0] * self.scale, y[y >= 0])
        return {"loss": loss, "tiny_loss": loss.detach(), "map_teachers": torch.tensor(float(len(maps)))}


COMMON = ["--student", "resnet10t", "--img-size", "32", "--batch-size", "4", "--workers", "0", "--no-progress"]


@pytest.fixture()
def tiny():
    """``Tiny`` registered for one test, as a plugin would do it."""
    register_method(Tiny)
    yield Tiny
    METHODS.pop(Tiny.name)


@pytest.fixture(scope="module")
def store_without_maps(tmp_path_factory):
    """6 labelled images; one predictive teacher with features and logits but no spatial maps."""
    root = tmp_path_factory.mktemp("no_maps")
    make_image_folder(root / "images", per_class=2)
    manifest = write_manifest(root / "teachers.yaml", [cnn_teacher(outputs=["features", "logits"], featmap=None)])
    result = CliRunner().invoke(cli, ["extract", "--manifest", str(manifest), "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    return root / "out.zarr"


def ktc(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], terminal_width=400)


def test_a_registered_method_is_listed_checked_and_trained_through_ktc_train(tiny, two_teacher_store,
                                                                              store_without_maps, tmp_path):
    assert f"tiny: {Tiny.summary}" in " ".join(ktc("train", "--help").output.split())
    refused = ktc("train", "--cache", store_without_maps, "--out", tmp_path / "refused", "--method", "tiny", *COMMON)
    assert refused.exit_code == 2, refused.output
    assert "--method tiny on" in refused.output and "no selected teacher has stored spatial maps (featmap)" \
        in refused.output and "Fix:" in refused.output and "Traceback" not in refused.output
    students = ktc("train", "--cache", two_teacher_store, "--out", tmp_path / "s", "--method", "tiny", *COMMON,
                   "--students", "resnet10t,resnet10t")
    assert students.exit_code == 2 and "--students is for --method bikd" in students.output, students.output
    out = tmp_path / "run"
    result = ktc("train", "--cache", two_teacher_store, "--out", out, "--method", "tiny", *COMMON, "--max-steps", "2",
                 "--log-every", "1", "--opt", "weight=0.5")
    assert result.exit_code == 0, result.output
    assert "note: tiny is a test method." in result.output
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert len(steps) == 2 and all(math.isfinite(r["tiny_loss"]) and r["map_teachers"] == 2 for r in steps)
    assert json.loads((out / "run.json").read_text())["method_options"] == {"weight": 0.5}
    assert (out / "student.safetensors").is_file() and "method.safetensors" in {p.name for p in out.iterdir()}


def test_an_unregistered_name_is_refused_by_the_cli_with_the_registered_choices(tiny):
    result = ktc("train", "--cache", "x", "--method", "tinyy")
    assert result.exit_code == 2 and "'tinyy' is not one of" in result.output and "'tiny'" in result.output


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_declares_itself_consistently(name):
    cls = METHODS[name]
    assert cls.name == name and cls.declaration_problems() == []
    options = cls.Options.from_dict({"num_students": 2} if cls.live_students else None, name)
    assert cls.requirements(options) <= REQUIREMENTS and isinstance(cls.labels_required(options), bool)
    assert cls.needs <= BATCH_FIELDS and set(cls.alternatives) <= REFUSALS
    assert all(isinstance(flag, bool) for flag in (cls.live_students, cls.reference_student, cls.sentinel_student))


def test_register_method_refuses_a_class_that_does_not_describe_itself():
    class Nameless(Method):
        name = "no_name"
        needs = frozenset({"featmap"})                        # the TeacherBatch field is `featmaps`

    with pytest.raises(MethodConfigError) as err:
        register_method(Nameless)
    text = str(err.value)
    assert "name 'no_name' must be lower case" in text and "summary" in text and "needs ['featmap']" in text
    assert "Fix:" in text and "no_name" not in METHODS


def test_nothing_outside_the_method_files_branches_on_a_method_name():
    """The point of the registry: the CLI, config, requirements, setup and loop ask the class, not the name."""
    names = "|".join(sorted(METHODS))
    quoted = rf"""["']({names})["']"""
    branch = re.compile(rf"""(==|!=)\s*{quoted}|{quoted}\s*(==|!=)|\bin\s*[(\[{{][^)\]}}]*{quoted}|[{{,]\s*{quoted}\s*:""")
    root = Path(__file__).resolve().parents[2]
    files = [p for pkg in ("kt_train", "kt_cache") for p in (root / pkg).rglob("*.py") if "methods" not in p.parts]
    found = [f"{p.relative_to(root)}:{i}: {line.strip()}" for p in files
             for i, line in enumerate(p.read_text().splitlines(), 1) if branch.search(line)]
    assert found == [], "\n".join(found)
