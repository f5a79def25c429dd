"""How good are the soft targets the logit methods build from the stored teachers? (read from the store)

For every training view it forms, in fp32 with the stored logits (``-inf`` outside a teacher's classes):

- ``digits_all`` alone: the target of Bi-KD/FG when that teacher teaches;
- the KD target: the mean of the predictive teachers' zero-padded softmaxes (docs/methods.md, ``kd``);
- the UNIFORM/AVG Case-B target: one softmax over the per-class mean logit of the teachers covering that
  class (``target: concat_logits``, chosen by ``auto`` because coverages differ).

and reports its top-1 against the true label and the mean probability it gives the true class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

PREDICTIVE = ("digits_lo", "digits_hi", "digits_all")


def padded_logits(store: Path, teachers: tuple[str, ...] = PREDICTIVE) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """Teacher id -> logits ``[N*V, C]`` in the target space (``-inf`` where uncovered); labels ``[N*V]``; C."""
    from kt_cache.store import StoreReader

    reader = StoreReader(str(store))
    classes = list(reader.class_names)
    labels = np.asarray(reader.root["samples/label"][:])
    out = {}
    for tid in teachers:
        stored = np.asarray(reader.root[f"teachers/{tid}/logits"][:], dtype=np.float32)   # [N, V, C_t]
        full = np.full((*stored.shape[:2], len(classes)), -np.inf, dtype=np.float32)
        for j, name in enumerate(reader.teacher_attrs(tid)["class_names"]):
            full[..., classes.index(name)] = stored[..., j]
        out[tid] = torch.from_numpy(full.reshape(-1, len(classes)))
    views = stored.shape[1]
    return out, torch.from_numpy(np.repeat(labels, views)), len(classes)


def concat_target(logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """Case B: per class, the mean logit of the teachers covering it; then one softmax."""
    stack = torch.stack(list(logits.values()))                       # [T, M, C]
    covered = torch.isfinite(stack)
    mean = torch.where(covered, stack, 0).sum(0) / covered.sum(0).clamp(min=1)
    return torch.softmax(mean, dim=-1)


def target_quality(store: Path) -> list[dict[str, float | str]]:
    """Rows (target, used by, top-1, mean p(true class)) over every stored training view."""
    logits, labels, _ = padded_logits(store)
    targets = {
        ("digits_all alone", "bikd, fg (when it teaches)"): torch.softmax(logits["digits_all"], -1),
        ("mean of zero-padded softmaxes of lo, hi, all", "kd"): torch.stack([torch.softmax(z, -1) for z in logits.values()]).mean(0),
        ("softmax of per-class mean logits (Case B)", "uniform, avg"): concat_target(logits),
    }
    rows = []
    for (name, used_by), p in targets.items():
        rows.append({"target": name, "used_by": used_by, "top1": float((p.argmax(-1) == labels).float().mean()),
                     "p_true": float(p.gather(1, labels[:, None]).mean())})
    return rows


def targets_table(rows: list[dict]) -> str:
    lines = ["| teacher target (all 4 stored views of the train images) | used by | top-1 vs label % | mean p(true class) |",
             "|---|---|---|---|"]
    lines += [f"| {r['target']} | {r['used_by']} | {100 * r['top1']:.2f} | {r['p_true']:.3f} |" for r in rows]
    return "\n".join(lines)
