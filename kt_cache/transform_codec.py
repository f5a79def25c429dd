"""The transform codec ``tc:B`` of spatial maps (``ktc compact --featmap tc:B``): B code bytes per grid cell.

One stored map ``M [cells, C]`` (a view's ``featmap [g, g, C]``, cells = g * g) is coded as a whole:

1. ``S = sign(M) sqrt(|M|)``: activations are heavy-tailed; their roots are closer to Gaussian.
2. ``Y = spatial^T (S - mean) basis^T``, ``[cells, K]``: a KLT across the cells (``spatial [cells, cells]``),
   then one channel PCA shared by every cell (``basis [K, C]``). Both are orthonormal, so an error in ``Y``
   is the same error in ``S``.
3. Coded coefficient ``i`` (flat position ``coef_i`` in ``Y``, ``depth_i`` in 1..7 bits) is stored as the
   index of the nearest of its ``2**depth_i`` Lloyd-Max levels (``levels[i]``, in units of its spread
   ``spread_i``). Every other coefficient decodes as 0, its mean.

Decode: ``Y_hat[coef_i] = levels[i, index_i] * spread_i``, ``S_hat = spatial (Y_hat basis) + mean``,
``M_hat = clip(S_hat |S_hat|, low, high)`` per channel (the fitted maps' range: a ReLU map stays >= 0).

The code of one map is ``uint8 [1 + ceil(sum(depth) / 8)]``: byte 0 is 0 (``MISSING_FLAG`` 255, the array's
fill value, marks a map whose image did not decode), then the indices bit-packed most significant bit first,
coefficients in parameter order (deepest first). The length is the same for every map, at most B x cells.

Fit (``fit_transform``, streamed over the maps in two passes): the moments (mean, the cells x cells and C x C
covariances, the range), then each coefficient's variance and a sample of at most ``FIT_MAPS`` maps spread
evenly over the rows; Lloyd-Max quantisers of 1..7 bits (Lloyd 1982, Max 1960) on the sample for the
``CANDIDATES`` coefficients of largest variance; then a Lagrangian bit allocation (minimise
``sum_i err_i(depth_i) + lambda * depth_i``, lambda bisected to the largest total that fits the budget), as in
transform coding (Goyal, "Theoretical foundations of transform coding", IEEE SP Magazine 2001).

Parameter arrays (float32) at ``teachers/<id>/codec/featmap/``: ``mean [cells, C]``, ``spatial [cells, cells]``,
``basis [K, C]``, ``coef``, ``depth``, ``spread [n]``, ``levels [n, 128]`` (row i uses its first ``2**depth_i``),
``low``, ``high [C]``. Measurements: docs/benchmarks.md ("Feature-map codecs").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kt_cache.codecs import Codec

MISSING_FLAG = 255
MAX_BITS = 7
LEVELS = 1 << MAX_BITS
FIT_MAPS = 2048            # maps the quantisers are fitted on (Lloyd-Max holds them sorted, per coefficient)
CANDIDATES = 16000         # coefficients of largest variance offered bits (~11 000 get some at 192 B/cell)
LLOYD_ITERATIONS = 25
COLUMN_CHUNK = 2048        # coefficients fitted at once: bounds the sorted copies to ~100 MB
SPAN = 1e4                 # column j of a matrix is shifted by j * SPAN so one sorted flat array holds all columns
PARAM_NAMES = ("mean", "spatial", "basis", "coef", "depth", "spread", "levels", "low", "high")
PARAM_DIMS = {"mean": ("cell", "channel"), "spatial": ("cell", "cell_component"), "basis": ("component", "channel"),
              "coef": ("coefficient",), "depth": ("coefficient",), "spread": ("coefficient",),
              "levels": ("coefficient", "level"), "low": ("channel",), "high": ("channel",)}


def signed_sqrt(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.sqrt(np.abs(x))


def principal_axes(cov: np.ndarray) -> np.ndarray:
    """Eigenvectors of a symmetric ``cov [D, D]`` as rows, strongest first, each with a deterministic sign."""
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    axes = vectors[:, np.argsort(values)[::-1]].T
    return axes * np.where(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)] < 0, -1, 1)[:, None]


# ------------------------------------------------------------------------------------------------ Lloyd-Max

class SortedColumns:
    """The columns of ``values [m, n]``, each sorted, with what Lloyd-Max iterations need of them: how many
    values of each column lie at or below a threshold (one ``searchsorted`` over one flat array where column j
    is shifted by j * SPAN), and running sums to total any run of a column."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = np.sort(np.clip(values, -SPAN / 4, SPAN / 4).astype(np.float64), axis=0)
        self.m, self.n = self.values.shape
        self.shift = np.arange(self.n) * SPAN
        self.flat = (self.values + self.shift).T.ravel()
        zeros = np.zeros((1, self.n))
        self.sum1 = np.concatenate([zeros, np.cumsum(self.values, axis=0)])
        self.sum2 = np.concatenate([zeros, np.cumsum(self.values ** 2, axis=0)])

    def cells(self, boundaries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Count, sum and sum of squares of each column's values between ``boundaries [L-1, n]``; ``[L, n]``."""
        below = np.searchsorted(self.flat, (boundaries + self.shift).T.ravel(), side="right")
        below = below.reshape(self.n, -1).T - np.arange(self.n) * self.m
        edges = np.concatenate([np.zeros((1, self.n), np.int64), below, np.full((1, self.n), self.m)])
        cols = np.arange(self.n)
        sums = [s[edges[1:], cols] - s[edges[:-1], cols] for s in (self.sum1, self.sum2)]
        return np.diff(edges, axis=0), sums[0], sums[1]


def midpoints(levels: np.ndarray) -> np.ndarray:
    return (levels[1:] + levels[:-1]) / 2


def lloyd_max(columns: SortedColumns, bits: int, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column, its ``2**bits`` Lloyd-Max levels ``[L, n]`` (started at its quantiles, ascending) and the
    mean squared error they leave ``[n]``."""
    count = 1 << bits
    levels = columns.values[((np.arange(count) + 0.5) * columns.m / count).astype(np.int64)]
    for _ in range(iterations):
        counts, sums, _ = columns.cells(midpoints(levels))
        # an empty cell keeps its level; sorting keeps the boundaries ascending
        moved = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), levels), axis=0)
        if np.array_equal(moved, levels):           # a fixed point: more iterations would change nothing
            break
        levels = moved
    counts, sums, squares = columns.cells(midpoints(levels))
    mse = (squares - 2 * levels * sums + counts * levels ** 2).sum(0) / columns.m
    return levels.astype(np.float32), np.maximum(mse, 0)


def nearest_level(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index ``[M, n]`` of the nearest of each column's ascending ``levels [L, n]`` to ``values [M, n]``."""
    boundaries = midpoints(levels.astype(np.float64))
    n = values.shape[1]
    shift = np.arange(n) * SPAN
    flat = (boundaries + shift).T.ravel()
    inside = np.clip(values, -SPAN / 2 + 1, SPAN / 2 - 1) + shift       # an outlier stays in its own column
    return (np.searchsorted(flat, inside, side="left") - np.arange(n) * len(boundaries)).astype(np.int64)


def fit_quantisers(standardised: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Levels per depth (``levels[d] [2**d, n]``, d = 1..7; index 0 unused) and the squared error of each
    depth ``[MAX_BITS + 1, n]`` (depth 0: the coefficient decodes as 0), in units of the columns."""
    levels: list[np.ndarray] = [np.zeros((1, standardised.shape[1]), np.float32)]
    levels += [np.zeros((1 << d, standardised.shape[1]), np.float32) for d in range(1, MAX_BITS + 1)]
    error = np.zeros((MAX_BITS + 1, standardised.shape[1]))
    for start in range(0, standardised.shape[1], COLUMN_CHUNK):
        cols = slice(start, start + COLUMN_CHUNK)
        columns = SortedColumns(standardised[:, cols])
        error[0, cols] = np.mean(columns.values ** 2, axis=0)
        for depth in range(1, MAX_BITS + 1):
            levels[depth][:, cols], error[depth, cols] = lloyd_max(columns, depth, LLOYD_ITERATIONS)
    return levels, error


def allocate(error: np.ndarray, budget_bits: int) -> np.ndarray:
    """Depth ``[n]`` of each coefficient: ``argmin_d error[d] + lambda * d`` with the smallest lambda whose
    total stays within ``budget_bits``."""
    depth = np.arange(error.shape[0])[:, None]
    low, high = 0.0, float(error[0].max()) + 1.0     # at lambda above the largest error no coefficient pays a bit
    for _ in range(60):
        lam = (low + high) / 2
        low, high = (lam, high) if np.argmin(error + lam * depth, axis=0).sum() > budget_bits else (low, lam)
    return np.argmin(error + high * depth, axis=0)


# ------------------------------------------------------------------------------------------------ fitting

class MapMoments:
    """First pass: the moments of ``S = signed_sqrt(M)`` over maps ``[M, cells, C]`` (shifted by the first
    block's mean, so a large mean does not cancel the spread), and each channel's range."""

    def __init__(self, cells: int, channels: int) -> None:
        self.ref: np.ndarray | None = None
        self.total, self.count = np.zeros((cells, channels)), 0
        self.channel, self.spatial = np.zeros((channels, channels)), np.zeros((cells, cells))
        self.low, self.high = np.full(channels, np.inf), np.full(channels, -np.inf)

    def add(self, maps: np.ndarray) -> None:
        if not len(maps):
            return
        self.low, self.high = np.minimum(self.low, maps.min((0, 1))), np.maximum(self.high, maps.max((0, 1)))
        roots = signed_sqrt(maps)
        self.ref = roots.mean(0) if self.ref is None else self.ref
        shifted = roots - self.ref
        self.total += shifted.sum(0)
        flat = shifted.reshape(-1, shifted.shape[-1])
        self.channel += (flat.T @ flat).astype(np.float64)
        self.spatial += np.tensordot(shifted, shifted, axes=([0, 2], [0, 2])).astype(np.float64)
        self.count += len(maps)

    def transforms(self) -> dict[str, np.ndarray]:
        """mean ``[cells, C]``, spatial ``[cells, cells]`` (columns: the cells' KLT axes), basis ``[C, C]``,
        low/high ``[C]``, from the cell-wise centred covariances."""
        drift = self.total / max(self.count, 1)                     # the true mean minus the reference
        channel = self.channel - self.count * drift.T @ drift
        spatial = self.spatial - self.count * drift @ drift.T
        ref = self.ref if self.ref is not None else 0.0
        return {"mean": (ref + drift).astype(np.float32), "spatial": principal_axes(spatial).T.astype(np.float32),
                "basis": principal_axes(channel).astype(np.float32),
                "low": np.where(np.isfinite(self.low), self.low, 0).astype(np.float32),
                "high": np.where(np.isfinite(self.high), self.high, 0).astype(np.float32)}


def coefficients(maps: np.ndarray, mean: np.ndarray, spatial: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``[M, cells, C]`` -> ``Y [M, cells * K]`` (step 2 of the module docstring)."""
    turned = np.einsum("ij,mic->mjc", spatial, signed_sqrt(maps) - mean, optimize=True)
    return (turned @ basis.T).reshape(len(maps), -1)


@dataclass
class TransformFit:
    """What a fit learnt before its allocation: the transforms, each coefficient's spread, the candidates'
    quantisers and errors. ``params(bytes_per_cell)`` allocates bits and returns the codec's parameters."""

    transforms: dict[str, np.ndarray]
    spread: np.ndarray                 # [cells * C] spread of each coefficient
    candidates: np.ndarray             # [n] flat positions offered bits, largest spread first
    levels: list[np.ndarray]           # per depth [2**d, n], in units of the spread
    error: np.ndarray                  # [MAX_BITS + 1, n] squared error in coefficient units

    def params(self, bytes_per_cell: int) -> TransformParams:
        cells, channels = self.transforms["mean"].shape
        depth = allocate(self.error, (bytes_per_cell * cells - 1) * 8)      # byte 0 is the missing flag
        coded = np.nonzero(depth)[0]
        coded = coded[np.lexsort((self.candidates[coded], -depth[coded]))]  # deepest first, then by position
        position = self.candidates[coded]
        used = np.unique(position % channels)                               # channel components any cell keeps
        rank = np.searchsorted(used, position % channels)
        levels = np.zeros((len(coded), LEVELS), np.float32)
        for d in range(1, MAX_BITS + 1):
            chosen = depth[coded] == d
            levels[chosen, :1 << d] = self.levels[d][:, coded[chosen]].T
        arrays = {**self.transforms, "basis": self.transforms["basis"][used],
                  "coef": (position // channels * len(used) + rank).astype(np.float32),
                  "depth": depth[coded].astype(np.float32), "spread": self.spread[position].astype(np.float32),
                  "levels": levels}
        return TransformParams(arrays, Codec(transform=bytes_per_cell))


def evenly_spread(start: int, count: int, total: int, wanted: int) -> np.ndarray:
    """bool ``[count]``: which of maps ``start .. start + count - 1`` (of ``total``) belong to ``wanted`` maps
    spread evenly over all of them (every map when ``total <= wanted``)."""
    index = np.arange(start, start + count, dtype=np.int64)
    return (index * wanted) // total != ((index + 1) * wanted) // total if total > wanted else np.ones(count, bool)


def fit_transform(blocks: Callable[[], Iterable[np.ndarray]]) -> TransformFit | None:
    """Fit on the finite maps ``[M, cells, C]`` that ``blocks()`` yields (called twice: two passes); None when
    it yields none."""
    moments: MapMoments | None = None
    for maps in blocks():
        moments = moments or MapMoments(maps.shape[1], maps.shape[2])
        moments.add(maps)
    if moments is None or not moments.count:
        return None
    transforms = moments.transforms()
    squares, seen, sample = 0.0, 0, []
    for maps in blocks():
        y = coefficients(maps, transforms["mean"], transforms["spatial"], transforms["basis"])
        squares = squares + (y.astype(np.float64) ** 2).sum(0)
        sample.append(y[evenly_spread(seen, len(maps), moments.count, FIT_MAPS)])
        seen += len(maps)
    spread = np.sqrt(squares / seen) + 1e-12
    candidates = np.argsort(spread, kind="stable")[::-1][:CANDIDATES]
    standardised = np.concatenate(sample)[:, candidates] / spread[candidates]
    levels, error = fit_quantisers(standardised)
    return TransformFit(transforms, spread, candidates, levels, error * spread[candidates] ** 2)


# ------------------------------------------------------------------------------------------------ coding

class TransformParams:
    """The parameters of one fitted ``tc`` codec (``arrays``: ``PARAM_NAMES``, float32) and its coding."""

    def __init__(self, arrays: dict[str, np.ndarray], codec: Codec) -> None:
        self.codec = codec
        self.arrays = {name: np.asarray(arrays[name], dtype=np.float32) for name in PARAM_NAMES}
        self.depth = self.arrays["depth"].astype(np.int64)
        self.coef = self.arrays["coef"].astype(np.int64)
        self.groups = [(d, np.nonzero(self.depth == d)[0]) for d in range(MAX_BITS, 0, -1) if (self.depth == d).any()]
        cells, k = len(self.arrays["spatial"]), len(self.arrays["basis"])
        # components each spatial row codes are a prefix in practice (both transforms order by variance): decode
        # multiplies only that prefix by the basis, about half of the products at 16 cells
        self.prefix = [int((self.coef[self.coef // k == row] % k).max(initial=-1)) + 1 for row in range(cells)]
        self._torch: dict[str, dict[str, torch.Tensor]] = {}

    def problem(self, code_width: int) -> str | None:
        """What makes these parameters unable to decode codes of ``code_width`` bytes (a damaged store), or None."""
        a, cells, k = self.arrays, len(self.arrays["spatial"]), len(self.arrays["basis"])
        if not all(np.array_equal(a[n], np.round(a[n])) for n in ("coef", "depth")):
            return "coef and depth must hold whole numbers"
        if len(self.coef) and (self.coef.min() < 0 or self.coef.max() >= cells * k):
            return (f"coef must index the {cells} x {k} coefficients, got values in "
                    f"[{self.coef.min()}, {self.coef.max()}]")
        if len(self.depth) and (self.depth.min() < 1 or self.depth.max() > MAX_BITS):
            return f"depth must be 1..{MAX_BITS} bits, got values in [{self.depth.min()}, {self.depth.max()}]"
        if self.code_bytes != code_width:
            return (f"depth adds up to {self.bits} bits, a code of {self.code_bytes} bytes, but the codes have "
                    f"{code_width}")
        return None

    @property
    def bits(self) -> int:
        return int(self.depth.sum())

    @property
    def code_bytes(self) -> int:
        """Bytes of one map's code: the flag byte and the packed indices."""
        return 1 + -(-self.bits // 8)

    def code_width(self, dim: int) -> int:
        return self.code_bytes

    def code_block(self, unit: int, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``featmap [rows, V, g, g, C]`` -> codes ``uint8 [rows, V, code_bytes]`` and their decoding."""
        codes = self.encode(block.reshape(-1, self.arrays["mean"].shape[0], block.shape[-1]))
        return codes.reshape(*block.shape[:2], -1), self.decode(codes)

    def encode(self, maps: np.ndarray) -> np.ndarray:
        """``[M, cells, C]`` -> ``uint8 [M, code_bytes]``; a map holding a non-finite value -> missing."""
        bad = ~np.isfinite(maps).all(axis=(1, 2))
        a = self.arrays
        y = coefficients(np.where(bad[:, None, None], 0, maps), a["mean"], a["spatial"], a["basis"])
        standardised = y[:, self.coef] / a["spread"]
        fields = []
        for d, members in self.groups:
            index = nearest_level(standardised[:, members], a["levels"][members, :1 << d].T)
            fields.append(((index[:, :, None] >> np.arange(d - 1, -1, -1)) & 1).reshape(len(maps), -1))
        packed = np.packbits(np.concatenate(fields, axis=1).astype(np.uint8), axis=1) if fields \
            else np.zeros((len(maps), 0), np.uint8)
        packed[bad] = 0                                   # a missing map's code is the flag alone
        flag = np.where(bad, MISSING_FLAG, 0).astype(np.uint8)[:, None]
        return np.concatenate([flag, packed], axis=1)

    def decode(self, codes: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """``uint8 [..., code_bytes]`` -> float32 ``[..., g, g, C]``; a missing map -> NaN (``rows``: unused,
        as ``CodecParams.decode``: a ``tc`` code needs nothing per unit)."""
        return self.torch_decode(torch.from_numpy(np.ascontiguousarray(codes))).numpy()

    def tensors(self, device: Any) -> dict[str, torch.Tensor]:
        key = str(device)
        if key not in self._torch:
            self._torch[key] = {name: torch.from_numpy(v).to(device) for name, v in self.arrays.items()}
            self._torch[key]["coef"] = torch.from_numpy(self.coef).to(device)
            self._torch[key]["flat_level"] = (torch.arange(len(self.coef)) * LEVELS).to(device)
        return self._torch[key]

    def torch_decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``uint8 [..., code_bytes]`` on any device -> float32 ``[..., g, g, C]`` there; missing -> NaN."""
        t, lead = self.tensors(codes.device), codes.shape[:-1]
        flat = codes.reshape(-1, codes.shape[-1])
        shifts = torch.arange(7, -1, -1, device=codes.device, dtype=torch.uint8)
        bits = ((flat[:, 1:, None] >> shifts) & 1).reshape(len(flat), -1)
        index, start = torch.empty((len(flat), len(self.coef)), dtype=torch.int64, device=codes.device), 0
        for d, members in self.groups:
            field = bits[:, start:start + d * len(members)].reshape(len(flat), len(members), d).long()
            index[:, members] = (field << torch.arange(d - 1, -1, -1, device=codes.device)).sum(-1)
            start += d * len(members)
        cells, channels = t["mean"].shape
        y = torch.zeros((len(flat), cells * len(t["basis"])), device=codes.device)
        y[:, t["coef"]] = t["levels"].reshape(-1)[t["flat_level"] + index] * t["spread"]
        y = y.reshape(len(flat), cells, len(t["basis"]))
        rows = torch.zeros((len(flat), cells, channels), device=codes.device)
        for row, width in enumerate(self.prefix):
            if width:
                rows[:, row] = y[:, row, :width] @ t["basis"][:width]
        roots = torch.einsum("ij,mjc->mic", t["spatial"], rows) + t["mean"]
        maps = torch.clamp(roots * roots.abs(), t["low"], t["high"])
        maps = maps.masked_fill((flat[:, 0] == MISSING_FLAG)[:, None, None], float("nan"))
        grid = math.isqrt(cells)                          # featmaps are square: ``featmap_grid`` x ``featmap_grid``
        return maps.reshape(*lead, grid, cells // grid, channels)
