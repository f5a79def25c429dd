"""docs/methods.md: every worked example, with the spec's numbers (6 decimals; methods compute in fp32)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kt_train.methods import build_method
from kt_train.methods.bikd import bikd_roles
from kt_train.methods.common import standardize_logits
from kt_train.methods.kpu import align_rows
from kt_train.methods.voting import (
    concat_logit_target,
    mean_prob_target,
    plain_mean,
    pseudo_class,
    sign_vote,
    uniform_logit_rows,
    vote_counts,
)

from .helpers import INF, batch, dims, student, t

TOL = 2e-6
approx = lambda x, tol=TOL: pytest.approx(x, abs=tol)  # noqa: E731

U = [[0.9, -0.5, 0.1, 0.4], [-0.7, -0.6, 0.9, -0.2], [0.5, 0.3, 0.2, -0.6]]
X = [0.5, -0.5, 0.5, -0.5]
Q = [[0.6, 0.2, 0.1, 0.1], [0.3, 0.5, 0.1, 0.1], [0.5, 0.1, 0.3, 0.1]]
ZS = [1.0, 0.5, 0.0, -0.5]
ALL3 = torch.ones(1, 3, dtype=torch.bool)


# ------------------------------------------------------------------------------------------- 7.1 features
def test_7_1_feature_vote_disjoint_mean():
    x_hat, m, ties = sign_vote(t([U]), ALL3)
    assert x_hat[0].tolist() == approx([0.70, -0.55, 0.40, -0.40])
    assert m[0].tolist() == [[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 1, 1]]
    assert not ties.any()
    x = t([X])
    assert torch.nn.functional.mse_loss(x, x_hat).item() == approx(0.015625)
    assert (x - x_hat).norm().item() == approx(0.25)


def test_7_1_plain_mean_baseline():
    mean = plain_mean(t([U]), ALL3)
    assert mean[0].tolist() == approx([0.233333, -0.266667, 0.40, -0.133333])
    assert torch.nn.functional.mse_loss(t([X]), mean).item() == approx(0.0675)


@pytest.mark.parametrize("rule, s0, x_hat", [("literal", 0.0, [0.0, -1.5]), ("sum", -1.0, [-3.0, -1.5])])
def test_7_1_ties(rule, s0, x_hat):
    got, m, ties = sign_vote(t([[[1.0, -2.0], [-3.0, -1.0]]]), torch.ones(1, 2, dtype=torch.bool), rule)
    assert got[0].tolist() == approx(x_hat)
    assert ties[0].tolist() == [True, False]
    assert m[0, :, 0].tolist() == ([0, 0] if rule == "literal" else [0, 1])


def test_7_1_missing_teacher():
    x_hat, _, _ = sign_vote(t([U]), torch.tensor([[True, True, False]]))
    assert x_hat[0].tolist() == approx([0.0, -0.55, 0.5, 0.0])


def test_7_1_through_module_identity_heads():
    tb = batch(["a", "b", "c"], features={k: t([u], torch.float32) for k, u in zip("abc", U)})
    m = build_method("uniform", {"head": "identity", "zscore": False}, dims(4, 4, tb))
    out = m(student(t([ZS], torch.float32), t([X], torch.float32)), tb)
    assert out["feature_loss"].item() == approx(0.015625)
    assert out["rec_loss"].item() == 0.0 and out["tie_frac"].item() == 0.0
    tb.valid["c"] = torch.tensor([False])
    assert m(student(t([ZS]), t([X])), tb)["feature_loss"].item() == approx(((0.5) ** 2 + 0.05**2 + 0 + 0.5**2) / 4)


# --------------------------------------------------------------------------------------------- 7.2 logits
def _q():
    return t([Q], torch.float32)


def test_7_2a_votes_and_target():
    q = _q()
    counts = vote_counts(q, ALL3)
    assert (counts / 3)[0].tolist() == approx([2 / 3, 1 / 3, 0, 0])
    p_hat = mean_prob_target(q, ALL3)
    assert p_hat[0].tolist() == approx([0.466667, 0.266667, 0.166667, 0.1])
    assert pseudo_class(counts, p_hat).item() == 0


@pytest.mark.parametrize("a1, a2, ce", [(1, 1, 1.237339), (1, 0.5, 0.802382), (2, 1, 1.604763)])
def test_7_2b_logit_loss_ce_form(a1, a2, ce):
    logq = torch.log_softmax(t([ZS]), -1)
    assert logq.exp()[0].tolist() == approx([0.455054, 0.276004, 0.167405, 0.101536])
    p_hat = mean_prob_target(t([Q]), ALL3)
    assert uniform_logit_rows(logq, p_hat, torch.tensor([0]), a1, a2).item() == approx(ce)


def test_7_2b_kl_form_and_entropy():
    p_hat = mean_prob_target(t([Q]), ALL3)
    H = -(p_hat * p_hat.log()).sum().item()
    assert H == approx(1.237019)
    logq = torch.log_softmax(t([ZS]), -1)
    kl_form = lambda a2: uniform_logit_rows(logq, p_hat, torch.tensor([0]), 1, a2).item() - H  # noqa: E731
    assert kl_form(1) == approx(0.000320)
    assert kl_form(0.5) == approx(-0.434637)
    uniform = torch.full((1, 4), math.log(0.25), dtype=torch.float64)
    assert uniform_logit_rows(uniform, p_hat, torch.tensor([0]), 1, 0.5).item() == approx(1.016616)


def test_7_2b_toy_total_through_module():
    tb = batch(["a", "b", "c"], features={k: t([u], torch.float32) for k, u in zip("abc", U)},
               logits={k: t([q], torch.float32).log() for k, q in zip("abc", Q)})
    m = build_method("uniform", {"head": "identity", "zscore": False, "alpha1": 1, "alpha2": 0.5}, dims(4, 4, tb))
    out = m(student(t([ZS], torch.float32), t([X], torch.float32)), tb)
    assert out["logit_loss"].item() == approx(0.802382)
    assert out["loss"].item() == approx(0.818007)
    assert out["vote_agreement"].item() == approx(2 / 3)


def test_7_2c_pseudo_class_tie_rule():
    q = t([[[0.40, 0.35, 0.25], [0.30, 0.45, 0.25]]])
    two = torch.ones(1, 2, dtype=torch.bool)
    counts, p_hat = vote_counts(q, two), mean_prob_target(q, two)
    assert counts[0].tolist() == [1, 1, 0]
    assert p_hat[0].tolist() == approx([0.35, 0.40, 0.25])
    assert pseudo_class(counts, p_hat, "p_hat").item() == 1
    assert pseudo_class(counts, p_hat, "index").item() == 0


def _case_b():
    z = t([[[2.0, 0.0, -INF, -INF], [1.5, 0.5, -INF, -INF], [-INF, -INF, 0.3, 0.2]]])
    covered = torch.isfinite(z[0])
    return z, covered


def test_7_2d_disjoint_label_spaces():
    z, covered = _case_b()
    q = torch.softmax(z, -1)
    counts = vote_counts(q, ALL3)
    assert (counts / 3)[0].tolist() == approx([2 / 3, 0, 1 / 3, 0])
    p_cat = concat_logit_target(z, covered, ALL3)
    assert p_cat[0].tolist() == approx([0.598821, 0.133615, 0.140466, 0.127099])
    assert pseudo_class(counts, p_cat).item() == 0
    assert mean_prob_target(q, ALL3)[0].tolist() == approx([0.537285, 0.129381, 0.174993, 0.158340])


def test_7_2d_module_picks_concat_target():
    z, _ = _case_b()
    tb = batch(["a", "b", "c"], logits={k: z[:, i].float() for i, k in enumerate("abc")})
    m = build_method("uniform", {"alpha2": 1.0, "zscore": False}, dims(4, 4, tb))
    out = m(student(t([ZS], torch.float32)), tb)
    p_cat = torch.tensor([0.598821, 0.133615, 0.140466, 0.127099], dtype=torch.float64)
    expected = -(p_cat * torch.log_softmax(t(ZS), -1)).sum().item()
    assert out["loss"].item() == approx(expected, 1e-5)
    assert "alt_target_ce" in out


# ----------------------------------------------------------------------------------------------- 7.3 Bi-KD
ZA = [[2.0, 1.0, 0.5], [0.2, 0.1, 1.5], [1.0, 1.0, 1.0]]
ZB = [[1.0, 2.0, 0.1], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]]
ZC = [[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
Y = torch.tensor([0, 1, 2])


def test_7_3_roles_official2():
    g = torch.stack([torch.log_softmax(t(z), -1).gather(1, Y[:, None])[:, 0] for z in (ZA, ZB)], 1)
    assert g.exp()[:, 0].tolist() == approx([0.628532, 0.162328, 0.333333])
    kstar, ok = bikd_roles(g, "official2")
    assert kstar.tolist() == [0, 1, 1] and ok.all()


def test_7_3_two_live_models():
    m = build_method("bikd", {"num_students": 2, "tie_rule": "official2"}, dims(4, 3, batch([], logits={"x": t(ZA)})))
    tb = batch([], logits={"x": t(ZA)}, labels=Y)
    out = m([student(t(ZA, torch.float32, True)), student(t(ZB, torch.float32, True))], tb)
    assert out["kd_loss"].item() == approx(0.466290)
    assert out["ce_loss"].item() == approx(1.127039 + 0.918396)
    assert out["loss"].item() == approx(2.511725)
    assert out["teach_share/student0"].item() == approx(1 / 3)
    assert out["teach_share/student1"].item() == approx(2 / 3)


def test_7_4_three_live_models_unique_ties():
    m = build_method("bikd", {"num_students": 3}, dims(4, 3, batch([], logits={"x": t(ZA)})))
    outs = [student(t(z, torch.float32, True)) for z in (ZA, ZB, ZC)]
    out = m(outs, batch([], logits={"x": t(ZA)}, labels=Y))
    assert out["kd_loss"].item() == approx(0.782856)
    assert out["no_teacher_frac"].item() == approx(1 / 3)


@pytest.mark.parametrize("topk_fields", [False, True])
def test_7_4_cached_variant_c1(topk_fields):
    zb, zc = t(ZB, torch.float32), t(ZC, torch.float32)
    extra = {}
    if topk_fields:   # exact log p_y from label_logit - lse, as a top-k cache provides
        # (fp64 here so that sample 2 stays an exact 3-way tie; an fp32-rounded LSE would break it)
        extra = {"label_logit": {k: z.double().gather(1, Y[:, None])[:, 0] for k, z in (("B", zb), ("C", zc))},
                 "lse": {k: z.double().logsumexp(-1) for k, z in (("B", zb), ("C", zc))}}
    tb = batch(["B", "C"], logits={"B": zb, "C": zc}, labels=Y, **extra)
    m = build_method("bikd", {}, dims(4, 3, tb))
    out = m(student(t(ZA, torch.float32, True)), tb)
    assert out["kd_loss"].item() == approx(0.401258)
    assert out["ce_loss"].item() == approx(1.127039)
    assert out["loss"].item() == approx(1.528298)
    assert [out[f"teach_share/{k}"].item() for k in ("student0", "B", "C")] == approx([0, 1 / 3, 1 / 3])


# --------------------------------------------------------------------------------------------------- 7.5 FG
@pytest.mark.parametrize("mask, shares", [("supervised", [0, 1, 0]), ("unsupervised", [1, 1, 0])])
def test_7_5_fantastic_gains(mask, shares):
    tb = batch(["B"], logits={"B": t(ZB, torch.float32)}, labels=Y, reference_logits=t(ZA, torch.float32))
    m = build_method("fg", {"mask": mask}, dims(4, 3, tb))
    zs = t([[1.5, 1.0, 0.5], [0.5, 0.5, 1.0], [1, 1, 1]], torch.float32, True)
    out = m(student(zs), tb)
    assert out["teach_share/B"].item() == approx(sum(shares) / 3)
    if mask == "supervised":
        assert out["loss"].item() == approx(0.201906)


# -------------------------------------------------------------------------------------------------- 7.6 KPU
def _kpu_inputs():
    x1, x2 = t([[1.0, 0.0]]), t([[0.6, 0.8]])
    v1 = t([[[[1.0, 0.0], [0.0, 2.0]]]])          # [B=1, h=1, w=2, d=2]
    v2 = t([[[[1.0, 1.0], [0.0, -1.0]]]])
    return x1, v1, x2, v2


def test_7_6_align_loss():
    x1, v1, x2, v2 = _kpu_inputs()
    assert align_rows(x1, None, x2, None, (1, 0, 0)).item() == approx(0.4)
    assert align_rows(None, v1, None, v2, (0, 1, 0)).item() == approx(1.146447)
    assert align_rows(None, v1, None, v2, (0, 0, 1)).item() == approx(0.75)
    assert align_rows(x1, v1, x2, v2).item() == approx(1.506802)
    assert align_rows(None, v1, None, v2).item() == approx(1.106802)


def test_7_6_rec_is_zero_with_identity_heads():
    _, _, x2, v2 = _kpu_inputs()
    tb = batch(["t"], features={"t": x2.float()}, featmaps={"t": v2.float()})
    m = build_method("kpu", {"s2t": False, "t2s": False}, dims(2, 3, tb))
    for heads in (m.global_heads["d2"], m.map_heads["d2"]):       # the group of teachers with d_t = 2
        heads["t2s"], heads["rec"] = nn.Identity(), nn.Identity()
    out = m(student(torch.zeros(1, 3), torch.ones(1, 2), torch.ones(1, 2, 1, 2)), tb)
    assert out["rec_loss"].item() == approx(0.0)


# ---------------------------------------------------------------------------------------------- 7.7 Hinton
@pytest.mark.parametrize("tau, value", [(2.0, 0.313684), (1.0, 0.266217)])
def test_7_7_hinton_single(tau, value):
    tb = batch(["t"], logits={"t": t([[2.0, 1.0, 0.0]], torch.float32)})
    m = build_method("kd", {"tau": tau}, dims(4, 3, tb))
    assert m(student(t([[1.0, 1.0, 1.0]], torch.float32)), tb)["loss"].item() == approx(value)


def test_7_7_hinton_two_teachers():
    from kt_train.methods.kd import average_teacher_probs

    z = t([[[2.0, 1.0, 0.0], [0.0, 2.0, 1.0]]], torch.float32)
    p, _ = average_teacher_probs(z, torch.ones(1, 2, dtype=torch.bool), 2.0)
    assert p[0].tolist() == approx([0.346402, 0.406838, 0.246760])
    tb = batch(["a", "b"], logits={"a": z[:, 0], "b": z[:, 1]})
    m = build_method("kd", {"tau": 2.0}, dims(4, 3, tb))
    assert m(student(torch.zeros(1, 3)), tb)["loss"].item() == approx(0.080743)


def test_7_7_logit_standardization():
    assert standardize_logits(t([[2.0, 1.0, 0.0]]))[0].tolist() == approx([1.0, 0.0, -1.0], 1e-6)
    covered = torch.tensor([True, True, True, False])
    z = standardize_logits(t([[2.0, 1.0, 0.0, -INF]]), covered)
    assert z[0, :3].tolist() == approx([1.0, 0.0, -1.0], 1e-6) and z[0, 3].item() == -INF
