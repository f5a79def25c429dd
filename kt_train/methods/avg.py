"""AVG: feature averaging in a learned common space = UNIFORM with both votes off (docs/methods.md).

The "none" row of UNIFORM's voting ablation and the closest stand-in for its CFL+ baseline (Luo et al.,
"Knowledge Amalgamation from Heterogeneous Networks by Common Feature Learning", IJCAI 2019; CFL itself
uses MMD, so AVG ≠ CFL+ exactly)::

    x̂ = Σ_i v_i u_i / Σ_i v_i                       plain mean of the mapped teacher features, no sign filter
    ℓ_logit = −Σ_c p̂_c log p_c                       α1 = α2 = 1: soft-CE to p̂ (= KL(p̂‖p) + H(p̂))
    L = ℓ_logit + β1 dist(x, x̂) + β2 ℓ_rec           same encoders, decoders and ℓ_rec as UNIFORM

Shapes as in ``uniform.py``: ``u [B, N, D]``, ``z [B, P, C]``, student ``x [B, D]``, ``z_s [B, C]``.
"""

from __future__ import annotations

from kt_train.methods.uniform import AvgOptions, Uniform


class Avg(Uniform):
    """Feature + logit averaging (UNIFORM's encoders/decoders, votes off)."""

    name = "avg"
    Options = AvgOptions
    summary = "feature and probability averaging over the teachers (UNIFORM without voting)"
    requires = frozenset({"features"})
    alternatives: dict[str, str] = {}      # no logit_vote option to turn off (Uniform's alternative)
