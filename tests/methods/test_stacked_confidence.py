"""``stacked_label_logprob`` (Bi-KD's and FG's teacher confidences for all teachers at once) equals
``label_logprob`` teacher by teacher, bit for bit, whichever teachers carry the cached ``label_logit``/``lse``."""

from __future__ import annotations

import pytest
import torch

from kt_train.methods.common import label_logprob, stacked_label_logprob, stacked_teacher_logits, teacher_logits
from .helpers import batch

IDS = ["a", "b", "c"]


def teachers(cached: tuple[str, ...]) -> object:
    g = torch.Generator().manual_seed(0)
    logits = {t: torch.randn(5, 4, generator=g, dtype=torch.float32) for t in IDS}
    logits["b"][:, 3] = float("-inf")                                   # b does not cover class 3
    valid = {"c": torch.tensor([True, False, True, True, True])}
    lse = {t: torch.logsumexp(logits[t].double(), -1).float() + 0.01 for t in cached}   # "all C_t logits"
    label_logit = {t: logits[t][:, 0] + 0.5 for t in cached}
    return batch(IDS, logits=logits, valid=valid, lse=lse, label_logit=label_logit)


@pytest.mark.parametrize("cached", [("a", "b", "c"), (), ("a", "c")])
@pytest.mark.parametrize("true_labels", [True, False])
def test_stacked_confidences_equal_the_per_teacher_ones(cached, true_labels):
    tb, y = teachers(cached), torch.tensor([0, 1, 2, 0, 1])
    one_by_one = torch.stack([label_logprob(tb, t, y, true_labels) for t in IDS])
    stacked = stacked_label_logprob(tb, IDS, y, true_labels)
    assert stacked.dtype == torch.float64 and stacked.shape == (3, 5)
    assert torch.equal(stacked, one_by_one)
    assert torch.isinf(stacked[2, 1]) and stacked[2, 1] < 0                    # c is invalid on row 1
    z = stacked_teacher_logits(tb, IDS)
    assert torch.equal(z, torch.stack([teacher_logits(tb, t) for t in IDS]))
    assert torch.equal(stacked_label_logprob(tb, IDS, y, true_labels, z), one_by_one)
