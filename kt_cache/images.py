"""Decode one image file into a fully loaded 8-bit RGB ``PIL.Image`` (odd modes, bad files: docs/manifest.md, Errors).

Decisions:
- Transparency (LA, La, PA, RGBA, RGBa, P with a transparent index) is composited on WHITE:
  ``out = round((c * a + 255 * (255 - a)) / 255)``. A transparent pixel becomes white, never the
  arbitrary colour hidden under alpha 0.
- 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) keeps the top 8 bits (``v >> 8``), so the full
  0..65535 range maps to 0..255 without clipping. ``I`` (32-bit int) is treated as 16-bit data when its
  values fit 0..65535 (how 16-bit PNG/TIFF often arrive), else as signed 32-bit (offset by 2**31, ``>> 24``).
- ``F`` (float): values inside [0, 1] are scaled by 255; inside [0, 255] kept; otherwise min..max is
  stretched to 0..255; NaN/inf become 0.
- ``1`` (bilevel), CMYK, YCbCr, LAB, HSV: Pillow's own conversion to RGB.
- EXIF orientation is applied (``ImageOps.exif_transpose``); only the first frame of a GIF/TIFF is used.
- Images over twice ``PIL.Image.MAX_IMAGE_PIXELS`` are errors (Pillow's decompression-bomb guard).
- Truncated files are errors: this module never sets ``ImageFile.LOAD_TRUNCATED_IMAGES``.
"""

from __future__ import annotations

import io

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kt_cache.errors import ImageDecodeError

_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_INT16_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S")


def read_image_bytes(path: Path | str) -> bytes:
    """The file's bytes, read once: the decoder and the content digest both use them (no second read)."""
    path = Path(path)
    _check_file(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read the file ({exc.strerror or exc}). Fix: check its "
                               "permissions and the disk, or remove it from the dataset.") from exc


def decode_image(path: Path | str, data: bytes | None = None) -> Image.Image:
    """Open, fully load and convert an image file to 8-bit RGB.

    Args:
        path: the image file (named in errors).
        data: its bytes when already read (``read_image_bytes``); else the file is opened.

    Returns:
        A loaded ``PIL.Image.Image`` in mode "RGB" (file closed).

    Raises:
        ImageDecodeError: missing, empty, unrecognised, truncated, corrupt, or too large (the message
            names the path, what is wrong and how to fix it).
    """
    path = Path(path)
    if data is None:
        _check_file(path)
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            im.load()
            return to_rgb(_orient(im))
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder failure becomes one explained error
        raise ImageDecodeError(f"{path}: {_reason(exc)}") from exc


def _check_file(path: Path) -> None:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ImageDecodeError(f"{path}: cannot decode: the file {what}. Fix: restore the file or "
                               "re-list the dataset.")
    if path.stat().st_size == 0:
        raise ImageDecodeError(f"{path}: cannot decode: the file is empty (0 bytes). Fix: re-download "
                               "or remove the file.")


def _reason(exc: Exception) -> str:
    """A one-line what + fix for a decoder exception."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, Image.DecompressionBombError):
        return (f"image too large (decompression bomb guard: {text}). Fix: downscale the file, or raise "
                "PIL.Image.MAX_IMAGE_PIXELS if you trust it.")
    if isinstance(exc, UnidentifiedImageError):
        return ("not an image Pillow can read (unknown or wrong format, e.g. a text or HTML file with an "
                "image extension). Fix: re-download the file or remove it from the dataset.")
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"truncated image data ({text}). Fix: re-download or remove the file."
    return f"corrupt image data ({type(exc).__name__}: {text}). Fix: re-download or remove the file."


def _orient(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a malformed EXIF block is ignored (pixels are still valid)."""
    try:
        return ImageOps.exif_transpose(im) or im
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose a decodable image
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to 8-bit RGB (rules in the module docstring)."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        return _composite_white(im)
    if mode in _INT16_MODES or mode == "I":
        return _grey_to_rgb(_int_to_uint8(np.asarray(im), mode))
    if mode == "F":
        return _grey_to_rgb(_float_to_uint8(np.asarray(im, dtype=np.float64)))
    return im.convert("RGB")


def _composite_white(im: Image.Image) -> Image.Image:
    rgba = np.asarray(im.convert("RGBA"), dtype=np.uint32)
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return Image.fromarray(out.astype(np.uint8), "RGB")


def _int_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    a = a.astype(np.int64)
    if mode == "I;16S":
        return ((a + 32768) >> 8).astype(np.uint8)
    if mode in _INT16_MODES or (a.size and a.min() >= 0 and a.max() <= 65535):
        return (a >> 8).astype(np.uint8)
    return ((a + 2**31) >> 24).astype(np.uint8)


def _float_to_uint8(a: np.ndarray) -> np.ndarray:
    a = np.where(np.isfinite(a), a, 0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif not (lo >= 0.0 and hi <= 255.0):
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2)), "RGB")

