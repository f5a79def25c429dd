"""Numerics shared by the methods: fp32 softmax/KL, fp64 label log-probs, masking, small heads.

Rules (docs/methods.md): every softmax / log-softmax / KL in fp32 (fp16 caches upcast first), role and
confidence comparisons in fp64, ``log_softmax`` never ``softmax().log()``, ``KL(teacher ‖ student)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kt_train.methods.base import TeacherBatch

NEG_INF = float("-inf")


def upcast(x: Tensor) -> Tensor:
    """``x`` in fp32, or fp64 when it already is (fp16/bf16 caches are never used as is)."""
    return x if x.dtype == torch.float64 else x.float()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values [B]`` over rows where ``mask [B]`` is True; 0 (with a graph) when none is."""
    m = mask.to(values.dtype)
    return torch.where(mask, values, torch.zeros_like(values)).sum() / m.sum().clamp_min(1.0)


def zero_invalid(x: Tensor, valid: Tensor) -> Tensor:
    """Detached fp32 copy of cached ``x [B, ...]`` (or stacked ``[T, B, ...]``) with rows where ``valid [B]``
    (``[T, B]``) is False set to 0 (NaN-safe)."""
    v = valid.reshape(valid.shape + (1,) * (x.dim() - valid.dim()))
    return torch.where(v, x.detach().float(), torch.zeros((), dtype=torch.float32, device=x.device))


def teacher_logits(tb: TeacherBatch, tid: str, standardize: bool = False) -> Tensor:
    """Teacher ``tid``'s detached fp32 global logits ``[B, C]``; invalid rows become 0 on covered classes.

    Uncovered classes stay ``-inf``. With ``standardize`` the row is Z-scored over its covered classes
    (cached per-row mean/std are used when present, docs/methods.md).
    """
    covered, valid = tb.covered[tid], tb.valid[tid]
    filler = torch.zeros((), dtype=torch.float32, device=covered.device)
    z = torch.where(valid[:, None] & covered[None], tb.logits[tid].detach().float(), filler)
    z = z.masked_fill(~covered[None], NEG_INF)
    if standardize:
        mean = tb.logit_mean.get(tid)
        std = tb.logit_std.get(tid)
        z = standardize_logits(z, covered, mean, std)
    return z


def stacked_teacher_logits(tb: TeacherBatch, ids: list[str], standardize: bool = False) -> Tensor:
    """``teacher_logits`` of every teacher of ``ids`` at once: detached fp32 ``[T, B, C]``, same math.

    ``z_t = where(valid_t ∧ covered_t, logits_t, 0)``, ``-inf`` where not covered; with ``standardize`` each
    row is Z-scored over its covered classes (cached mean/std ``[T, B]`` when every teacher has them; a mix
    falls back to one call per teacher, as the result must match ``teacher_logits`` row for row).
    """
    covered, valid = tb.stacked("covered", ids), tb.stacked("valid", ids)          # [T, C], [T, B]
    z = tb.stacked("logits", ids).detach().float().masked_fill(~valid[:, :, None], 0.0)     # a new tensor
    z.masked_fill_(~covered[:, None, :], NEG_INF)
    if not standardize:
        return z
    cached = [sum(t in table for t in ids) for table in (tb.logit_mean, tb.logit_std)]
    if cached == [len(ids)] * 2:
        return standardize_logits(z, covered, tb.stacked("logit_mean", ids), tb.stacked("logit_std", ids))
    if cached == [0, 0]:
        return standardize_logits(z, covered)
    return torch.stack([teacher_logits(tb, t, True) for t in ids])


def standardize_logits(z: Tensor, covered: Tensor | None = None, mean: Tensor | None = None,
                       std: Tensor | None = None) -> Tensor:
    """Logit standardization ``Z(z) = (z - mean_c z) / (std_c z + 1e-7)`` over covered classes.

    Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024. ``std`` is unbiased (N-1),
    as ``torch.std``. Args: ``z [B, C]`` (or stacked ``[T, B, C]``); ``covered [C]`` (``[T, C]``) bool or None
    (all); optional cached ``mean``/``std`` ``[B]`` (``[T, B]``) over the teacher's full logit vector (exact for
    top-k caches). Uncovered classes stay ``-inf``.
    """
    if covered is None:
        covered = torch.ones(z.shape[-1], dtype=torch.bool, device=z.device)
    cov = covered.unsqueeze(-2)                                                  # [1, C] or [T, 1, C]
    zc = torch.where(cov, z, torch.zeros_like(z))
    n = cov.sum(-1, keepdim=True).to(z.dtype)
    mu = zc.sum(-1, keepdim=True) / n if mean is None else mean.to(z.dtype)[..., None]
    if std is None:
        dev = torch.where(cov, zc - mu, torch.zeros_like(z))
        sd = (dev.pow(2).sum(-1, keepdim=True) / (n - 1).clamp_min(1.0)).sqrt()
    else:
        sd = std.to(z.dtype)[..., None]
    return torch.where(cov, (zc - mu) / (sd + 1e-7), torch.full_like(z, NEG_INF))


def log_probs(z: Tensor, tau: float = 1.0) -> Tensor:
    """fp32 ``log_softmax(z / tau)`` over the last dimension (``-inf`` classes get ``-inf``)."""
    x = upcast(z)
    return F.log_softmax(x if tau == 1.0 else x / tau, dim=-1)         # x / 1.0 == x: one pass less


def target_probs(z: Tensor, tau: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(p, log p)`` of a target distribution, with ``log p`` set to 0 where ``p == 0`` (for KL / xlogy)."""
    logp = log_probs(z, tau)
    p = logp.exp()
    return p, torch.where(p > 0, logp, torch.zeros_like(logp))


def kl_rows(p: Tensor, logp: Tensor, logq: Tensor) -> Tensor:
    """Per-row ``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)`` ``[B]``; ``logp`` must be 0 where ``p`` is 0."""
    return (p * (logp - logq)).sum(-1)


def soft_ce_rows(p: Tensor, logq: Tensor) -> Tensor:
    """Per-row soft cross-entropy ``−Σ_c p_c log q_c`` ``[B]``."""
    return -(p * logq).sum(-1)


def label_logprob(tb: TeacherBatch, tid: str, y: Tensor, true_labels: bool = True) -> Tensor:
    """fp64 ``log σ(z_t)_y`` ``[B]`` of teacher ``tid`` (``-inf`` where the teacher is invalid).

    Uses the cached ``label_logit - lse`` (exact for top-k caches) when ``y`` are the true labels and both
    are cached; otherwise ``log_softmax`` of the global row in fp64. ``y`` must be ``>= 0``.
    """
    if true_labels and tid in tb.label_logit and tid in tb.lse:
        g = tb.label_logit[tid].detach().double() - tb.lse[tid].detach().double()
    else:
        g = class_logprob(teacher_logits(tb, tid), y)
    return g.masked_fill(~tb.valid[tid], NEG_INF)


def stacked_label_logprob(tb: TeacherBatch, ids: list[str], y: Tensor, true_labels: bool = True,
                          z: Tensor | None = None) -> Tensor:
    """``label_logprob`` of every teacher of ``ids`` at once: fp64 ``[T, B]``, the same math row for row
    (``z``: their ``stacked_teacher_logits``, when already built). A mix of teachers with and without the cached
    ``label_logit``/``lse`` falls back to one call per teacher."""
    cached = [sum(t in table for t in ids) for table in (tb.label_logit, tb.lse)]
    if true_labels and cached == [len(ids)] * 2:
        g = tb.stacked("label_logit", ids).detach().double() - tb.stacked("lse", ids).detach().double()
    elif not true_labels or cached[0] * cached[1] == 0:
        g = class_logprob(stacked_teacher_logits(tb, ids) if z is None else z, y)
    else:
        return torch.stack([label_logprob(tb, t, y, true_labels) for t in ids])
    return g.masked_fill(~tb.stacked("valid", ids), NEG_INF)


def class_logprob(z: Tensor, y: Tensor) -> Tensor:
    """fp64 ``log σ(z)_y = z_y − logsumexp(z)`` ``[B]`` of ``z [B, C]`` (or ``[T, B]`` of stacked ``[T, B, C]``; no
    grad), computed exactly as ``label_logit − lse``.

    Every role comparison uses this one formula for live and cached participants alike, so equal logits
    give bit-equal confidences and exact ties stay ties (``log_softmax`` differs from it by an ulp).
    """
    z = z.detach().double()
    return z.gather(-1, y.expand(z.shape[:-1])[..., None])[..., 0] - torch.logsumexp(z, -1)


def full_cover_ids(tb: TeacherBatch, cache: dict[str, bool]) -> list[str]:
    """The batch's predictive logit teachers that cover every class (Bi-KD / FG participants).

    Coverage is static per teacher, so the answer is memoised in ``cache`` (one device sync per teacher).
    """
    for tid in tb.logit_ids():
        if tid not in cache:
            cache[tid] = bool(tb.covered[tid].all())
    return [t for t in tb.logit_ids() if cache[t]]


def safe_key(tid: str) -> str:
    """Teacher id -> an ``nn.ModuleDict`` key (ids may contain '.', which module names may not)."""
    return tid.replace("%", "%25").replace(".", "%2E")


def mlp(d_in: int, d_hidden: int, d_out: int, norm: bool = False) -> nn.Sequential:
    """``Linear(d_in, h) [-> LayerNorm(h)] -> GELU -> Linear(h, d_out)``: the per-teacher head."""
    layers: list[nn.Module] = [nn.Linear(d_in, d_hidden)]
    if norm:
        layers.append(nn.LayerNorm(d_hidden))
    layers += [nn.GELU(), nn.Linear(d_hidden, d_out)]
    return nn.Sequential(*layers)
