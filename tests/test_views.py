"""sample_views and view_pixels: the recorded boxes and the pixels they stand for (docs/manifest.md, `views`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from kt_cache.manifest_types import ViewsSpec
from kt_cache.views import (
    box_to_pixels, image_hw, rrc_box, sample_views, view_pixels, views_to_pixels,
)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A smooth-ish 'photo' (gradients + noise) of 60 x 90 (H x W)."""
    yy, xx = np.mgrid[0:60, 0:90]
    noise = np.random.RandomState(0).randint(0, 40, (60, 90, 3))
    arr = np.stack([xx * 2, yy * 3, (xx + yy)], axis=2) + noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def test_view0_is_centred_square():
    views = sample_views(ViewsSpec(count=3, center_crop=0.875), row=7, image_size=(300, 451))
    assert views.dtype == np.float32 and views.shape == (3, 5)
    x0, y0, w, h, flip = views[0]
    assert round(w * 451) == round(h * 300) == 262            # round(0.875 * 300)
    assert abs((x0 + w / 2) - 0.5) < 1.5 / 451 and abs((y0 + h / 2) - 0.5) < 1.5 / 300
    assert flip == 0
    full = sample_views(ViewsSpec(count=1, center_crop=1.0), row=0, image_size=(100, 50))
    np.testing.assert_allclose(full[0], [0, 0.25, 1, 0.5, 0])


def test_boxes_inside_image_and_whole_pixels():
    policy = ViewsSpec(count=6, seed=3)
    for row in range(50):
        views = sample_views(policy, row, (37, 101))
        assert (views[:, :4] >= 0).all() and (views[:, 2:4] > 0).all()
        assert (views[:, 0] + views[:, 2] <= 1 + 1e-6).all() and (views[:, 1] + views[:, 3] <= 1 + 1e-6).all()
        for v in views:                                       # float32 round trip recovers the integer box
            top, left, h, w = box_to_pixels(v, 37, 101)
            np.testing.assert_allclose(v[:4], [left / 101, top / 37, w / 101, h / 37], atol=1e-6)


def test_deterministic_and_keyed_by_seed_row_view():
    policy = ViewsSpec(count=4, seed=11)
    a = sample_views(policy, 5, (64, 80))
    sample_views(policy, 6, (64, 80))                          # other rows do not disturb row 5
    np.testing.assert_array_equal(a, sample_views(policy, 5, (64, 80)))
    assert not np.array_equal(a[1:], sample_views(policy, 6, (64, 80))[1:])
    assert not np.array_equal(a[1:], sample_views(ViewsSpec(count=4, seed=12), 5, (64, 80))[1:])
    rng = np.random.default_rng([11, 5, 2])
    top, left, h, w = rrc_box(rng, 64, 80, policy.scale, policy.ratio)
    np.testing.assert_allclose(a[2, :4], [left / 80, top / 64, w / 80, h / 64], rtol=1e-6)


def test_count_does_not_change_earlier_views():
    short = sample_views(ViewsSpec(count=3, seed=1), 9, (120, 90))
    long = sample_views(ViewsSpec(count=8, seed=1), 9, (120, 90))
    np.testing.assert_array_equal(short, long[:3])


def test_scale_and_ratio_respected():
    policy = ViewsSpec(count=2, seed=0, scale=(0.2, 0.6), ratio=(0.5, 2.0), flip=False)
    height = width = 500
    boxes = np.stack([sample_views(policy, r, (height, width))[1] for r in range(1500)])
    area = boxes[:, 2] * boxes[:, 3]
    ratio = (boxes[:, 2] * width) / (boxes[:, 3] * height)
    assert area.min() >= 0.2 - 0.01 and area.max() <= 0.6 + 0.01
    assert ratio.min() >= 0.5 * 0.98 and ratio.max() <= 2.0 * 1.02
    assert area.min() < 0.22 and area.max() > 0.58              # the whole range is used
    assert abs(np.log(ratio).mean()) < 0.05                       # log-uniform ratio: symmetric in log
    centres = boxes[:, 0] + boxes[:, 2] / 2
    assert 0.45 < centres.mean() < 0.55


@pytest.mark.parametrize("hw", [(50, 400), (400, 50), (100, 120)])
def test_fallback_matches_torchvision(hw):
    """With scale > 1 every attempt fails; the deterministic fallback must equal torchvision's."""
    rng = np.random.default_rng(0)
    ratio = (3 / 4, 4 / 3)
    ours = rrc_box(rng, hw[0], hw[1], (2.0, 3.0), ratio)
    theirs = RandomResizedCrop.get_params(torch.zeros(3, *hw), [2.0, 3.0], list(ratio))
    assert ours == tuple(theirs)


def test_flip_only_when_enabled():
    on = np.stack([sample_views(ViewsSpec(count=4, flip=True), r, (32, 32)) for r in range(200)])
    off = np.stack([sample_views(ViewsSpec(count=4, flip=False), r, (32, 32)) for r in range(200)])
    assert (off[:, :, 4] == 0).all() and (on[:, 0, 4] == 0).all()
    assert 0.35 < on[:, 1:, 4].mean() < 0.65
    np.testing.assert_array_equal(on[:, :, :4], off[:, :, :4])     # the flip draw never moves boxes


def test_bad_arguments():
    with pytest.raises(ValueError):
        sample_views(ViewsSpec(), -1, (10, 10))
    with pytest.raises(ValueError):
        view_pixels(torch.zeros(3, 4, 4, dtype=torch.uint8), (0, 0, 1, 1), False, (2, 2), "area")


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "lanczos"])
def test_view_pixels_shape_and_flip(photo, interpolation):
    box = (0.1, 0.2, 0.5, 0.6)
    out = view_pixels(photo, box, False, (24, 32), interpolation)
    assert out.dtype == torch.uint8 and out.shape == (3, 24, 32) and out.is_contiguous()
    flipped = view_pixels(photo, box, True, (24, 32), interpolation)
    assert torch.equal(flipped, out.flip(-1))
    as_tensor = view_pixels(TF.pil_to_tensor(photo), box, False, (24, 32), interpolation)
    assert torch.equal(as_tensor, out)                             # PIL and tensor input agree


def test_full_box_same_size_is_identity(photo):
    tensor = TF.pil_to_tensor(photo)
    assert image_hw(photo) == image_hw(tensor) == (60, 90)
    assert torch.equal(view_pixels(photo, (0, 0, 1, 1), False, (60, 90), "nearest"), tensor)


@pytest.mark.parametrize("size", [(20, 25), (70, 50)])
def test_bilinear_matches_pil_reference(photo, size):
    box = sample_views(ViewsSpec(count=3, seed=5), 2, (60, 90))[1]
    left, top = round(box[0] * 90), round(box[1] * 60)
    width, height = round(box[2] * 90), round(box[3] * 60)
    ref = photo.crop((left, top, left + width, top + height)).resize((size[1], size[0]), Image.BILINEAR)
    ref_t = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).int()
    out = view_pixels(photo, box[:4], False, size, "bilinear").int()
    assert (out - ref_t).abs().max() <= 1


def test_views_to_pixels(photo):
    views = sample_views(ViewsSpec(count=4, seed=2), 0, image_hw(photo))
    batch = views_to_pixels(photo, views, (16, 16), "bicubic")
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.uint8
    for i, v in enumerate(views):
        assert torch.equal(batch[i], view_pixels(photo, v[:4], bool(v[4]), (16, 16), "bicubic"))
    assert torch.equal(views_to_pixels(TF.pil_to_tensor(photo), views, (16, 16), "bicubic"), batch)
