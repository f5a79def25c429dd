"""Training inputs from a ktc store: teacher selection, cached teacher outputs, student views, loaders.

Read path (docs/store-format.md):

- ``CachedTeachers`` (``kt_train.cached``, imported here) holds every array the method needs (pooled features,
  logits or top-k + LSE, ``label_logit``, spatial maps) within ``ram_budget_bytes``: in RAM when they all fit,
  else the smallest in RAM and the rest read in row blocks (a unit, or an aligned part of it) of one view
  through LRU block caches, which read each block once per window when rows come from a
  ``BlockShuffleSampler`` with the same ``block_rows`` / ``window_blocks``. A compact store's codes are held
  as codes and decoded per batch.
- Views: in each epoch all rows of a block use one stored view (``StudentViews.block_views``, drawn per
  ``(seed, epoch, block)`` by ``kt_train.sampler.block_views``; each block sees each view once per V epochs),
  so a streamed block reads only that view's chunks (new stores chunk one view per inner chunk). Held and
  streamed arrays are gathered at the same ``(row, view)``: the same batches either way.
- ``StudentViews`` (a picklable ``Dataset`` of numpy arrays, no zarr handle) decodes an image and cuts
  the stored view box with ``kt_cache.views.view_pixels``: the student sees the teachers' pixels.
- The DataLoader yields ``(image, row, view, label)``; the main process then gathers the teachers' rows
  from RAM (``CachedTeachers.gather``: one numpy gather per group of equal-shaped teachers) and builds the
  ``TeacherBatch`` (one stacked ``[T, B, ...]`` tensor per group, ``kt_train.teacher_stacks``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kt_cache.errors import UsageError, did_you_mean
from kt_cache.image_source import open_images
from kt_cache.images import decode_image
from kt_cache.store import StoreReader
from kt_cache.views import INTERPOLATIONS, view_pixels
from kt_train.cached import ALL_FIELDS, TOPK, CachedTeachers, GiB
from kt_train.methods.base import ROLES
from kt_train.sampler import BlockShuffleSampler, block_views

__all__ = ["ALL_FIELDS", "GiB", "TOPK", "CachedTeachers", "StudentLoader", "StudentViews", "check_images_exist",
           "collate", "make_loader", "select_teachers"]


def select_teachers(reader: StoreReader, spec: Iterable[str]) -> list[str]:
    """Teacher ids chosen by ``spec`` (ids, roles or "all"; comma-separated items allowed), in spec order.

    Raises:
        UsageError: an unknown id/role (with a did-you-mean), nothing selected, or an incomplete teacher.
    """
    stored = reader.teacher_ids()
    items = [part.strip() for item in spec for part in str(item).split(",") if part.strip()] or ["all"]
    chosen: list[str] = []
    for item in items:
        ids = [item] if item in stored else _match_role(item, stored, reader)
        chosen += [tid for tid in ids if tid not in chosen]
    reader.open_teachers(chosen)             # concurrently: one metadata read each
    for tid in chosen:
        _check_complete(reader, tid, [t for t in chosen if t != tid])
    return chosen


def _match_role(item: str, stored: list[str], reader: StoreReader) -> list[str]:
    """The teachers ``item`` (a role or "all") names; a store lists ids without roles, so the roles (each
    teacher's metadata) are read only here, never for a selection by id."""
    reader.open_teachers(stored)
    roles = {tid: reader.teacher_record(tid).role for tid in stored}
    listing = ", ".join(f"{t} ({roles[t]})" for t in stored) or "none"
    if item == "all" or item in ROLES:
        ids = [t for t in stored if item == "all" or roles[t] == item]
        if not ids:
            raise UsageError(f"--teachers {item!r}: the store {reader.where} has no "
                             f"{'' if item == 'all' else item + ' '}teacher (stored: {listing}). Fix: pick stored "
                             "teacher ids or roles.")
        return ids
    hint = did_you_mean(item, [*stored, *ROLES, "all"])
    raise UsageError(f"--teachers: unknown teacher id or role {item!r} for the store {reader.where}.{hint} Stored "
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


class StudentViews(Dataset):
    """Store row -> the student's input for one stored view (``len`` = N; index by store row).

    Args:
        reader: the store (read once here; the dataset holds only numpy arrays, so it pickles).
        input_size: student ``(H, W)``.
        mean, std: student normalisation in 0..1 units (timm's data config).
        interpolation: bilinear | bicubic | nearest | lanczos.
        data_root: dataset root; default the store's ``attrs dataset.root``.
        seed: view-choice seed; in epoch ``e`` every row of a block (``block_rows`` rows: the reader's block, set
            by ``make_loader``; default the store's unit) uses the view ``sampler.block_views(seed, e, ...)[block]``,
            so each block shows each view once per ``V`` epochs and a streaming reader reads one view per block.
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
        dataset = reader.meta.dataset
        recorded = str(dataset.get("root", ""))
        self.data_root = str(data_root if data_root is not None else recorded)
        self.images = open_images(dataset, self.ids, self.data_root)     # a folder, or tar shards by offset
        self.size = (int(input_size[0]), int(input_size[1]))
        self.mean = np.asarray(mean, dtype=np.float32) * 255.0
        self.std = np.asarray(std, dtype=np.float32) * 255.0
        self.interpolation, self.seed, self.views_mode, self.epoch = interpolation, int(seed), views_mode, 0
        self.set_view_blocks(reader.meta.unit_rows)
        check_images_exist(self.images, np.flatnonzero(self.ok), reader.where, recorded)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_view_blocks(self, block_rows: int) -> None:
        """Rows that share a view in an epoch: the blocks of the sampler and the streaming reader."""
        self.block_rows, self._assigned = int(block_rows), (-1, np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.ids.size)

    def block_views(self, epoch: int | None = None) -> np.ndarray:
        """int64 ``[n_blocks]``: the view of every block in ``epoch`` (default the current one); 0 when "center"."""
        epoch = self.epoch if epoch is None else int(epoch)
        n_blocks = -(-len(self) // self.block_rows)
        if self.views_mode == "center":
            return np.zeros(n_blocks, dtype=np.int64)
        if self._assigned[0] != epoch:        # once per epoch (and per worker): __getitem__ asks it per row
            self._assigned = (epoch, block_views(self.seed, epoch, n_blocks, self.views.shape[1]))
        return self._assigned[1]

    def view_for(self, row: int, epoch: int | None = None) -> int:
        return int(self.block_views(epoch)[int(row) // self.block_rows])

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

    def block_views(self) -> np.ndarray:
        """The view of every sampler block this epoch (give it to ``CachedTeachers.plan_epoch``)."""
        return self.dataset.block_views()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def make_loader(dataset: StudentViews, batch_size: int, block_rows: int, window_blocks: int, seed: int = 0,
                mask: np.ndarray | None = None, rank: int = 0, world: int = 1, split: str = "blocks", num_workers: int = 0,
                drop_last: bool = True, multiprocessing_context: str | None = None,
                pin_memory: bool = False) -> StudentLoader:
    """Build the block-shuffled loader (``block_rows``/``window_blocks``: those of ``CachedTeachers``).

    Args:
        mask: optional bool ``[N]`` rows to use (a split); always combined with ``samples/ok``.
        split: how DDP ranks share an epoch (``BlockShuffleSampler``): ``blocks`` or ``strided``.

    Workers are not persistent, so each epoch's workers see ``set_epoch``; use
    ``multiprocessing_context="spawn"`` (or "forkserver") with remote stores.
    """
    ok = dataset.ok if mask is None else dataset.ok & np.asarray(mask, dtype=bool)
    dataset.set_view_blocks(block_rows)       # a block's rows share a view, so a streamed block reads one
    sampler = BlockShuffleSampler(len(dataset), block_rows, window_blocks, seed, rank, world, ok, split)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate, drop_last=drop_last, pin_memory=pin_memory,
                        multiprocessing_context=multiprocessing_context if num_workers > 0 else None)
    return StudentLoader(loader, sampler, dataset)
