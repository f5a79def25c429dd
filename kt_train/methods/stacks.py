"""Teachers as tensors: a ``TeacherBatch`` field held as one stacked tensor per shape group.

A cache reader fills a field with ``Stacked(layout, tensors)``: ``layout.groups[g]`` are the ids of group ``g``
(teacher order) and ``tensors[g]`` their outputs stacked ``[T_g, B, ...]`` (``covered``: ``[T_g, C]``). It reads
as the usual ``id -> [B, ...]`` mapping (each entry a view ``tensors[g][i]``, made only when read), and
``TeacherBatch.stacked(name, ids)`` returns a group's tensor as is, so methods run one op per group
instead of one per teacher. ``StackLayout`` is built once per reader; a batch costs nothing per teacher.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor


class StackLayout:
    """The teacher groups of a stacked field: ``groups[g]`` ids in order; ``index[id] = (g, i)``."""

    def __init__(self, groups: Sequence[Sequence[str]]) -> None:
        self.groups = tuple(tuple(ids) for ids in groups)
        self.index = {tid: (g, i) for g, ids in enumerate(self.groups) for i, tid in enumerate(ids)}
        self.order = tuple(tid for ids in self.groups for tid in ids)
        self._picks: dict[tuple[str, ...], tuple[int, list[int]] | None] = {}

    def pick(self, ids: tuple[str, ...]) -> tuple[int, list[int]] | None:
        """``(g, positions)`` when every id of ``ids`` is in one group ``g``; else None (memoised per ``ids``)."""
        if ids not in self._picks:
            places = [self.index.get(t) for t in ids]
            ok = bool(places) and None not in places and len({p[0] for p in places}) == 1  # type: ignore[index]
            self._picks[ids] = (places[0][0], [p[1] for p in places]) if ok else None    # type: ignore[index]
        return self._picks[ids]


class Stacked(Mapping[str, Tensor]):
    """``id -> tensors[g][i]`` over one stacked tensor per group (see the module docstring). Read-only."""

    def __init__(self, layout: StackLayout, values: Sequence[Tensor]) -> None:
        if len(values) != len(layout.groups):
            raise ValueError(f"Stacked: {len(values)} tensors for {len(layout.groups)} groups")
        self.layout, self.tensors = layout, list(values)   # not .values: that is Mapping's

    def __getitem__(self, tid: str) -> Tensor:
        g, i = self.layout.index[tid]
        return self.tensors[g][i]

    def __contains__(self, tid: object) -> bool:
        return tid in self.layout.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.order)

    def __len__(self) -> int:
        return len(self.layout.order)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{len(ids)}x{tuple(v.shape[1:])}" for ids, v in zip(self.layout.groups, self.tensors))
        return f"Stacked({shapes})"

    def select(self, ids: Sequence[str]) -> Tensor | None:
        """``[T, ...]`` of ``ids`` in that order: a group's tensor itself when ``ids`` is the group, one
        ``index_select`` when they are part of one group; None when they span groups or are missing."""
        ids = tuple(ids)
        picked = self.layout.pick(ids)
        if picked is None:
            return None
        g, positions = picked
        values = self.tensors[g]
        if ids == self.layout.groups[g]:
            return values
        return values.index_select(0, torch.tensor(positions, device=values.device))


def stack_of(table: Mapping[str, Tensor], ids: Sequence[str]) -> Tensor:
    """``[T, ...]``: ``table``'s entries of ``ids``, without a copy when ``table`` is ``Stacked`` by these groups."""
    if isinstance(table, Stacked):
        got = table.select(ids)
        if got is not None:
            return got
    return torch.stack([table[t] for t in ids])


def shape_subsets(table: Mapping[str, Tensor], ids: Sequence[str]) -> list[tuple[tuple[str, ...], Tensor | None]]:
    """``ids`` split by the shape of their entries: ``[(ids, None)]`` when ``table`` is ``Stacked`` with ``ids``
    in one group (one shape, nothing per teacher); else ``(sub ids, their positions in ids as int64)`` per shape."""
    ids = tuple(ids)
    if isinstance(table, Stacked) and table.layout.pick(ids) is not None:
        return [(ids, None)]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, tid in enumerate(ids):
        by_shape.setdefault(tuple(table[tid].shape), []).append(i)
    if len(by_shape) == 1:
        return [(ids, None)]
    return [(tuple(ids[i] for i in pos), torch.tensor(pos)) for pos in by_shape.values()]
