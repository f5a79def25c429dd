"""Gradients: gradcheck of the custom pieces, no gradient into cached tensors, fp16 and NaN-row robustness."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from kt_train.methods import METHODS, MethodDims, StudentOutput, TeacherBatch, TeacherInfo, build_method
from kt_train.methods.bikd import bikd_kd_rows, bikd_roles
from kt_train.methods.common import class_logprob, standardize_logits
from kt_train.methods.kd import kd_rows
from kt_train.methods.kpu import align_rows
from kt_train.methods.voting import mean_prob_target, pseudo_class, sign_vote, uniform_logit_rows, vote_counts

B, C, D, H, W = 4, 6, 8, 3, 3


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize("rule", ["literal", "sum"])
def test_gradcheck_sign_vote(rule):
    g = _gen(1)
    u = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    u = (u + 0.2 * u.sign()).requires_grad_()                         # away from 0: signs are locally constant
    valid = torch.rand(3, 4, generator=g) > 0.3
    assert gradcheck(lambda x: sign_vote(x, valid, rule)[0], (u,))


def test_gradcheck_uniform_logit_target():
    g = _gen(2)
    q = torch.softmax(torch.randn(3, 4, 5, generator=g, dtype=torch.float64), -1)
    valid = torch.ones(3, 4, dtype=torch.bool)
    p_hat = mean_prob_target(q, valid)
    c_hat = pseudo_class(vote_counts(q, valid), p_hat)
    z = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda z: uniform_logit_rows(F.log_softmax(z, -1), p_hat, c_hat, 1.0, 0.5), (z,))


def test_gradcheck_align_loss():
    g = _gen(3)
    args = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in [(2, 3), (2, 2, 2, 3), (2, 3), (2, 2, 2, 3)]]
    assert gradcheck(lambda *a: align_rows(*a), tuple(args))
    assert gradcheck(lambda v1, v2: align_rows(None, v1, None, v2), (args[1], args[3]))


def test_gradcheck_bikd_masking_teacher_grad():
    """Official-code form (no stop-gradient): the whole KD term is differentiable in every live model."""
    g = _gen(4)
    live = [torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    cached = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (5,), generator=g)
    kstar, ok = bikd_roles(torch.stack([class_logprob(z, y) for z in live + [cached]], 1))
    learners = torch.tensor([True, True, False])

    def kd(a, b):
        logp = torch.stack([F.log_softmax(z, -1) for z in (a, b, cached)], 1)
        return bikd_kd_rows(logp, kstar, ok, learners, teacher_grad=True)

    assert gradcheck(kd, tuple(live))


def test_gradcheck_bikd_masking_stop_gradient():
    """With sg, a pure learner's gradient is exact and a teaching model gets no gradient on its rows."""
    g = _gen(4)
    a, b = (torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cached = torch.randn(6, 4, generator=g, dtype=torch.float64)
    kstar = torch.tensor([1, 2, 1, 2, 1, 2])                          # a never teaches, b teaches rows 0, 2, 4
    ok = torch.tensor([True, True, True, False, True, True])
    learners = torch.tensor([True, True, False])

    def kd(x, y):
        logp = torch.stack([F.log_softmax(z, -1) for z in (x, y, cached)], 1)
        return bikd_kd_rows(logp, kstar, ok, learners, teacher_grad=False)

    assert gradcheck(lambda x: kd(x, b.detach()), (a,))
    kd(a, b).sum().backward()
    assert torch.all(b.grad[kstar == 1] == 0) and torch.all(b.grad[(kstar == 2) & ok] != 0)
    assert torch.all(a.grad[~ok] == 0)


def test_gradcheck_kd_and_standardization():
    g = _gen(5)
    z = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(torch.randn(3, 5, generator=g, dtype=torch.float64), -1)
    assert gradcheck(lambda z: kd_rows(standardize_logits(z), p, p.log(), 2.0), (z,))


# ---------------------------------------------------------------------------------- every method, end to end
OPTIONS = {
    "ce": {}, "kd": {"alpha": 0.5, "standardize": True}, "avg": {}, "uniform": {"tie_break": "sum"},
    "kpu": {}, "bikd": {"num_students": 2}, "fg": {"alpha": 0.5},
}
TEACHERS = {   # id: (role, feature dim, featmap (h, w, d), logit coverage)
    "p.a": ("predictive", 6, (2, 2, 5), C),
    "p_b": ("predictive", 3, None, C),
    "d": ("descriptive", 4, (3, 3, 4), 0),
    "s": ("sentinel", None, (4, 4, 3), 0),
    "part": ("predictive", None, None, C // 2),
}


def _setup(dtype: torch.dtype, nan_invalid: bool) -> tuple[TeacherBatch, MethodDims, list[torch.Tensor]]:
    g = _gen(7)
    valid = {tid: torch.ones(B, dtype=torch.bool) for tid in TEACHERS}
    valid["p_b"][1], valid["d"][2], valid["part"][0] = False, False, False
    tb = TeacherBatch(ids=tuple(TEACHERS), roles={k: v[0] for k, v in TEACHERS.items()}, valid=valid,
                      labels=torch.tensor([0, 3, -1, 5]), reference_logits=torch.randn(B, C, generator=g))
    infos, leaves = [], [tb.reference_logits]
    for tid, (role, fd, fm, cov) in TEACHERS.items():
        if fd:
            tb.features[tid] = torch.randn(B, fd, generator=g)
        if fm:
            tb.featmaps[tid] = torch.randn(B, *fm, generator=g)
        if cov:
            tb.covered[tid] = torch.arange(C) < cov
            tb.logits[tid] = (3 * torch.randn(B, C, generator=g)).masked_fill(~tb.covered[tid], float("-inf"))
        infos.append(TeacherInfo(tid, role, fd, fm[2] if fm else None, bool(cov),
                                 torch.zeros(fd) if fd else None, torch.full((fd,), 2.0) if fd else None))
    for field in ("features", "featmaps", "logits"):
        d = getattr(tb, field)
        for tid in d:
            x = d[tid].to(dtype)
            if nan_invalid:
                x = torch.where(valid[tid].reshape(-1, *[1] * (x.dim() - 1)), x, float("nan")).to(dtype)
            d[tid] = x.requires_grad_()
            leaves.append(d[tid])
    tb.reference_logits = tb.reference_logits.to(dtype).requires_grad_()
    leaves[0] = tb.reference_logits
    return tb, MethodDims(D, C, tuple(infos)), leaves


def _students(n: int, dtype: torch.dtype) -> list[StudentOutput]:
    g = _gen(8)
    return [StudentOutput(torch.randn(B, C, generator=g).to(dtype).requires_grad_(),
                          torch.randn(B, D, generator=g).to(dtype).requires_grad_(),
                          torch.randn(B, D, H, W, generator=g).to(dtype).requires_grad_()) for _ in range(n)]


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("dtype, nan_invalid", [(torch.float32, False), (torch.float16, False), (torch.float16, True)])
def test_method_end_to_end(name, dtype, nan_invalid):
    tb, dims, teacher_leaves = _setup(dtype, nan_invalid)
    method = build_method(name, OPTIONS[name], dims)
    students = _students(method.num_students, dtype)
    out = method(students if method.num_students > 1 else students[0], tb)
    loss = out["loss"]
    assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss)
    assert loss.requires_grad
    for key, value in out.items():
        assert value.dim() == 0 and torch.isfinite(value), key
        assert key == "loss" or not value.requires_grad, key
    loss.backward()
    assert all(t.grad is None for t in teacher_leaves), "a gradient reached a cached teacher tensor"
    assert students[0].logits.grad is not None or name == "kpu"
    for s in students:
        for x in (s.logits, s.features, s.featmap):
            assert x.grad is None or torch.isfinite(x.grad).all()
    for p in method.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
