"""Block-shuffled row order: random whole blocks, rows shuffled inside a window of blocks (docs/store-format.md).

Store rows already follow a seeded random permutation of the dataset, so every block (one store unit =
one shard) is class-mixed. Each epoch this sampler visits the blocks in a random order, groups them into
windows of ``window_blocks`` blocks and shuffles the rows inside each window. A reader that keeps the
blocks of the current window in RAM (``kt_train.data.CachedTeachers``' shard cache) then reads every
block exactly once per epoch, instead of decoding a whole shard for each random row.

DDP: the epoch's global order is padded by repeating its start (like ``DistributedSampler``) to a
multiple of ``world`` and split between the ranks, one of two ways (``split``):

- ``blocks`` (the default): ``world`` contiguous, equal slices; rank ``r`` takes slice ``r``. The global order
  goes window by window, so a slice holds whole windows but for the two at its ends: each rank reads about
  ``1/world`` of the blocks (disjoint but for at most one boundary block shared with each neighbour), which is
  what keeps a streamed store's reads from growing with the number of ranks.
- ``strided``: rank ``r`` takes rows ``r, r + world, …`` (``DistributedSampler``'s split), so the ranks' i-th
  batches together are the i-th batch of one process with ``world`` x the batch: DDP takes exactly that
  process's steps. Every rank then reads every block.

Views (``block_views``): in each epoch every row of a block uses the same stored view, drawn per
``(seed, epoch, block)`` so that each run of V epochs (epochs ``cV … cV+V−1``) shows each block each of its
V views exactly once. A streaming reader then reads one view of a block per epoch, not all V.

``BlockCache`` is the read side: an LRU of whole blocks of one view of one large array (spatial maps).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler


SPLITS = ("blocks", "strided")   # how DDP ranks share an epoch (BlockShuffleSampler)
VIEW_STREAM = 2       # third seed word of the view permutations (the row order uses [seed, e] and [seed, e, 1])


def block_views(seed: int, epoch: int, n_blocks: int, n_views: int) -> np.ndarray:
    """int64 ``[n_blocks]``: the view every row of block ``b`` uses in ``epoch``.

    Epochs come in cycles of ``n_views``; cycle ``c = epoch // n_views`` gives each block its own random
    permutation of the views (row ``b`` of an argsort of ``default_rng([seed, c, VIEW_STREAM]).random((n_blocks,
    n_views))``, so a block's permutation does not depend on how many blocks follow it), and epoch ``cV + i``
    uses entry ``i``: over every cycle each block sees each view exactly once, every view equally often.
    """
    if n_views <= 1:
        return np.zeros(n_blocks, dtype=np.int64)
    cycle, place = divmod(int(epoch), int(n_views))
    keys = np.random.default_rng([int(seed), cycle, VIEW_STREAM]).random((int(n_blocks), int(n_views)))
    return np.argsort(keys, axis=1, kind="stable")[:, place].astype(np.int64)


def touched_bytes(array: Any, rows: slice, view: int | None = None) -> int:
    """Decoded bytes of the inner chunks of ``array [N, V, ...]`` that reading ``array[rows]`` (or one ``view``
    of them) touches: what the codec pipeline fetches and decompresses (chunks clipped to the array's rows)."""
    if hasattr(array, "read_bytes"):
        return int(array.read_bytes(rows, view))
    chunks, n = tuple(int(c) for c in array.chunks), int(array.shape[0])
    start, stop, _ = rows.indices(n)
    if stop <= start:
        return 0
    first, end = (start // chunks[0]) * chunks[0], min(n, -(-stop // chunks[0]) * chunks[0])
    views = int(array.shape[1]) if view is None or len(chunks) < 2 else chunks[1]
    per_row = views * int(np.prod(chunks[2:], dtype=np.int64)) * np.dtype(array.dtype).itemsize
    return int((end - first) * per_row)


class BlockShuffleSampler(Sampler[int]):
    """Yields store row indices, block-shuffled, deterministic per ``(seed, epoch)``.

    Args:
        n_rows: ``N``, rows in the store.
        block_rows: rows per block (the store's ``unit_rows``, or the reader's read block).
        window_blocks: blocks whose rows are shuffled together.
        seed: base seed; the order of epoch ``e`` uses ``np.random.default_rng([seed, e])``.
        rank: this process's DDP rank.
        world: DDP world size.
        ok: optional bool ``[N]``; rows where it is False are never yielded (failed images, other splits).
        split: how the ranks share an epoch: ``blocks`` or ``strided`` (see the module docstring).
    """

    def __init__(self, n_rows: int, block_rows: int, window_blocks: int, seed: int = 0, rank: int = 0,
                 world: int = 1, ok: np.ndarray | None = None, split: str = "blocks") -> None:
        if n_rows < 0 or block_rows < 1 or window_blocks < 1:
            raise ValueError(f"BlockShuffleSampler: need n_rows >= 0, block_rows >= 1, window_blocks >= 1; got "
                             f"n_rows={n_rows}, block_rows={block_rows}, window_blocks={window_blocks}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"BlockShuffleSampler: need 0 <= rank < world, got rank={rank}, world={world}")
        if split not in SPLITS:
            raise ValueError(f"BlockShuffleSampler: split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.split = split
        self.ok = np.ones(n_rows, dtype=bool) if ok is None else np.asarray(ok, dtype=bool)
        if self.ok.shape != (n_rows,):
            raise ValueError(f"BlockShuffleSampler: ok mask has shape {self.ok.shape}, expected ({n_rows},)")
        self.n_rows, self.block_rows, self.window_blocks = int(n_rows), int(block_rows), int(window_blocks)
        self.seed, self.rank, self.world = int(seed), int(rank), int(world)
        self.n_blocks = -(-self.n_rows // self.block_rows)
        self.n_ok = int(self.ok.sum())
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` (call before each epoch, as with ``DistributedSampler``)."""
        self.epoch = int(epoch)

    def global_windows(self, epoch: int | None = None) -> list[np.ndarray]:
        """Block ids of each window of ``epoch`` (default: the current one) for all ranks, in visiting order."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else int(epoch)])
        order = rng.permutation(self.n_blocks)
        return [order[i:i + self.window_blocks] for i in range(0, self.n_blocks, self.window_blocks)]

    def windows(self, epoch: int | None = None) -> list[np.ndarray]:
        """The blocks this rank reads in ``epoch``, per window in visiting order (what a reader reads ahead)."""
        every = self.global_windows(epoch)
        if self.world == 1 or self.split == "strided":
            return every
        touched = np.unique(self.rank_order(epoch) // self.block_rows)
        mine = [w[np.isin(w, touched)] for w in every]
        return [w for w in mine if w.size]

    def global_order(self, epoch: int | None = None) -> np.ndarray:
        """All ok rows of ``epoch`` for every rank, before padding and splitting: int64 ``[n_ok]``."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch, 1])
        parts = []
        for blocks in self.global_windows(epoch):
            rows = np.concatenate([np.arange(b * self.block_rows, min(self.n_rows, (b + 1) * self.block_rows))
                                   for b in blocks])
            rows = rows[self.ok[rows]]
            rng.shuffle(rows)
            parts.append(rows)
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def rank_order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's rows of ``epoch``: int64 ``[len(self)]`` (padded by repeating the global start): slice
        ``rank`` of ``world`` contiguous ones (``split="blocks"``), or rows ``rank, rank + world, …``
        (``split="strided"``)."""
        order = self.global_order(epoch)
        total = len(self) * self.world
        if total > order.size and order.size:
            order = np.concatenate([order, np.resize(order, total - order.size)])
        if self.split == "strided":
            return order[self.rank:total:self.world]
        return order[self.rank * len(self):(self.rank + 1) * len(self)]

    def __len__(self) -> int:
        return -(-self.n_ok // self.world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_order().tolist())


class BlockCache:
    """LRU of row blocks of one view, ``array[b*block_rows:(b+1)*block_rows, v]``, of one large row-chunked array.

    Args:
        array: a zarr (or any ``[rows, view]``-sliceable) array ``[N, V, ...]``.
        block_rows: rows per block; a divisor of the store's unit rows so a block never spans two shards.
        capacity: (block, view) entries kept once used: one sampler window, the one in use (one view per block
            and epoch, see ``block_views``). Blocks read ahead wait in ``pending`` until first used, so with
            read-ahead of the next window two windows are in RAM, never three.
        executor: a ``concurrent.futures`` executor for ``prefetch`` (read-ahead); None reads on demand only.

    ``reads`` counts the entries read, ``bytes_read`` the decoded bytes of the chunks they touched
    (``touched_bytes``), both counted in the calling thread when a read starts.
    """

    def __init__(self, array: Any, block_rows: int, capacity: int, executor: Any = None) -> None:
        self.array, self.block_rows, self.capacity = array, int(block_rows), max(1, int(capacity))
        self.n_rows = int(array.shape[0])
        self.blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.pending: dict[tuple[int, int], Any] = {}   # (block, view) -> Future (main thread only touches it)
        self.executor = executor
        self.reads = self.bytes_read = 0

    def _rows(self, b: int) -> slice:
        return slice(b * self.block_rows, min(self.n_rows, (b + 1) * self.block_rows))

    def _read(self, b: int, v: int) -> np.ndarray:
        return np.asarray(self.array[self._rows(b), v])

    def _count(self, b: int, v: int) -> None:
        self.reads += 1
        self.bytes_read += touched_bytes(self.array, self._rows(b), v)

    def prefetch(self, blocks: Any, views: Any) -> None:
        """Start reading view ``views[i]`` of block ``blocks[i]`` in the background (unless held or on its way)."""
        if self.executor is None:
            return
        for key in zip(map(int, blocks), map(int, views)):
            if key not in self.blocks and key not in self.pending:
                self._count(*key)
                self.pending[key] = self.executor.submit(self._read, *key)

    def block(self, b: int, v: int) -> np.ndarray:
        """View ``v`` of block ``b`` (``[rows, ...]``): held, read ahead (waited for), or read now."""
        key = (b, v)
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return self.blocks[key]
        future = self.pending.pop(key, None)
        if future is None:
            self._count(b, v)
        self.blocks[key] = future.result() if future is not None else self._read(b, v)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
        return self.blocks[key]

    def gather(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        """``array[rows, views]``: ``[B, ...]``; (block, view) pairs visited in order of first use."""
        blocks = rows // self.block_rows
        pairs = blocks * int(self.array.shape[1]) + views
        out = np.empty((rows.size, *self.array.shape[2:]), dtype=self.array.dtype)
        _, first = np.unique(pairs, return_index=True)
        for i in np.sort(first):
            sel = pairs == pairs[i]
            out[sel] = self.block(int(blocks[i]), int(views[i]))[rows[sel] - blocks[i] * self.block_rows]
        return out
