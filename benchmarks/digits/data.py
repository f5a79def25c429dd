"""scikit-learn's digits as a folder of PNGs (``train/<class>/*.png``, ``val/<class>/*.png``).

The 8x8 images (grey levels 0..16) are scaled to 0..255, upsampled to 32x32 (bilinear) and saved as RGB
PNGs. The train/val split is stratified and seeded, so the same ``split_seed`` gives the same files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = tuple(str(c) for c in range(10))
IMAGE_SIZE = 32


@dataclass(frozen=True)
class Split:
    """One split held in memory: uint8 images ``[N, 3, 32, 32]`` and int64 labels ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor


def to_png_image(grey8x8: np.ndarray) -> Image.Image:
    """One 8x8 digit (values 0..16) -> a 32x32 RGB PIL image."""
    grey = np.clip(grey8x8 * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).convert("RGB")


def render_digits(root: Path, split_seed: int = 0, val_frac: float = 0.3) -> dict[str, int]:
    """Write ``root/train`` and ``root/val`` (skipped when ``root/split.json`` records the same split).

    Returns:
        ``{"train": n_train, "val": n_val}``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    stamp = {"split_seed": split_seed, "val_frac": val_frac, "size": IMAGE_SIZE}
    marker = root / "split.json"
    if marker.is_file() and json.loads(marker.read_text()).get("stamp") == stamp:
        return json.loads(marker.read_text())["counts"]
    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(index, test_size=val_frac, stratify=digits.target, random_state=split_seed)
    counts = {}
    for name, rows in (("train", train_idx), ("val", val_idx)):
        for row in sorted(rows):
            folder = root / name / CLASSES[digits.target[row]]
            folder.mkdir(parents=True, exist_ok=True)
            to_png_image(digits.images[row]).save(folder / f"{row:04d}.png")
        counts[name] = int(len(rows))
    marker.write_text(json.dumps({"stamp": stamp, "counts": counts}))
    return counts


def load_split(folder: Path) -> Split:
    """Read ``folder/<class>/*.png`` back (exactly the pixels ``ktc`` will decode)."""
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((folder / name).glob("*.png")):
            array = np.array(Image.open(path).convert("RGB"), dtype=np.uint8)
            images.append(torch.from_numpy(array).permute(2, 0, 1))
            labels.append(label)
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.int64))
