"""Plain-Python loop references for the vectorised losses (lists of floats, ``math`` only).

Each function mirrors one formula of docs/methods.md literally, one sample / teacher / class at a time, so
the tensor code can be checked against it on random shapes. ``None`` in a logit list = uncovered class.
"""

from __future__ import annotations

import math

Vec = list[float]
NEG_INF = float("-inf")


def sgn(a: float) -> int:
    return (a > 0) - (a < 0)


def log_softmax(z: list[float | None], tau: float = 1.0) -> list[float | None]:
    """Log-softmax over the covered (non-None) entries; None stays None."""
    vals = [v / tau for v in z if v is not None]
    m = max(vals)
    lse = m + math.log(sum(math.exp(v - m) for v in vals))
    return [None if v is None else v / tau - lse for v in z]


def probs(z: list[float | None], tau: float = 1.0) -> Vec:
    return [0.0 if lp is None else math.exp(lp) for lp in log_softmax(z, tau)]


def kl(p: Vec, logq: Vec) -> float:
    return sum(pc * (math.log(pc) - lq) for pc, lq in zip(p, logq) if pc > 0)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


# ----------------------------------------------------------------------------------------------- UNIFORM
def sign_vote(u: list[list[Vec]], valid: list[list[bool]], tie_break: str = "literal") -> list[Vec]:
    """x̂ [B][D] from u [B][N][D]: elect the sign per dimension, average the agreeing teachers."""
    out = []
    for ub, vb in zip(u, valid):
        row = []
        for d in range(len(ub[0])):
            s = sgn(sum(sgn(ub[i][d]) for i in range(len(ub)) if vb[i]))
            if s == 0 and tie_break == "sum":
                s = sgn(sum(ub[i][d] for i in range(len(ub)) if vb[i]))
            agree = [ub[i][d] for i in range(len(ub)) if vb[i] and s != 0 and sgn(ub[i][d]) == s]
            row.append(sum(agree) / len(agree) if agree else 0.0)
        out.append(row)
    return out


def plain_mean(u: list[list[Vec]], valid: list[list[bool]]) -> list[Vec]:
    out = []
    for ub, vb in zip(u, valid):
        rows = [ub[i] for i in range(len(ub)) if vb[i]]
        out.append([mean([r[d] for r in rows]) for d in range(len(ub[0]))])
    return out


def uniform_target(z: list[list[float | None]], valid: list[bool], tau: float, concat: bool) -> Vec:
    """p̂ for one sample from P teachers' logits (None = uncovered): probability mean or CFL concat."""
    C = len(z[0])
    live = [i for i in range(len(z)) if valid[i]]
    if not concat:
        qs = [probs(z[i], tau) for i in live]
        return [mean([q[c] for q in qs]) for c in range(C)]
    zbar: list[float | None] = []
    for c in range(C):
        vals = [z[i][c] for i in live if z[i][c] is not None]
        zbar.append(mean(vals) if vals else None)   # type: ignore[arg-type]
    return probs(zbar, tau)


def uniform_logit(z_s: Vec, z: list[list[float | None]], valid: list[bool], a1: float, a2: float,
                  tau: float = 1.0, concat: bool = False, tie: str = "p_hat", norm: str = "count") -> tuple[float, int]:
    """CE-form ℓ_logit and ĉ for one sample; ``norm``: ĉ by vote counts, or counts / probability mass per
    valid covering teacher (``coverage`` / ``soft_coverage``)."""
    C = len(z_s)
    counts, able = [0.0] * C, [0] * C
    for i in range(len(z)):
        if valid[i]:
            q = probs(z[i], tau)
            for c in range(C):
                counts[c] += q[c] if norm == "soft_coverage" else 0.0
                able[c] += z[i][c] is not None
            if norm != "soft_coverage":
                counts[max(range(C), key=lambda c: (q[c], -c))] += 1
    if norm != "count":
        counts = [counts[c] / max(1, able[c]) for c in range(C)]
    p_hat = uniform_target(z, valid, tau, concat)
    best = max(counts)
    cands = [c for c in range(C) if counts[c] >= best - 1e-6]
    c_hat = min(cands, key=lambda c: (-p_hat[c], c)) if tie == "p_hat" else cands[0]
    logq = log_softmax(list(z_s), tau)
    loss = -sum((a1 if c == c_hat else a2) * p_hat[c] * logq[c] for c in range(C) if p_hat[c] > 0)  # type: ignore
    return loss, c_hat


def rec_loss(rs: list[list[Vec]], xs: list[list[Vec]], valid: list[list[bool]]) -> float:
    """mean over samples with a valid teacher of (mean over valid teachers of ‖r_i − x_i‖₂)."""
    per = []
    for rb, xb, vb in zip(rs, xs, valid):
        norms = [math.sqrt(sum((a - b) ** 2 for a, b in zip(rb[i], xb[i]))) for i in range(len(rb)) if vb[i]]
        if norms:
            per.append(mean(norms))
    return mean(per)


# --------------------------------------------------------------------------------------------------- KD
def kd(z_s: list[Vec], z_t: list[list[list[float | None]]], valid: list[list[bool]], tau: float) -> float:
    """τ² · mean over samples with a valid teacher of KL(mean_t σ(z_t/τ) ‖ σ(z_s/τ))."""
    per = []
    for b in range(len(z_s)):
        qs = [probs(z_t[b][t], tau) for t in range(len(z_t[b])) if valid[b][t]]
        if not qs:
            continue
        p = [mean([q[c] for q in qs]) for c in range(len(z_s[b]))]
        per.append(tau * tau * kl(p, log_softmax(z_s[b], tau)))   # type: ignore[arg-type]
    return mean(per)


def zscore(z: Vec) -> Vec:
    m = mean(z)
    sd = math.sqrt(sum((v - m) ** 2 for v in z) / (len(z) - 1))
    return [(v - m) / (sd + 1e-7) for v in z]


# ------------------------------------------------------------------------------------------------- Bi-KD
def bikd(logits: list[list[Vec]], y: list[int], trainable: list[bool], valid: list[list[bool]] | None = None,
         tie_rule: str = "unique") -> tuple[float, float]:
    """(Σ_live CE, KD term) of docs/methods.md with participants' logits [K][B][C]."""
    K, B = len(logits), len(y)
    ce = sum(mean([-log_softmax(logits[k][b])[y[b]] for b in range(B)])  # type: ignore[misc]
             for k in range(K) if trainable[k])
    total = 0.0
    for b in range(B):
        g = [log_softmax(logits[k][b])[y[b]] if (valid is None or valid[b][k]) else NEG_INF for k in range(K)]
        if tie_rule == "official2":
            teacher = 1 if g[0] <= g[1] else 0
        else:
            top = max(g)
            if sum(1 for v in g if v == top) != 1:  # type: ignore[operator]
                continue
            teacher = g.index(top)
        p = probs(logits[teacher][b])
        for j in range(K):
            if j != teacher and trainable[j]:
                total += kl(p, log_softmax(logits[j][b]))   # type: ignore[arg-type]
    return ce, total / B


# ---------------------------------------------------------------------------------------------------- FG
def fg(z_s: list[Vec], z_ref: list[Vec], z_t: list[list[Vec]], y: list[int] | None, tau: float = 1.0) -> float:
    """KL+DP: per sample the most confident of [f_st, teachers...] (first wins ties) is the target."""
    per = []
    for b in range(len(z_s)):
        cands = [z_ref[b]] + [zt[b] for zt in z_t]
        conf = []
        for z in cands:
            lp = log_softmax(z)
            conf.append(lp[y[b]] if y is not None and y[b] >= 0 else max(lp))  # type: ignore[type-var]
        k = conf.index(max(conf))                                             # type: ignore[type-var]
        per.append(tau * tau * kl(probs(cands[k], tau), log_softmax(z_s[b], tau)))  # type: ignore[arg-type]
    return mean(per)


# --------------------------------------------------------------------------------------------------- KPU
def cos_dist(a: Vec, b: Vec) -> float:
    na = math.sqrt(sum(v * v for v in a))
    nb = math.sqrt(sum(v * v for v in b))
    return 1.0 - sum(x * y for x, y in zip(a, b)) / max(na * nb, 1e-8)


def smooth_l1(a: float, b: float, beta: float = 1.0) -> float:
    d = abs(a - b)
    return 0.5 * d * d / beta if d < beta else d - 0.5 * beta


def align(x1: Vec | None, v1: list[Vec] | None, x2: Vec | None, v2: list[Vec] | None,
          lambdas: tuple[float, float, float] = (1.0, 0.9, 0.1)) -> float:
    """L_align for one sample; ``v*`` = list of positions, each a channel vector."""
    total = 0.0
    if x1 is not None and x2 is not None:
        total += lambdas[0] * cos_dist(x1, x2)
    if v1 is not None and v2 is not None:
        total += lambdas[1] * mean([cos_dist(a, b) for a, b in zip(v1, v2)])
        total += lambdas[2] * mean([smooth_l1(a, b) for pa, pb in zip(v1, v2) for a, b in zip(pa, pb)])
    return total
