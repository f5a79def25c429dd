"""The teacher interface the extraction engine drives.

``resolve(spec, target_classes)`` works offline without weights (meta device) and returns a
``TeacherPlan``: everything the engine and ``--dry-run`` need to know (input size, output shapes,
class names, parameter bytes). ``load(plan, device)`` builds the network with its weights and returns
a ``LoadedTeacher`` whose ``forward`` maps *normalised* pixels to a dict of outputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from kt_cache.manifest_types import TeacherSpec


@dataclass(frozen=True)
class TeacherPlan:
    """A teacher resolved offline.

    Shapes are per image-view: ``features`` ``[D]``, ``logits`` ``[C_t]``, ``featmap`` ``[g, g, d]``.
    """

    spec: TeacherSpec
    input_size: tuple[int, int, int]        # (3, H, W)
    interpolation: str                      # bilinear | bicubic | nearest | lanczos
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int | None                 # D; None when "features" not requested/available
    num_classes: int | None                 # C_t; None when "logits" not requested/available
    featmap_dim: int | None                 # d; None when "featmap" not requested
    class_names: tuple[str, ...] | None     # names of the C_t logits, in order
    param_bytes: int                        # bytes of parameters (for waves under a memory budget)
    weights: str                            # where weights come from: file path, "hub:<tag>", or "random"
    extra: dict[str, Any] = field(default_factory=dict)  # source-specific provenance for attrs

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def resize_key(self) -> tuple[int, int, str]:
        """Teachers with the same key share one resize of each view (docs/store-format.md)."""
        return (self.input_size[1], self.input_size[2], self.interpolation)


class LoadedTeacher(ABC):
    """A teacher network in eval mode on a device. Subclasses implement ``forward``."""

    plan: TeacherPlan
    weights_sha256: str | None              # sha256 of the weights file actually loaded, None if random/hub

    @abstractmethod
    def forward(self, pixels: Any) -> dict[str, Any]:
        """Normalised float pixels ``[B, 3, H, W]`` -> ``{"features": [B, D], "logits": [B, C_t],
        "featmap": [B, g, g, d]}`` (only the requested outputs), fp32 tensors on the same device."""

    @abstractmethod
    def release(self) -> None:
        """Free the network's memory (end of a wave)."""
