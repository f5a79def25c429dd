"""UNIFORM's pseudo-class under partial coverage (``vote_norm``), and label-free diagnostics (``audit_labels``).

Worked example (docs/methods.md, "Partial coverage"): three teachers, four classes, one row whose true class is
2. Teacher a covers {0, 1}, b covers {0, 1}, c covers {1, 2, 3}::

    q_a = (0.9, 0.1, 0, 0)        vote 0
    q_b = (0.6, 0.4, 0, 0)        vote 0
    q_c = (0, 0.1, 0.7, 0.2)      vote 2
    counts                = (2, 0, 1, 0)               -> ĉ = 0 (the paper's count)
    covering teachers     = (2, 3, 1, 1)
    vote shares           = (1, 0, 1, 0)               -> tie 0/2, broken by p̂
    probability mass      = (1.5, 0.6, 0.7, 0.2)
    mass / covering       = (0.75, 0.2, 0.7, 0.2)      -> ĉ = 0

and with q_c = (0, 0.05, 0.9, 0.05) the mass share of class 2 is 0.9 > 0.75: ĉ = 2, where the count still says 0.
"""

from __future__ import annotations

import pytest
import torch

from kt_train.methods import build_method
from kt_train.methods.voting import coverage_shares, mean_prob_target, pseudo_class, soft_votes, vote_counts

from .helpers import INF, batch, dims, student, t

COVERED = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
ALL3 = torch.ones(1, 3, dtype=torch.bool)


def _q(c_row: list[float]) -> torch.Tensor:
    return t([[[0.9, 0.1, 0, 0], [0.6, 0.4, 0, 0], c_row]])


def test_vote_and_mass_shares_worked_example():
    q = _q([0, 0.1, 0.7, 0.2])
    counts = vote_counts(q, ALL3)
    assert counts[0].tolist() == [2, 0, 1, 0]
    assert coverage_shares(counts, COVERED, ALL3)[0].tolist() == pytest.approx([1, 0, 1, 0])
    assert soft_votes(q, ALL3)[0].tolist() == pytest.approx([1.5, 0.6, 0.7, 0.2])
    assert coverage_shares(soft_votes(q, ALL3), COVERED, ALL3)[0].tolist() == pytest.approx([0.75, 0.2, 0.7, 0.2])


def test_mass_share_names_the_class_that_the_count_outvotes():
    q = _q([0, 0.05, 0.9, 0.05])
    p_hat = mean_prob_target(q, ALL3)
    assert pseudo_class(vote_counts(q, ALL3), p_hat).item() == 0
    assert pseudo_class(coverage_shares(soft_votes(q, ALL3), COVERED, ALL3), p_hat).item() == 2


def test_invalid_teachers_leave_the_covering_count():
    valid = torch.tensor([[True, False, True]])
    q = _q([0, 0.1, 0.7, 0.2])
    assert coverage_shares(soft_votes(q, valid), COVERED, valid)[0].tolist() == pytest.approx([0.9, 0.1, 0.7, 0.2])


def test_fractional_ties_fall_to_p_hat_like_integer_ties():
    shares = t([[1.0, 0.0, 1.0, 0.0]])
    assert pseudo_class(shares, t([[0.2, 0.1, 0.6, 0.1]])).item() == 2
    assert pseudo_class(shares, t([[0.6, 0.1, 0.2, 0.1]])).item() == 0
    assert pseudo_class(shares, t([[0.4, 0.1, 0.4, 0.1]])).item() == 0      # then the lower index


def _uniform_batch(c_row: list[float], labels: torch.Tensor | None = None, **extra):
    q = _q(c_row)[0]
    logits = {k: torch.where(COVERED[i], q[i].clamp_min(1e-12).log(), torch.tensor(-INF, dtype=q.dtype))[None].float()
              for i, k in enumerate("abc")}
    return batch(["a", "b", "c"], logits=logits, labels=labels, **extra)


@pytest.mark.parametrize("norm, c_hat", [("count", 0), ("coverage", 0), ("soft_coverage", 2)])
def test_uniform_elects_by_vote_norm(norm, c_hat):
    tb = _uniform_batch([0, 0.05, 0.9, 0.05], labels=torch.tensor([2]))
    method = build_method("uniform", {"vote_norm": norm, "target": "mean_prob"}, dims(4, 4, tb))
    out = method(student(torch.zeros(1, 4)), tb)
    assert out["pseudo_acc"].item() == float(c_hat == 2)


def test_audit_labels_score_the_target_and_never_train():
    plain = _uniform_batch([0, 0.05, 0.9, 0.05])
    audited = _uniform_batch([0, 0.05, 0.9, 0.05], audit_labels=torch.tensor([2]))
    z_s = torch.tensor([[0.3, -0.2, 0.1, 0.0]])
    for name, options in (("uniform", {"vote_norm": "soft_coverage"}), ("kd", {})):
        method = build_method(name, options, dims(4, 4, plain))
        a, b = method(student(z_s), plain), method(student(z_s), audited)
        assert "pseudo_acc" not in a and b["pseudo_acc"].item() in (0.0, 1.0)
        assert a["loss"].item() == b["loss"].item()


def test_default_vote_is_the_mass_share_only_under_partial_coverage():
    mixed = _uniform_batch([0, 0.05, 0.9, 0.05], labels=torch.tensor([2]))
    method = build_method("uniform", {"target": "mean_prob"}, dims(4, 4, mixed))
    assert method.options.vote_norm == "auto" and method(student(torch.zeros(1, 4)), mixed)["pseudo_acc"].item() == 1.0
    # every teacher covering every class: the paper's counts (two votes for 0 beat one for 2)
    q = t([[[0.6, 0.2, 0.1, 0.1], [0.5, 0.1, 0.3, 0.1], [0.0, 0.05, 0.9, 0.05]]])[0]
    full = batch(["a", "b", "c"], logits={k: q[i].clamp_min(1e-12).log()[None].float() for i, k in enumerate("abc")},
                 labels=torch.tensor([2]))
    method = build_method("uniform", {}, dims(4, 4, full))
    assert method(student(torch.zeros(1, 4)), full)["pseudo_acc"].item() == 0.0
