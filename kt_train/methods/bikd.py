"""Bi-KD, cached formulation (Bi-KD-CM): live students and cached teachers compete per sample to teach.

Jain, Karthik, Gandhi, "Simplifying Knowledge Transfer in Pretrained Models", TMLR 2025, arXiv 2510.22208
(official code Syd-J/Bi-KD; docs/methods.md)::

    participants k = [student_0 .. student_{M-1}, cached teacher_0 .. teacher_{K-1}]
    g_{b,k}  = log σ(z_k)_{y_b}  in fp64 (cached: label_logit − lse when stored; invalid: −inf)
    k*_b     = argmax_k g_{b,k};  ok_b = unique maximum        ("official2": 2 participants, ties → 2nd)
    L = w_ce Σ_{live j} CE(z_j, y) + w_kd · τ² · (1/B) Σ_b ok_b Σ_{live j ≠ k*_b} KL(p_{k*_b} ‖ p_j)
    p_k = σ(z_k/τ), the teaching distribution stop-gradiented unless ``teacher_grad`` (official code)

Shapes: stacked participant logits ``[B, K, C]``, roles ``g [B, K]``, ``y [B]`` (rows with ``y < 0`` are left
out). Cached teachers never learn; a live student learns from whoever teaches, including another live
student. M=1 is Bi-KD-C1. ``label_source="vote"`` is the label-free variant: ``y`` is the cached teachers'
voted pseudo-label (UNIFORM's vote and tie rule), used for the roles and for CE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from kt_train.methods.base import Method, MethodDims, StudentOutput, TeacherBatch
from kt_train.methods.ce import ce_rows
from kt_train.methods.common import (
    class_logprob,
    full_cover_ids,
    log_probs,
    masked_mean,
    stacked_label_logprob,
    stacked_teacher_logits,
)
from kt_train.methods.options import MethodOptions
from kt_train.methods.voting import mean_prob_target, pseudo_class, vote_counts


@dataclass(frozen=True)
class BiKDOptions(MethodOptions):
    num_students: int = 1                                  # M live students (sequence of StudentOutput)
    tie_rule: Literal["unique", "official2"] = "unique"    # B2: exact ties → no KD; official2: ≤ → 2nd teaches
    teacher_grad: bool = False                             # B1: True lets KD gradients reach a live teacher
    tau: float = 1.0                                       # KL temperature (roles always at T=1)
    kd_weight: float = 1.0                                 # B5
    ce_weight: float = 1.0
    label_source: Literal["labels", "vote"] = "labels"     # "vote": label-free, teachers' pseudo-label

    def validate(self, method: str = "") -> None:
        self._require(self.num_students >= 1, method, f"num_students must be >= 1, got {self.num_students}")
        self._require(self.tau > 0, method, f"tau must be > 0, got {self.tau}")


def bikd_roles(g: Tensor, tie_rule: str = "unique") -> tuple[Tensor, Tensor]:
    """Teacher index ``k* [B]`` and ``ok [B]`` (a teacher exists) from fp64 confidences ``g [B, K]``."""
    if tie_rule == "official2":
        if g.shape[1] != 2:
            raise ValueError(f"tie_rule='official2' needs exactly 2 participants, got {g.shape[1]}")
        return (g[:, 0] <= g[:, 1]).long(), torch.ones_like(g[:, 0], dtype=torch.bool)
    top = g.max(1, keepdim=True).values
    return g.argmax(1), (g == top).sum(1) == 1


def bikd_kd_rows(logp: Tensor, kstar: Tensor, ok: Tensor, learners: Tensor, teacher_grad: bool = False) -> Tensor:
    """``Σ_{j learner, j ≠ k*} KL(p_{k*} ‖ p_j)`` per row ``[B]`` (0 where ``ok`` is False).

    Args:
        logp: ``[B, K, C]`` fp32 log-probabilities of all participants.
        kstar, ok: from ``bikd_roles``.
        learners: ``[K]`` bool, True for live (trainable) participants.
        teacher_grad: keep the graph through the teaching distribution (official code) instead of ``sg``.
    """
    lp_t = logp.gather(1, kstar[:, None, None].expand(-1, 1, logp.shape[2]))           # [B, 1, C]
    if not teacher_grad:
        lp_t = lp_t.detach()
    p_t = lp_t.exp()
    lp_t = torch.where(p_t > 0, lp_t, torch.zeros_like(lp_t))
    kl = (p_t * (lp_t - logp)).sum(-1)                                                   # [B, K]
    k = torch.arange(logp.shape[1], device=logp.device)
    mask = learners[None] & (k[None] != kstar[:, None]) & ok[:, None]
    return torch.where(mask, kl, torch.zeros_like(kl)).sum(1)


class BiKD(Method):
    """Bi-KD with M live students and the batch's full-coverage predictive cached teachers."""

    name = "bikd"
    Options = BiKDOptions
    needs = frozenset({"logits", "labels", "label_logit", "lse"})
    summary = "Bi-KD: per-sample teacher role by confidence, teachers and several live students"
    requires = frozenset({"predictive_logits", "all_classes"})
    live_students = True
    alternatives = {"labels": "--opt label_source=vote for label-free Bi-KD"}

    @classmethod
    def labels_required(cls, options: MethodOptions) -> bool:
        return getattr(options, "label_source", "labels") == "labels"

    def __init__(self, options: BiKDOptions, dims: MethodDims) -> None:
        super().__init__(options, dims)
        self.num_students = options.num_students
        self._full_cover: dict[str, bool] = {}

    def forward(self, student: StudentOutput | Sequence[StudentOutput], teachers: TeacherBatch) -> dict[str, Tensor]:
        o = self.options
        students = [student] if isinstance(student, StudentOutput) else list(student)
        if len(students) != o.num_students:
            raise ValueError(f"method {self.name!r}: num_students={o.num_students} but got {len(students)} outputs")
        tids = full_cover_ids(teachers, self._full_cover)
        zt = stacked_teacher_logits(teachers, tids) if tids else None                    # [T, B, C]
        y, usable = self._labels(teachers, tids, zt)
        yc = y.clamp_min(0)
        with torch.no_grad():
            g = torch.stack([class_logprob(s.logits, yc) for s in students], 1)          # [B, M]
            if zt is not None:
                g_t = stacked_label_logprob(teachers, tids, yc, o.label_source == "labels", zt)
                g = torch.cat([g, g_t.T], 1)                                             # [B, M + T]
            kstar, ok = bikd_roles(g, o.tie_rule)
        logp = torch.stack([log_probs(s.logits, o.tau) for s in students], 1)
        if zt is not None:
            logp = torch.cat([logp, log_probs(zt, o.tau).transpose(0, 1)], 1)            # [B, M + T, C]
        learners = torch.arange(logp.shape[1], device=yc.device) < len(students)
        kd = o.tau**2 * masked_mean(bikd_kd_rows(logp, kstar, ok & usable, learners, o.teacher_grad), usable)
        ce = sum(masked_mean(ce_rows(s.logits, y), usable) for s in students)
        out = {"loss": o.ce_weight * ce + o.kd_weight * kd, "ce_loss": ce.detach(), "kd_loss": kd.detach()}
        out.update(self._shares(kstar, ok & usable, usable, len(students), tids))
        return out  # type: ignore[return-value]

    def _labels(self, tb: TeacherBatch, tids: list[str], zt: Tensor | None) -> tuple[Tensor, Tensor]:
        """``y [B]`` (true labels, or the teachers' voted pseudo-label from their logits ``zt [T, B, C]``) and
        ``usable [B]``."""
        if self.options.label_source == "labels":
            if tb.labels is None:
                raise ValueError(f"method {self.name!r} needs labels; the batch has none. "
                                 "Fix: set label_source: vote for label-free Bi-KD.")
            return tb.labels, tb.labels >= 0
        if zt is None:
            raise ValueError(f"method {self.name!r}: label_source='vote' needs cached predictive teachers")
        q = log_probs(zt).exp().transpose(0, 1)                                          # [B, T, C]
        valid = tb.stacked("valid", tids).T
        y = pseudo_class(vote_counts(q, valid), mean_prob_target(q, valid))
        usable = valid.any(1)
        return torch.where(usable, y, torch.full_like(y, -1)), usable

    @staticmethod
    def _shares(kstar: Tensor, ok: Tensor, usable: Tensor, m: int, tids: list[str]) -> dict[str, Tensor]:
        """Detached teaching share per participant and the no-teacher (tie) fraction."""
        names = [f"student{i}" for i in range(m)] + list(tids)
        teaches = (kstar[:, None] == torch.arange(len(names), device=kstar.device)) & (ok & usable)[:, None]
        shares = teaches.float().sum(0) / usable.float().sum().clamp_min(1.0)        # one op for all participants
        out = dict(zip((f"teach_share/{n}" for n in names), shares.unbind()))
        out["no_teacher_frac"] = masked_mean((~ok).float(), usable)
        return out
