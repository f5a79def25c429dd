"""Teachers as tensors on the read side: equal-shaped teacher arrays held, gathered and moved as one.

``CachedTeachers`` (``kt_train/data.py``) groups the selected teachers' store arrays into ``ArrayGroup`` s:
teachers whose arrays of a *bundle* (the top-k triple ``logits_topk/values``, ``logits_topk/index``,
``logits_lse``; full ``logits``; ``features``; ``featmap``; ``logits_lse``; ``label_logit``) have the same
trailing shapes, dtypes and codec. A group's array of one path is one numpy array ``[N, V, T, ...]`` (held)
or one ``StackedSource`` read in row blocks (streamed), so a batch is one fancy-index gather per group and
path (``[B, T, ...]``), one host-to-device copy, and one transpose to the ``[T, B, ...]`` the methods use.
Logits of every group are scattered into the target space with one ``scatter_`` per group
(``stacked_logits``); compact codes are decoded with one batched op per group (``StackedDecoder``).
Per-teacher Python is left only where it is once per reader (planning, reading) or once per streamed block
(``StackedSource``, in the read-ahead threads), never per batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kt_cache.codecs import MISSING_CODE
from kt_cache.transform_codec import MISSING_FLAG
from kt_train.sampler import touched_bytes

TOPK = ("logits_topk/values", "logits_topk/index")


@dataclass(frozen=True)
class ArrayGroup:
    """Teachers ``ids`` (teacher order; ``members``: their positions in the reader's ids) whose arrays of
    ``paths`` share trailing shape, dtype and codec: each path is stacked along a teacher axis."""

    paths: tuple[str, ...]
    ids: tuple[str, ...]
    members: tuple[int, ...]

    @property
    def logits(self) -> bool:
        return "logits" in self.paths or TOPK[0] in self.paths


def bundles(paths: Sequence[str]) -> list[tuple[str, ...]]:
    """A teacher's store paths cut into the bundles grouped together (the top-k triple stays whole)."""
    rest = [p for p in paths if p not in (*TOPK, "logits_lse")]
    if TOPK[0] in paths:
        return [(*TOPK, "logits_lse"), *[(p,) for p in rest]]
    return [(p,) for p in rest] + ([("logits_lse",)] if "logits_lse" in paths else [])


def plan_groups(ids: Sequence[str], paths: dict[str, list[str]], arrays: dict[tuple[str, str], Any],
                codecs: dict[tuple[str, str], str]) -> list[ArrayGroup]:
    """Group ``(teacher, path)`` arrays by bundle, trailing shape, dtype and codec name (first-seen order)."""
    groups: dict[tuple, list[tuple[int, str]]] = {}
    for position, tid in enumerate(ids):
        for bundle in bundles(paths[tid]):
            key = tuple((p, tuple(arrays[(tid, p)].shape[2:]), np.dtype(arrays[(tid, p)].dtype).str,
                         codecs.get((tid, p))) for p in bundle)
            groups.setdefault(key, []).append((position, tid))
    return [ArrayGroup(tuple(p for p, *_ in key), tuple(t for _, t in members), tuple(i for i, _ in members))
            for key, members in groups.items()]


class Gathered(Mapping[str, dict[str, np.ndarray]]):
    """``CachedTeachers.gather``'s result: per group and path one ``[B, T, ...]`` array (``stacks[(g, path)]``,
    int8 codec parameters in ``quant[(g, path, name)]``); read as teacher id -> path -> ``[B, ...]`` (views)."""

    def __init__(self, groups: Sequence[ArrayGroup], where: dict[str, list[tuple[int, int]]],
                 stacks: dict[tuple[int, str], np.ndarray], quant: dict[tuple[int, str, str], np.ndarray],
                 size: int) -> None:
        self.groups, self.stacks, self.quant, self.size = groups, stacks, quant, int(size)
        self._where = where                   # id -> [(group, position in it)]: the reader's, built once

    def __getitem__(self, tid: str) -> dict[str, np.ndarray]:
        out = {}
        for g, i in self._where[tid]:
            out.update({p: self.stacks[(g, p)][:, i] for p in self.groups[g].paths})
            out.update({f"codec/{p}/{n}": a[:, i] for (h, p, n), a in self.quant.items() if h == g})
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def places(ids: Sequence[str], groups: Sequence[ArrayGroup]) -> dict[str, list[tuple[int, int]]]:
    """Teacher id -> ``[(group, position in the group)]`` for every group holding one of its arrays."""
    where: dict[str, list[tuple[int, int]]] = {tid: [] for tid in ids}
    for g, group in enumerate(groups):
        for i, tid in enumerate(group.ids):
            where[tid].append((g, i))
    return where


class StackedSource:
    """The arrays ``[N, V, ...]`` of a group's members seen as one ``[N, V, T, ...]`` (for ``BlockCache``)."""

    def __init__(self, arrays: Sequence[Any]) -> None:
        self.arrays = list(arrays)
        first = self.arrays[0]
        self.shape = (first.shape[0], first.shape[1], len(self.arrays), *first.shape[2:])
        self.dtype = np.dtype(first.dtype)
        self.nbytes = int(sum(int(a.nbytes) for a in self.arrays))
        self.chunks = (max(int(a.chunks[0]) for a in self.arrays),)

    def __getitem__(self, key: slice | tuple[slice, int]) -> np.ndarray:
        """``[rows]``: a row block of every member in one ``[rows, V, T, ...]``; ``[rows, view]``: one view of it,
        ``[rows, T, ...]`` (only that view's chunks are read from a store with per-view chunks). Written member
        by member, so a read holds the block and one member's part of it, not every part twice."""
        rows, view = key if isinstance(key, tuple) else (key, None)
        axis, out = (2 if view is None else 1), None          # the teacher axis: after (rows, view), or rows
        for i, array in enumerate(self.arrays):
            part = np.asarray(array[rows] if view is None else array[rows, int(view)])
            if out is None:
                out = np.empty((*part.shape[:axis], len(self.arrays), *part.shape[axis:]), dtype=self.dtype)
            out[(slice(None),) * axis + (i,)] = part
        return out

    def read_bytes(self, rows: slice, view: int | None = None) -> int:
        """Decoded chunk bytes a read of ``[rows]`` or ``[rows, view]`` touches, over every member."""
        return sum(touched_bytes(array, rows, view) for array in self.arrays)


def read_stacked(source: StackedSource, unit_rows: int) -> np.ndarray:
    """The whole ``[N, V, T, ...]``, read a unit of one member at a time into one preallocated array."""
    out = np.empty(source.shape, dtype=source.dtype)
    for i, array in enumerate(source.arrays):
        for start in range(0, int(source.shape[0]), unit_rows):
            out[start:start + unit_rows, :, i] = array[start:start + unit_rows]
    return out


def view_row_bytes(array: Any) -> int:
    """Bytes of one row of one view of ``array [N, V, ...]``: what a streamed block holds per row."""
    return int(array.nbytes) // max(1, int(array.shape[0]) * int(array.shape[1]))


def two_windows_bytes(arrays: Any, block_rows: int, window_blocks: int) -> int:
    """Stream buffers of ``arrays``: per array, the sampler window in use (its block cache) and the next one
    (read ahead), ``window_blocks`` blocks of ``block_rows`` rows of one view each."""
    return sum(2 * window_blocks * block_rows * view_row_bytes(a) for a in arrays)


def decoded_row_bytes(path: str, array: Any, record: Any, coded: bool) -> int:
    """float32 bytes of one row of one view of a stacked ``features``/``featmap`` array ``[N, V, T, ...]`` as methods
    use it (``coded``: a compact codec's decoded width, from the teacher's ``record``); 0 for the other paths."""
    if path not in ("features", "featmap"):
        return 0
    if not coded:
        return 4 * view_row_bytes(array) // array.dtype.itemsize
    width = record.feature_dim if path == "features" else record.featmap_grid ** 2 * record.featmap_dim
    return 4 * int(array.shape[2]) * int(width)


def finite_rows(arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """bool ``[B, T]``: every float value of a ``[B, T, ...]`` array is finite, no int8 code is the missing
    code and no ``tc`` map code (uint8) is flagged missing, over all ``arrays`` of a group (``label_logit`` may be
    NaN and is ignored); None when none is checked."""
    ok = None
    for path, a in arrays.items():
        if path == "label_logit" or not (np.issubdtype(a.dtype, np.floating) or a.dtype in (np.int8, np.uint8)):
            continue
        flat = a.reshape(a.shape[0], a.shape[1], -1)
        if a.dtype == np.uint8:
            row_ok = flat[:, :, 0] != MISSING_FLAG
        else:
            row_ok = (flat != MISSING_CODE).all(axis=2) if a.dtype == np.int8 else np.isfinite(flat).all(axis=2)
        ok = row_ok if ok is None else ok & row_ok
    return ok


def zero_invalid_rows(a: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """``a [B, T, ...]`` with the (row, teacher) entries where ``ok [B, T]`` is False set to 0 (floats only)."""
    if ok.all() or not np.issubdtype(a.dtype, np.floating):
        return a
    return np.where(ok.reshape(*ok.shape, *([1] * (a.ndim - 2))), a, 0).astype(a.dtype)


def to_device(a: np.ndarray, device: Any) -> torch.Tensor:
    """``[B, T, ...]`` numpy -> contiguous ``[T, B, ...]`` on ``device`` (one copy there, one transpose)."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(device).transpose(0, 1).contiguous()


class LogitMaps:
    """A logit group's label maps ``[T, C_t]`` (-1 dropped) and covered ``[T, C]``, moved once per device."""

    def __init__(self, label_maps: Sequence[np.ndarray], num_classes: int) -> None:
        maps = np.stack([np.asarray(m, dtype=np.int64) for m in label_maps])
        self.num_classes, self.drops = int(num_classes), bool((maps < 0).any())
        self.maps = torch.from_numpy(np.where(maps < 0, num_classes, maps))   # dropped -> a scratch column C
        covered = np.zeros((len(maps), num_classes + 1), dtype=bool)
        np.put_along_axis(covered, self.maps.numpy(), True, axis=1)
        self.covered = torch.from_numpy(covered[:, :num_classes])
        self.wide = torch.from_numpy(covered if self.drops else covered[:, :num_classes])  # + scratch column
        self.all_covered = bool(covered[:, :num_classes].all())
        self._on: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(label maps, covered, covered + scratch column)`` on ``device``."""
        key = str(device)
        if key not in self._on:
            self._on[key] = (self.maps.to(device), self.covered.to(device), self.wide.to(device))
        return self._on[key]


def stacked_logits(got: dict[str, torch.Tensor], maps: LogitMaps) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's stored logits -> raw target-space logits ``[T, B, C]`` (fp32, -inf uncovered), covered ``[T, C]``.

    ``got``: ``logits [T, B, C_t]``, or the top-k triple ``values [T, B, k]``, ``index [T, B, k]``,
    ``lse [T, B]``. Same values as ``scatter_full_logits`` / ``scatter_topk_logits`` per teacher: a top-k
    row holds its k logits at their classes and, on every other covered class, the tail
    ``r = lse + log(1 − Σ_k e^{v_k − lse}) − log(C_t − k)`` (fp64, then fp32).
    """
    label_map, covered, wide = maps.on(next(iter(got.values())).device)
    T, C = covered.shape
    if "logits" in got:
        z = got["logits"]
        B = z.shape[1]
        out = z.new_full((T, B, C + maps.drops), float("-inf"), dtype=torch.float32)
        out.scatter_(2, label_map[:, None, :].expand(T, B, -1), z.float())
    else:
        v, lse = got[TOPK[0]].double(), got["logits_lse"].double()
        c_t, k = label_map.shape[1], v.shape[2]
        rest = torch.log(torch.clamp(-torch.expm1(torch.logsumexp(v, 2) - lse), min=1e-300))
        tail = (lse + rest - math.log(max(c_t - k, 1))).float()                       # [T, B]
        out = tail[:, :, None].expand(-1, -1, wide.shape[1]).contiguous()              # one pass, no mask read
        if not maps.all_covered:
            out.masked_fill_(~wide[:, None, :], float("-inf"))
        target = label_map.gather(1, got[TOPK[1]].long().reshape(T, -1)).reshape(v.shape)
        out.scatter_(2, target, v.float())
    return (out[..., :C].contiguous() if maps.drops else out), covered


class StackedDecoder:
    """A compact codec decoded for a group at once (``kt_cache.codecs.TorchDecoder``'s math per member):
    ``x̂_t = (q · scale_t[u] + offset_t[u]) @ basis_t + mean_t``; codes ``[T, B, ..., W]`` -> fp32 ``[T, B, ..., D]``,
    missing vectors NaN. ``mean [T, D]``, ``basis [T, K, D]`` are moved to the device once. A ``tc`` codec
    (``kt_cache.transform_codec``) has its own bit layout per teacher, so its groups hold one teacher:
    codes ``[1, B, W]`` -> ``[1, B, g, g, C]``."""

    def __init__(self, params: Sequence[Any], device: Any) -> None:
        self.codec = params[0].codec
        self.members = list(params) if self.codec.transform else []
        self.tensors = {name: torch.from_numpy(np.stack([np.asarray(p.arrays[name], dtype=np.float32) for p in params]))
                        .to(device) for name in ("mean", "basis") if name in params[0].arrays and not self.members}

    def __call__(self, codes: torch.Tensor, scale: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None) -> torch.Tensor:
        """``scale``/``offset [T, B, W]``: the int8 parameters of each row's unit."""
        if self.members:
            return torch.stack([p.torch_decode(c) for p, c in zip(self.members, codes)])
        code = codes.float()
        T, B, W = codes.shape[0], codes.shape[1], codes.shape[-1]
        if self.codec.int8:
            shape = (T, B, *([1] * (codes.ndim - 3)), W)
            missing = (codes == MISSING_CODE).any(dim=-1, keepdim=True)
            code = (code * scale.reshape(shape) + offset.reshape(shape)).masked_fill(missing, float("nan"))
        if self.codec.pca is not None:
            basis, mean = self.tensors["basis"], self.tensors["mean"]
            flat = torch.baddbmm(mean[:, None, :], code.reshape(T, -1, W), basis)
            code = flat.reshape(*codes.shape[:-1], basis.shape[-1])
        return code
