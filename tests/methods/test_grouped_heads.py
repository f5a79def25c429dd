"""Teachers as tensors: grouped heads and stacked batches against the per-teacher implementation.

``data/legacy_heads.{json,safetensors}`` were written by the per-teacher implementation (commit b58860e, one
``nn.Linear`` / ``common.mlp`` per teacher, batches as per-teacher dicts): for UNIFORM, AVG and KPU cases,
the heads drawn after ``torch.manual_seed(0)``, one batch, the loss parts, and the gradients of the student
outputs and of every head parameter. The grouped implementation must reproduce all of it: the same initial
heads for the seed, and, with those heads loaded through the old per-teacher keys, the same losses and
gradients, from per-teacher dicts and from stacked (``Stacked``) batches alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kt_train.methods import MethodDims, StudentOutput, TeacherBatch, TeacherInfo, build_method
from kt_train.methods.common import mlp
from kt_train.methods.heads import GroupedLayerNorm, GroupedLinear, GroupedMLP, upgrade_state
from kt_train.methods.stacks import StackLayout, Stacked

DATA = Path(__file__).parent / "data" / "legacy_heads"
META = json.loads(DATA.with_suffix(".json").read_text())
TENSORS = load_file(str(DATA.with_suffix(".safetensors")))
FIELDS = ("valid", "features", "featmaps", "logits", "covered")


def part(case: str, kind: str) -> dict[str, torch.Tensor]:
    prefix = f"{case}/{kind}/"
    return {k[len(prefix):]: v for k, v in TENSORS.items() if k.startswith(prefix)}


def dims_of(case: str) -> MethodDims:
    stats = {k: part(case, f"stats/{k}") for k in ("feature_mean", "feature_std")}
    infos = [TeacherInfo(i, r, f, m, bool(lg), stats["feature_mean"].get(i), stats["feature_std"].get(i))
             for i, r, f, m, lg in META[case]["teachers"]]
    return MethodDims(4, 6, tuple(infos))


def stacked(table: dict[str, torch.Tensor], ids: list[str]) -> Stacked:
    """``table`` as a reader builds it: one tensor per group of equal shape and dtype, ids in teacher order."""
    groups: dict[tuple, list[str]] = {}
    for tid in ids:
        if tid in table:
            groups.setdefault((tuple(table[tid].shape), table[tid].dtype), []).append(tid)
    layout = StackLayout(list(groups.values()))
    return Stacked(layout, [torch.stack([table[t] for t in g]) for g in layout.groups])


def batch_of(case: str, stack: bool) -> TeacherBatch:
    ids = [t[0] for t in META[case]["teachers"]]
    fields = {f: {k.split("/", 1)[1]: v for k, v in part(case, "batch").items() if k.startswith(f + "/")}
              for f in FIELDS}
    if stack:
        fields = {f: stacked(table, ids) for f, table in fields.items()}
    return TeacherBatch(ids=tuple(ids), roles={t[0]: t[1] for t in META[case]["teachers"]}, **fields)


def options_of(case: str) -> dict:
    """The case's options; UNIFORM's pinned numbers were made with the paper's vote counts (before vote_norm)."""
    options = dict(META[case]["options"])
    if META[case]["method"] == "uniform":
        options.setdefault("vote_norm", "count")
    return options


def run(case: str, method: torch.nn.Module, stack: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    s = {k: v.clone().requires_grad_() for k, v in part(case, "student").items()}
    out = method(StudentOutput(s["zs"], s["x"], s["V"] if META[case]["method"] == "kpu" else None),
                 batch_of(case, stack))
    out["loss"].backward()
    return out, {k: v.grad for k, v in s.items() if v.grad is not None}


@pytest.mark.parametrize("case", sorted(META))
def test_same_seed_draws_the_same_heads_as_the_per_teacher_modules(case):
    torch.manual_seed(0)
    method = build_method(META[case]["method"], options_of(case), dims_of(case))
    want = upgrade_state(part(case, "state"), method.legacy_params())
    got = method.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got), [k for k in got if not torch.equal(got[k], want[k])]
    assert [p.old for p in method.legacy_params() if not p.buffer] == META[case]["param_order"]


@pytest.mark.parametrize("stack", [False, True], ids=["dicts", "stacked"])
@pytest.mark.parametrize("case", sorted(META))
def test_grouped_method_reproduces_per_teacher_losses_and_gradients(case, stack):
    torch.manual_seed(123)                       # other heads: the old checkpoint's must be loaded over them
    method = build_method(META[case]["method"], options_of(case), dims_of(case))
    method.load_state_dict(part(case, "state"))  # per-teacher keys, as an old method.safetensors holds them
    out, grads = run(case, method, stack)
    for name, value in META[case]["parts"].items():
        assert out[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name
    for name, grad in part(case, "student_grad").items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6)
    old_grads = upgrade_state(part(case, "grad"), method.legacy_params())
    for name, p in method.named_parameters():
        torch.testing.assert_close(p.grad, old_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_grouped_mlp_equals_per_teacher_mlps_in_values_and_gradients():
    """Parameters copied across from T separate ``common.mlp`` (with LayerNorm): same outputs and gradients."""
    gen = torch.Generator().manual_seed(0)
    T, d_in, h, d_out = 3, 7, 6, 5
    mods = [mlp(d_in, h, d_out, norm=True) for _ in range(T)]
    grouped = GroupedMLP(T, d_in, h, d_out, norm=True)
    with torch.no_grad():
        for i, m in enumerate(mods):
            m[1].weight.normal_(generator=gen), m[1].bias.normal_(generator=gen)
            for src, dst in ((m[0], grouped.fc1), (m[3], grouped.fc2)):
                dst.weight[i], dst.bias[i] = src.weight.T, src.bias
            grouped.norm.weight[i], grouped.norm.bias[i] = m[1].weight, m[1].bias
    x = torch.randn(T, 4, 2, d_in, generator=gen)                            # [T, B, positions, d_in]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = torch.stack([m(xa[i]) for i, m in enumerate(mods)])
    yb = grouped(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-6, atol=1e-6)
    w = torch.randn(ya.shape, generator=gen)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-6, atol=1e-6)
    for i, m in enumerate(mods):
        torch.testing.assert_close(grouped.fc1.weight.grad[i], m[0].weight.grad.T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grouped.fc2.bias.grad[i], m[3].bias.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grouped.norm.weight.grad[i], m[1].weight.grad, rtol=1e-5, atol=1e-6)


def test_grouped_linear_initialises_members_like_nn_linear():
    torch.manual_seed(5)
    linears = [torch.nn.Linear(9, 4) for _ in range(3)]
    torch.manual_seed(5)
    grouped = GroupedLinear(3, 9, 4)
    for i, lin in enumerate(linears):
        assert torch.equal(grouped.weight[i], lin.weight.T) and torch.equal(grouped.bias[i], lin.bias)
    norm = GroupedLayerNorm(2, 3)
    assert norm.weight.eq(1).all() and norm.bias.eq(0).all()


def test_kpu_group_with_two_map_grids_equals_its_members_run_alone():
    """Teachers with equal map channels but different grids share a head group; each grid runs as a subset of
    the group's members. The loss is the (sample, teacher) mean of what each member gives on its own."""
    gen = torch.Generator().manual_seed(3)
    B, D = 4, 5
    maps = {"a": torch.randn(B, 2, 2, 3, generator=gen), "b": torch.randn(B, 3, 3, 3, generator=gen)}
    feats = {"a": torch.randn(B, 6, generator=gen), "b": torch.randn(B, 6, generator=gen)}
    dims = MethodDims(D, 3, tuple(TeacherInfo(t, feature_dim=6, featmap_dim=3) for t in maps))
    x, V = torch.randn(B, D, generator=gen), torch.randn(B, D, 4, 4, generator=gen)
    both = build_method("kpu", {}, dims)
    assert list(both.map_heads) == ["d3"] and both.map_heads["d3"]["s2t"].fc1.weight.shape[0] == 2
    tb = TeacherBatch(("a", "b"), {"a": "predictive", "b": "predictive"},
                      {t: torch.ones(B, dtype=torch.bool) for t in maps}, features=feats, featmaps=maps)
    out = both(StudentOutput(torch.zeros(B, 3), x, V), tb)
    alone = []
    for i, tid in enumerate(maps):
        one = build_method("kpu", {}, MethodDims(D, 3, (dims.teachers[i],)))
        with torch.no_grad():
            for name, p in one.named_parameters():
                p.copy_(dict(both.named_parameters())[name][i:i + 1])
        tb = TeacherBatch((tid,), {tid: "predictive"}, {tid: torch.ones(B, dtype=torch.bool)},
                          features={tid: feats[tid]}, featmaps={tid: maps[tid]})
        alone.append(one(StudentOutput(torch.zeros(B, 3), x, V), tb))
    for k in ("s2t_loss", "t2s_loss", "rec_loss", "loss"):
        assert out[k].item() == pytest.approx((alone[0][k].item() + alone[1][k].item()) / 2, rel=1e-5), k
