"""Methods describe themselves: the CLI's choices and help, the config check and the store requirements all
come from the registry (``kt_train.methods.METHODS``), so a new method is one file plus one registry line."""

from __future__ import annotations

from typing import ClassVar

import pytest
from click.testing import CliRunner

from kt_cache.cli import cli
from kt_cache.errors import UsageError
from kt_cache.store import StoreReader
from kt_train.config import TrainConfig
from kt_train.methods import METHODS, Method, MethodOptions
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
    ("avg", {"features"}, False, False), ("kpu", {"featmap"}, False, False),
    ("bikd", {"predictive_logits", "all_classes"}, True, False), ("fg", {"predictive_logits", "all_classes"}, False, True),
])
def test_shipped_methods_declare_their_ingredients(name, requires, live, reference):
    cls = METHODS[name]
    assert cls.requires == requires and cls.live_students is live and cls.reference_student is reference
    if name == "uniform":
        assert "predictive_logits" not in cls.requirements(cls.Options(logit_vote=False))
