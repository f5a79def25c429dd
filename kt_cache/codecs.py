"""Feature codecs of compact stores (``ktc compact``): the codes, their parameter arrays, encode and decode.

A codec acts on the last axis of ``features [N, V, D]`` or ``featmap [N, V, g, g, D]`` (each vector of ``D``
values; for a featmap, the channels of one grid cell):

- ``fp16``        code = x in float16 (re-encode a float32 array; a float16 array is copied unchanged);
- ``int8``        code = round((x - offset) / scale), int8 in [-127, 127]; -128 marks a missing vector;
- ``pca:K``       code = (x - mean) @ basis.T in float16, ``basis [K, D]`` the top-K principal directions;
- ``pca:K,int8``  both: the K components quantised to int8;
- ``tc:B``        (featmaps only) a transform code of each whole map at B bytes per grid cell: sqrt, a KLT across
                  the cells, a channel PCA, Lloyd-Max quantisers with a bit allocation (``kt_cache.transform_codec``).

Decoding: x_hat = (q * scale[u] + offset[u]) @ basis + mean, ``u = row // unit_rows`` (terms absent for the
codec are skipped). Parameter arrays live at ``teachers/<id>/codec/<output>/``: ``mean [D]`` and ``basis [K, D]``
(one object each), ``scale``/``offset [n_units, W]`` (one object per unit: each unit is quantised with its own
range, so its writer needs nothing from other units), all float32; an extraction-time codec also keeps
``moments [n_units, M]`` (float64), each unit's error sums (``ErrorMeter``). The teacher's
``attrs["ktc_teacher"]["codec"][<output>]`` records the codec, the widths and the measured error
(docs/store-format.md, "Compact stores").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kt_cache.errors import UsageError

MISSING_CODE = -128                    # int8 code of a vector whose image did not decode (float codes: NaN)
QUANT_LEVELS = 127                     # codes -127..127: symmetric around the range's centre
PARAM_DIMS = {"mean": ("dim",), "basis": ("component", "dim"), "scale": ("unit", "code"), "offset": ("unit", "code"),
              "moments": ("unit", "moment")}
COS_BINS_PER_DECADE = 32               # worst-decile cosine from a histogram of -log10(1 - cos) in [0, 9]
COS_BINS = 9 * COS_BINS_PER_DECADE
CODEC_PATTERN = re.compile(r"^(?:(fp16)|(int8)|pca:(D/)?(\d+)(,int8)?|tc:(D/)?(\d+))$")
CODEC_CHOICES = "fp16, int8, pca:K, pca:K,int8 or (featmap) tc:B"


@dataclass(frozen=True)
class Codec:
    """One codec: ``pca`` components kept (None: no projection) and ``int8`` quantisation of the code, or a
    ``transform`` code of whole maps at that many bytes per grid cell. With ``divisor`` the size was asked as
    ``D/divisor`` (``pca:D/4,int8``, ``tc:D/8``) and ``for_width`` makes it concrete for vectors of ``D`` values."""

    pca: int | None = None
    int8: bool = False
    transform: int | None = None
    divisor: int | None = None

    @property
    def name(self) -> str:
        def size(value: int) -> str:
            return f"D/{self.divisor}" if self.divisor else str(value)

        if self.transform is not None:
            return f"tc:{size(self.transform)}"
        if self.pca is None:
            return "int8" if self.int8 else "fp16"
        return f"pca:{size(self.pca)}" + (",int8" if self.int8 else "")

    def for_width(self, dim: int) -> Codec:
        """The concrete codec for vectors of ``dim`` values: K (or B) = max(1, dim // divisor)."""
        if self.divisor is None:
            return self
        size = max(1, dim // self.divisor)
        return Codec(pca=size if self.pca is not None else None, int8=self.int8,
                     transform=size if self.transform is not None else None)

    @property
    def code_dtype(self) -> str:
        return "uint8" if self.transform is not None else "int8" if self.int8 else "float16"

    def code_dim(self, dim: int) -> int:
        return dim if self.pca is None else self.pca

    def param_names(self) -> tuple[str, ...]:
        if self.transform is not None:
            from kt_cache.transform_codec import PARAM_NAMES

            return PARAM_NAMES
        return (("mean", "basis") if self.pca is not None else ()) + (("scale", "offset") if self.int8 else ())

    def code_bytes(self, dim: int) -> int:
        """Bytes of one encoded vector of width ``dim`` (before zstd)."""
        return self.code_dim(dim) * np.dtype(self.code_dtype).itemsize


def code_axis(output: str, whole_maps: bool = False) -> str:
    """Name of a code array's last dimension: ``feature_code``, ``channel_code`` (a map's cells coded one by one)
    or ``map_code`` (``tc``: one code per map). Distinct names: a teacher's features and maps may hold codes of
    different widths, which plain ``xarray.open_zarr`` of its group could not hold on one dimension name (stores
    from before these names call both ``code``)."""
    return "map_code" if whole_maps else "feature_code" if output == "features" else "channel_code"


def parse_codec(text: str, option: str = "--features") -> Codec:
    """``fp16`` | ``int8`` | ``pca:K`` | ``pca:K,int8`` | ``tc:B`` (K, B a number or ``D/N``) -> Codec; anything
    else is a UsageError."""
    match = CODEC_PATTERN.match(str(text).strip().replace(" ", ""))
    if match is None or any(match.group(i) is not None and int(match.group(i)) < 1 for i in (4, 7)):
        raise UsageError(f"{option} {text!r}: not a codec. Expected one of {CODEC_CHOICES}, with K a positive "
                         "number of principal components (e.g. pca:256,int8) and B a positive number of code bytes "
                         "per grid cell (e.g. tc:160, 1/16 of fp16 at 1280 channels); either may be D/N, a fraction "
                         "of each teacher's width (pca:D/4,int8, tc:D/8).")
    if match.group(7) is not None:
        return Codec(transform=int(match.group(7)), divisor=int(match.group(7)) if match.group(6) else None)
    if match.group(4) is not None:
        return Codec(pca=int(match.group(4)), int8=bool(match.group(5)),
                     divisor=int(match.group(4)) if match.group(3) else None)
    return Codec(int8=bool(match.group(2)))


def check_width(codec: Codec, dim: int, option: str, where: str) -> None:
    if codec.pca is not None and codec.pca > dim:
        raise UsageError(f"{option} {codec.name}: {where} has vectors of {dim} values, so at most pca:{dim} "
                         f"components exist. Fix: choose K <= {dim} (K = {max(1, dim // 4)} keeps a quarter).")


@dataclass
class CodecParams:
    """A codec with its parameter arrays (float32): ``mean [D]``, ``basis [K, D]``, ``scale``/``offset
    [n_units, W]`` (row ``r`` uses unit ``r // unit_rows``)."""

    codec: Codec
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    unit_rows: int = 1 << 62

    def unit_quant(self, unit: int) -> CodecParams:
        """The parameters one unit's vectors are encoded with (its own ``scale``/``offset`` row)."""
        arrays = dict(self.arrays)
        if self.codec.int8:
            arrays["scale"], arrays["offset"] = self.arrays["scale"][unit], self.arrays["offset"][unit]
        return CodecParams(self.codec, arrays, self.unit_rows)

    def code_width(self, dim: int) -> int:
        return self.codec.code_dim(dim)

    def code_block(self, unit: int, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One unit's ``block [rows, ..., D]`` -> its codes ``[rows, ..., W]`` and their decoding ``[M, D]``."""
        params = self.unit_quant(unit)
        codes = params.encode(block.reshape(-1, block.shape[-1]))
        return codes.reshape(*block.shape[:-1], -1), params.decode(codes)

    def project(self, x: np.ndarray) -> np.ndarray:
        """float ``[M, D]`` -> the unquantised code ``[M, W]`` (float32)."""
        if self.codec.pca is None:
            return x.astype(np.float32, copy=False)
        return ((x - self.arrays["mean"]) @ self.arrays["basis"].T).astype(np.float32)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float ``[M, D]`` -> codes ``[M, W]`` (int8 or float16); rows holding a non-finite value -> missing."""
        bad = ~np.isfinite(x).all(axis=-1)
        code = self.project(np.where(bad[:, None], 0, x))
        if not self.codec.int8:
            code[bad] = np.nan
            return code.astype(np.float16)
        q = np.rint((code - self.arrays["offset"]) / self.arrays["scale"])
        q = np.clip(q, -QUANT_LEVELS, QUANT_LEVELS).astype(np.int8)
        q[bad] = MISSING_CODE
        return q

    def decode(self, codes: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """codes ``[B, ..., W]`` of store rows ``rows [B]`` (default ``0..B-1``; ignored once ``unit_quant``
        picked one unit) -> float32 ``[B, ..., D]``; missing vectors -> NaN."""
        code = codes.astype(np.float32)
        if self.codec.int8:
            scale, offset = self.arrays["scale"], self.arrays["offset"]
            if scale.ndim == 2:
                units = (np.arange(len(codes)) if rows is None else np.asarray(rows)) // self.unit_rows
                shape = (len(codes), *([1] * (codes.ndim - 2)), scale.shape[-1])
                scale, offset = scale[units].reshape(shape), offset[units].reshape(shape)
            missing = (codes == MISSING_CODE).any(axis=-1)
            code = code * scale + offset
            code[missing] = np.nan
        if self.codec.pca is not None:
            code = code @ self.arrays["basis"] + self.arrays["mean"]
        return code

    def torch_decoder(self, device: Any) -> TorchDecoder:
        return TorchDecoder(self, device)


class TorchDecoder:
    """``decode`` on a torch device: the parameter arrays are moved there once."""

    def __init__(self, params: CodecParams, device: Any) -> None:
        import torch

        self.codec = params.codec
        self.tensors = {name: torch.from_numpy(np.ascontiguousarray(params.arrays[name])).to(device)
                        for name in ("mean", "basis") if name in params.arrays}

    def __call__(self, codes: Any, scale: Any = None, offset: Any = None) -> Any:
        """codes tensor ``[B, ..., W]`` -> float32 ``[B, ..., D]``; missing vectors (code -128 / NaN) -> NaN.
        ``scale``/``offset [B, W]``: the int8 parameters of each row's unit (``CachedTeachers.gather``)."""
        t = self.tensors
        code = codes.float()
        if self.codec.int8:
            shape = (codes.shape[0], *([1] * (codes.ndim - 2)), codes.shape[-1])
            missing = (codes == MISSING_CODE).any(dim=-1, keepdim=True)
            code = (code * scale.reshape(shape) + offset.reshape(shape)).masked_fill(missing, float("nan"))
        if self.codec.pca is not None:
            code = code @ t["basis"] + t["mean"]
        return code


def quant_params(low: np.ndarray, high: np.ndarray) -> dict[str, np.ndarray]:
    """Per-dimension affine int8 parameters covering ``[low, high]`` exactly (nothing is clipped)."""
    offset = (low + high) / 2
    scale = np.maximum((high - low) / (2 * QUANT_LEVELS), np.float32(1e-12))
    return {"scale": scale.astype(np.float32), "offset": offset.astype(np.float32)}


def pca_basis(total: np.ndarray, outer: np.ndarray, count: int, k: int) -> tuple[dict[str, np.ndarray], float]:
    """Mean and top-``k`` principal directions from streamed moments (sum ``[D]``, sum of outer products
    ``[D, D]``, ``count`` vectors), and the fraction of the variance those directions keep."""
    mean = total / max(count, 1)
    cov = outer / max(count, 1) - np.outer(mean, mean)
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(values)[::-1][:k]
    kept = float(values[order].clip(min=0).sum() / max(values.clip(min=0).sum(), 1e-30))
    basis = vectors[:, order].T
    basis *= np.where(basis[np.arange(k), np.abs(basis).argmax(axis=1)] < 0, -1, 1)[:, None]   # sign: deterministic
    return {"mean": mean.astype(np.float32), "basis": basis.astype(np.float32)}, kept


def codec_record(teacher: Any, output: str) -> dict[str, Any] | None:
    """The codec record of ``output`` of a teacher (its ``kt_cache.store.records.TeacherRecord``), or None for an array
    stored plainly (float16/float32)."""
    record = (teacher.codec or {}).get(output)
    return record if isinstance(record, dict) else None


def size_table(vectors: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Bytes (before zstd) of feature-like arrays under each codec family: ``vectors`` maps an array
    (``<teacher>/features`` or ``<teacher>/featmap``) to (number of vectors, width; a featmap's vectors are its
    cells). PCA rows keep a quarter and an eighth of each width; the last row is the sharing setting of
    docs/store-format.md: features ``pca:D/4,int8``, maps ``tc:D/8`` (D/8 bytes per cell, flag bytes left out)."""
    table = {"fp32": 0, "fp16": 0, "int8": 0, "pca:D/4,int8": 0, "pca:D/8,int8": 0, "pca:D/4,int8 + maps tc:D/8": 0}
    for name, (count, dim) in vectors.items():
        table["fp32"] += count * dim * 4
        table["fp16"] += count * dim * 2
        table["int8"] += count * dim
        table["pca:D/4,int8"] += count * max(1, dim // 4)
        table["pca:D/8,int8"] += count * max(1, dim // 8)
        table["pca:D/4,int8 + maps tc:D/8"] += count * max(1, dim // (8 if name.endswith("/featmap") else 4))
    return table


class ErrorMeter:
    """Reconstruction error over vectors ``x`` and their decodings ``x_hat``: cosines (mean, and a histogram of
    ``-log10(1 - cos)`` for the worst decile), squared error, variance, and the decoded vectors' moments.
    ``to_vector``/``add_vector`` keep it as one float64 row (an extraction unit's ``moments``)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.hist = np.zeros(COS_BINS, dtype=np.float64)
        self.cos_sum, self.err, self.count, self.x_sq = 0.0, 0.0, 0.0, 0.0
        self.x_sum, self.dec_sum, self.dec_sq = np.zeros(dim), np.zeros(dim), np.zeros(dim)

    def add(self, x: np.ndarray, decoded: np.ndarray) -> None:
        # a vector stored as missing decodes to NaN (tc: every cell of a map holding any non-finite value)
        keep = np.isfinite(x).all(axis=1) & np.isfinite(decoded).all(axis=1)
        x, xh = x[keep].astype(np.float64), decoded[keep].astype(np.float64)
        cos = cosines(x, xh)
        t = -np.log10(np.maximum(1.0 - cos, 10.0 ** -9))
        self.hist += np.bincount(np.clip((t * COS_BINS_PER_DECADE).astype(np.int64), 0, COS_BINS - 1),
                                 minlength=COS_BINS)
        self.cos_sum += float(cos.sum())
        self.err += float(((x - xh) ** 2).sum())
        self.x_sum += x.sum(axis=0)
        self.x_sq += float((x**2).sum())
        self.dec_sum += xh.sum(axis=0)
        self.dec_sq += (xh**2).sum(axis=0)
        self.count += len(x)

    def to_vector(self) -> np.ndarray:
        head = np.array([self.count, self.cos_sum, self.err, self.x_sq])
        return np.concatenate([head, self.hist, self.x_sum, self.dec_sum, self.dec_sq])

    @staticmethod
    def width(dim: int) -> int:
        return 4 + COS_BINS + 3 * dim

    def add_vector(self, v: np.ndarray) -> None:
        d, b = self.dim, COS_BINS
        self.count += v[0]
        self.cos_sum += v[1]
        self.err += v[2]
        self.x_sq += v[3]
        self.hist += v[4:4 + b]
        self.x_sum += v[4 + b:4 + b + d]
        self.dec_sum += v[4 + b + d:4 + b + 2 * d]
        self.dec_sq += v[4 + b + 2 * d:4 + b + 3 * d]

    def error(self) -> dict[str, Any]:
        """mean cosine, relative MSE (squared error over the vectors' total variance), worst-decile cosine
        (the lower edge of the histogram bin holding the 10th percentile: at most the true value)."""
        n = max(self.count, 1.0)
        variance = self.x_sq - float((self.x_sum**2).sum()) / n
        tenth = int(np.searchsorted(np.cumsum(self.hist), 0.1 * self.count))
        worst = 1.0 - 10.0 ** (-min(tenth, COS_BINS - 1) / COS_BINS_PER_DECADE)
        return {"mean_cosine": round(self.cos_sum / n, 6), "rel_mse": round(self.err / max(variance, 1e-30), 6),
                "worst_decile_cosine": round(worst if tenth else -1.0, 6), "vectors": int(self.count)}

    def decoded_stats(self) -> dict[str, Any]:
        n = max(self.count, 1.0)
        mean = self.dec_sum / n
        std = np.sqrt(np.maximum(self.dec_sq / n - mean**2, 0.0))
        return {"mean": mean.astype(np.float32).tolist(), "std": std.astype(np.float32).tolist(), "count": int(self.count)}


def cosines(x: np.ndarray, xh: np.ndarray) -> np.ndarray:
    """Per-row cosine; 1 where both rows are zero, 0 where only one is."""
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(xh, axis=1)
    both_zero = (np.abs(x).sum(axis=1) == 0) & (np.abs(xh).sum(axis=1) == 0)
    cos = np.where(norms > 0, (x * xh).sum(axis=1) / np.where(norms > 0, norms, 1), 0.0)
    return np.clip(np.where(both_zero, 1.0, cos), -1.0, 1.0)


def encode_unit(x: np.ndarray, codec: Codec, meter: ErrorMeter) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One unit's vectors ``[rows, ..., D]`` -> int8 codes and that unit's ``scale``/``offset`` (from its own
    range; no PCA), measuring the error into ``meter`` (extraction-time codecs)."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float32)
    finite = flat[np.isfinite(flat).all(axis=1)]
    low = finite.min(axis=0) if len(finite) else np.zeros(flat.shape[-1], np.float32)
    high = finite.max(axis=0) if len(finite) else np.zeros(flat.shape[-1], np.float32)
    params = CodecParams(codec, quant_params(low, high))
    codes = params.encode(flat)
    meter.add(flat, params.decode(codes))
    return codes.reshape(*x.shape[:-1], -1), params.arrays
