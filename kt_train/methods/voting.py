"""UNIFORM's two votes as pure functions (docs/methods.md).

Wang et al., "UNIFORM: Unifying Knowledge from Large-scale and Diverse Pre-trained Models",
arXiv 2508.19498. Aggregation rule, tie handling and Case B target are the spec's [G] resolutions U2-U12.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NEG_INF = float("-inf")


def sign_vote(u: Tensor, valid: Tensor, tie_break: str = "literal") -> tuple[Tensor, Tensor, Tensor]:
    """Sign election per dimension, then the disjoint mean over the agreeing teachers.

    ``s = sgn(Σ_i v_i sgn(u_i))``; ``m_{i,d} = 1[sgn(u_{i,d}) = s_d ≠ 0 ∧ v_i]``;
    ``x̂_d = Σ_i m_{i,d} u_{i,d} / max(1, Σ_i m_{i,d})``. With ``tie_break="sum"`` a tied ``s_d = 0`` becomes
    ``sgn(Σ_i v_i u_{i,d})`` (TIES-merging's mass election); ``"literal"`` keeps ``x̂_d = 0``.

    Args:
        u: ``[B, N, D]`` teacher features mapped to the student space (gradients flow through ``x̂``).
        valid: ``[B, N]`` bool.
        tie_break: ``literal`` or ``sum``.

    Returns:
        ``x̂ [B, D]``, agreement mask ``m [B, N, D]`` (float, no grad), ties ``[B, D]`` bool (before tie-break).
    """
    v = valid[..., None]
    u = torch.where(v, u, torch.zeros_like(u))
    sg = torch.sign(u.detach())
    s = torch.sign(sg.sum(1))                                             # [B, D]
    ties = s == 0
    if tie_break == "sum":
        s = torch.where(ties, torch.sign(u.detach().sum(1)), s)
    m = ((sg == s[:, None]) & (s[:, None] != 0) & v).to(u.dtype)
    return (m * u).sum(1) / m.sum(1).clamp_min(1.0), m, ties


def plain_mean(u: Tensor, valid: Tensor) -> Tensor:
    """AVG baseline target: ``x̂ = Σ_i v_i u_i / max(1, Σ_i v_i)`` ``[B, D]`` from ``u [B, N, D]``."""
    vf = valid[..., None].to(u.dtype)
    return (torch.where(valid[..., None], u, torch.zeros_like(u)) * vf).sum(1) / vf.sum(1).clamp_min(1.0)


def vote_counts(q: Tensor, valid: Tensor) -> Tensor:
    """Integer vote counts ``[B, C]``: each valid teacher votes ``argmax_c q_{i,c}`` (``q [B, P, C]``).

    ``counts_{b,c} = Σ_i v_{b,i} 1[argmax q_{b,i} = c]``, as one ``scatter_add`` of the ``[B, P]`` votes (no
    ``[B, P, C]`` one-hot; the sums of 0/1 are exact in floating point, so the counts are those of the one-hot).
    """
    votes = valid.to(q.dtype)
    return q.new_zeros(q.shape[0], q.shape[-1]).scatter_add_(1, q.argmax(-1), votes)


def pseudo_class(counts: Tensor, p_hat: Tensor, tie_rule: str = "p_hat") -> Tensor:
    """``ĉ = argmax_c counts_c`` ``[B]``; ties by larger ``p̂_c`` then lower index (``p_hat``) or lower index.

    ``counts`` may be integer vote counts or coverage shares (``coverage_shares``); values within 1e-6 of the
    row's maximum count as tied.
    """
    if tie_rule == "p_hat":
        tied = counts >= counts.max(-1, keepdim=True).values - 1e-6
        return torch.where(tied, p_hat + 1.0, torch.zeros_like(p_hat)).argmax(-1)
    return counts.argmax(-1)


def soft_votes(q: Tensor, valid: Tensor) -> Tensor:
    """Probability mass per class ``Σ_i v_i q_{i,c}`` ``[B, C]`` (``q [B, P, C]`` zero-padded, ``valid [B, P]``):
    each teacher votes with its whole distribution instead of its argmax."""
    return (q * valid[..., None].to(q.dtype)).sum(1)


def coverage_shares(counts: Tensor, covered: Tensor, valid: Tensor) -> Tensor:
    """Votes per class over the teachers able to cast them: ``counts_c / max(1, Σ_i v_i 1[c ∈ cover_i])`` ``[B, C]``.

    With partial coverage a raw count favours classes that many teachers cover: a teacher that cannot name the
    true class still votes, always for one of its own. The share asks, per class, what fraction of the teachers
    that know the class chose it (``counts [B, C]``, ``covered [P, C]`` bool, ``valid [B, P]`` bool).
    """
    able = valid.to(counts.dtype) @ covered.to(counts.dtype)               # [B, C] teachers covering c
    return counts / able.clamp_min(1.0)


def mean_prob_target(q: Tensor, valid: Tensor) -> Tensor:
    """Case A target ``p̂ = Σ_i v_i q_i / N^p_b`` ``[B, C]`` (zero-padded teacher probabilities ``q``)."""
    vf = valid[..., None].to(q.dtype)
    return (q * vf).sum(1) / vf.sum(1).clamp_min(1.0)


def concat_logit_target(z: Tensor, covered: Tensor, valid: Tensor, tau: float = 1.0) -> Tensor:
    """Case B target (CFL concatenation): per class, the mean logit of the valid teachers covering it.

    For label groups with disjoint coverage this is ``σ(concat_g z̄_g / τ)``; classes no valid teacher
    covers get probability 0. Rows without any valid teacher are all zero (masked out by the caller).

    Args:
        z: ``[B, P, C]`` raw teacher logits in the global space (``-inf`` uncovered).
        covered: ``[P, C]`` bool.
        valid: ``[B, P]`` bool.
    """
    w = valid[..., None] & covered[None]                                  # [B, P, C]
    total = torch.where(w, z, torch.zeros_like(z)).sum(1)
    cnt = w.sum(1)
    zbar = torch.where(cnt > 0, total / cnt.clamp_min(1), torch.full_like(total, NEG_INF))
    any_valid = (cnt > 0).any(-1, keepdim=True)
    zbar = torch.where(any_valid, zbar, torch.zeros_like(zbar))
    return torch.where(any_valid, F.softmax(zbar / tau, -1), torch.zeros_like(zbar))


def uniform_logit_rows(logq: Tensor, p_hat: Tensor, c_hat: Tensor, alpha1: float, alpha2: float) -> Tensor:
    """CE-form logit-voting loss per row ``[B]``: ``−α1 p̂_ĉ log p_ĉ − α2 Σ_{c≠ĉ} p̂_c log p_c``.

    ``logq [B, C]`` student log-probs, ``p_hat [B, C]`` target, ``c_hat [B]`` pseudo-class. Classes with
    ``p̂_c = 0`` contribute nothing (even where ``log p_c = -inf``).
    """
    w = torch.full_like(p_hat, alpha2).scatter(1, c_hat[:, None], alpha1)
    terms = torch.where(p_hat > 0, w * p_hat * logq, torch.zeros_like(logq))
    return -terms.sum(-1)
