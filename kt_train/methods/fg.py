"""Fantastic Gains KL+DP: distil only where a teacher beats the frozen initial student, else retain.

Roth, Thede, Koepke, Vinyals, Hénaff, Akata, "Fantastic Gains and Where to Find Them: On the Existence and
Prospect of General Knowledge Transfer between Any Pretrained Model", ICLR 2024 (official code
ExplainableML/FantasticGains; docs/methods.md)::

    participants k = [f_st (frozen initial student), teacher_1 .. teacher_K]
    g_{b,k} = log σ(z_k)_{y_b}   (supervised)  or  max_c log σ(z_k)_c  (unsupervised, "most-conf_u"), fp64
    k*_b    = argmax_k g_{b,k}, first index on ties (f_st wins ties: strict > for a teacher)
    z_tgt   = z_{k*_b}  (whole logit vectors, no grad)
    L = α τ² mean_b KL(σ(z_tgt/τ) ‖ σ(z_s/τ)) + (1 − α) CE(z_s, y)          KL+DP: α = 1, τ = 1

With K > 1 this is the parallel multi-teacher rule (``main_multidist.py``). The frozen initial student's
logits arrive as ``TeacherBatch.reference_logits [B, C]``: cached like any frozen network, or computed by the
trainer from a frozen copy of the initial student under ``no_grad``. Rows whose label is unknown (``y < 0``)
use the unsupervised rule. Shapes: stacked logits ``[B, 1 + K, C]``, student ``z_s [B, C]``.

FG is transfer between two *trained* models: start the student from its weights (``--student-checkpoint``).
From a random init ``f_st`` is random, the teacher wins nearly every row and this is plain KD (``ktc train``
prints a note, ``run_notes``); ``transfer_frac`` (share of rows with ``k* > 0``) shows which regime a run is in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from kt_train.methods.base import Method, MethodDims, RunFacts, StudentOutput, TeacherBatch
from kt_train.methods.ce import ce_rows
from kt_train.methods.common import (
    class_logprob,
    full_cover_ids,
    masked_mean,
    stacked_label_logprob,
    stacked_teacher_logits,
    target_probs,
)
from kt_train.methods.kd import kd_rows
from kt_train.methods.options import MethodOptions


@dataclass(frozen=True)
class FGOptions(MethodOptions):
    tau: float = 1.0
    alpha: float = 1.0                                              # KL weight; 1 = pure KL+DP
    mask: Literal["auto", "supervised", "unsupervised"] = "auto"    # F1: auto = supervised iff labels exist

    def validate(self, method: str = "") -> None:
        self._require(self.tau > 0, method, f"tau must be > 0, got {self.tau}")
        self._require(0.0 <= self.alpha <= 1.0, method, f"alpha must be in [0, 1], got {self.alpha}")


def fg_confidence(z: Tensor, y: Tensor | None) -> Tensor:
    """fp64 confidence ``[B]`` of logits ``z [B, C]`` (``[T, B]`` of stacked ``[T, B, C]``): ``log σ(z)_y`` where
    ``y ≥ 0``, else ``max_c log σ(z)_c``."""
    z = z.detach().double()
    top = z.max(-1).values - torch.logsumexp(z, -1)
    if y is None:
        return top
    return torch.where(y >= 0, class_logprob(z, y.clamp_min(0)), top)


def select_targets(ref: Tensor, zt: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``z_tgt [B, C]``: per row, the logits of participant ``k* = argmax_k g[b, k]`` (first index on ties) among
    the reference (``k = 0``, ``ref [B, C]``) and the teachers (``k = 1 + t``, ``zt [T, B, C]``); and ``k* [B]``."""
    kstar = g.argmax(1)
    if zt.shape[0] == 0:
        return ref, kstar
    picked = zt[(kstar - 1).clamp_min(0), torch.arange(ref.shape[0], device=ref.device)]      # [B, C], no [B, T, C]
    return torch.where((kstar == 0)[:, None], ref, picked), kstar


class FG(Method):
    """KL+DP against a frozen copy of the initial student (``TeacherBatch.reference_logits``)."""

    name = "fg"
    Options = FGOptions
    needs = frozenset({"logits", "labels", "label_logit", "lse", "reference_logits"})
    summary = "Fantastic Gains KL+DP: transfer from one teacher while retaining a pretrained student"
    requires = frozenset({"predictive_logits", "all_classes"})
    reference_student = True

    @classmethod
    def labels_required(cls, options: MethodOptions) -> bool:
        return getattr(options, "mask", "auto") == "supervised"

    @classmethod
    def run_notes(cls, options: MethodOptions, facts: RunFacts) -> list[str]:
        """A random initial student loses almost every row to the teacher, so FG would be plain KD: say so."""
        if facts.student_checkpoint:
            return []
        return ["fg: no --student-checkpoint, so the frozen initial student is random: the teacher wins nearly "
                "every row (transfer_frac ≈ 1) and fg is plain KD; start from a pretrained student with "
                "--student-checkpoint."]

    def __init__(self, options: FGOptions, dims: MethodDims) -> None:
        super().__init__(options, dims)
        self._full_cover: dict[str, bool] = {}

    def forward(self, student: StudentOutput | Sequence[StudentOutput], teachers: TeacherBatch) -> dict[str, Tensor]:
        s, o = self.single_student(student), self.options
        if teachers.reference_logits is None:
            raise ValueError(f"method {self.name!r} needs TeacherBatch.reference_logits [B, C] (the frozen "
                             "initial student). Fix: cache it, or fill it from a frozen copy under no_grad.")
        y = self._mask_labels(teachers)
        tids = full_cover_ids(teachers, self._full_cover)
        ref = teachers.reference_logits.detach().float()
        zt = stacked_teacher_logits(teachers, tids) if tids else ref.new_zeros((0, *ref.shape))     # [T, B, C]
        with torch.no_grad():
            g = torch.cat([fg_confidence(ref, y)[:, None], self._teacher_conf(teachers, tids, zt, y).T], 1)
            z_tgt, kstar = select_targets(ref, zt, g)
        p, logp = target_probs(z_tgt, o.tau)
        kl = kd_rows(s.logits, p, logp, o.tau).mean()
        out = {"kl_loss": kl.detach(), "transfer_frac": (kstar > 0).float().mean()}
        shares = (kstar[:, None] == torch.arange(1, len(tids) + 1, device=kstar.device)).float().mean(0)
        out.update(zip((f"teach_share/{t}" for t in tids), shares.unbind()))
        loss = o.alpha * kl
        if o.alpha < 1.0:
            if teachers.labels is None:
                raise ValueError(f"method {self.name!r}: alpha < 1 needs labels. Fix: set alpha: 1.0")
            ce = masked_mean(ce_rows(s.logits, teachers.labels), teachers.labels >= 0)
            loss = loss + (1.0 - o.alpha) * ce
            out["ce_loss"] = ce.detach()
        out["loss"] = loss
        return out

    def _mask_labels(self, tb: TeacherBatch) -> Tensor | None:
        """Labels for the supervised mask, or None for the unsupervised (max-prob) mask."""
        mode = self.options.mask
        if mode == "supervised" and tb.labels is None:
            raise ValueError(f"method {self.name!r}: mask='supervised' needs labels. Fix: mask: unsupervised")
        return None if mode == "unsupervised" else tb.labels

    def _teacher_conf(self, tb: TeacherBatch, tids: list[str], zt: Tensor, y: Tensor | None) -> Tensor:
        """fp64 confidences ``[T, B]`` of the teachers (logits ``zt [T, B, C]``); exact ``label_logit − lse`` for
        top-k caches when supervised."""
        if not tids:
            return zt.new_zeros(zt.shape[:2], dtype=torch.float64)
        g = fg_confidence(zt, None)
        if y is not None:          # one pass over [T, B, C]: the labelled rows come from the cache where it is
            g = torch.where(y >= 0, stacked_label_logprob(tb, tids, y.clamp_min(0), True, zt), g)
        return g.masked_fill(~tb.stacked("valid", tids), float("-inf"))
