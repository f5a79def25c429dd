"""Grouped heads: the heads of ``T`` teachers with equal dims held as stacked parameters and run as one op.

Per member ``t`` of a group (inputs ``x [T, B, ..., d_in]``; one input shared by all: ``x.expand(T, ...)``)::

    GroupedLinear     y_t = x_t W_t + b_t                 W [T, d_in, d_out], b [T, d_out]     (torch.baddbmm)
    GroupedLayerNorm  y_t = (x_t − μ) / √(σ² + 1e-5) · γ_t + β_t   over the last dim; γ, β [T, d]
    GroupedMLP        y_t = fc2(GELU([norm](fc1(x_t))))  = ``common.mlp`` of every member

The math is that of ``T`` separate ``nn.Linear`` / ``nn.LayerNorm`` / ``common.mlp`` modules; so is the
initialisation: ``reset_member(t)`` draws member ``t`` exactly as ``nn.Linear(d_in, d_out)`` does
(kaiming-uniform a=√5 weight, then ``U(±1/√d_in)`` bias, consuming the RNG in that order), so resetting the
members in the order the per-teacher modules used to be built gives bit-identical initial heads for a seed.

Checkpoints of the per-teacher heads name each teacher's tensors ``<dict>.<teacher key>.<layer>.weight``
(``nn.Linear`` weight ``[d_out, d_in]``). ``LegacyParam`` records where each such tensor lives in the
stacked layout; ``upgrade_state`` rewrites a per-teacher state dict (or any per-parameter dict, e.g. AdamW's
moments) into the stacked keys, ``kt_train.checkpoint`` uses it for old run folders.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GroupedLinear(nn.Module):
    """``T`` linear maps ``d_in -> d_out``: ``x [T, B, ..., d_in]`` -> ``[T, B, ..., d_out]``."""

    def __init__(self, members: int, d_in: int, d_out: int, reset: bool = True) -> None:
        super().__init__()
        self.members, self.d_in, self.d_out = int(members), int(d_in), int(d_out)
        self.weight = nn.Parameter(torch.empty(self.members, self.d_in, self.d_out))
        self.bias = nn.Parameter(torch.empty(self.members, self.d_out))
        for t in range(self.members if reset else 0):       # reset=False: the owner draws them (reset_member)
            self.reset_member(t)

    @torch.no_grad()
    def reset_member(self, t: int) -> None:
        """Member ``t`` drawn as ``nn.Linear(d_in, d_out).reset_parameters()`` draws (same RNG use and order)."""
        w = torch.empty(self.d_out, self.d_in)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.d_in) if self.d_in > 0 else 0.0
        b = torch.empty(self.d_out).uniform_(-bound, bound)
        self.weight[t].copy_(w.T)
        self.bias[t].copy_(b)

    def forward(self, x: Tensor, members: Tensor | None = None) -> Tensor:
        """``x [T, B, ..., d_in]`` (a shared input as ``x.expand(T, ...)``: a view) -> ``[T, B, ..., d_out]``.
        ``members``: int64 ``[T']``, run only those members on ``x [T', ...]``."""
        w, b = (self.weight, self.bias) if members is None else (self.weight[members], self.bias[members])
        out = torch.baddbmm(b[:, None, :], x.reshape(w.shape[0], -1, self.d_in), w)
        return out.reshape(*x.shape[:-1], self.d_out)


class GroupedLayerNorm(nn.Module):
    """``T`` LayerNorms over the last dim ``d`` with their own affine ``γ, β [T, d]`` (init 1, 0)."""

    def __init__(self, members: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.members, self.dim, self.eps = int(members), int(dim), eps
        self.weight = nn.Parameter(torch.ones(self.members, self.dim))
        self.bias = nn.Parameter(torch.zeros(self.members, self.dim))

    def forward(self, x: Tensor, members: Tensor | None = None) -> Tensor:
        w, b = (self.weight, self.bias) if members is None else (self.weight[members], self.bias[members])
        shape = (w.shape[0], *([1] * (x.dim() - 2)), self.dim)
        return F.layer_norm(x, (self.dim,), eps=self.eps) * w.view(shape) + b.view(shape)


class GroupedMLP(nn.Module):
    """``fc2(GELU([norm](fc1(x))))`` for ``T`` members: ``common.mlp(d_in, hidden, d_out, norm)`` each."""

    def __init__(self, members: int, d_in: int, hidden: int, d_out: int, norm: bool = False,
                 reset: bool = True) -> None:
        super().__init__()
        self.fc1 = GroupedLinear(members, d_in, hidden, reset=False)
        self.norm = GroupedLayerNorm(members, hidden) if norm else None
        self.fc2 = GroupedLinear(members, hidden, d_out, reset=False)
        for t in range(members if reset else 0):
            self.reset_member(t)

    def reset_member(self, t: int) -> None:
        """Member ``t`` as ``common.mlp`` builds it: fc1 drawn, then fc2 (LayerNorm draws nothing)."""
        self.fc1.reset_member(t)
        self.fc2.reset_member(t)

    def forward(self, x: Tensor, members: Tensor | None = None) -> Tensor:
        h = self.fc1(x, members)
        if self.norm is not None:
            h = self.norm(h, members)
        return self.fc2(F.gelu(h), members)


def grouped_head(kind: str, members: int, d_in: int, hidden: int, d_out: int, norm: bool = False,
                 reset: bool = True) -> nn.Module:
    """``kind`` = "mlp" (``GroupedMLP``), "linear" (``GroupedLinear``) or "identity" (``nn.Identity``)."""
    if kind == "identity":
        return nn.Identity()
    if kind == "linear":
        return GroupedLinear(members, d_in, d_out, reset)
    return GroupedMLP(members, d_in, hidden, d_out, norm, reset)


def run_head(head: nn.Module, x: Tensor, members: Tensor | None = None) -> Tensor:
    """``head(x)``, or only ``members`` of a grouped head (any other module, e.g. ``nn.Identity``, takes all)."""
    return head(x) if members is None or not hasattr(head, "reset_member") else head(x, members)


def reset_member(head: nn.Module, t: int) -> None:
    """``head.reset_member(t)`` where the head has parameters (identity heads have none)."""
    if hasattr(head, "reset_member"):
        head.reset_member(t)


def group_by(items: Iterable[tuple[str, int]]) -> dict[int, list[str]]:
    """``(id, dim)`` pairs -> dim -> ids, both in first-seen order: the teacher groups of equal dims."""
    groups: dict[int, list[str]] = {}
    for tid, dim in items:
        groups.setdefault(int(dim), []).append(tid)
    return groups


@dataclass(frozen=True)
class LegacyParam:
    """One tensor of the per-teacher layout and its place in the stacked one.

    Attributes:
        old: its per-teacher state-dict key, e.g. ``encoders.t%2E1.0.weight``.
        new: the stacked key, e.g. ``encoders.d768.fc1.weight``.
        member: its index along the stacked dim 0.
        transpose: ``nn.Linear`` weights ``[d_out, d_in]`` become ``[d_in, d_out]``.
        buffer: a buffer (z-score statistics), not a parameter: no optimizer state.
    """

    old: str
    new: str
    member: int
    transpose: bool = False
    buffer: bool = False


def legacy_layout(head: nn.Module, old_prefix: str, new_prefix: str, member: int) -> list[LegacyParam]:
    """Per-teacher tensors of one member of ``head``, in the order its ``common.mlp`` / ``nn.Linear`` had them."""
    if isinstance(head, GroupedLinear):
        return [LegacyParam(old_prefix + "weight", new_prefix + "weight", member, True),
                LegacyParam(old_prefix + "bias", new_prefix + "bias", member)]
    if not isinstance(head, GroupedMLP):
        return []
    last = "3" if head.norm is not None else "2"
    out = legacy_layout(head.fc1, old_prefix + "0.", new_prefix + "fc1.", member)
    if head.norm is not None:
        out += [LegacyParam(old_prefix + f"1.{n}", new_prefix + f"norm.{n}", member) for n in ("weight", "bias")]
    return out + legacy_layout(head.fc2, old_prefix + last + ".", new_prefix + "fc2.", member)


def upgrade_state(state: dict[str, Tensor], layout: Sequence[LegacyParam]) -> dict[str, Tensor]:
    """``state`` with every complete set of per-teacher tensors of ``layout`` stacked into its new key.

    A stacked key is written only when all its members are present (else the old keys are left for
    ``load_state_dict`` to report). Returns a new dict; ``state`` is not changed.
    """
    out = dict(state)
    targets: dict[str, list[LegacyParam]] = {}
    for p in layout:
        targets.setdefault(p.new, []).append(p)
    for new, parts in targets.items():
        if new in out or not all(p.old in out for p in parts):
            continue
        parts = sorted(parts, key=lambda p: p.member)
        out[new] = torch.stack([out[p.old].T if p.transpose else out[p.old] for p in parts]).contiguous()
        for p in parts:
            del out[p.old]
    return out
