"""The ``codec`` stage of ``benchmarks/gpu.py``: what decoding compact feature maps costs on the device.

A compact store's maps are decoded on the student's device inside the trainer's read path
(``kt_cache.transform_codec.TransformParams.torch_decode`` for ``tc:B``, ``StackedDecoder`` for ``pca:K,int8``).
On one CPU core a ``tc:160`` map of 4x4x1280 takes ~0.6 ms (docs/benchmarks.md, "Compact stores"); this stage
measures the same decode on the device, against the plain store's device work for the same maps (an fp16 ->
fp32 cast), for one batch of maps of one teacher.

Maps: non-negative, low-rank synthetic ``[M, cells, C]`` (a ReLU of a random rank-32 product); the codec is
fitted on them (``fit_transform``, on the host) and allocated at ``C // 8`` bytes per cell (``tc:D/8``, 1/16 of
fp16). Timings: best of ``repeats`` after a warm-up, with the device synchronised around each.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from gpu_common import sync


def best_ms(action: Callable[[], Any], device: str, repeats: int) -> float:
    action()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def synthetic_maps(count: int, cells: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(count, 32)).astype(np.float32)
    return np.maximum(factors @ rng.normal(size=(32, cells * channels)).astype(np.float32), 0).reshape(
        count, cells, channels)


def run_codec_stage(device: str, profile: Any, repeats: int = 10) -> dict[str, Any]:
    """``tc:D/8`` decode of ``profile.codec_batch`` maps on ``device`` vs the fp16 cast of the same maps."""
    import torch

    from kt_cache.transform_codec import fit_transform

    cells, channels = profile.codec_grid ** 2, profile.codec_channels
    maps = synthetic_maps(profile.codec_fit_maps, cells, channels)
    start = time.perf_counter()
    params = fit_transform(lambda: [maps]).params(channels // 8)
    fit_s = time.perf_counter() - start
    batch = maps[:profile.codec_batch]
    codes = torch.from_numpy(params.encode(batch)).to(device)
    plain = torch.from_numpy(batch.astype(np.float16)).to(device)
    decode_ms = best_ms(lambda: params.torch_decode(codes), device, repeats)
    cast_ms = best_ms(lambda: plain.float(), device, repeats)
    decoded = params.torch_decode(codes).reshape(len(batch), cells, channels).cpu().numpy()
    cos = (batch * decoded).sum(-1) / np.maximum(np.linalg.norm(batch, axis=-1) * np.linalg.norm(decoded, axis=-1), 1e-30)
    return {"codec": f"tc:{channels // 8}", "grid": profile.codec_grid, "channels": channels, "maps": len(batch),
            "code_bytes": params.code_bytes, "fp16_bytes": cells * channels * 2, "fit_maps": len(maps),
            "fit_s": fit_s, "decode_ms": decode_ms, "fp16_cast_ms": cast_ms, "maps_per_s": len(batch) / decode_ms * 1e3,
            "mflop_per_map": 2 * sum(params.prefix) * channels / 1e6, "mean_cosine": float(cos.mean())}
