"""KPU without spatial maps (the global λ1 terms only) and its unification diagnostic ``std_ratio``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kt_train.methods import METHODS, build_method
from kt_train.methods.base import RunFacts

from . import reference as ref
from .helpers import batch, dims, student


def member_head(m, tid: str, stream: str):
    """Teacher ``tid``'s global ``stream`` head out of KPU's grouped ones: input ``[b, d]`` -> output ``[b, d']``."""
    (d, ids), = [(d, ids) for d, ids in m.groups["global_heads"].items() if tid in ids]
    head, i = m.global_heads[f"d{d}"][stream], ids.index(tid)
    return lambda a: head(a.expand(len(ids), *a.shape))[i]


@pytest.mark.parametrize("seed", [0, 1])
def test_global_only_loss_is_the_cosine_terms_over_valid_rows(seed):
    """Teachers with features and no featmap, a student with no featmap: each term is the mean over valid
    (sample, teacher) pairs of λ1 (1 − cos), computed here one pair at a time with the module's own heads."""
    gen = torch.Generator().manual_seed(seed)
    B, D = 4, 3
    feats = {"a": torch.randn(B, 5, generator=gen), "b": torch.randn(B, 5, generator=gen),
             "c": torch.randn(B, 2, generator=gen)}
    feats["b"][1] = float("nan")                                     # an invalid row may hold anything
    valid = {"b": torch.tensor([True, False, True, True]), "c": torch.tensor([False, True, True, False])}
    tb = batch(list(feats), features=feats, valid=valid)
    m = build_method("kpu", {}, dims(D, 3, tb))
    assert not m.groups["map_heads"]
    x = torch.randn(B, D, generator=gen)
    out = m(student(torch.zeros(B, 3), x, None), tb)                 # featmap=None: not needed here
    terms: dict[str, list[float]] = {"s2t": [], "t2s": [], "rec": []}
    with torch.no_grad():
        for tid, xt in feats.items():
            s2t, t2s, rec = (member_head(m, tid, k) for k in ("s2t", "t2s", "rec"))
            for b in [i for i in range(B) if tb.valid[tid][i]]:
                xu = t2s(xt[b:b + 1])
                terms["s2t"].append(ref.cos_dist(s2t(x[b:b + 1])[0].tolist(), xt[b].tolist()))
                terms["t2s"].append(ref.cos_dist(x[b].tolist(), xu[0].tolist()))
                terms["rec"].append(ref.cos_dist(xt[b].tolist(), rec(xu)[0].tolist()))
    for name, vals in terms.items():
        assert len(vals) == 4 + 3 + 2 and out[f"{name}_loss"].item() == pytest.approx(ref.mean(vals), abs=1e-5)
    assert out["loss"].item() == pytest.approx(sum(ref.mean(v) for v in terms.values()), abs=1e-5)
    out["loss"].backward()                                           # trains heads (and x's producer)
    assert all(p.grad is not None for p in m.global_heads.parameters())


class Half(nn.Module):
    def forward(self, x):
        return 0.5 * x


def test_std_ratio_on_a_hand_made_batch():
    """σ(x) = sqrt(0.5) over [[1, 0], [-1, 0]]; teacher a: values ±1, ±3 (σ = √5); teacher b: its one valid
    row [2, 2] (σ = 0); teacher c has no valid row and is left out. t2s halves: σ(h_t2s(x^a)) = √5 / 2."""
    feats = {"a": torch.tensor([[1.0, -1.0], [3.0, -3.0]]), "b": torch.tensor([[2.0, 2.0], [float("nan")] * 2]),
             "c": torch.tensor([[5.0, 0.0, 1.0], [0.0, 7.0, 1.0]])}
    valid = {"b": torch.tensor([True, False]), "c": torch.tensor([False, False])}
    tb = batch(list(feats), features=feats, valid=valid)
    m = build_method("kpu", {}, dims(2, 3, tb))
    m.global_heads["d2"]["t2s"] = Half()                             # the group of a and b (d_t = 2)
    out = m(student(torch.zeros(2, 3), torch.tensor([[1.0, 0.0], [-1.0, 0.0]])), tb)
    sigma_x = math.sqrt(0.5)
    assert out["raw_std_ratio"].item() == pytest.approx((math.sqrt(5) + 0.0) / 2 / sigma_x, abs=1e-6)   # 1.581139
    assert out["std_ratio"].item() == pytest.approx((math.sqrt(5) / 2 + 0.0) / 2 / sigma_x, abs=1e-6)   # 0.790569
    assert not out["std_ratio"].requires_grad and not out["raw_std_ratio"].requires_grad


def test_no_std_ratio_without_global_teachers_or_t2s():
    maps = {"m": torch.randn(2, 2, 2, 3)}
    tb = batch(["m"], featmaps=maps)
    out = build_method("kpu", {}, dims(4, 3, tb))(student(torch.zeros(2, 3), torch.randn(2, 4),
                                                          torch.randn(2, 4, 2, 2)), tb)
    assert "std_ratio" not in out and "raw_std_ratio" not in out
    tb = batch(["a"], features={"a": torch.randn(2, 5)})
    s2t_only = build_method("kpu", {"t2s": False, "rec": False}, dims(4, 3, tb))
    out = s2t_only(student(torch.zeros(2, 3), torch.randn(2, 4)), tb)
    assert "std_ratio" not in out and set(out) == {"s2t_loss", "loss"}


def test_run_notes_say_when_only_the_global_terms_train():
    cls = METHODS["kpu"]
    options = cls.Options()
    without = cls.run_notes(options, RunFacts({"a": frozenset({"features", "logits"})}))
    assert len(without) == 1 and "no selected teacher has a stored featmap" in without[0] and "\n" not in without[0]
    assert cls.run_notes(options, RunFacts({"a": frozenset({"features"}), "b": frozenset({"featmap"})})) == []
