"""Vectorised losses == the plain-loop references of reference.py, on random shapes (a few seeds)."""

from __future__ import annotations

import pytest
import torch

from kt_train.methods import build_method
from kt_train.methods.common import standardize_logits
from kt_train.methods.kpu import align_rows, resize_map
from kt_train.methods.uniform import reconstruction_rows
from kt_train.methods.voting import plain_mean, sign_vote

from . import reference as ref
from .helpers import batch, dims, student

SEEDS = [0, 1, 2]


def _close(got: torch.Tensor, expected: list, atol: float = 1e-9) -> None:
    torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype), atol=atol, rtol=0)


def _logit_lists(z: torch.Tensor) -> list:
    """[B, C] tensor with -inf -> nested lists with None for uncovered classes."""
    return [[None if v == float("-inf") else v for v in row] for row in z.tolist()]


def _coverage(gen: torch.Generator, P: int, C: int, case: str) -> list[torch.Tensor]:
    if case == "A":
        return [torch.ones(C, dtype=torch.bool) for _ in range(P)]
    groups = torch.randint(0, 2, (C,), generator=gen)
    groups[0], groups[-1] = 0, 1                                    # two non-empty disjoint groups
    return [groups == (i % 2) for i in range(P)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rule", ["literal", "sum"])
def test_sign_vote_matches_loop(seed, rule):
    gen = torch.Generator().manual_seed(seed)
    B, N, D = 5, 2 + seed, 7
    u = torch.randint(-2, 3, (B, N, D), generator=gen).double()    # integers: many sign ties and zeros
    valid = torch.rand(B, N, generator=gen) > 0.3
    x_hat, _, _ = sign_vote(u, valid, rule)
    _close(x_hat, ref.sign_vote(u.tolist(), valid.tolist(), rule))
    _close(plain_mean(u, valid), ref.plain_mean(u.tolist(), valid.tolist()))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", ["A", "B"])
@pytest.mark.parametrize("tie", ["p_hat", "index"])
@pytest.mark.parametrize("norm", ["count", "coverage", "soft_coverage"])
def test_uniform_logit_loss_matches_loop(seed, case, tie, norm):
    gen = torch.Generator().manual_seed(seed)
    B, P, C, tau = 6, 2 + seed, 5, 1.0 + 0.5 * seed
    cov = _coverage(gen, P, C, case)
    z = [torch.randn(B, C, generator=gen).masked_fill(~c, float("-inf")) for c in cov]
    valid = torch.rand(B, P, generator=gen) > 0.25
    ids = [f"t{i}" for i in range(P)]
    tb = batch(ids, logits=dict(zip(ids, z)), valid={i: valid[:, k] for k, i in enumerate(ids)})
    opts = {"alpha1": 1.0, "alpha2": 0.3, "tau": tau, "pseudo_tie": tie, "zscore": False, "vote_norm": norm}
    zs = torch.randn(B, C, generator=gen)
    got = build_method("uniform", opts, dims(4, C, tb))(student(zs), tb)["logit_loss"].item()
    rows = []
    for b in range(B):
        if valid[b].any():
            zb = [_logit_lists(zi[b:b + 1])[0] for zi in z]
            rows.append(ref.uniform_logit(zs[b].tolist(), zb, valid[b].tolist(), 1.0, 0.3, tau, case == "B", tie, norm)[0])
    assert got == pytest.approx(ref.mean(rows), abs=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_uniform_module_identity_heads_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    B, N, D = 4, 3, 6
    feats = torch.randn(B, N, D, generator=gen)
    valid = torch.rand(B, N, generator=gen) > 0.3
    ids = [f"t.{i}" for i in range(N)]
    tb = batch(ids, features={i: feats[:, k] for k, i in enumerate(ids)},
               valid={i: valid[:, k] for k, i in enumerate(ids)}, roles={"t.2": "descriptive"})
    x = torch.randn(B, D, generator=gen)
    out = build_method("uniform", {"head": "identity", "zscore": False}, dims(D, 3, tb))(
        student(torch.zeros(B, 3), x), tb)
    x_hat = ref.sign_vote(feats.tolist(), valid.tolist())
    per = [ref.mean([(a - c) ** 2 for a, c in zip(x[b].tolist(), x_hat[b])]) for b in range(B) if valid[b].any()]
    assert out["feature_loss"].item() == pytest.approx(ref.mean(per), abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_reconstruction_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    B, dims_t = 5, [3, 4, 2]
    rs = [torch.randn(B, d, generator=gen) for d in dims_t]
    xs = [torch.randn(B, d, generator=gen) for d in dims_t]
    valid = torch.rand(B, len(dims_t), generator=gen) > 0.3
    rows = reconstruction_rows(rs, xs, valid)
    has = valid.any(1)
    got = (rows * has).sum() / has.sum().clamp_min(1)
    expected = ref.rec_loss([[r[b].tolist() for r in rs] for b in range(B)],
                            [[x[b].tolist() for x in xs] for b in range(B)], valid.tolist())
    assert got.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", ["A", "B"])
def test_kd_matches_loop(seed, case):
    gen = torch.Generator().manual_seed(seed)
    B, T, C, tau = 5, 1 + seed, 6, [1.0, 2.0, 4.0][seed]
    cov = _coverage(gen, T, C, case)
    z = [torch.randn(B, C, generator=gen).masked_fill(~c, float("-inf")) for c in cov]
    valid = torch.rand(B, T, generator=gen) > 0.3
    ids = [f"t{i}" for i in range(T)]
    tb = batch(ids, logits=dict(zip(ids, z)), valid={i: valid[:, k] for k, i in enumerate(ids)})
    zs = torch.randn(B, C, generator=gen)
    got = build_method("kd", {"tau": tau}, dims(4, C, tb))(student(zs), tb)["loss"].item()
    zt = [[_logit_lists(zi[b:b + 1])[0] for zi in z] for b in range(B)]
    assert got == pytest.approx(ref.kd(zs.tolist(), zt, valid.tolist(), tau), abs=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_standardize_matches_loop(seed):
    z = torch.randn(4, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _close(standardize_logits(z), [ref.zscore(r) for r in z.tolist()])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tie_rule", ["unique", "official2"])
def test_bikd_matches_loop(seed, tie_rule):
    gen = torch.Generator().manual_seed(seed)
    B, C = 8, 4
    M, K = (1, 1) if tie_rule == "official2" else (1 + seed % 2, 2)
    protos = torch.randn(3, B, C, generator=gen)                     # shared rows -> exact ties happen
    pick = torch.randint(0, 3, (M + K, B), generator=gen)
    logits = [protos[pick[k], torch.arange(B)] for k in range(M + K)]
    y = torch.randint(0, C, (B,), generator=gen)
    valid = torch.rand(B, K, generator=gen) > 0.2
    ids = [f"c{i}" for i in range(K)]
    tb = batch(ids, logits=dict(zip(ids, logits[M:])), labels=y, valid={i: valid[:, k] for k, i in enumerate(ids)})
    m = build_method("bikd", {"num_students": M, "tie_rule": tie_rule}, dims(4, C, tb))
    out = m([student(z.clone().requires_grad_()) for z in logits[:M]], tb)
    full_valid = [[True] * M + valid[b].tolist() for b in range(B)]
    ce, kd = ref.bikd([z.tolist() for z in logits], y.tolist(), [k < M for k in range(M + K)], full_valid, tie_rule)
    assert out["ce_loss"].item() == pytest.approx(ce, abs=1e-5)
    assert out["kd_loss"].item() == pytest.approx(kd, abs=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mask", ["supervised", "unsupervised"])
def test_fg_matches_loop(seed, mask):
    gen = torch.Generator().manual_seed(seed)
    B, C, K, tau = 6, 5, 1 + seed, [1.0, 2.0, 1.5][seed]
    ref_z, zs = torch.randn(B, C, generator=gen), torch.randn(B, C, generator=gen)
    zt = [2 * torch.randn(B, C, generator=gen) for _ in range(K)]
    y = torch.randint(-1, C, (B,), generator=gen)                    # some unknown labels
    ids = [f"t{i}" for i in range(K)]
    tb = batch(ids, logits=dict(zip(ids, zt)), labels=y, reference_logits=ref_z)
    got = build_method("fg", {"mask": mask, "tau": tau}, dims(4, C, tb))(student(zs), tb)["loss"].item()
    labels = y.tolist() if mask == "supervised" else None
    assert got == pytest.approx(ref.fg(zs.tolist(), ref_z.tolist(), [z.tolist() for z in zt], labels, tau), abs=1e-5)


def _positions(v: torch.Tensor) -> list:
    return v.reshape(-1, v.shape[-1]).tolist()


@pytest.mark.parametrize("seed", SEEDS)
def test_align_rows_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    B, h, w, d = 3, 2 + seed, 3, 4
    x1, x2 = torch.randn(B, d, generator=gen), torch.randn(B, d, generator=gen)
    v1, v2 = torch.randn(B, h, w, d, generator=gen), 2 * torch.randn(B, h, w, d, generator=gen)
    got = align_rows(x1, v1, x2, v2)
    for b in range(B):
        expected = ref.align(x1[b].tolist(), _positions(v1[b]), x2[b].tolist(), _positions(v2[b]))
        assert got[b].item() == pytest.approx(expected, abs=1e-5)


def member_heads(m, name: str, tid: str) -> dict:
    """Teacher ``tid``'s heads out of KPU's grouped ones: stream -> (input [b, ...] -> its output [b, ...])."""
    (d, ids), = [(d, ids) for d, ids in m.groups[name].items() if tid in ids]
    heads, i = getattr(m, name)[f"d{d}"], ids.index(tid)
    return {k: (lambda a, h=h: h(a.expand(len(ids), *a.shape))[i]) for k, h in heads.items()}


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_kpu_module_matches_loop(seed):
    """Per-(sample, teacher) loop over the module's own heads: checks resizing, masking and averaging."""
    gen = torch.Generator().manual_seed(seed)
    B, D, H, W = 3, 4, 4, 4
    maps = {"g.lob": torch.randn(B, 2, 2, 3, generator=gen), "map": torch.randn(B, 3, 5, 6, generator=gen)}
    tb = batch(["g.lob", "map"], features={"g.lob": torch.randn(B, 5, generator=gen)}, featmaps=maps,
               valid={"map": torch.tensor([True, False, True])})
    m = build_method("kpu", {}, dims(D, 3, tb))
    x, V = torch.randn(B, D, generator=gen), torch.randn(B, D, H, W, generator=gen)
    out = m(student(torch.zeros(B, 3), x, V), tb)
    terms: dict[str, list[float]] = {"s2t": [], "t2s": [], "rec": []}
    with torch.no_grad():
        for tid in tb.ids:
            gh, mh = member_heads(m, "global_heads", tid) if tid in tb.features else None, member_heads(m, "map_heads", tid)
            vt = tb.featmaps[tid]
            for b in [i for i in range(B) if tb.valid[tid][i]]:
                vs = V[b:b + 1].permute(0, 2, 3, 1)
                xt = tb.features[tid][b].tolist() if gh is not None else None
                pj = (lambda n, a: gh[n](a)[0].tolist()) if gh is not None else (lambda n, a: None)  # noqa: E731
                vtb = vt[b:b + 1]
                s2t_v = mh["s2t"](resize_map(vs, vtb.shape[1:3]))
                terms["s2t"].append(ref.align(pj("s2t", x[b:b + 1]), _positions(s2t_v), xt, _positions(vtb)))
                vu = mh["t2s"](resize_map(vtb, (H, W)))
                xu = gh["t2s"](tb.features[tid][b:b + 1]) if gh is not None else None
                terms["t2s"].append(ref.align(x[b].tolist() if gh is not None else None, _positions(vs),
                                              None if xu is None else xu[0].tolist(), _positions(vu)))
                vr = mh["rec"](resize_map(vu, vtb.shape[1:3]))
                terms["rec"].append(ref.align(xt, _positions(vtb), None if xu is None else pj("rec", xu),
                                              _positions(vr)))
    for name, vals in terms.items():
        assert out[f"{name}_loss"].item() == pytest.approx(ref.mean(vals), abs=1e-5)
    assert out["loss"].item() == pytest.approx(sum(ref.mean(v) for v in terms.values()), abs=1e-5)
