"""Feature codecs of compact stores (``ktc compact``): the codes, their parameter arrays, encode and decode.

A codec acts on the last axis of ``features [N, V, D]`` or ``featmap [N, V, g, g, D]`` (each vector of ``D``
values; for a featmap, the channels of one grid cell):

- ``fp16``        code = x in float16 (re-encode a float32 array; a float16 array is copied unchanged);
- ``int8``        code = round((x - offset) / scale), int8 in [-127, 127]; -128 marks a missing vector;
- ``pca:K``       code = (x - mean) @ basis.T in float16, ``basis [K, D]`` the top-K principal directions;
- ``pca:K,int8``  both: the K components quantised to int8.

Decoding: x_hat = (q * scale + offset) @ basis + mean (terms absent for the codec are skipped). Parameter
arrays live at ``teachers/<id>/codec/<output>/{mean,basis,scale,offset}`` (float32), and the teacher's
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
PARAM_DIMS = {"mean": ("dim",), "basis": ("component", "dim"), "scale": ("code",), "offset": ("code",)}
CODEC_PATTERN = re.compile(r"^(?:(fp16)|(int8)|pca:(\d+)(,int8)?)$")


@dataclass(frozen=True)
class Codec:
    """One codec: ``pca`` components kept (None: no projection) and ``int8`` quantisation of the code."""

    pca: int | None = None
    int8: bool = False

    @property
    def name(self) -> str:
        if self.pca is None:
            return "int8" if self.int8 else "fp16"
        return f"pca:{self.pca}" + (",int8" if self.int8 else "")

    @property
    def code_dtype(self) -> str:
        return "int8" if self.int8 else "float16"

    def code_dim(self, dim: int) -> int:
        return dim if self.pca is None else self.pca

    def param_names(self) -> tuple[str, ...]:
        return (("mean", "basis") if self.pca is not None else ()) + (("scale", "offset") if self.int8 else ())

    def code_bytes(self, dim: int) -> int:
        """Bytes of one encoded vector of width ``dim`` (before zstd)."""
        return self.code_dim(dim) * np.dtype(self.code_dtype).itemsize


def parse_codec(text: str, option: str = "--features") -> Codec:
    """``fp16`` | ``int8`` | ``pca:K`` | ``pca:K,int8`` -> Codec; anything else is a UsageError saying so."""
    match = CODEC_PATTERN.match(str(text).strip().replace(" ", ""))
    if match is None or (match.group(3) is not None and int(match.group(3)) < 1):
        raise UsageError(f"{option} {text!r}: not a codec. Expected one of fp16, int8, pca:K or pca:K,int8 with K "
                         "a positive number of principal components (e.g. pca:256,int8).")
    if match.group(3) is not None:
        return Codec(pca=int(match.group(3)), int8=bool(match.group(4)))
    return Codec(int8=bool(match.group(2)))


def check_width(codec: Codec, dim: int, option: str, where: str) -> None:
    if codec.pca is not None and codec.pca > dim:
        raise UsageError(f"{option} {codec.name}: {where} has vectors of {dim} values, so at most pca:{dim} "
                         f"components exist. Fix: choose K <= {dim} (K = {max(1, dim // 4)} keeps a quarter).")


@dataclass
class CodecParams:
    """A codec with its parameter arrays (float32): ``mean [D]``, ``basis [K, D]``, ``scale``/``offset [W]``."""

    codec: Codec
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

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

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes ``[..., W]`` -> float32 ``[..., D]``; missing vectors -> NaN."""
        code = codes.astype(np.float32)
        if self.codec.int8:
            missing = (codes == MISSING_CODE).any(axis=-1)
            code = code * self.arrays["scale"] + self.arrays["offset"]
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
        self.tensors = {name: torch.from_numpy(np.ascontiguousarray(a)).to(device) for name, a in params.arrays.items()}

    def __call__(self, codes: Any) -> Any:
        """codes tensor ``[..., W]`` -> float32 ``[..., D]``; missing vectors (code -128 / NaN) -> NaN."""
        t = self.tensors
        code = codes.float()
        if self.codec.int8:
            missing = (codes == MISSING_CODE).any(dim=-1, keepdim=True)
            code = (code * t["scale"] + t["offset"]).masked_fill(missing, float("nan"))
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


def codec_record(attrs: dict[str, Any], output: str) -> dict[str, Any] | None:
    """``attrs["codec"][output]`` of a teacher, or None for an array stored plainly (float16/float32)."""
    record = (attrs.get("codec") or {}).get(output)
    return record if isinstance(record, dict) else None


def size_table(vectors: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Bytes (before zstd) of feature-like arrays under each codec family: ``vectors`` maps an array to
    (number of vectors, width). PCA rows keep a quarter and an eighth of each width."""
    table = {"fp32": 0, "fp16": 0, "int8": 0, "pca:D/4,int8": 0, "pca:D/8,int8": 0}
    for count, dim in vectors.values():
        table["fp32"] += count * dim * 4
        table["fp16"] += count * dim * 2
        table["int8"] += count * dim
        table["pca:D/4,int8"] += count * max(1, dim // 4)
        table["pca:D/8,int8"] += count * max(1, dim // 8)
    return table
