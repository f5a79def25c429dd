"""Block-shuffled row order: random whole blocks, rows shuffled inside a window of blocks (docs/store-format.md).

Store rows already follow a seeded random permutation of the dataset, so every block (one store unit =
one shard) is class-mixed. Each epoch this sampler visits the blocks in a random order, groups them into
windows of ``window_blocks`` blocks and shuffles the rows inside each window. A reader that keeps the
blocks of the current window in RAM (``kt_train.data.CachedTeachers``' shard cache) then reads every
block exactly once per epoch, instead of decoding a whole shard for each random row.

DDP: the epoch's global order is padded by repeating its start (like ``DistributedSampler``) to a
multiple of ``world`` and cut into ``world`` contiguous, equal slices; rank ``r`` takes slice ``r``. A
contiguous slice keeps each rank on its own windows, so each rank reads about ``1/world`` of the blocks.

``BlockCache`` is the read side: an LRU of whole blocks of one large array (spatial maps).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler


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
    """

    def __init__(self, n_rows: int, block_rows: int, window_blocks: int, seed: int = 0, rank: int = 0,
                 world: int = 1, ok: np.ndarray | None = None) -> None:
        if n_rows < 0 or block_rows < 1 or window_blocks < 1:
            raise ValueError(f"BlockShuffleSampler: need n_rows >= 0, block_rows >= 1, window_blocks >= 1; got "
                             f"n_rows={n_rows}, block_rows={block_rows}, window_blocks={window_blocks}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"BlockShuffleSampler: need 0 <= rank < world, got rank={rank}, world={world}")
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

    def windows(self, epoch: int | None = None) -> list[np.ndarray]:
        """Block ids of each window of ``epoch`` (default: the current one), in visiting order."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else int(epoch)])
        order = rng.permutation(self.n_blocks)
        return [order[i:i + self.window_blocks] for i in range(0, self.n_blocks, self.window_blocks)]

    def global_order(self, epoch: int | None = None) -> np.ndarray:
        """All ok rows of ``epoch`` for every rank, before padding and splitting: int64 ``[n_ok]``."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch, 1])
        parts = []
        for blocks in self.windows(epoch):
            rows = np.concatenate([np.arange(b * self.block_rows, min(self.n_rows, (b + 1) * self.block_rows))
                                   for b in blocks])
            rows = rows[self.ok[rows]]
            rng.shuffle(rows)
            parts.append(rows)
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def rank_order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's rows of ``epoch``: int64 ``[len(self)]`` (padded by repeating the global start).

        Strided like ``DistributedSampler``: rank r takes rows r, r+world, … of the global order, so the
        union of the ranks' i-th batches is the i-th batch of a single process with ``world``× the batch
        size (DDP then computes the same steps as one process with the same global batch).
        """
        order = self.global_order(epoch)
        total = len(self) * self.world
        if total > order.size and order.size:
            order = np.concatenate([order, np.resize(order, total - order.size)])
        return order[self.rank:total:self.world]

    def __len__(self) -> int:
        return -(-self.n_ok // self.world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_order().tolist())


class BlockCache:
    """LRU of whole row blocks ``array[b*block_rows:(b+1)*block_rows]`` of one large row-chunked array.

    Args:
        array: a zarr (or any sliceable) array ``[N, V, ...]``.
        block_rows: rows per block; a divisor of the store's unit rows so a block never spans two shards.
        capacity: blocks kept in RAM (two sampler windows when reading ahead: the one in use and the next).
        executor: a ``concurrent.futures`` executor for ``prefetch`` (read-ahead); None reads on demand only.
    """

    def __init__(self, array: Any, block_rows: int, capacity: int, executor: Any = None) -> None:
        self.array, self.block_rows, self.capacity = array, int(block_rows), max(1, int(capacity))
        self.n_rows = int(array.shape[0])
        self.blocks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.pending: dict[int, Any] = {}          # block -> Future of a read ahead (main thread only touches it)
        self.executor = executor
        self.reads = 0

    def _read(self, b: int) -> np.ndarray:
        return np.asarray(self.array[b * self.block_rows:min(self.n_rows, (b + 1) * self.block_rows)])

    def prefetch(self, blocks: Any) -> None:
        """Start reading ``blocks`` in the background (those not held or already on their way)."""
        if self.executor is None:
            return
        for b in map(int, blocks):
            if b not in self.blocks and b not in self.pending:
                self.pending[b] = self.executor.submit(self._read, b)

    def block(self, b: int) -> np.ndarray:
        """Block ``b`` (``[rows, V, ...]``): held, read ahead (waited for), or read whole now."""
        if b in self.blocks:
            self.blocks.move_to_end(b)
            return self.blocks[b]
        future = self.pending.pop(b, None)
        data = future.result() if future is not None else self._read(b)
        self.reads += 1
        self.blocks[b] = data
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
        return data

    def gather(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        """``array[rows, views]``: ``[B, ...]``; blocks visited in order of first use (old window first)."""
        blocks = rows // self.block_rows
        out = np.empty((rows.size, *self.array.shape[2:]), dtype=self.array.dtype)
        _, first = np.unique(blocks, return_index=True)
        for b in blocks[np.sort(first)]:
            sel = blocks == b
            out[sel] = self.block(int(b))[rows[sel] - b * self.block_rows, views[sel]]
        return out
