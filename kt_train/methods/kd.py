"""Hinton KD, single or multi-teacher (probability average), with optional logit standardization.

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015; logit standardization:
Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024 (docs/methods.md)::

    p̄_b  = Σ_t v_{b,t} σ(z_t,b / τ) / Σ_t v_{b,t}        zero-padded over classes teacher t does not cover
    L_KD = τ² · mean_b KL(p̄_b ‖ σ(z_s,b / τ))            rows with no valid teacher are left out
    L    = (1 − α) · CE(z_s, y) + α · L_KD
    standardize: z ← (z − mean_c z) / (std_c z + 1e-7) for teachers (over covered classes) and student

Shapes: teacher logits stacked ``[T, B, C]`` (``TeacherBatch.stacked``: one tensor for all teachers, no
per-teacher op; averaged over ``T`` in that layout); student ``z_s [B, C]``, ``y [B]``. Teachers are the batch's
predictive teachers with logits (``TeacherBatch.logit_ids``). Top-k caches are lossy here (docs/methods.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kt_train.methods.base import Method, StudentOutput, TeacherBatch
from kt_train.methods.ce import ce_rows
from kt_train.methods.common import (
    kl_rows,
    log_probs,
    masked_mean,
    stacked_teacher_logits,
    standardize_logits,
    upcast,
)
from kt_train.methods.options import MethodOptions


@dataclass(frozen=True)
class KDOptions(MethodOptions):
    tau: float = 1.0                 # 1 for ImageNet-scale pretrained teachers, 4 for CIFAR-scale
    alpha: float | None = None       # KD weight; None = 1.0 without labels, 0.9 with labels
    standardize: bool = False        # logit standardization (then tau is the base temperature, e.g. 2)

    def validate(self, method: str = "") -> None:
        self._require(self.tau > 0, method, f"tau must be > 0, got {self.tau}")
        self._require(self.alpha is None or 0.0 <= self.alpha <= 1.0, method,
                      f"alpha must be in [0, 1], got {self.alpha}")


def average_teacher_probs(z: Tensor, valid: Tensor, tau: float = 1.0, dim: int = 1) -> tuple[Tensor, Tensor]:
    """Mean of the valid teachers' ``σ(z/τ)``: ``p̄ [B, C]`` and ``log p̄`` (0 where p̄ = 0).

    ``z [B, T, C]`` with ``valid [B, T]`` (``dim=1``), or stacked ``z [T, B, C]`` with ``valid [T, B]``
    (``dim=0``): ``p̄_b = Σ_t v_{b,t} σ(z_{t,b}/τ) / Σ_t v_{b,t}``. Cached teachers carry no graph, so the
    ``[T, B, C]`` temporaries are then updated in place (one allocation instead of three).
    """
    vf = valid[..., None].float()
    q = log_probs(z, tau)
    p = q.exp() * vf if q.requires_grad else q.exp_().mul_(vf)
    p = p.sum(dim) / vf.sum(dim).clamp_min(1.0)
    return p, torch.where(p > 0, p.log(), torch.zeros_like(p))


def kd_rows(z_s: Tensor, p_t: Tensor, logp_t: Tensor, tau: float = 1.0) -> Tensor:
    """Per-row ``τ² · KL(p_t ‖ σ(z_s/τ))`` ``[B]`` in fp32."""
    return tau * tau * kl_rows(p_t, logp_t, log_probs(z_s, tau))


class KD(Method):
    """Hinton KD from the average of the cached teachers' probabilities."""

    name = "kd"
    Options = KDOptions
    needs = frozenset({"logits", "labels"})
    summary = "Hinton KD on the predictive teachers' averaged probabilities (optionally with labels)"
    requires = frozenset({"predictive_logits"})

    @classmethod
    def labels_required(cls, options: MethodOptions) -> bool:
        alpha = getattr(options, "alpha", None)
        return alpha is not None and alpha < 1

    def forward(self, student: StudentOutput | Sequence[StudentOutput], teachers: TeacherBatch) -> dict[str, Tensor]:
        s, o = self.single_student(student), self.options
        ids = teachers.logit_ids()
        if not ids:
            raise ValueError(f"method {self.name!r}: the batch has no predictive teacher with logits")
        y = teachers.labels
        alpha = o.alpha if o.alpha is not None else (1.0 if y is None else 0.9)
        if alpha < 1.0 and y is None:
            raise ValueError(f"method {self.name!r}: alpha={alpha} < 1 needs labels; the batch has none. "
                             "Fix: set alpha: 1.0 for unlabelled data.")
        z = stacked_teacher_logits(teachers, ids, o.standardize)                      # [T, B, C]
        valid = teachers.stacked("valid", ids)                                         # [T, B]
        p, logp = average_teacher_probs(z, valid, o.tau, dim=0)
        z_s = standardize_logits(upcast(s.logits)) if o.standardize else s.logits
        kd = masked_mean(kd_rows(z_s, p, logp, o.tau), valid.any(0))
        out = {"kd_loss": kd.detach()}
        truth = y if y is not None else teachers.audit_labels
        if truth is not None:   # how often the averaged target names the true class (never trained on)
            out["pseudo_acc"] = masked_mean((p.argmax(-1) == truth).float(), valid.any(0) & (truth >= 0)).detach()
        loss = alpha * kd
        if alpha < 1.0:
            ce = masked_mean(ce_rows(s.logits, y), y >= 0)  # type: ignore[arg-type]
            loss = loss + (1.0 - alpha) * ce
            out["ce_loss"] = ce.detach()
        out["loss"] = loss
        return out
