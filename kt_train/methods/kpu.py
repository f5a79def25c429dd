"""KPU: multi-teacher feature alignment with s2t, t2s and reconstruction terms (KPU-noPre when cached).

Huang, Chen, Lyu (Sony AI), "Knowledge Preservation and Unification" (docs/methods.md, Eqs. 1-4)::

    L_align({x1,V1},{x2,V2}) = λ1 (1 − cos(x1,x2)) + λ2 mean_pos (1 − cos(V1,V2)) + λ3 smoothL1_β(V1,V2)
                               λ = (1, 0.9, 0.1); the λ1 term is dropped when the teacher has no global x^t
    L_s2t = avg_t L_align(h^t_s2t(X), X^t)           student → teacher space (V resized to (H_t, W_t) first)
    L_t2s = avg_t L_align(X, h^t_t2s(X^t))           teacher → student space (V^t resized to (H, W) first)
    L_rec = avg_t L_align(X^t, h^t_rec(h^t_t2s(X^t)))  back to teacher space (resized to (H_t, W_t) first)
    L     = L_t2s + L_s2t + λ_rec L_rec

"avg_t" is the mean over valid (sample, teacher) pairs. Heads per teacher and stream are
``Linear → LN → GELU → Linear`` with hidden ``max(D, d_t)`` (K3), separate for global/spatial and for
s2t/t2s/rec (K6). A teacher needs ``x^t`` or ``V^t`` (``requires = features_or_featmap``, per teacher); with no
``V^t`` at all only the λ1 (global) terms train, the student's ``V`` is not read, and ``ktc train`` says so
(``run_notes``). Diagnostic (the unification effect, ``std_ratios``): ``std_ratio = mean_t σ(h_t2s(x^t)) / σ(x)``
and ``raw_std_ratio = mean_t σ(x^t) / σ(x)``, σ the population std over valid rows and dims. Shapes: student
``x [B, D]``, ``V [B, D, H, W]``; teacher ``x^t [B, d_t]``, ``V^t [B, h_t, w_t, d'_t]`` (channels last, as cached).
The sentinel/adapter half of KPU needs the sentinel's weights as the student trunk and lives in the student, not
here (docs/methods.md).

Teachers with the same ``d_t`` share one ``heads.GroupedMLP`` per stream (global heads grouped by feature dim,
spatial heads by map channels): a group's stacked ``x^t [T, B, d_t]`` / ``V^t [T, B, h_t, w_t, d'_t]`` go
through its heads in one batched op, and the student's ``x`` / ``V`` enter as ``expand(T, ...)`` views.
Each term's sum over valid (sample, teacher) pairs is the sum of the groups' sums, so ``avg_t`` is unchanged.
State-dict keys: ``global_heads.d<d_t>.s2t.fc1.weight [T, D, h]`` ...; checkpoints of per-teacher heads
(``global_heads.<id>.s2t.0.weight``) load through ``legacy_params``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kt_train.methods.base import Method, MethodDims, RunFacts, StudentOutput, TeacherBatch
from kt_train.methods.common import safe_key, zero_invalid
from kt_train.methods.heads import GroupedMLP, LegacyParam, group_by, legacy_layout, run_head
from kt_train.methods.stacks import shape_subsets
from kt_train.methods.options import MethodOptions

_HEADS = ("s2t", "t2s", "rec")


@dataclass(frozen=True)
class KPUOptions(MethodOptions):
    lambdas: tuple[float, float, float] = (1.0, 0.9, 0.1)   # (global cos, spatial cos, spatial smooth-L1)
    rec_weight: float = 1.0                                 # λ of L_rec
    s2t: bool = True
    t2s: bool = True
    rec: bool = True                                        # keep with t2s (docs/methods.md)
    hidden: int | None = None                               # head width; None = max(D, d_t)
    head_norm: bool = True                                  # LayerNorm inside the heads (K3)
    sl1_beta: float = 1.0                                   # smooth-L1 β

    def validate(self, method: str = "") -> None:
        self._require(self.s2t or self.t2s or self.rec, method, "enable at least one of s2t, t2s, rec")
        self._require(self.sl1_beta > 0, method, f"sl1_beta must be > 0, got {self.sl1_beta}")


def resize_map(v: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of a channels-last map ``[..., h, w, d]`` (e.g. ``[B, h, w, d]`` or ``[T, B, h, w, d]``)
    to ``[..., H, W, d]`` (no-op when equal)."""
    if tuple(v.shape[-3:-1]) == tuple(size):
        return v
    flat = v.reshape(-1, *v.shape[-3:]).permute(0, 3, 1, 2)
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    return out.reshape(*v.shape[:-3], *out.shape[1:])


def align_rows(x1: Tensor | None, v1: Tensor | None, x2: Tensor | None, v2: Tensor | None,
               lambdas: tuple[float, float, float] = (1.0, 0.9, 0.1), beta: float = 1.0) -> Tensor:
    """Per-row ``L_align`` ``[B]`` (Eq. 1). ``x* [B, d]`` or None (term dropped); ``v* [B, h, w, d]`` or None.
    Stacked inputs (``[T, B, d]``, ``[T, B, h, w, d]``) give ``[T, B]``."""
    terms = []
    if x1 is not None and x2 is not None:
        terms.append(lambdas[0] * (1.0 - F.cosine_similarity(x1, x2, dim=-1, eps=1e-8)))
    if v1 is not None and v2 is not None:
        cos = 1.0 - F.cosine_similarity(v1, v2, dim=-1, eps=1e-8)                      # [..., h, w]
        sl1 = F.smooth_l1_loss(v1, v2, beta=beta, reduction="none")
        terms.append(lambdas[1] * cos.flatten(-2).mean(-1) + lambdas[2] * sl1.flatten(-3).mean(-1))
    if not terms:
        raise ValueError("align_rows needs a global pair (x1, x2) or a spatial pair (v1, v2)")
    return torch.stack(terms, 0).sum(0)


def masked_std(values: Tensor, valid: Tensor) -> Tensor:
    """Population std ``[T]`` of ``values [T, B, d]`` over each teacher's valid rows (``valid [T, B]``) and all
    ``d`` dims: ``σ_t = sqrt(Σ_{b valid, j} (v_tbj − μ_t)² / (n_t d))``; 0 for a teacher with no valid row."""
    w = valid[..., None].to(values.dtype)
    v = torch.where(valid[..., None], values, torch.zeros((), dtype=values.dtype, device=values.device))
    n = (w.sum((1, 2)) * values.shape[-1]).clamp_min(1.0)
    mean = v.sum((1, 2)) / n
    return (((v - mean[:, None, None]) ** 2 * w).sum((1, 2)) / n).sqrt()


def std_ratios(stats: Sequence[tuple[Tensor, Tensor, Tensor]], x: Tensor) -> dict[str, Tensor]:
    """The unification diagnostic, over the teachers ``t`` with a valid row in the batch (no grad)::

        std_ratio     = mean_t σ(h_t2s(x^t)) / σ(x)    teachers mapped into the student space, relative to x
        raw_std_ratio = mean_t σ(x^t) / σ(x)           the same before mapping (as cached)

    ``stats``: per global group ``(σ(x^t) [T], σ(h_t2s(x^t)) [T], has a valid row [T])`` (``masked_std``);
    ``σ(x)``: population std of the student's ``x [B, D]`` over all rows and dims. ``std_ratio`` → 1 as t2s
    brings every teacher to the student's scale, whatever ``raw_std_ratio`` (the spread before) was."""
    with torch.no_grad():
        raw, uni, has = (torch.cat(parts) for parts in zip(*stats))
        n = has.sum().clamp_min(1).to(raw.dtype)
        sigma = x.detach().float().std(correction=0).clamp_min(1e-12)
        return {"std_ratio": (uni * has).sum() / n / sigma, "raw_std_ratio": (raw * has).sum() / n / sigma}


def _head_set(members: int, d_s: int, d_t: int, hidden: int | None, norm: bool) -> nn.ModuleDict:
    h = hidden or max(d_s, d_t)
    return nn.ModuleDict({name: GroupedMLP(members, d_in, h, d_out, norm, reset=False)
                          for name, (d_in, d_out) in (("s2t", (d_s, d_t)), ("t2s", (d_t, d_s)), ("rec", (d_s, d_t)))})


class KPU(Method):
    """KPU alignment terms against cached global and spatial teacher features."""

    name = "kpu"
    Options = KPUOptions
    needs = frozenset({"features", "featmaps"})
    summary = "KPU: unified latent space with reconstruction on global and spatial features (trains features)"
    requires = frozenset({"features_or_featmap"})     # per teacher; without any featmap: the global terms only
    sentinel_student = True       # its preservation half is a student on a frozen sentinel trunk (--sentinel)
    note = ("kpu trains the student's features, not its classifier: the head's top-1 is not a measure of the method; "
            "the linear-probe top-1 (ktc eval --probe) is.")

    @classmethod
    def run_notes(cls, options: MethodOptions, facts: RunFacts) -> list[str]:
        """Say so when no teacher has a map: only the λ1 (pooled-feature) terms train, not the spatial ones."""
        if any("featmap" in outputs for outputs in facts.outputs.values()):
            return []
        return ["kpu: no selected teacher has a stored featmap; training the global (pooled-feature) terms only "
                "— store `featmap` outputs for the spatial terms."]

    def __init__(self, options: KPUOptions, dims: MethodDims) -> None:
        super().__init__(options, dims)
        D = dims.student_dim
        self.global_heads, self.map_heads = nn.ModuleDict(), nn.ModuleDict()
        self.teacher_ids = [t.id for t in dims.teachers if t.feature_dim or t.featmap_dim]
        options._require(bool(self.teacher_ids), self.name, "no teacher has a cached feature or spatial map "
                         "(TeacherInfo.feature_dim / featmap_dim). Fix: cache features or featmap for KPU teachers.")
        self.groups = {"global_heads": group_by((t.id, t.feature_dim) for t in dims.teachers if t.feature_dim),
                       "map_heads": group_by((t.id, t.featmap_dim) for t in dims.teachers if t.featmap_dim)}
        for name, groups in self.groups.items():
            for d, ids in groups.items():
                getattr(self, name)[f"d{d}"] = _head_set(len(ids), D, d, options.hidden, options.head_norm)
        for name, key, i, _ in self._members(by_teacher=True):    # the per-teacher heads' drawing order
            for head in getattr(self, name)[key].values():
                head.reset_member(i)

    def _members(self, by_teacher: bool = False) -> list[tuple[str, str, int, str]]:
        """``(heads dict, group key, index in group, teacher id)``; per dict then teacher order, or per teacher."""
        out = [(name, f"d{d}", i, tid) for name, groups in self.groups.items() for d, ids in groups.items()
               for i, tid in enumerate(ids)]
        order = {tid: n for n, tid in enumerate(t.id for t in self.dims.teachers)}
        return sorted(out, key=lambda m: (order[m[3]], m[0]) if by_teacher else (m[0], order[m[3]]))

    def legacy_params(self) -> list[LegacyParam]:
        """Per-teacher keys ``global_heads.<id>.s2t.0.weight`` ... in their parameter order."""
        return [p for name, key, i, tid in self._members() for stream, head in getattr(self, name)[key].items()
                for p in legacy_layout(head, f"{name}.{safe_key(tid)}.{stream}.", f"{name}.{key}.{stream}.", i)]

    def forward(self, student: StudentOutput | Sequence[StudentOutput], teachers: TeacherBatch) -> dict[str, Tensor]:
        s, o = self.single_student(student), self.options
        x = None if s.features is None else s.features.float()
        v = None if s.featmap is None else s.featmap.float().permute(0, 2, 3, 1)        # [B, H, W, D]
        sums: dict[str, list[Tensor]] = {k: [] for k, on in zip(_HEADS, (o.s2t, o.t2s, o.rec)) if on}
        stats: list[tuple[Tensor, Tensor, Tensor]] = []
        for name, groups in self.groups.items():
            for d, ids in groups.items():
                for k, total in self._group_sums(name, f"d{d}", ids, x, v, teachers, stats).items():
                    sums[k].append(total)
        count = teachers.stacked("valid", self.teacher_ids).sum().float().clamp_min(1.0)
        parts = {k: torch.stack(t).sum() / count for k, t in sums.items()}
        total = sum(parts.get(k, torch.zeros((), device=count.device)) * w
                    for k, w in (("s2t", 1.0), ("t2s", 1.0), ("rec", o.rec_weight)))
        out = {f"{k}_loss": p.detach() for k, p in parts.items()}
        if stats and x is not None:
            out.update(std_ratios(stats, x))
        out["loss"] = total  # type: ignore[assignment]
        return out

    def _group_sums(self, name: str, key: str, ids: tuple[str, ...], x: Tensor | None, v: Tensor | None,
                    tb: TeacherBatch, stats: list[tuple[Tensor, Tensor, Tensor]]) -> dict[str, Tensor]:
        """``{"s2t"|"t2s"|"rec": Σ over valid (sample, teacher) pairs of the group's term}`` (global or spatial).
        Global groups append ``(σ(x^t), σ(h_t2s(x^t)), has a valid row)``, each ``[T]``, to ``stats``."""
        spatial, heads = name == "map_heads", getattr(self, name)[key]
        if (v if spatial else x) is None:
            missing = "featmap [B, D, H, W]" if spatial else "features [B, D]"
            raise ValueError(f"method {self.name!r}: teacher {ids[0]!r} needs StudentOutput.{missing}; it is None")
        field = "featmaps" if spatial else "features"
        tb.stacked(field, ids[:1])                              # a missing field: the error names the teacher
        sums: dict[str, Tensor] = {}
        for sub, members in shape_subsets(getattr(tb, field), ids):   # one subset unless map grids differ
            valid = tb.stacked("valid", sub)                                               # [T, B]
            target = zero_invalid(tb.stacked(field, sub), valid)                           # [T, B, (h, w,) d_t]
            mapped: list[Tensor] = []
            rows = self._map_rows(heads, members, target, v) if spatial else \
                self._global_rows(heads, members, target, x, mapped)
            if mapped:
                with torch.no_grad():
                    stats.append((masked_std(target, valid), masked_std(mapped[0], valid), valid.any(1)))
            for k, r in rows.items():
                part = torch.where(valid, r, torch.zeros_like(r)).sum()
                sums[k] = part if k not in sums else sums[k] + part
        return sums

    def _global_rows(self, heads: nn.ModuleDict, members: Tensor | None, xt: Tensor, x: Tensor,
                     mapped: list[Tensor] | None = None) -> dict[str, Tensor]:
        """Global ``L_align`` rows ``[T, B]``: ``x^t [T, B, d_t]``, student ``x [B, D]`` (shared by the group).
        ``h_t2s(x^t) [T, B, D]`` is appended to ``mapped`` (detached) when given and computed (t2s or rec on)."""
        o, xs = self.options, x.expand(xt.shape[0], *x.shape)
        out: dict[str, Tensor] = {}
        if o.s2t:
            out["s2t"] = align_rows(run_head(heads["s2t"], xs, members), None, xt, None, o.lambdas, o.sl1_beta)
        if o.t2s or o.rec:
            xu = run_head(heads["t2s"], xt, members)
            if mapped is not None:
                mapped.append(xu.detach())
            if o.t2s:
                out["t2s"] = align_rows(xs, None, xu, None, o.lambdas, o.sl1_beta)
            if o.rec:
                out["rec"] = align_rows(xt, None, run_head(heads["rec"], xu, members), None, o.lambdas, o.sl1_beta)
        return out

    def _map_rows(self, heads: nn.ModuleDict, members: Tensor | None, vt: Tensor, v: Tensor) -> dict[str, Tensor]:
        """Spatial ``L_align`` rows ``[T, B]``: ``V^t [T, B, h_t, w_t, d'_t]`` (one grid), student
        ``V [B, H, W, D]``."""
        o, T = self.options, vt.shape[0]
        grid, here = (vt.shape[2], vt.shape[3]), (v.shape[1], v.shape[2])
        out: dict[str, Tensor] = {}
        if o.s2t:
            vs = run_head(heads["s2t"], resize_map(v, grid).expand(T, -1, -1, -1, -1), members)
            out["s2t"] = align_rows(None, vs, None, vt, o.lambdas, o.sl1_beta)
        if o.t2s or o.rec:
            vu = run_head(heads["t2s"], resize_map(vt, here), members)
            if o.t2s:
                out["t2s"] = align_rows(None, v.expand(T, -1, -1, -1, -1), None, vu, o.lambdas, o.sl1_beta)
            if o.rec:
                vr = run_head(heads["rec"], resize_map(vu, grid), members)
                out["rec"] = align_rows(None, vt, None, vr, o.lambdas, o.sl1_beta)
        return out
