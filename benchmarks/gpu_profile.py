"""The two sizes of ``benchmarks/gpu.py``: ``full`` (a GPU, <= 8 minutes) and ``tiny`` (any CPU, seconds).

Both run the very same stages; only the numbers and model names differ, so a CPU run of ``--tiny`` proves
the device run's code end to end before any GPU time is spent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

# The teachers: real architectures, random init (no hub on the device machine), 1000 ImageNet logits
# kept as top-20 like manifests/imagenet-104.yaml. No `preprocess:`: ktc resolves each model's own input size.
FULL_TEACHERS = ("resnet50", "convnext_tiny", "vit_base_patch16_224", "vit_large_patch14_clip_224",
                 "efficientnet_b3", "swin_tiny_patch4_window7_224", "deit_small_patch16_224", "regnety_160")

# Cheap stand-ins for the training stores: the trainer only reads their outputs, so what matters is the
# spread of feature widths (192..2048) and the 1000-class top-20 logits, not what they cost to extract.
TRAIN_TEACHERS = (("resnet50", {}), ("convnext_tiny", {}), ("vit_base_patch16_224", {"img_size": 64}),
                  ("regnety_016", {}), ("mobilenetv3_large_100", {}), ("vit_small_patch16_224", {"img_size": 64}),
                  ("deit_tiny_patch16_224", {"img_size": 64}), ("resnet34", {}), ("efficientnet_b2", {}),
                  ("convnext_small", {}))


def timm_entry(tid: str, model: str, size: int | None = None, model_args: dict | None = None) -> dict[str, Any]:
    """A manifest teacher (docs/manifest.md): random-init timm, 1000 ImageNet logits as top-20 + features."""
    entry = {"id": tid, "source": "timm", "model": model, "pretrained": "none", "classes": "imagenet-1k",
             "model_args": {"num_classes": 1000, **(model_args or {})}, "outputs": ["features", "logits"],
             "logits": {"topk": 20}}
    if size:
        entry["preprocess"] = {"input_size": [3, size, size]}
    return entry


@dataclass
class Profile:
    """Every size knob of a run (see ``full_profile`` / ``tiny_profile`` for the values and why)."""

    name: str
    images: int
    image_side: tuple[int, int]          # shorter side of the synthetic JPEGs, drawn in [lo, hi]
    views: int
    unit_rows: int
    decode_batch: int                    # images per decode batch (ktc extract --batch-size)
    teacher_batch: int                   # views per teacher forward (manifest defaults.batch_size)
    workers: int
    teachers: list[dict] = field(default_factory=list)
    floor_warmup: int = 2
    floor_batches: int = 8
    decode_probe: int = 48               # images decoded in-process to time decode and resize
    student: str = "resnet50"
    student_size: int = 224
    train_batch: int = 128
    train_warmup: int = 4
    train_steps: int = 24
    train_views: int = 2
    train_teachers: list[dict] = field(default_factory=list)
    teacher_counts: tuple[int, int] = (10, 100)
    codec_grid: int = 4                  # the codec stage: maps of grid x grid cells of codec_channels (Lite0's)
    codec_channels: int = 1280
    codec_fit_maps: int = 1024           # maps the tc codec is fitted on (on the host: ~20 s)
    codec_batch: int = 256               # maps decoded per timed call (one teacher's batch)


def default_workers() -> int:
    """Leave a few cores to the main process and the writer thread; 12 keeps an H200 fed on 16 cores."""
    return max(2, min(12, (os.cpu_count() or 4) - 4))


def full_profile(images: int | None = None) -> Profile:
    """Sized for one H200 in well under 8 minutes: 4096 images x 2 views is ~25 decode batches per teacher
    after warm-up (a steady state), and 24 training steps of 128 fit in one epoch (no worker restarts)."""
    return Profile(name="full", images=images or 4096, image_side=(320, 512), views=2, unit_rows=1024,
                   decode_batch=128, teacher_batch=256, workers=default_workers(),
                   teachers=[timm_entry(m, m) for m in FULL_TEACHERS],
                   train_teachers=[timm_entry(f"t{i:02d}_{m}", m, 64, a) for i, (m, a) in enumerate(TRAIN_TEACHERS)])


def tiny_profile(images: int | None = None) -> Profile:
    """Seconds on a CPU: 12 small images, two small teachers, resnet10t student at 32 px, 2 and 4 teachers."""
    vit = {"img_size": 48, "depth": 2}
    return Profile(name="tiny", images=images or 12, image_side=(40, 64), views=2, unit_rows=4, decode_batch=4,
                   teacher_batch=8, workers=0, teachers=[timm_entry("resnet10t", "resnet10t", 32),
                                                         timm_entry("vit_tiny", "vit_tiny_patch16_224", 48, vit)],
                   floor_warmup=1, floor_batches=2, decode_probe=4, student="resnet10t", student_size=32,
                   train_batch=4, train_warmup=1, train_steps=2,
                   train_teachers=[timm_entry(f"t{i:02d}_resnet10t", "resnet10t", 32) for i in range(2)],
                   teacher_counts=(2, 4), codec_grid=2, codec_channels=32, codec_fit_maps=96, codec_batch=16)


def make_profile(tiny: bool, images: int | None = None, steps: int | None = None) -> Profile:
    profile = tiny_profile(images) if tiny else full_profile(images)
    return replace(profile, train_steps=steps) if steps else profile
