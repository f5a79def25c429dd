"""How good is each candidate soft target / pseudo-class on the stored training views? (no student trained)

Built with ktc's own functions (``kt_train.methods.voting``, ``common.standardize_logits``) from a store's
logits, so a row here is exactly the target the method would train on; it is scored against the true label
(top-1) and by the probability it gives the true class. It costs seconds, so it screens ingredients before
any student is trained on them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from digits.targets import padded_logits


def candidate_targets(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """``z [M, P, C]`` (``-inf`` uncovered) -> name -> ``[M, C]`` target probabilities or one-hot pseudo-classes."""
    from kt_train.methods.voting import (
        concat_logit_target,
        coverage_shares,
        mean_prob_target,
        pseudo_class,
        soft_votes,
        vote_counts,
    )

    covered = torch.isfinite(z[0])                                          # [P, C]: coverage is static
    valid = torch.ones(z.shape[:2], dtype=torch.bool)
    out: dict[str, torch.Tensor] = {}
    for tag, logits in (("", z), (", standardized", standardized(z, covered))):
        q = torch.softmax(logits, -1)
        case_b = concat_logit_target(logits, covered, valid)
        votes = vote_counts(q, valid)
        out[f"KD: mean of zero-padded probabilities{tag}"] = mean_prob_target(q, valid)
        out[f"Case B: softmax of per-class mean logits{tag}"] = case_b
        scores = {"raw votes (paper)": votes, "vote shares of covering teachers": coverage_shares(votes, covered, valid),
                  "probability mass of covering teachers": coverage_shares(soft_votes(q, valid), covered, valid)}
        for norm, counts in scores.items():
            c_hat = pseudo_class(counts, case_b)
            out[f"UNIFORM ĉ by {norm}{tag}"] = torch.nn.functional.one_hot(c_hat, z.shape[-1]).float()
    return out


def standardized(z: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """Per teacher and row: ``(z − mean) / std`` over its covered classes (``-inf`` kept where uncovered)."""
    from kt_train.methods.common import standardize_logits

    out = torch.full_like(z, float("-inf"))
    for p in range(z.shape[1]):
        cols = covered[p].nonzero().flatten()
        out[:, p, cols] = standardize_logits(z[:, p, cols])
    return out


def vote_quality(store: Path, teachers: tuple[str, ...]) -> list[dict]:
    """Rows (target, top-1 vs label, mean p(true class)) over every stored training view."""
    logits, labels, _ = padded_logits(store, teachers)
    z = torch.stack([logits[t] for t in teachers], 1)                       # [M, P, C]
    rows = []
    for name, p in candidate_targets(z).items():
        rows.append({"target": name, "top1": float((p.argmax(-1) == labels).float().mean()),
                     "p_true": float(p.gather(1, labels[:, None]).mean())})
    return rows


def vote_table(rows: list[dict]) -> str:
    lines = ["| target built from the stored logits (main zoo, all stored train views) | top-1 vs label % | "
             "mean p(true class) |", "|---|---|---|"]
    lines += [f"| {r['target']} | {100 * r['top1']:.2f} | {r['p_true']:.3f} |" for r in rows]
    return "\n".join(lines)
