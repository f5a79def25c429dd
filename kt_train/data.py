"""Training inputs from a ktc store: teacher selection, cached teacher outputs, student views, loaders.

Read path (docs/store-format.md):

- ``CachedTeachers`` holds every array the method needs (pooled features, logits or top-k + LSE,
  ``label_logit``, spatial maps) within ``ram_budget_bytes``: in RAM when they all fit, else the smallest in
  RAM and the rest read in whole row blocks (a unit, or an aligned part of it) through LRU block caches,
  which read each block once per window when rows come from a ``BlockShuffleSampler`` with the same
  ``block_rows`` / ``window_blocks``. A compact store's codes are held as codes and decoded per batch.
- ``StudentViews`` (a picklable ``Dataset`` of numpy arrays, no zarr handle) decodes an image and cuts
  the stored view box with ``kt_cache.views.view_pixels``: the student sees the teachers' pixels.
- The DataLoader yields ``(image, row, view, label)``; the main process then gathers the teachers' rows
  from RAM (``CachedTeachers.gather``, a numpy gather) and builds the ``TeacherBatch``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kt_cache.codecs import MISSING_CODE
from kt_cache.errors import UsageError, did_you_mean
from kt_cache.image_source import open_images
from kt_cache.images import decode_image
from kt_cache.store import StoreReader
from kt_cache.views import INTERPOLATIONS, view_pixels
from kt_train.labels import covered_mask, label_map_for
from kt_train.methods.base import ROLES, TeacherBatch, TeacherInfo, scatter_full_logits, scatter_topk_logits
from kt_train.sampler import BlockCache, BlockShuffleSampler

GiB = 1 << 30
ALL_FIELDS = frozenset({"features", "logits", "featmaps", "label_logit", "lse", "logit_mean", "logit_std"})
TOPK = ("logits_topk/values", "logits_topk/index")


def select_teachers(reader: StoreReader, spec: Iterable[str]) -> list[str]:
    """Teacher ids chosen by ``spec`` (ids, roles or "all"; comma-separated items allowed), in spec order.

    Raises:
        UsageError: an unknown id/role (with a did-you-mean), nothing selected, or an incomplete teacher.
    """
    stored = reader.teacher_ids()
    roles = {tid: str(reader.teacher_attrs(tid).get("role", "predictive")) for tid in stored}
    items = [part.strip() for item in spec for part in str(item).split(",") if part.strip()] or ["all"]
    chosen: list[str] = []
    for item in items:
        ids = _match_item(item, stored, roles, reader.where)
        chosen += [tid for tid in ids if tid not in chosen]
    for tid in chosen:
        _check_complete(reader, tid, [t for t in chosen if t != tid])
    return chosen


def _match_item(item: str, stored: list[str], roles: dict[str, str], where: str) -> list[str]:
    listing = ", ".join(f"{t} ({roles[t]})" for t in stored) or "none"
    if item in roles:
        return [item]
    if item == "all" or item in ROLES:
        ids = [t for t in stored if item == "all" or roles[t] == item]
        if not ids:
            raise UsageError(f"--teachers {item!r}: the store {where} has no {'' if item == 'all' else item + ' '}"
                             f"teacher (stored: {listing}). Fix: pick stored teacher ids or roles.")
        return ids
    hint = did_you_mean(item, [*stored, *ROLES, "all"])
    raise UsageError(f"--teachers: unknown teacher id or role {item!r} for the store {where}.{hint} Stored "
                     f"teachers: {listing}; roles: {', '.join(ROLES)}, or 'all'. Fix: use one of these.")


def _check_complete(reader: StoreReader, tid: str, others: list[str]) -> None:
    done = reader.done(tid)
    if done.all():
        return
    keep = ",".join(others) if others else "<other teacher ids>"
    raise UsageError(
        f"teacher '{tid}' in the store {reader.where} is incomplete: {int(done.sum())}/{done.size} units done, "
        "so some rows hold no outputs. Fix: rerun `ktc extract` with the same manifest to finish it, or "
        f"exclude it with --teachers {keep}.")


class CachedTeachers:
    """The selected teachers' stored outputs, held for cheap per-batch gathers (main process only).

    Args:
        reader: the open store.
        teacher_ids: teachers in run order (from ``select_teachers``).
        needs: ``TeacherBatch`` fields to provide (a method's ``needs``); ``None`` = every field.
        ram_budget_bytes: bounds every array held (features, logits or top-k + LSE, ``label_logit``, maps): when
            all of them fit they are loaded into RAM; otherwise the smallest are loaded while they fit half the
            budget and the rest are read in whole row blocks through ``BlockCache``s whose windows together
            fit the other half (each block is read once per window when rows come from a
            ``BlockShuffleSampler`` with the same ``block_rows`` / ``window_blocks``).
        window_blocks: blocks per shuffle window (give the same to ``make_loader``).
        block_rows: rows per cache block (default: the store's unit, halved until the windows fit the
            budget, never below an inner chunk); give ``self.block_rows`` to ``make_loader``.
    """

    def __init__(self, reader: StoreReader, teacher_ids: Sequence[str], needs: Iterable[str] | None = None,
                 ram_budget_bytes: int = 4 * GiB, window_blocks: int = 8, block_rows: int | None = None) -> None:
        self.ids = tuple(teacher_ids)
        self.wanted = ALL_FIELDS if needs is None else frozenset("featmaps" if n == "featmap" else n for n in needs)
        self.num_classes = len(reader.class_names)
        self.window_blocks, self.block_rows = int(window_blocks), int(reader.meta["unit_rows"])
        self.attrs = {tid: reader.teacher_attrs(tid) for tid in self.ids}
        self.stats = {tid: reader.feature_stats(tid) for tid in self.ids}     # v1 attrs or v2 stats/features
        self.tables: dict[str, dict[str, np.ndarray]] = {tid: {} for tid in self.ids}
        self.label_maps: dict[str, np.ndarray] = {}
        self.caches: dict[tuple[str, str], BlockCache] = {}
        sources: dict[tuple[str, str], Any] = {}
        for tid in self.ids:
            arrays = reader.teacher_arrays(tid)
            paths = self._ram_paths(tid, arrays, reader)
            if "featmaps" in self.wanted and "featmap" in arrays:
                paths.append("featmap")
            sources.update({(tid, path): reader.rows(tid, path) for path in paths})
        self._place(sources, int(ram_budget_bytes), block_rows)
        self.codecs = {(tid, path): params for tid in self.ids for path in ("features", "featmap")
                       if self.holds(tid, path) and (params := reader.codec_params(tid, path)) is not None}
        self._decoders: dict[tuple[str, str, str], Any] = {}

    def holds(self, tid: str, path: str) -> bool:
        """Whether ``path`` of ``tid`` is provided (held in RAM or streamed)."""
        return path in self.tables[tid] or (tid, path) in self.caches

    def _place(self, sources: dict[tuple[str, str], Any], budget: int, block_rows: int | None) -> None:
        """RAM for everything when it fits the budget; else the smallest arrays in half of it, the rest streamed."""
        sizes = {key: int(array.nbytes) for key, array in sources.items()}
        held, used = [], 0
        for key in sorted(sources, key=lambda k: sizes[k]):
            if sum(sizes.values()) <= budget or used + sizes[key] <= budget // 2:
                held.append(key)
                used += sizes[key]
        for tid, path in held:
            self.tables[tid][path] = read_by_units(sources[(tid, path)], self.block_rows)
        streamed = {key: array for key, array in sources.items() if key not in held}
        if streamed:       # half of what is left: a block being read is held twice (decoded chunks, then the copy)
            self._stream(streamed, (budget - used) // 2, block_rows)
        self._windows: list[np.ndarray] = []
        self._window_of: dict[int, int] = {}
        self._ahead = -1

    def _stream(self, arrays: dict[tuple[str, str], Any], budget: int, block_rows: int | None) -> None:
        if block_rows is None:
            row_bytes = sum(int(a.nbytes) // max(1, a.shape[0]) for a in arrays.values())
            floor = max(int(a.chunks[0]) for a in arrays.values())
            block_rows = self.block_rows
            while block_rows > floor and block_rows * row_bytes * 2 * self.window_blocks > budget:
                block_rows //= 2           # two windows: the one in use and the one read ahead
        if block_rows < 1 or self.block_rows % block_rows:
            raise ValueError(f"CachedTeachers: block_rows={block_rows} must divide the store's unit rows "
                             f"({self.block_rows}) so a block never spans two shards")
        from concurrent.futures import ThreadPoolExecutor

        self.block_rows = int(block_rows)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ktc-read-ahead")
        self.caches = {key: BlockCache(a, self.block_rows, 2 * self.window_blocks, self._pool)
                       for key, a in arrays.items()}

    def plan_epoch(self, windows: Sequence[np.ndarray]) -> None:
        """The sampler's block windows of this epoch (``BlockShuffleSampler.windows()``): while a window's rows
        are gathered, the next window's blocks are read in background threads, so a step rarely waits on a read."""
        if not self.caches:
            return
        self._windows = [np.asarray(w) for w in windows]
        self._window_of = {int(b): i for i, w in enumerate(self._windows) for b in w}
        self._ahead = -1
        self._read_ahead(0)

    def _read_ahead(self, window: int) -> None:
        if window > self._ahead and window < len(self._windows):
            for cache in self.caches.values():
                cache.prefetch(self._windows[window])
            self._ahead = window

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
        names, count = self.attrs[tid].get("class_names"), self.attrs[tid].get("num_classes")
        label_map = label_map_for(reader.class_names, names, count)
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
            attrs = self.attrs[tid]
            stats = self.stats[tid] or {}
            has_feat = self.holds(tid, "features")
            mean, std = (torch.tensor(stats[k], dtype=torch.float32) if has_feat and stats.get(k) is not None
                         else None for k in ("mean", "std"))
            infos.append(TeacherInfo(
                id=tid, role=str(attrs.get("role", "predictive")),
                feature_dim=int(attrs["feature_dim"]) if has_feat else None,
                featmap_dim=int(attrs["featmap_dim"]) if self.holds(tid, "featmap") else None,
                has_logits=tid in self.label_maps and "logits" in self.wanted, feature_mean=mean, feature_std=std))
        return tuple(infos)

    def covered(self, tid: str) -> np.ndarray:
        """bool ``[C]``: target classes teacher ``tid`` has logits for."""
        return covered_mask(self.label_maps[tid], self.num_classes)

    def gather(self, rows: np.ndarray, views: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """Stored outputs at ``(rows[b], views[b])``: teacher id -> store path -> ``[B, ...]`` numpy."""
        rows, views = np.asarray(rows, dtype=np.int64), np.asarray(views, dtype=np.int64)
        out = {}
        for tid in self.ids:
            got = {path: table[rows, views] for path, table in self.tables[tid].items()}
            for (owner, path), cache in self.caches.items():
                if owner == tid:
                    got[path] = cache.gather(rows, views)
            for path in ("features", "featmap"):
                params = self.codecs.get((tid, path))
                if params is not None and params.codec.int8:     # each row's unit has its own int8 range
                    for name in ("scale", "offset"):
                        got[f"codec/{path}/{name}"] = params.arrays[name][rows // params.unit_rows]
            out[tid] = got
        self._after_gather(rows)
        return out

    def to_teacher_batch(self, gathered: dict[str, dict[str, np.ndarray]], labels: Any, device: Any) -> TeacherBatch:
        """A ``TeacherBatch`` on ``device`` from ``gather`` output; logits scattered into the target space.

        Args:
            gathered: from ``gather``.
            labels: int ``[B]`` target labels (-1 unknown), or ``None``.
            device: the student's device.
        """
        tb = TeacherBatch(ids=self.ids, roles={t: str(self.attrs[t].get("role", "predictive")) for t in self.ids},
                          valid={}, labels=None if labels is None else torch.as_tensor(labels).long().to(device))
        size = max([len(a) for g in gathered.values() for a in g.values()] + [0 if labels is None else len(labels)])
        for tid in self.ids:
            ok = finite_rows(gathered[tid], size)
            got = {p: zero_invalid(a, ok) for p, a in gathered[tid].items()}
            tb.valid[tid] = torch.from_numpy(ok).to(device)
            for path, table in (("features", tb.features), ("featmap", tb.featmaps)):
                if path in got:
                    table[tid] = self._decoded(tid, path, got, device, tb.valid[tid])
            for path, name in (("logits_lse", "lse"), ("label_logit", "label_logit")):
                if path in got and name in self.wanted:
                    getattr(tb, name)[tid] = _tensor(got[path], device)
            if tid in self.label_maps:
                self._add_logits(tb, tid, got, device)
        return tb

    def _decoded(self, tid: str, path: str, got: dict[str, np.ndarray], device: Any, valid: torch.Tensor) -> torch.Tensor:
        """``got[path]`` on ``device``; a compact store's codes decoded there (``kt_cache.codecs``), invalid rows 0."""
        codes = _tensor(got[path], device)
        if (tid, path) not in self.codecs:
            return codes
        key = (tid, path, str(codes.device))
        if key not in self._decoders:
            self._decoders[key] = self.codecs[(tid, path)].torch_decoder(codes.device)
        quant = [_tensor(got[f"codec/{path}/{n}"], device) if f"codec/{path}/{n}" in got else None
                 for n in ("scale", "offset")]
        decoded = self._decoders[key](codes, *quant)
        return torch.where(valid.view(-1, *([1] * (decoded.ndim - 1))), decoded, torch.zeros((), device=codes.device))

    def _add_logits(self, tb: TeacherBatch, tid: str, got: dict[str, np.ndarray], device: Any) -> None:
        label_map = torch.from_numpy(self.label_maps[tid]).to(device)
        if "logits" in got:
            z = torch.from_numpy(got["logits"]).to(device).float()
            if self.wanted & {"logit_mean", "logit_std"}:
                tb.logit_mean[tid], tb.logit_std[tid] = z.mean(-1), z.std(-1, unbiased=True)
            logits, covered = scatter_full_logits(z, label_map, self.num_classes)
        else:
            values, lse = (torch.from_numpy(got[p]).to(device) for p in (TOPK[0], "logits_lse"))
            index = torch.from_numpy(got[TOPK[1]].astype(np.int64)).to(device)
            logits, covered = scatter_topk_logits(values, index, lse, label_map, self.num_classes)
        if "logits" in self.wanted:
            tb.logits[tid], tb.covered[tid] = logits, covered

    def for_batch(self, batch: dict[str, torch.Tensor], device: Any) -> TeacherBatch:
        """``to_teacher_batch(gather(batch rows, batch views), batch labels, device)`` for a loader batch."""
        gathered = self.gather(batch["row"].numpy(), batch["view"].numpy())
        return self.to_teacher_batch(gathered, batch["label"], device)


def read_by_units(array: Any, unit_rows: int) -> np.ndarray:
    """The whole array, read a unit at a time into one preallocated array: no second full-size copy in flight."""
    out = np.empty(array.shape, dtype=array.dtype)
    for start in range(0, int(array.shape[0]), unit_rows):
        out[start:start + unit_rows] = array[start:start + unit_rows]
    return out


def _tensor(a: np.ndarray, device: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def finite_rows(arrays: dict[str, np.ndarray], size: int) -> np.ndarray:
    """bool ``[size]``: every float value of a row is finite and no int8 code is the missing code
    (``label_logit`` may be NaN and is ignored)."""
    ok = np.ones(size, dtype=bool)
    for path, a in arrays.items():
        if path == "label_logit" or not (np.issubdtype(a.dtype, np.floating) or a.dtype == np.int8):
            continue
        flat = a.reshape(a.shape[0], -1)
        row_ok = (flat != MISSING_CODE).all(axis=1) if a.dtype == np.int8 else np.isfinite(flat).all(axis=1)
        ok &= row_ok
    return ok


def zero_invalid(a: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """``a`` with the rows where ``ok`` is False set to 0, so no NaN of a failed image reaches a method."""
    if ok.all() or not np.issubdtype(a.dtype, np.floating):
        return a
    return np.where(ok.reshape(-1, *([1] * (a.ndim - 1))), a, 0).astype(a.dtype)


class StudentViews(Dataset):
    """Store row -> the student's input for one stored view (``len`` = N; index by store row).

    Args:
        reader: the store (read once here; the dataset holds only numpy arrays, so it pickles).
        input_size: student ``(H, W)``.
        mean, std: student normalisation in 0..1 units (timm's data config).
        interpolation: bilinear | bicubic | nearest | lanczos.
        data_root: dataset root; default the store's ``attrs dataset.root``.
        seed: view-choice seed; the view of ``row`` in epoch ``e`` is drawn from
            ``np.random.default_rng([seed, e, row])``, uniform in ``[0, V)``.
        views_mode: "random", or "center" (always view 0, for evaluation).
    """

    def __init__(self, reader: StoreReader, input_size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear", data_root: str | Path | None = None, seed: int = 0,
                 views_mode: str = "random") -> None:
        if views_mode not in ("random", "center") or interpolation not in INTERPOLATIONS:
            raise UsageError(f"StudentViews: views_mode must be 'random' or 'center' and interpolation one of "
                             f"{INTERPOLATIONS}; got {views_mode!r}, {interpolation!r}")
        samples = reader.samples()
        self.ids = np.array([str(i).encode("utf-8") for i in samples["id"].tolist()], dtype=bytes)  # compact, fork-safe
        self.views = np.asarray(samples["views"], dtype=np.float32)
        self.labels = np.asarray(samples["label"], dtype=np.int64)
        self.ok = np.asarray(samples["ok"], dtype=bool)
        dataset = reader.meta.get("dataset", {})
        recorded = str(dataset.get("root", ""))
        self.data_root = str(data_root if data_root is not None else recorded)
        self.images = open_images(dataset, self.ids, self.data_root)     # a folder, or tar shards by offset
        self.size = (int(input_size[0]), int(input_size[1]))
        self.mean = np.asarray(mean, dtype=np.float32) * 255.0
        self.std = np.asarray(std, dtype=np.float32) * 255.0
        self.interpolation, self.seed, self.views_mode, self.epoch = interpolation, int(seed), views_mode, 0
        check_images_exist(self.images, np.flatnonzero(self.ok), reader.where, recorded)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.ids.size)

    def view_for(self, row: int, epoch: int | None = None) -> int:
        if self.views_mode == "center":
            return 0
        epoch = self.epoch if epoch is None else int(epoch)
        return int(np.random.default_rng([self.seed, epoch, int(row)]).integers(self.views.shape[1]))

    def pixels(self, row: int, view: int) -> torch.Tensor:
        """uint8 ``[3, H, W]``: the stored box ``views[row, view]`` of the decoded image, as the teachers saw it."""
        image = decode_image(self.images.name(row), self.images.read(row))
        box = self.views[row, view]
        return view_pixels(image, box[:4], bool(box[4]), self.size, self.interpolation)

    def __getitem__(self, row: int) -> dict[str, Any]:
        row = int(row)
        view = self.view_for(row)
        x = self.pixels(row, view).float()
        image = (x - torch.from_numpy(self.mean).view(3, 1, 1)) / torch.from_numpy(self.std).view(3, 1, 1)
        return {"image": image, "row": row, "view": view, "label": int(self.labels[row])}


def check_images_exist(images: Any, rows: np.ndarray, where: str, recorded: str) -> None:
    """Raise a ``UsageError`` unless every row's image is there (a file; a member in its shard's index)."""
    missing = images.missing(rows)
    if missing:
        holder = "shards" if images.kind == "shards" else "class folders"
        raise UsageError(
            f"{len(missing)} of {len(rows)} images of the store {where} are missing under the data root {images.root} "
            f"(first: {', '.join(missing[:5])}). Sample ids are paths relative to the dataset root the store was made "
            f"from (recorded: {recorded or 'none'}). Fix: pass --data pointing at that dataset root (the folder "
            f"holding the {holder}), or restore the missing files.")


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Items -> ``image`` float ``[B, 3, H, W]``, ``row`` / ``view`` / ``label`` int64 ``[B]``."""
    return {"image": torch.stack([it["image"] for it in items]),
            **{k: torch.tensor([it[k] for it in items], dtype=torch.int64) for k in ("row", "view", "label")}}


@dataclass
class StudentLoader:
    """A DataLoader over ``StudentViews`` in block-shuffled order; call ``set_epoch`` before each epoch."""

    loader: DataLoader
    sampler: BlockShuffleSampler
    dataset: StudentViews

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def make_loader(dataset: StudentViews, batch_size: int, block_rows: int, window_blocks: int, seed: int = 0,
                mask: np.ndarray | None = None, rank: int = 0, world: int = 1, num_workers: int = 0,
                drop_last: bool = True, multiprocessing_context: str | None = None,
                pin_memory: bool = False) -> StudentLoader:
    """Build the block-shuffled loader (``block_rows``/``window_blocks``: those of ``CachedTeachers``).

    Args:
        mask: optional bool ``[N]`` rows to use (a split); always combined with ``samples/ok``.

    Workers are not persistent, so each epoch's workers see ``set_epoch``; use
    ``multiprocessing_context="spawn"`` (or "forkserver") with remote stores.
    """
    ok = dataset.ok if mask is None else dataset.ok & np.asarray(mask, dtype=bool)
    sampler = BlockShuffleSampler(len(dataset), block_rows, window_blocks, seed, rank, world, ok)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate, drop_last=drop_last, pin_memory=pin_memory,
                        multiprocessing_context=multiprocessing_context if num_workers > 0 else None)
    return StudentLoader(loader, sampler, dataset)
