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
s2t/t2s/rec (K6). Shapes: student ``x [B, D]``, ``V [B, D, H, W]``; teacher ``x^t [B, d_t]``,
``V^t [B, h_t, w_t, d'_t]`` (channels last, as cached). The sentinel/adapter half of KPU needs the
sentinel's weights as the student trunk and lives in the student, not here (docs/methods.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kt_train.methods.base import Method, MethodDims, StudentOutput, TeacherBatch
from kt_train.methods.common import masked_mean, mlp, safe_key, zero_invalid
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
    """Bilinear resize of a channels-last map ``[B, h, w, d]`` to ``[B, H, W, d]`` (no-op when equal)."""
    if tuple(v.shape[1:3]) == tuple(size):
        return v
    out = F.interpolate(v.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1)


def align_rows(x1: Tensor | None, v1: Tensor | None, x2: Tensor | None, v2: Tensor | None,
               lambdas: tuple[float, float, float] = (1.0, 0.9, 0.1), beta: float = 1.0) -> Tensor:
    """Per-row ``L_align`` ``[B]`` (Eq. 1). ``x* [B, d]`` or None (term dropped); ``v* [B, h, w, d]`` or None."""
    terms = []
    if x1 is not None and x2 is not None:
        terms.append(lambdas[0] * (1.0 - F.cosine_similarity(x1, x2, dim=-1, eps=1e-8)))
    if v1 is not None and v2 is not None:
        cos = 1.0 - F.cosine_similarity(v1, v2, dim=-1, eps=1e-8)                      # [B, h, w]
        sl1 = F.smooth_l1_loss(v1, v2, beta=beta, reduction="none")
        terms.append(lambdas[1] * cos.flatten(1).mean(1) + lambdas[2] * sl1.flatten(1).mean(1))
    if not terms:
        raise ValueError("align_rows needs a global pair (x1, x2) or a spatial pair (v1, v2)")
    return torch.stack(terms, 0).sum(0)


def _head_set(d_s: int, d_t: int, hidden: int | None, norm: bool) -> nn.ModuleDict:
    h = hidden or max(d_s, d_t)
    return nn.ModuleDict({"s2t": mlp(d_s, h, d_t, norm), "t2s": mlp(d_t, h, d_s, norm), "rec": mlp(d_s, h, d_t, norm)})


class KPU(Method):
    """KPU alignment terms against cached global and spatial teacher features."""

    name = "kpu"
    Options = KPUOptions
    needs = frozenset({"features", "featmaps"})
    summary = "KPU: unified latent space with reconstruction on global and spatial features (trains features)"
    requires = frozenset({"featmap"})

    def __init__(self, options: KPUOptions, dims: MethodDims) -> None:
        super().__init__(options, dims)
        D = dims.student_dim
        self.global_heads, self.map_heads = nn.ModuleDict(), nn.ModuleDict()
        self.teacher_ids = [t.id for t in dims.teachers if t.feature_dim or t.featmap_dim]
        options._require(bool(self.teacher_ids), self.name, "no teacher has a cached feature or spatial map "
                         "(TeacherInfo.feature_dim / featmap_dim). Fix: cache features or featmap for KPU teachers.")
        for t in dims.teachers:
            if t.feature_dim:
                self.global_heads[safe_key(t.id)] = _head_set(D, t.feature_dim, options.hidden, options.head_norm)
            if t.featmap_dim:
                self.map_heads[safe_key(t.id)] = _head_set(D, t.featmap_dim, options.hidden, options.head_norm)

    def forward(self, student: StudentOutput | Sequence[StudentOutput], teachers: TeacherBatch) -> dict[str, Tensor]:
        s, o = self.single_student(student), self.options
        x = None if s.features is None else s.features.float()
        v = None if s.featmap is None else s.featmap.float().permute(0, 2, 3, 1)        # [B, H, W, D]
        rows: dict[str, list[Tensor]] = {k: [] for k in _HEADS}
        valids = []
        for tid in self.teacher_ids:
            for name, r in self._teacher_rows(tid, x, v, teachers).items():
                rows[name].append(r)
            valids.append(teachers.valid[tid])
        valid = torch.stack(valids, 1)
        parts = {k: masked_mean(torch.stack(r, 1).flatten(), valid.flatten()) for k, r in rows.items() if r}
        total = sum(parts.get(k, torch.zeros((), device=valid.device)) * w
                    for k, w in (("s2t", 1.0), ("t2s", 1.0), ("rec", o.rec_weight)))
        out = {f"{k}_loss": p.detach() for k, p in parts.items()}
        out["loss"] = total  # type: ignore[assignment]
        return out

    def _teacher_rows(self, tid: str, x: Tensor | None, v: Tensor | None, tb: TeacherBatch) -> dict[str, Tensor]:
        """``{"s2t"|"t2s"|"rec": L_align rows [B]}`` for one teacher (only the enabled terms)."""
        o, key, valid = self.options, safe_key(tid), tb.require("valid", tid)
        gh = self.global_heads[key] if key in self.global_heads else None
        mh = self.map_heads[key] if key in self.map_heads else None
        xt = zero_invalid(tb.require("features", tid), valid) if gh is not None else None
        vt = zero_invalid(tb.require("featmaps", tid), valid) if mh is not None else None
        if (gh is not None and x is None) or (mh is not None and v is None):
            missing = "features [B, D]" if gh is not None and x is None else "featmap [B, D, H, W]"
            raise ValueError(f"method {self.name!r}: teacher {tid!r} needs StudentOutput.{missing}; it is None")
        grid = None if vt is None else (vt.shape[1], vt.shape[2])
        here = None if v is None else (v.shape[1], v.shape[2])
        lam, beta = o.lambdas, o.sl1_beta
        out: dict[str, Tensor] = {}
        if o.s2t:
            vs = _project(mh, "s2t", None if vt is None else resize_map(v, grid))  # type: ignore[arg-type]
            out["s2t"] = align_rows(_project(gh, "s2t", x), vs, xt, vt, lam, beta)
        if o.t2s or o.rec:
            xu = _project(gh, "t2s", xt)
            vu = _project(mh, "t2s", None if vt is None else resize_map(vt, here))  # type: ignore[arg-type]
            if o.t2s:
                out["t2s"] = align_rows(x, v, xu, vu, lam, beta)
            if o.rec:
                vr = _project(mh, "rec", None if vu is None else resize_map(vu, grid))  # type: ignore[arg-type]
                out["rec"] = align_rows(xt, vt, _project(gh, "rec", xu), vr, lam, beta)
        return out


def _project(heads: nn.ModuleDict | None, name: str, inp: Tensor | None) -> Tensor | None:
    """``heads[name](inp)``, or None when the teacher has no such stream."""
    return None if heads is None or inp is None else heads[name](inp)
