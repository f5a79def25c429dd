"""Registry, options, the TeacherBatch fill helpers, and the error paths of the interface."""

from __future__ import annotations

import pytest
import torch

from kt_train.methods import (
    METHODS,
    MethodConfigError,
    MethodDims,
    TeacherInfo,
    build_method,
    build_options,
    list_methods,
    scatter_full_logits,
    scatter_topk_logits,
)
from kt_train.methods.base import TeacherBatch

from .helpers import batch, dims, student, t

ZB = [[1.0, 2.0, 0.1], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]]
ZC = [[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]


def test_registry_names_and_classes():
    assert set(METHODS) == {"ce", "kd", "avg", "uniform", "kpu", "bikd", "fg"}
    assert list_methods() == sorted(METHODS)
    for name, cls in METHODS.items():
        assert cls.name == name and cls.needs <= {f for f in TeacherBatch.__dataclass_fields__}
        assert cls.__doc__ and __import__(cls.__module__, fromlist=["x"]).__doc__


@pytest.mark.parametrize("name, message", [
    ("unifrom", 'Did you mean "uniform"'), ("bi-kd", None), ("Bi_KD", None), ("hinton", "Known methods"),
])
def test_unknown_method_names(name, message):
    if message is None:
        assert type(build_method(name, {}, MethodDims(4, 3))).name == "bikd"
        return
    with pytest.raises(MethodConfigError, match=message):
        build_method(name, {}, MethodDims(4, 3))


@pytest.mark.parametrize("name, options, message", [
    ("kd", {"alpah": 0.5}, 'unknown option .alpah.. Did you mean "alpha"'),
    ("kd", {"temperature": 2}, "Valid options: tau, alpha, standardize"),
    ("uniform", {"alpah2": 0.5}, 'Did you mean "alpha2"'),
    ("uniform", {"tie_break": "summ"}, 'expected one of .*Did you mean "sum"'),
    ("kd", {"tau": "two"}, "expected float"),
    ("kd", {"tau": 0}, "tau must be > 0"),
    ("kpu", {"lambdas": [1, 0.9]}, "expected 3"),
    ("bikd", {"num_students": True}, "expected int"),
    ("fg", {"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
])
def test_bad_options(name, options, message):
    with pytest.raises(MethodConfigError, match=message):
        build_options(name, options)


def test_options_are_typed_and_frozen():
    o = build_options("kpu", {"lambdas": [1, 0, 0], "rec_weight": 2})
    assert o.lambdas == (1.0, 0.0, 0.0) and isinstance(o.rec_weight, float)
    with pytest.raises(AttributeError):
        o.rec_weight = 3.0  # type: ignore[misc]
    assert isinstance(MethodConfigError("x"), ValueError)


def test_uniform_build_errors_name_the_fix():
    d = MethodDims(4, 3, (TeacherInfo("a.b", feature_dim=5),))
    with pytest.raises(MethodConfigError, match="zscore=true needs feature_mean.*'a.b'"):
        build_method("uniform", {}, d)
    with pytest.raises(MethodConfigError, match="head='identity' needs d_t = D"):
        build_method("uniform", {"head": "identity", "zscore": False}, d)


def test_heads_are_saved_per_dim_group_and_old_per_teacher_keys_load():
    """Grouped heads are saved under their group (``d<dim>``); a checkpoint of the per-teacher heads (keys under
    the escaped teacher id, ``nn.Linear`` weights [d_out, d_in]) loads into them."""
    d = MethodDims(4, 3, (TeacherInfo("convnext.fb_in1k", feature_dim=5, featmap_dim=6),))
    kpu = build_method("kpu", {}, d)
    assert kpu.state_dict()["global_heads.d5.s2t.fc1.weight"].shape == (1, 4, 5)
    assert kpu.state_dict()["map_heads.d6.rec.norm.weight"].shape == (1, 6)
    stats = dict(feature_mean=torch.zeros(5), feature_std=torch.ones(5))
    d2 = MethodDims(4, 3, (TeacherInfo("convnext.fb_in1k", feature_dim=5, **stats), TeacherInfo("b", feature_dim=5, **stats)))
    uniform = build_method("uniform", {}, d2)
    assert uniform.state_dict()["zscores.d5.std"].shape == (2, 5)
    old = {}
    for p in uniform.legacy_params():
        value = uniform.state_dict()[p.new][p.member]
        old[p.old] = (value.T if p.transpose else value) + 1.0
    assert "encoders.convnext%2Efb_in1k.0.weight" in old and old["encoders.b.2.weight"].shape == (4, 4)
    uniform.load_state_dict(old)
    assert torch.equal(uniform.state_dict()["encoders.d5.fc1.weight"][0], old["encoders.convnext%2Efb_in1k.0.weight"].T)
    assert torch.equal(uniform.state_dict()["zscores.d5.mean"][1], old["zscores.b.mean"])


@pytest.mark.parametrize("method", ["uniform", "avg"])
def test_head_width_defaults_to_the_students_width_capped_at_512(method):
    """``hidden`` unset: the encoders and decoders are min(D, 512) wide (at D = 2048, width D would make 100
    teachers' heads 1.2 B parameters); an explicit ``hidden`` is what is built, also above D."""
    stats = dict(feature_mean=torch.zeros(5), feature_std=torch.ones(5))
    for D, options, width in ((256, {}, 256), (2048, {}, 512), (2048, {"hidden": 1024}, 1024), (256, {"hidden": 600}, 600)):
        heads = build_method(method, options, MethodDims(D, 3, (TeacherInfo("a", feature_dim=5, **stats),))).state_dict()
        assert heads["encoders.d5.fc1.weight"].shape == (1, 5, width) and heads["decoders.d5.fc2.weight"].shape == (1, width, 5)
        assert heads["encoders.d5.fc2.weight"].shape == (1, width, D)


def test_missing_inputs_raise_clear_errors():
    tb = batch(["B"], logits={"B": t(ZB, torch.float32)})
    with pytest.raises(ValueError, match="needs labels"):
        build_method("bikd", {}, dims(4, 3, tb))(student(torch.zeros(3, 3)), tb)
    with pytest.raises(ValueError, match="reference_logits"):
        build_method("fg", {}, dims(4, 3, tb))(student(torch.zeros(3, 3)), tb)
    with pytest.raises(ValueError, match="needs TeacherBatch.labels"):
        build_method("ce", {}, dims(4, 3, tb))(student(torch.zeros(3, 3)), tb)
    with pytest.raises(ValueError, match="alpha=0.9 < 1 needs labels"):
        build_method("kd", {"alpha": 0.9}, dims(4, 3, tb))(student(torch.zeros(3, 3)), tb)
    with pytest.raises(ValueError, match="trains one student"):
        build_method("kd", {}, dims(4, 3, tb))([student(torch.zeros(3, 3))] * 2, tb)


def test_kd_alpha_defaults_follow_labels():
    tb = batch(["B"], logits={"B": t(ZB, torch.float32)})
    m = build_method("kd", {}, dims(4, 3, tb))
    assert "ce_loss" not in m(student(torch.zeros(3, 3)), tb)
    tb.labels = torch.tensor([0, 1, -1])
    out = m(student(torch.zeros(3, 3)), tb)
    assert out["loss"].item() == pytest.approx(0.9 * out["kd_loss"].item() + 0.1 * out["ce_loss"].item(), abs=1e-6)


def test_bikd_label_free_vote_equals_training_on_the_pseudo_labels():
    tb = batch(["B", "C"], logits={"B": t(ZB, torch.float32), "C": t(ZC, torch.float32)})
    za = t([[2.0, 1.0, 0.5], [0.2, 0.1, 1.5], [1.0, 1.0, 1.0]], torch.float32)
    voted = build_method("bikd", {"label_source": "vote"}, dims(4, 3, tb))(student(za), tb)
    # votes: row 0 B→1, C→0 (tie; larger mean prob → 0); row 1 both → 1; row 2 uniform rows → 0
    tb.labels = torch.tensor([0, 1, 0])
    labelled = build_method("bikd", {}, dims(4, 3, tb))(student(za), tb)
    assert voted["loss"].item() == pytest.approx(labelled["loss"].item(), abs=1e-6)


def test_uniform_is_label_free_and_teacher_order_invariant():
    g = torch.Generator().manual_seed(0)
    feats = {f"t{i}": torch.randn(5, 4, generator=g) for i in range(3)}
    logits = {f"t{i}": torch.randn(5, 6, generator=g) for i in range(3)}
    zs, x = torch.randn(5, 6, generator=g), torch.randn(5, 4, generator=g)
    opts = {"head": "identity", "zscore": False}
    tb = batch(list(feats), features=feats, logits=logits)
    a = build_method("uniform", opts, dims(4, 6, tb))(student(zs, x), tb)["loss"]
    rev = batch(list(feats)[::-1], features=feats, logits=logits, labels=torch.zeros(5, dtype=torch.long))
    b = build_method("uniform", opts, dims(4, 6, rev))(student(zs, x), rev)["loss"]
    assert a.item() == pytest.approx(b.item(), abs=1e-6)


def test_avg_is_uniform_with_votes_off():
    g = torch.Generator().manual_seed(1)
    feats = {f"t{i}": torch.randn(5, 4, generator=g) for i in range(4)}
    logits = {f"t{i}": torch.randn(5, 6, generator=g) for i in range(4)}
    tb = batch(list(feats), features=feats, logits=logits)
    s = student(torch.randn(5, 6, generator=g), torch.randn(5, 4, generator=g))
    opts = {"head": "identity", "zscore": False}
    avg = build_method("avg", opts, dims(4, 6, tb))(s, tb)
    off = build_method("uniform", {**opts, "feature_vote": False, "logit_vote": False}, dims(4, 6, tb))(s, tb)
    assert avg["loss"].item() == pytest.approx(off["loss"].item(), abs=1e-6)


def test_scatter_full_logits_drops_and_pads():
    z = t([[1.0, 2.0, 3.0]], torch.float32)
    out, covered = scatter_full_logits(z, torch.tensor([4, -1, 0]), 5)
    assert covered.tolist() == [True, False, False, False, True]
    assert out[0].tolist() == [3.0, float("-inf"), float("-inf"), float("-inf"), 1.0]


def test_scatter_topk_logits_is_exact_on_stored_classes():
    g = torch.Generator().manual_seed(3)
    z = 3 * torch.randn(4, 10, generator=g, dtype=torch.float64)
    values, index = z.topk(3, -1)
    lse = torch.logsumexp(z, -1)
    filled, covered = scatter_topk_logits(values.half(), index.to(torch.int32), lse.float(), torch.arange(10), 10)
    assert covered.all()
    lp = torch.log_softmax(filled.double(), -1).gather(1, index)
    exact = values.half().double() - lse.float().double()[:, None]
    torch.testing.assert_close(lp, exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(filled.double().logsumexp(-1), lse.float().double(), atol=1e-5, rtol=0)
    tail = torch.ones_like(filled, dtype=torch.bool).scatter(1, index, False)
    assert (filled[tail].reshape(4, 7) == filled[tail].reshape(4, 7)[:, :1]).all()


def test_teacher_batch_check():
    tb = batch(["B"], logits={"B": t(ZB, torch.float32)}, features={"B": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"logits\['B'\] has 3 rows, expected 2"):
        tb.check(3)
    with pytest.raises(ValueError, match="expected \\[B, 4\\]"):
        batch(["B"], logits={"B": t(ZB, torch.float32)}).check(4)
