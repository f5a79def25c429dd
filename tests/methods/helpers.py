"""Small builders for TeacherBatch / StudentOutput used by the method tests."""

from __future__ import annotations

import torch
from torch import Tensor

from kt_train.methods import MethodDims, StudentOutput, TeacherBatch, TeacherInfo

INF = float("inf")


def t(x, dtype=torch.float64, grad: bool = False) -> Tensor:
    return torch.tensor(x, dtype=dtype, requires_grad=grad)


def batch(
    ids: list[str],
    *,
    features: dict[str, Tensor] | None = None,
    logits: dict[str, Tensor] | None = None,
    featmaps: dict[str, Tensor] | None = None,
    roles: dict[str, str] | None = None,
    valid: dict[str, Tensor] | None = None,
    labels: Tensor | None = None,
    **extra,
) -> TeacherBatch:
    """A TeacherBatch; ``covered`` is derived from the finite entries of each logit tensor's first row."""
    features, logits, featmaps = features or {}, logits or {}, featmaps or {}
    B = next(iter((features or logits or featmaps).values())).shape[0]
    valid = valid or {}
    return TeacherBatch(
        ids=tuple(ids),
        roles={i: (roles or {}).get(i, "predictive") for i in ids},
        valid={i: valid.get(i, torch.ones(B, dtype=torch.bool)) for i in ids},
        features=features,
        logits=logits,
        covered={i: torch.isfinite(z[0]) for i, z in logits.items()},
        featmaps=featmaps,
        labels=labels,
        **extra,
    )


def dims(D: int, C: int, tb: TeacherBatch) -> MethodDims:
    """MethodDims matching a TeacherBatch (dims read from the tensors)."""
    infos = []
    for i in tb.ids:
        f, m = tb.features.get(i), tb.featmaps.get(i)
        infos.append(TeacherInfo(i, tb.roles[i], None if f is None else f.shape[-1],
                                 None if m is None else m.shape[-1], i in tb.logits))
    return MethodDims(D, C, tuple(infos))


def student(logits: Tensor, features: Tensor | None = None, featmap: Tensor | None = None) -> StudentOutput:
    return StudentOutput(logits=logits, features=features, featmap=featmap)
