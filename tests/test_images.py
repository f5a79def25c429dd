"""decode_image: every odd mode becomes 8-bit RGB with known pixels; every bad file an ImageDecodeError."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kt_cache.errors import ImageDecodeError
from kt_cache.images import decode_image


def _decoded(path) -> np.ndarray:
    im = decode_image(path)
    assert im.mode == "RGB"
    arr = np.asarray(im)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    return arr


def test_rgb_roundtrip(tmp_path):
    src = np.random.RandomState(0).randint(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(src, "RGB").save(tmp_path / "a.png")
    np.testing.assert_array_equal(_decoded(tmp_path / "a.png"), src)


def test_grey_l(tmp_path):
    src = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(src, "L").save(tmp_path / "g.png")
    out = _decoded(tmp_path / "g.png")
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], src)


def test_la_composited_on_white(tmp_path):
    la = np.zeros((2, 2, 2), dtype=np.uint8)
    la[0, 0] = (100, 255)   # opaque
    la[0, 1] = (100, 0)     # fully transparent -> white
    la[1, 0] = (0, 128)     # half -> 127
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = _decoded(tmp_path / "la.png")
    assert tuple(out[0, 0]) == (100, 100, 100)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert tuple(out[1, 0]) == (127, 127, 127)


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgba[0, 1] = (10, 20, 30, 0)
    rgba[0, 2] = (255, 0, 0, 128)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = _decoded(tmp_path / "rgba.png")
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert tuple(out[0, 2]) == (255, 127, 127)


def test_palette_with_and_without_transparency(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "p.png")
    out = _decoded(tmp_path / "p.png")
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (0, 0, 255)
    im.save(tmp_path / "pt.png", transparency=1)
    out = _decoded(tmp_path / "pt.png")
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    out = _decoded(tmp_path / "c.jpg").astype(int)
    assert np.abs(out - np.array([255, 0, 0])).max() <= 3


def test_16bit_png_uses_full_range(tmp_path):
    src = np.array([[0, 255, 256, 32768, 65280, 65535]], dtype=np.uint16)
    Image.fromarray(src).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = _decoded(tmp_path / "g16.png")
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 128, 255, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_float_image_in_unit_range(tmp_path):
    src = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(src, "F").save(tmp_path / "f.tif")
    np.testing.assert_array_equal(_decoded(tmp_path / "f.tif")[0, :, 1], [0, 128, 255])


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (4, 2), (0, 0, 0))
    im.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6          # rotate 90 CW when displayed
    im.save(tmp_path / "o.jpg", exif=exif, quality=100)
    out = _decoded(tmp_path / "o.jpg")
    assert out.shape[:2] == (4, 2)                          # displayed: 2 wide, 4 tall
    assert out[0, 1].mean() > 128 > out[0, 0].mean()        # top-left corner went to the top-right


def _assert_decode_error(path, *words):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(path)
    msg = str(info.value)
    assert str(path) in msg and "Fix" in msg
    for word in words:
        assert word in msg.lower()


def test_truncated_jpeg(tmp_path):
    src = np.random.RandomState(1).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(src).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    _assert_decode_error(tmp_path / "cut.jpg", "truncated")


def test_text_file_with_image_extension(tmp_path):
    (tmp_path / "x.jpg").write_text("this is not an image\n")
    _assert_decode_error(tmp_path / "x.jpg", "not an image")


def test_empty_file(tmp_path):
    (tmp_path / "e.png").write_bytes(b"")
    _assert_decode_error(tmp_path / "e.png", "empty")


def test_missing_file(tmp_path):
    _assert_decode_error(tmp_path / "nope.png", "does not exist")


def test_decompression_bomb(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    _assert_decode_error(tmp_path / "big.png", "too large")
