"""Decode stage of extraction: one decode per image per pass, one resize per input resolution.

Runs inside DataLoader workers. For a store row it decodes the image once, draws its recorded view
boxes, and cuts every view at every resolution the wave's teachers need (``TeacherPlan.resize_key``).
Normalisation happens later, per teacher, on the device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from kt_cache.errors import ImageDecodeError
from kt_cache.images import decode_image
from kt_cache.store.checks import DIGEST_BYTES
from kt_cache.views import sample_views, views_to_pixels

ResizeKey = tuple[int, int, str]


class ViewDecodeDataset(torch.utils.data.Dataset):
    """Store row -> decoded views at each needed resolution.

    Item: ``{"row": int, "ok": bool, "views": float32 [V, 5], "error": str,
    "pixels": {resize_key: uint8 [V, 3, H, W]}}``; a failed decode gives zero pixels, NaN views.
    """

    def __init__(self, images: Any, views_policy: Any, resize_keys: Sequence[ResizeKey]):
        self.images = images                  # ``kt_cache.image_source``: a folder or tar shards, by row
        self.policy = views_policy
        self.resize_keys = list(resize_keys)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, row: int) -> dict[str, Any]:
        try:
            data = self.images.read(row)
            image = decode_image(self.images.name(row), data)
        except ImageDecodeError as err:
            return self.failed(row, str(err))
        views = sample_views(self.policy, row, (image.height, image.width))
        pixels = {key: views_to_pixels(image, views, (key[0], key[1]), key[2]) for key in self.resize_keys}
        return {"row": row, "ok": True, "views": views, "error": "", "pixels": pixels, "digest": content_digest(data)}

    def failed(self, row: int, reason: str) -> dict[str, Any]:
        count = self.policy.count
        pixels = {key: torch.zeros((count, 3, key[0], key[1]), dtype=torch.uint8) for key in self.resize_keys}
        views = np.full((count, 5), np.nan, dtype=np.float32)
        return {"row": row, "ok": False, "views": views, "error": reason, "pixels": pixels,
                "digest": np.zeros(DIGEST_BYTES, dtype=np.uint8)}     # 0: nothing recorded, nothing compared


def content_digest(data: bytes) -> np.ndarray:
    """blake2b-128 of the bytes the decoder read (never all zeros in practice; zero means unrecorded)."""
    return np.frombuffer(hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest(), dtype=np.uint8).copy()


def collate_views(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items: rows [b], ok [b], views [b, V, 5], errors [b], pixels {key: uint8 [b, V, 3, H, W]}."""
    keys = items[0]["pixels"].keys()
    return {
        "rows": np.array([it["row"] for it in items], dtype=np.int64),
        "ok": np.array([it["ok"] for it in items], dtype=bool),
        "views": np.stack([it["views"] for it in items]).astype(np.float32),
        "digests": np.stack([it["digest"] for it in items]),
        "errors": [it["error"] for it in items],
        "pixels": {key: torch.stack([it["pixels"][key] for it in items]) for key in keys},
    }


class UnitBatchSampler(torch.utils.data.Sampler):
    """Batches of rows that never cross a unit boundary, units in the given order."""

    def __init__(self, unit_ranges: Sequence[slice], batch_size: int):
        self.unit_ranges = list(unit_ranges)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for rows in self.unit_ranges:
            for start in range(rows.start, rows.stop, self.batch_size):
                yield list(range(start, min(rows.stop, start + self.batch_size)))

    def __len__(self) -> int:
        return sum(-(-(r.stop - r.start) // self.batch_size) for r in self.unit_ranges)
