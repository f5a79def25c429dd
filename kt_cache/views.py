"""The ONE place a stored view becomes pixels (docs/manifest.md, `views`); extraction and training both call it.

A view is a row ``(x0, y0, w, h, flip)`` of ``samples/views``: a box in normalised image coordinates
(x horizontal, relative to the width; y vertical, relative to the height) and a horizontal-flip flag.

Conventions (fixed; changing any of them changes the pixels of every existing store):
- ``image_size`` / ``image_hw`` is ``(height, width)`` -- NOT ``PIL.Image.size`` which is (W, H);
  use ``image_hw(image)``. Output ``size`` is ``(H, W)`` too.
- View 0: centred square of side ``round(center_crop * min(H, W))`` px, offsets
  ``round((H - side) / 2)``, ``round((W - side) / 2)`` (torchvision ``CenterCrop``), flip 0.
- Views 1..V-1: torchvision ``RandomResizedCrop.get_params`` re-implemented on
  ``np.random.default_rng([seed, row, view])``: per attempt ``uniform(scale)`` then
  ``exp(uniform(log ratio))``, then ``integers`` for top and left; after the box one ``random()``
  draw decides the flip (``< 0.5``), drawn even when ``policy.flip`` is off so boxes never depend on it.
- Box -> pixels (``box_to_pixels``): ``top = floor(y0*H + 0.5)``, ``left = floor(x0*W + 0.5)``,
  ``height = max(1, floor(h*H + 0.5))``, ``width = max(1, floor(w*W + 0.5))``, then clipped to the image.
  Boxes produced here are whole pixels, so the float32 round trip is exact.
- Resampling: ``torchvision.transforms.v2.functional.resized_crop(..., antialias=True)`` on the uint8
  tensor for bilinear / bicubic / nearest. ``lanczos`` (not supported on tensors by torchvision) uses
  Pillow: ``crop`` then ``resize(..., Image.LANCZOS)``. The flip is applied after resizing.
"""

from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from kt_cache.manifest_types import ViewsSpec

ImageLike = Union[Image.Image, torch.Tensor]
_MODES = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")


def image_hw(image: ImageLike) -> tuple[int, int]:
    """``(height, width)`` of a PIL image or a ``[C, H, W]`` tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def center_box(policy: ViewsSpec, height: int, width: int) -> tuple[int, int, int, int]:
    """View 0 in pixels: ``(top, left, h, w)`` of the centred square."""
    side = min(max(1, int(round(policy.center_crop * min(height, width)))), height, width)
    return int(round((height - side) / 2.0)), int(round((width - side) / 2.0)), side, side


def rrc_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
            ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` drawn from ``rng``: ``(top, left, h, w)``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_views(policy: ViewsSpec, row: int, image_size: tuple[int, int]) -> np.ndarray:
    """The ``policy.count`` views of dataset row ``row`` of an image of ``image_size = (H, W)``.

    Returns:
        float32 ``[V, 5]``: ``(x0, y0, w, h, flip)`` normalised to the image; view 0 is the centre
        square, views 1.. random-resized-crop boxes keyed by ``(policy.seed, row, view)`` only.
    """
    height, width = int(image_size[0]), int(image_size[1])
    if height < 1 or width < 1 or policy.count < 1 or row < 0 or policy.seed < 0:
        raise ValueError(f"sample_views: need image_size >= 1, count >= 1, row >= 0, seed >= 0; got "
                         f"image_size={image_size}, count={policy.count}, row={row}, seed={policy.seed}")
    out = np.zeros((policy.count, 5), dtype=np.float32)
    for view in range(policy.count):
        flip = 0.0
        if view == 0:
            top, left, h, w = center_box(policy, height, width)
        else:
            rng = np.random.default_rng([int(policy.seed), int(row), view])
            top, left, h, w = rrc_box(rng, height, width, tuple(policy.scale), tuple(policy.ratio))
            flip = float(rng.random() < 0.5 and policy.flip)
        out[view] = (left / width, top / height, w / width, h / height, flip)
    return out


def box_to_pixels(box: np.ndarray | tuple[float, ...], height: int, width: int) -> tuple[int, int, int, int]:
    """Normalised ``(x0, y0, w, h)`` -> integer ``(top, left, h, w)`` inside an ``height x width`` image."""
    x0, y0, bw, bh = (float(v) for v in box[:4])
    top = min(max(0, math.floor(y0 * height + 0.5)), height - 1)
    left = min(max(0, math.floor(x0 * width + 0.5)), width - 1)
    h = min(max(1, math.floor(bh * height + 0.5)), height - top)
    w = min(max(1, math.floor(bw * width + 0.5)), width - left)
    return top, left, h, w


def _as_uint8_chw(image: ImageLike) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"view_pixels: expected a uint8 [3, H, W] tensor, got {image.dtype} {tuple(image.shape)}")
    return image


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"view_pixels: unknown interpolation {interpolation!r}; use one of {INTERPOLATIONS}")


def view_pixels(image: ImageLike, box: np.ndarray | tuple[float, ...], flip: bool | float,
                size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """Crop ``box`` out of ``image``, resize to ``size = (H, W)``, mirror when ``flip``.

    Args:
        image: PIL RGB image or uint8 tensor ``[3, H0, W0]``.
        box: normalised ``(x0, y0, w, h)`` (extra entries ignored).
        flip: horizontal flip after resizing.
        size: output ``(H, W)``.
        interpolation: bilinear | bicubic | nearest | lanczos.

    Returns:
        uint8 tensor ``[3, H, W]`` (contiguous).
    """
    _check_interpolation(interpolation)
    tensor = _as_uint8_chw(image)
    top, left, h, w = box_to_pixels(box, *image_hw(tensor))
    out_h, out_w = int(size[0]), int(size[1])
    if interpolation == "lanczos":
        pil = image if isinstance(image, Image.Image) and image.mode == "RGB" else TF.to_pil_image(tensor)
        crop = pil.crop((left, top, left + w, top + h)).resize((out_w, out_h), Image.LANCZOS)
        out = TF.pil_to_tensor(crop)
    else:
        out = TF.resized_crop(tensor, top, left, h, w, [out_h, out_w],
                              interpolation=_MODES[interpolation], antialias=True)
    if bool(flip):
        out = TF.horizontal_flip(out)
    return out.contiguous()


def views_to_pixels(image: ImageLike, views: np.ndarray, size: tuple[int, int],
                    interpolation: str = "bilinear") -> torch.Tensor:
    """All rows of ``views`` (``[V, 5]``) of one image -> uint8 ``[V, 3, H, W]``."""
    _check_interpolation(interpolation)
    source = image if interpolation == "lanczos" else _as_uint8_chw(image)
    views = np.asarray(views)
    return torch.stack([view_pixels(source, v[:4], bool(v[4]), size, interpolation) for v in views])
