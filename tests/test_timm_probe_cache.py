"""timm teachers sharing an architecture are built and probed once when resolving; plans and errors unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import timm

from kt_cache.errors import TeacherError
from kt_cache.manifest_types import PreprocessSpec, TeacherSpec
from kt_cache.teachers import load_teacher, resolve_teacher
from kt_cache.teachers import timm_source


def spec(tid: str = "cnn", **kw) -> TeacherSpec:
    base = dict(id=tid, source="timm", model="resnet10t", pretrained="none", outputs=("features", "logits", "featmap"),
                featmap_grid=2, model_args={"num_classes": 10}, preprocess=PreprocessSpec(input_size=(3, 32, 32)))
    return TeacherSpec(**{**base, **kw})


@pytest.fixture
def counted(monkeypatch):
    """A cold cache; counts timm builds and meta probes."""
    timm_source._PROBED.clear()
    calls = {"build": 0, "probe": 0}
    real_create, real_probe = timm.create_model, timm_source._probe

    def create(*a, **k):
        calls["build"] += 1
        return real_create(*a, **k)

    def probe(*a, **k):
        calls["probe"] += 1
        return real_probe(*a, **k)

    monkeypatch.setattr(timm, "create_model", create)
    monkeypatch.setattr(timm_source, "_probe", probe)
    yield calls
    timm_source._PROBED.clear()


def test_teachers_of_one_architecture_build_and_probe_once(counted, tmp_path):
    plans = [resolve_teacher(spec(f"t{i}"), None, tmp_path) for i in range(4)]
    assert counted == {"build": 1, "probe": 1}
    timm_source._PROBED.clear()
    cold = resolve_teacher(spec("t3"), None, tmp_path)
    assert dataclasses.asdict(cold) == dataclasses.asdict(plans[3])          # a cached plan is the uncached one
    assert [p.id for p in plans] == ["t0", "t1", "t2", "t3"]


def test_what_changes_the_model_or_its_outputs_is_probed_again(counted, tmp_path):
    resolve_teacher(spec(), None, tmp_path)
    other_size = resolve_teacher(spec(preprocess=PreprocessSpec(input_size=(3, 64, 64))), None, tmp_path)
    other_grid = resolve_teacher(spec(featmap_grid=1), None, tmp_path)
    no_map = resolve_teacher(spec(outputs=("features", "logits")), None, tmp_path)
    assert counted == {"build": 1, "probe": 4}
    assert other_size.input_size == (3, 64, 64) and other_grid.featmap_dim == 512 and no_map.featmap_dim is None
    wider = resolve_teacher(spec(model_args={"num_classes": 7}), None, tmp_path)
    assert counted["build"] == 2 and wider.num_classes == 7


def test_errors_still_name_each_teacher(counted, tmp_path):
    vit = dict(model="vit_tiny_patch16_224", model_args={}, preprocess=PreprocessSpec((3, 32, 32)))
    for tid in ("first", "second"):
        with pytest.raises(TeacherError) as err:
            resolve_teacher(spec(tid, **vit), None, tmp_path)
        assert f"teacher {tid}:" in str(err.value) and "3x32x32" in str(err.value) and "Fix" in str(err.value)
    resolve_teacher(spec("ok"), None, tmp_path)
    with pytest.raises(TeacherError) as err:              # cached model, wrong class list: this teacher's error
        resolve_teacher(spec("named", classes=("a", "b")), None, tmp_path)
    assert "teacher named: classes has 2 names but the model outputs 10 logits" in str(err.value)


def test_a_cpu_built_fallback_is_not_kept(counted, monkeypatch, tmp_path):
    """A model whose constructor needs real tensors is built on the CPU: caching it would pin its memory."""
    monkeypatch.setattr(timm_source, "meta_build", lambda make: make().eval())
    resolve_teacher(spec("a"), None, tmp_path)
    resolve_teacher(spec("b"), None, tmp_path)
    assert counted["build"] == 2 and not timm_source._PROBED


def test_the_cache_is_bounded(counted, monkeypatch, tmp_path):
    monkeypatch.setattr(timm_source, "PROBE_CACHE_SIZE", 2)
    for classes in (3, 4, 5):
        resolve_teacher(spec(model_args={"num_classes": classes}), None, tmp_path)
    assert [key[2] for key in timm_source._PROBED] == ['{"num_classes": 4}', '{"num_classes": 5}']


def test_a_cached_plan_loads_and_runs(counted, tmp_path):
    import torch

    resolve_teacher(spec("warm"), None, tmp_path)
    plan = resolve_teacher(spec("cached"), None, tmp_path)
    out = load_teacher(plan, "cpu").forward(torch.zeros(2, 3, 32, 32))
    assert out["features"].shape == (2, plan.feature_dim) and out["logits"].shape == (2, plan.num_classes)
    assert out["featmap"].shape == (2, 2, 2, plan.featmap_dim)
