"""CE: the supervised baseline, cross-entropy of the student on the labels (no teacher is read).

    L = −(1/|K|) Σ_{b∈K} log σ(z_s)_{b, y_b}        K = rows with a known label (y ≥ 0)

Shapes: ``z_s [B, C]``, ``y [B]`` int64 (``-1`` = unknown, ignored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kt_train.methods.base import Method, StudentOutput, TeacherBatch
from kt_train.methods.common import masked_mean, upcast
from kt_train.methods.options import MethodOptions


@dataclass(frozen=True)
class CEOptions(MethodOptions):
    label_smoothing: float = 0.0                         # as torch's cross_entropy

    def validate(self, method: str = "") -> None:
        self._require(0.0 <= self.label_smoothing < 1.0, method,
                      f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


def ce_rows(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-row fp32 cross-entropy ``[B]``; rows with ``labels < 0`` give 0 (mask them with ``labels >= 0``)."""
    return F.cross_entropy(upcast(logits), labels.clamp_min(0), reduction="none",
                           label_smoothing=label_smoothing) * (labels >= 0)


def require_labels(teachers: TeacherBatch, method: str) -> Tensor:
    if teachers.labels is None:
        raise ValueError(f"method {method!r} needs TeacherBatch.labels [B]; the batch has none. "
                         "Fix: train on a labelled store, or pick a label-free method/option.")
    return teachers.labels


class CE(Method):
    """Plain supervised cross-entropy."""

    name = "ce"
    Options = CEOptions
    needs = frozenset({"labels"})
    summary = "cross-entropy on the true labels (the reference without teachers)"

    @classmethod
    def labels_required(cls, options: MethodOptions) -> bool:
        return True

    def forward(self, student: StudentOutput | Sequence[StudentOutput], teachers: TeacherBatch) -> dict[str, Tensor]:
        s = self.single_student(student)
        y = require_labels(teachers, self.name)
        loss = masked_mean(ce_rows(s.logits, y, self.options.label_smoothing), y >= 0)
        return {"loss": loss, "ce_loss": loss.detach()}
