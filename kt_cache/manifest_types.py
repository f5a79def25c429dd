"""Typed, frozen objects a manifest is loaded into (see docs/manifest.md).

Only data lives here; ``kt_cache.manifest.load_manifest`` builds these from YAML and validates them.
Paths are absolute (resolved against the manifest's folder) once loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUTPUT_KINDS = ("features", "logits", "featmap")
ROLES = ("predictive", "descriptive", "sentinel")
SOURCES = ("timm", "open_clip")
DTYPES = ("float16", "float32")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")


@dataclass(frozen=True)
class DatasetSpec:
    """Where the images are: exactly one of ``root`` (class sub-folders), ``list`` (csv), ``shards``
    (WebDataset tar shards: brace patterns or URLs, ``kt_cache.shards``) or ``builtin``."""

    root: Path | None = None
    list: Path | None = None
    shards: tuple[str, ...] | None = None   # local patterns made absolute; fsspec URLs kept as written
    builtin: str | None = None              # "skimage": the embedded offline photo set
    classes: tuple[str, ...] | str | None = None   # names, "imagenet-1k", or a file path (str)


@dataclass(frozen=True)
class ViewsSpec:
    """View policy (docs/manifest.md, `views`): view 0 is a centre crop, views 1..count-1 random-resized-crop boxes."""

    count: int = 1
    seed: int = 0
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (0.75, 4 / 3)
    flip: bool = True
    center_crop: float = 0.875              # view 0: centred square, this fraction of the shorter side


@dataclass(frozen=True)
class StorageSpec:
    """Store layout knobs; the defaults suit ImageNet-scale runs, tests use tiny units."""

    unit_rows: int = 16384                  # rows per unit of work / shard; a power of two
    chunk_bytes: int = 2 * 1024 * 1024      # target inner-chunk size
    order_seed: int = 0                     # seed of the recorded row permutation


@dataclass(frozen=True)
class PreprocessSpec:
    """Per-teacher override of the model's own pretrained data config; None keeps the model's value."""

    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = None


@dataclass(frozen=True)
class TeacherSpec:
    """One manifest ``teachers:`` entry, with defaults applied."""

    id: str
    source: str
    model: str
    role: str = "predictive"
    pretrained: str | None = None           # open_clip tag, or timm tag when not in the model name
    checkpoint: Path | str | None = None    # local file or "pkg:<module>/<file>" inside an installed package
    remap: bool = False
    model_args: dict[str, Any] = field(default_factory=dict)
    classes: tuple[str, ...] | str | None = None   # names, "imagenet-1k", or a file path (str)
    outputs: tuple[str, ...] = ("features", "logits")
    logits_topk: int | None = None          # None: full logits
    featmap_grid: int = 7
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    batch_size: int = 128
    dtype: str = "float16"
    codec: str | None = None                # "int8": features/featmap stored as int8 codes (kt_cache.codecs)
    class_map: tuple[tuple[str, str], ...] | str | None = None   # teacher class -> target class, or a CSV path
    entry: dict[str, Any] = field(default_factory=dict, compare=False)  # the YAML entry as written

    def fingerprint_entry(self) -> dict[str, Any]:
        """What a stored teacher is compared against on resume (batch size does not change outputs)."""
        return {k: v for k, v in self.entry.items() if k != "batch_size"}


@dataclass(frozen=True)
class Manifest:
    path: Path
    dataset: DatasetSpec
    store: Path | None
    views: ViewsSpec
    storage: StorageSpec
    teachers: tuple[TeacherSpec, ...]
