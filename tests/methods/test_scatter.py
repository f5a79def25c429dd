"""scatter_full_logits (index_copy_ along dim 1) is bit-identical to the advanced-index assignment it replaced."""

from __future__ import annotations

import math

import pytest
import torch

from kt_train.methods import scatter_full_logits, scatter_topk_logits


def advanced_index_scatter(z: torch.Tensor, label_map: torch.Tensor, num_classes: int):
    """The former implementation, kept as the reference."""
    keep = label_map >= 0
    out = z.new_full((z.shape[0], num_classes), float("-inf"), dtype=torch.float32)
    out[:, label_map[keep]] = z[:, keep].float()
    covered = torch.zeros(num_classes, dtype=torch.bool, device=z.device)
    covered[label_map[keep]] = True
    return out, covered


def label_map(c_t: int, num_classes: int, dropped: float, seed: int) -> torch.Tensor:
    """A random injective teacher -> target map with a share of teacher classes dropped (-1)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randperm(num_classes, generator=g)[:c_t]
    return torch.where(torch.rand(c_t, generator=g) < dropped, -1, target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("c_t", "num_classes", "dropped"), [(1000, 1000, 0.0), (1000, 1200, 0.1), (7, 5, 0.5),
                                                              (3, 3, 1.0), (0, 4, 0.0)])
def test_bit_identical_to_the_advanced_index_assignment(dtype, c_t, num_classes, dropped):
    if c_t > num_classes:
        c_t = num_classes
    lm = label_map(c_t, num_classes, dropped, seed=c_t + num_classes)
    z = (5 * torch.randn(16, c_t, generator=torch.Generator().manual_seed(1))).to(dtype)
    z[0, : min(2, c_t)] = torch.tensor([float("nan"), float("inf")][: min(2, c_t)], dtype=dtype)  # copied as is
    out, covered = scatter_full_logits(z, lm, num_classes)
    ref_out, ref_covered = advanced_index_scatter(z, lm, num_classes)
    assert out.dtype == torch.float32 and out.shape == (16, num_classes)
    assert torch.equal(out.view(torch.int32), ref_out.view(torch.int32))          # bit for bit, NaN included
    assert torch.equal(covered, ref_covered)


def test_int32_label_map_and_non_contiguous_logits():
    lm = label_map(50, 60, 0.2, seed=4)
    z = torch.randn(50, 8).t()                          # [8, 50], not contiguous
    out, covered = scatter_full_logits(z, lm.to(torch.int32), 60)
    ref_out, ref_covered = advanced_index_scatter(z, lm, 60)
    assert torch.equal(out, ref_out) and torch.equal(covered, ref_covered)


def test_top_k_path_is_unchanged():
    g = torch.Generator().manual_seed(7)
    z = 3 * torch.randn(6, 40, generator=g, dtype=torch.float64)
    values, index = z.topk(5, -1)
    lm = label_map(40, 45, 0.25, seed=9)
    filled, covered = scatter_topk_logits(values.half(), index.to(torch.int16), torch.logsumexp(z, -1).float(), lm, 45)
    v = values.half().double()
    rest = torch.log(torch.clamp(-torch.expm1(torch.logsumexp(v, 1) - torch.logsumexp(z, -1).float().double()),
                                 min=1e-300))
    full = (torch.logsumexp(z, -1).float().double() + rest - math.log(35))
    full = full[:, None].expand(-1, 40).clone().scatter_(1, index, v)
    ref_out, ref_covered = advanced_index_scatter(full, lm, 45)
    assert torch.equal(filled, ref_out) and torch.equal(covered, ref_covered)
