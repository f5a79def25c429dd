"""``CachedTeachers``: the selected teachers' stored outputs, held in RAM or streamed, gathered per batch.

The read path of ``ktc train`` (``kt_train.data`` describes it and re-exports this class). Teachers are
handled as tensors (``kt_train.teacher_stacks``): equal-shaped teacher arrays form a group, held as one
``[N, V, T, ...]`` array (or streamed in row blocks of all members), gathered with one numpy op per group
and path and handed to the methods as ``Stacked`` ``TeacherBatch`` fields ``[T, B, ...]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from kt_cache.errors import UsageError
from kt_cache.store import StoreReader
from kt_train.labels import covered_mask, label_map_for
from kt_train.methods.base import TeacherBatch, TeacherInfo
from kt_train.methods.stacks import StackLayout, Stacked
from kt_train.sampler import BlockCache
from kt_train.teacher_stacks import (
    TOPK,
    Gathered,
    LogitMaps,
    StackedDecoder,
    StackedSource,
    decoded_row_bytes,
    finite_rows,
    places,
    plan_groups,
    read_stacked,
    stacked_logits,
    to_device,
    two_windows_bytes,
    view_row_bytes,
    zero_invalid_rows,
)

GiB = 1 << 30
ALL_FIELDS = frozenset({"features", "logits", "featmaps", "label_logit", "lse", "logit_mean", "logit_std"})


class CachedTeachers:
    """The selected teachers' stored outputs, held for cheap per-batch gathers (main process only).

    Teachers as tensors (``kt_train.teacher_stacks``): teachers whose arrays have the same trailing shapes,
    dtypes and codec form a group, and each of a group's paths is one array ``[N, V, T, ...]``; a batch is one
    gather per group and path, moved to the device as ``[T, B, ...]`` and handed to the methods as ``Stacked``
    ``TeacherBatch`` fields, the top-k scatter of a group is one op. Nothing in ``gather`` / ``to_teacher_batch``
    runs per teacher. ``tables[id][path]`` (views into the group arrays) and ``caches[(id, path)]`` (the group's
    ``BlockCache``) still address one teacher's array.

    Args:
        reader: the open store.
        teacher_ids: teachers in run order (from ``select_teachers``).
        needs: ``TeacherBatch`` fields to provide (a method's ``needs``); ``None`` = every field.
        ram_budget_bytes: bounds every array held (features, logits or top-k + LSE, ``label_logit``, maps): when
            all of them fit they are loaded into RAM; otherwise the smallest group arrays are loaded while they
            fit half the budget and the rest are read in row blocks of one view (the epoch's view of the block,
            ``plan_epoch``) through ``BlockCache``s whose windows together fit the other half (each block is
            read once per window when rows come from a ``BlockShuffleSampler`` with the same ``block_rows`` /
            ``window_blocks``); ``read_counts`` says how many bytes that read per sample and teacher.
        window_blocks: blocks per shuffle window (give the same to ``make_loader``).
        block_rows: rows per cache block (default: the store's unit, halved until the windows fit the
            budget, never below an inner chunk); give ``self.block_rows`` to ``make_loader``.
    """

    def __init__(self, reader: StoreReader, teacher_ids: Sequence[str], needs: Iterable[str] | None = None,
                 ram_budget_bytes: int = 4 * GiB, window_blocks: int = 8, block_rows: int | None = None) -> None:
        self.ids = tuple(teacher_ids)
        self.wanted = ALL_FIELDS if needs is None else frozenset("featmaps" if n == "featmap" else n for n in needs)
        self.num_classes = len(reader.class_names)
        self.window_blocks, self.block_rows = int(window_blocks), reader.meta.unit_rows
        self.records = {tid: reader.teacher_record(tid) for tid in self.ids}
        self.stats = {tid: reader.feature_stats(tid) for tid in self.ids}     # v1 attrs or v2 stats/features
        self.roles = {tid: self.records[tid].role for tid in self.ids}
        self.label_maps: dict[str, np.ndarray] = {}
        paths: dict[str, list[str]] = {}
        arrays: dict[tuple[str, str], Any] = {}
        for tid in self.ids:
            stored = reader.teacher_arrays(tid)
            paths[tid] = self._ram_paths(tid, stored, reader)
            if "featmaps" in self.wanted and "featmap" in stored:
                paths[tid].append("featmap")
            arrays.update({(tid, path): reader.rows(tid, path) for path in paths[tid]})
        self.codecs = {(tid, path): params for (tid, path) in arrays if path in ("features", "featmap")
                       and (params := reader.codec_params(tid, path)) is not None}
        width = {"features": "feature_dim", "featmap": "featmap_dim"}          # decoded width: part of the key
        decoded = {(tid, path): f"{p.codec.name}->{getattr(self.records[tid], width[path])}"
                   + (f"@{tid}" if p.codec.transform else "")        # a tc bit layout is the teacher's own
                   for (tid, path), p in self.codecs.items()}
        self.groups = plan_groups(self.ids, paths, arrays, decoded)
        self._where = places(self.ids, self.groups)
        sources = {(g, path): StackedSource([arrays[(tid, path)] for tid in group.ids])
                   for g, group in enumerate(self.groups) for path in group.paths}
        self.ram_budget_bytes = int(ram_budget_bytes)
        first = [group.ids[0] for group in self.groups]            # a group's teachers share shapes and codec
        self._row_bytes = {(g, path): (view_row_bytes(a), decoded_row_bytes(path, a, self.records[first[g]],
                                                                            (first[g], path) in self.codecs))
                           for (g, path), a in sources.items()}
        self._place(sources, self.ram_budget_bytes, block_rows)
        self._prepare()

    def holds(self, tid: str, path: str) -> bool:
        """Whether ``path`` of ``tid`` is provided (held in RAM or streamed)."""
        return path in self.tables[tid] or (tid, path) in self.caches

    def _place(self, sources: dict[tuple[int, str], StackedSource], budget: int, block_rows: int | None) -> None:
        """RAM for everything when it fits the budget; else the smallest group arrays in half of it, the rest
        streamed."""
        sizes = {key: int(array.nbytes) for key, array in sources.items()}
        held, used = [], 0
        for key in sorted(sources, key=lambda k: sizes[k]):
            if sum(sizes.values()) <= budget or used + sizes[key] <= budget // 2:
                held.append(key)
                used += sizes[key]
        self.held = {key: read_stacked(sources[key], self.block_rows) for key in held}
        self.tables: dict[str, dict[str, np.ndarray]] = {tid: {} for tid in self.ids}
        for (g, path), table in self.held.items():
            for i, tid in enumerate(self.groups[g].ids):
                self.tables[tid][path] = table[:, :, i]
        streamed = {key: array for key, array in sources.items() if key not in self.held}
        self.group_caches: dict[tuple[int, str], BlockCache] = {}
        self.caches: dict[tuple[str, str], BlockCache] = {}
        if streamed:       # two windows in half of what is left: the other half is for what the plan does not
            self._stream(streamed, (budget - used) // 2, block_rows)   # count (batch tensors, allocator free lists)
        self._windows: list[np.ndarray] = []
        self._window_of: dict[int, int] = {}
        self._views: np.ndarray | None = None
        self._ahead, self._read_base, self._gathered = -1, 0, 0

    def _stream(self, arrays: dict[tuple[int, str], StackedSource], budget: int, block_rows: int | None) -> None:
        if block_rows is None:     # a cache entry is one view of a block (``sampler.block_views``)
            floor = max(int(a.chunks[0]) for a in arrays.values())
            block_rows = self.block_rows
            while block_rows > floor and two_windows_bytes(arrays.values(), block_rows, self.window_blocks) > budget:
                block_rows //= 2
        if block_rows < 1 or self.block_rows % block_rows:
            raise ValueError(f"CachedTeachers: block_rows={block_rows} must divide the store's unit rows "
                             f"({self.block_rows}) so a block never spans two shards")
        from concurrent.futures import ThreadPoolExecutor

        self.block_rows = int(block_rows)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ktc-read-ahead")
        # the cache keeps the window in use; the next window waits as read-ahead futures: two windows in all
        self.group_caches = {key: BlockCache(a, self.block_rows, self.window_blocks, self._pool)
                             for key, a in arrays.items()}
        self.caches = {(tid, path): cache for (g, path), cache in self.group_caches.items()
                       for tid in self.groups[g].ids}

    def _prepare(self) -> None:
        """What every batch reuses: the layouts of the stacked fields, label maps, codec parameters per group."""
        by_path = {path: [g for g, group in enumerate(self.groups) if path in group.paths]
                   for path in ("features", "featmap", "logits_lse", "label_logit", "logits")}
        self._field_groups = {name: by_path[path] for name, path in (
            ("features", "features"), ("featmaps", "featmap"), ("lse", "logits_lse"), ("label_logit", "label_logit"),
            ("logit_mean", "logits"), ("logit_std", "logits"))}
        self._layouts = {name: StackLayout([self.groups[g].ids for g in gs]) for name, gs in self._field_groups.items()}
        self._layouts["valid"] = StackLayout([self.ids])
        self._member_index = [np.asarray(group.members, dtype=np.int64) for group in self.groups]
        self._logit_groups = [g for g, group in enumerate(self.groups) if group.logits]
        self._logit_maps = {g: LogitMaps([self.label_maps[t] for t in self.groups[g].ids], self.num_classes)
                            for g in self._logit_groups}
        logit_ids = [tid for tid in self.ids if tid in self.label_maps]
        self._layouts["logits"] = self._layouts["covered"] = StackLayout([logit_ids])
        rank = {tid: i for i, tid in enumerate(logit_ids)}
        self._logit_rows = {g: torch.tensor([rank[t] for t in self.groups[g].ids]) for g in self._logit_groups}
        self._group_codecs = {(g, path): [self.codecs[(t, path)] for t in group.ids]
                              for g, group in enumerate(self.groups)
                              for path in group.paths if (group.ids[0], path) in self.codecs}
        self._quant = {(g, path, name): np.stack([p.arrays[name] for p in params], axis=1)
                       for (g, path), params in self._group_codecs.items() if params[0].codec.int8
                       for name in ("scale", "offset")}                                   # [n_units, T, W]
        self._decoders: dict[tuple[int, str, str], StackedDecoder] = {}
        self._on_device: dict[tuple[str, ...], torch.Tensor] = {}

    def plan_epoch(self, windows: Sequence[np.ndarray], views: np.ndarray | None = None) -> None:
        """The sampler's block windows of this epoch (``BlockShuffleSampler.windows()``) and the view of each block
        (``StudentLoader.block_views()``): while a window's rows are gathered, that view of the next window's
        blocks is read in background threads, so a step rarely waits on a read (without ``views``, blocks are
        read when first gathered). Starts the epoch's ``read_counts``."""
        self._read_base, self._gathered = self._bytes_read(), 0
        if not self.group_caches:
            return
        self._windows = [np.asarray(w) for w in windows]
        self._window_of = {int(b): i for i, w in enumerate(self._windows) for b in w}
        self._views, self._ahead = (None if views is None else np.asarray(views)), -1
        self._read_ahead(0)

    def _read_ahead(self, window: int) -> None:
        if self._views is not None and self._ahead < window < len(self._windows):
            for cache in self.group_caches.values():
                cache.prefetch(self._windows[window], self._views[self._windows[window]])
            self._ahead = window

    def memory_plan(self, batch_size: int = 0) -> dict[str, Any]:
        """Bytes the teacher arrays take in RAM, bounded together by ``ram_budget_bytes``: ``held_bytes`` (loaded at
        start-up) and ``stream_buffer_bytes`` (two sampler windows of one view per streamed array: the window in
        use, held by its block cache, and the next, read ahead); the rows of a streamed block and how many arrays
        stream; and ``batch_tensor_bytes``, what one batch of ``batch_size`` builds beside them (``batch_bytes``)."""
        buffers = two_windows_bytes([c.array for c in self.group_caches.values()], self.block_rows, self.window_blocks)
        return {"ram_budget_bytes": self.ram_budget_bytes,
                "held_bytes": sum(int(table.nbytes) for table in self.held.values()),
                "stream_buffer_bytes": int(buffers), "streamed_arrays": len(self.group_caches),
                "block_rows": self.block_rows if self.group_caches else None,
                "batch_tensor_bytes": self.batch_bytes(batch_size)}

    def batch_bytes(self, batch_size: int) -> int:
        """Host bytes of the teacher tensors one batch of ``batch_size`` samples builds, outside the budget: the
        gathered rows (one view) of every array ``[B, T, ...]`` and their ``[T, B, ...]`` copy, the float32
        decoding of features and maps, and each logit group's float32 scores in the target classes ``[T, B, C]``
        twice (the scattered output and the float copy of what it scatters). Grows with the teachers, not with N."""
        per_sample = sum(2 * stored + decoded for stored, decoded in self._row_bytes.values())
        scores = sum(len(self.groups[g].ids) for g in self._logit_groups) * self.num_classes * 4
        return int(batch_size) * (per_sample + 2 * scores)

    def close(self) -> None:
        """Let go of every held array and block (the final evaluation then reads within the budget on its own)."""
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for cache in self.group_caches.values():
            cache.blocks.clear()
            cache.pending.clear()
        self.held, self.tables = {}, {tid: {} for tid in self.ids}
        self._on_device.clear()

    def describe_memory(self, batch_size: int = 0) -> str:
        """One line for the start of ``ktc train``: where the teacher arrays live, against the budget, and what a
        batch's teacher tensors add."""
        plan, gib = self.memory_plan(batch_size), float(1 << 30)
        line = (f"memory: teacher arrays {plan['held_bytes'] / gib:.2f} GiB held in RAM, "
                f"{plan['stream_buffer_bytes'] / gib:.2f} GiB of stream buffers "
                f"(--ram-budget-gb {plan['ram_budget_bytes'] / gib:.2f})")
        if batch_size:
            line += f", plus {plan['batch_tensor_bytes'] / gib:.2f} GiB of teacher tensors per batch of {batch_size}"
        if plan["streamed_arrays"]:
            line += f"; {plan['streamed_arrays']} stacked array(s) streamed in blocks of {plan['block_rows']} rows"
        need = plan["held_bytes"] + plan["stream_buffer_bytes"]
        if need > plan["ram_budget_bytes"]:       # blocks never go below one inner chunk of the store
            line += (f". The store's smallest blocks (one inner chunk of rows) need {need / gib:.2f} GiB, more than the "
                     "budget: that is what the run takes")
        return line

    def _bytes_read(self) -> int:
        return sum(cache.bytes_read for cache in self.group_caches.values())

    def read_counts(self) -> dict[str, float]:
        """Streamed reads since ``plan_epoch``: ``read_bytes_per_sample_teacher`` = decoded bytes of the chunks
        the block caches read (``sampler.touched_bytes``) / samples gathered / teachers with a streamed array;
        0 when every array is held in RAM (read once, at start-up)."""
        streamed = len({tid for tid, _ in self.caches})
        per = (self._bytes_read() - self._read_base) / max(1, self._gathered) / max(1, streamed)
        return {"read_bytes_per_sample_teacher": round(per, 1)}

    def _after_gather(self, rows: np.ndarray) -> None:
        if self._window_of and rows.size:
            current = max(self._window_of.get(int(b), -1) for b in np.unique(rows // self.block_rows))
            self._read_ahead(current + 1)

    def _ram_paths(self, tid: str, arrays: dict[str, Any], reader: StoreReader) -> list[str]:
        """Store paths of ``tid`` to load into RAM; sets its label map when its logits are used."""
        w, paths = self.wanted, []
        if "features" in w and "features" in arrays:
            paths.append("features")
        full, topk = "logits" in arrays, TOPK[0] in arrays
        if (full or topk) and w & {"logits", "logit_mean", "logit_std"}:
            self.label_maps[tid] = self._label_map(tid, reader)
            paths += ["logits"] if full else [*TOPK, "logits_lse"]
        paths += [p for p, f in (("logits_lse", "lse"), ("label_logit", "label_logit"))
                  if f in w and p in arrays and p not in paths]
        return paths

    def _label_map(self, tid: str, reader: StoreReader) -> np.ndarray:
        record = self.records[tid]
        names = list(record.class_names) if record.class_names is not None else None
        label_map = label_map_for(reader.class_names, names, record.num_classes)
        if not (label_map >= 0).any():
            raise UsageError(
                f"teacher '{tid}' in the store {reader.where} has {label_map.size} logits, but none of its class "
                f"names ({(names or ['<none recorded>'])[:5]}) is a target class ({reader.class_names[:5]}...). "
                "Its logits cannot be used. Fix: exclude it with --teachers, or re-extract it with `classes:` "
                "naming its logits in the target label space.")
        return label_map

    def teacher_infos(self) -> tuple[TeacherInfo, ...]:
        """``TeacherInfo`` per teacher, describing exactly what ``to_teacher_batch`` will provide."""
        infos = []
        for tid in self.ids:
            record = self.records[tid]
            stats = self.stats[tid] or {}
            has_feat = self.holds(tid, "features")
            mean, std = (torch.tensor(stats[k], dtype=torch.float32) if has_feat and stats.get(k) is not None
                         else None for k in ("mean", "std"))
            infos.append(TeacherInfo(
                id=tid, role=self.roles[tid],
                feature_dim=int(record.feature_dim) if has_feat else None,
                featmap_dim=int(record.featmap_dim) if self.holds(tid, "featmap") else None,
                has_logits=tid in self.label_maps and "logits" in self.wanted, feature_mean=mean, feature_std=std))
        return tuple(infos)

    def covered(self, tid: str) -> np.ndarray:
        """bool ``[C]``: target classes teacher ``tid`` has logits for."""
        return covered_mask(self.label_maps[tid], self.num_classes)

    def gather(self, rows: np.ndarray, views: np.ndarray) -> Gathered:
        """Stored outputs at ``(rows[b], views[b])``: per group and path one ``[B, T, ...]`` numpy gather; reads
        as teacher id -> store path -> ``[B, ...]`` (``teacher_stacks.Gathered``)."""
        rows, views = np.asarray(rows, dtype=np.int64), np.asarray(views, dtype=np.int64)
        stacks = {key: table[rows, views] for key, table in self.held.items()}
        stacks.update({key: cache.gather(rows, views) for key, cache in self.group_caches.items()})
        quant = {}
        for (g, path, name), table in self._quant.items():     # each row's unit has its own int8 range
            units = rows // self._group_codecs[(g, path)][0].unit_rows
            quant[(g, path, name)] = table[units]
        self._after_gather(rows)
        self._gathered += rows.size
        return Gathered(self.groups, self._where, stacks, quant, rows.size)

    def to_teacher_batch(self, gathered: Gathered, labels: Any, device: Any) -> TeacherBatch:
        """A ``TeacherBatch`` on ``device`` from ``gather`` output: every field ``Stacked`` per group, logits
        scattered into the target space, rows with a non-finite value (or missing code) invalid and zeroed.

        Args:
            gathered: from ``gather``.
            labels: int ``[B]`` target labels (-1 unknown), or ``None``.
            device: the student's device.
        """
        size = max(gathered.size, 0 if labels is None else len(labels))
        ok = np.ones((len(self.ids), size), dtype=bool)                       # [T_all, B]
        for g, group in enumerate(self.groups):
            row_ok = finite_rows({p: gathered.stacks[(g, p)] for p in group.paths})
            if row_ok is not None:
                ok[self._member_index[g]] &= row_ok.T
        valid = torch.from_numpy(ok).to(device)
        tb = TeacherBatch(ids=self.ids, roles=dict(self.roles), valid=Stacked(self._layouts["valid"], [valid]),
                          labels=None if labels is None else torch.as_tensor(labels).long().to(device))
        moved = {}
        for (g, path), a in gathered.stacks.items():
            moved[(g, path)] = to_device(zero_invalid_rows(a, ok[self._member_index[g]].T), device)
        for name, path in (("features", "features"), ("featmaps", "featmap"), ("lse", "logits_lse"),
                           ("label_logit", "label_logit")):
            if name in self.wanted or name in ("features", "featmaps"):
                values = [self._decoded(g, path, moved, gathered, valid) for g in self._field_groups[name]]
                setattr(tb, name, Stacked(self._layouts[name], values))
        self._add_logits(tb, moved, valid.device)
        return tb

    def _decoded(self, g: int, path: str, moved: dict[tuple[int, str], torch.Tensor], gathered: Gathered,
                 valid: torch.Tensor) -> torch.Tensor:
        """Group ``g``'s ``path`` ``[T, B, ...]``; a compact store's codes decoded in one op (invalid rows 0)."""
        codes = moved[(g, path)]
        if (g, path) not in self._group_codecs:
            return codes
        key = (g, path, str(codes.device))
        if key not in self._decoders:
            self._decoders[key] = StackedDecoder(self._group_codecs[(g, path)], codes.device)
        quant = [to_device(gathered.quant[(g, path, n)], codes.device) if (g, path, n) in gathered.quant else None
                 for n in ("scale", "offset")]
        decoded = self._decoders[key](codes, *quant)
        ok = valid[torch.from_numpy(self._member_index[g]).to(valid.device)]
        zero = torch.zeros((), device=codes.device)
        return torch.where(ok.view(*ok.shape, *([1] * (decoded.ndim - 2))), decoded, zero)

    def _add_logits(self, tb: TeacherBatch, moved: dict[tuple[int, str], torch.Tensor], device: torch.device) -> None:
        """Every logit group scattered at once (``teacher_stacks.stacked_logits``) into one ``[P, B, C]``."""
        if not self._logit_groups:
            return
        means, stds, parts = [], [], []
        for g in self._logit_groups:
            got = {p: moved[(g, p)] for p in self.groups[g].paths}
            if "logits" in got and self.wanted & {"logit_mean", "logit_std"}:
                z = got["logits"].float()
                means.append(z.mean(-1))
                stds.append(z.std(-1, unbiased=True))
            parts.append(stacked_logits(got, self._logit_maps[g]))
        if means:
            tb.logit_mean = Stacked(self._layouts["logit_mean"], means)
            tb.logit_std = Stacked(self._layouts["logit_std"], stds)
        if "logits" not in self.wanted:
            return
        if len(parts) == 1:
            logits, covered = parts[0]
        else:                                     # several logit groups: one [P, B, C] in teacher order
            logits = parts[0][0].new_empty((len(self._layouts["logits"].order), *parts[0][0].shape[1:]))
            covered = parts[0][1].new_empty((logits.shape[0], logits.shape[2]))
            for g, (z, cov) in zip(self._logit_groups, parts):
                rows = self._on(("logit_rows", str(g)), self._logit_rows[g], device)
                logits.index_copy_(0, rows, z)
                covered.index_copy_(0, rows, cov)
        tb.logits = Stacked(self._layouts["logits"], [logits])
        tb.covered = Stacked(self._layouts["covered"], [covered])

    def _on(self, key: tuple[str, ...], tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``tensor`` moved to ``device`` once (static index tensors)."""
        full = (*key, str(device))
        if full not in self._on_device:
            self._on_device[full] = tensor.to(device)
        return self._on_device[full]

    def for_batch(self, batch: dict[str, torch.Tensor], device: Any) -> TeacherBatch:
        """``to_teacher_batch(gather(batch rows, batch views), batch labels, device)`` for a loader batch."""
        gathered = self.gather(batch["row"].numpy(), batch["view"].numpy())
        return self.to_teacher_batch(gathered, batch["label"], device)
