"""Real weights and a CLIP teacher through the whole extraction path."""

from __future__ import annotations

import numpy as np
import torch
import zarr
from click.testing import CliRunner

from extract_helpers import CLASSES, clip_teacher, cnn_teacher, make_image_folder, write_manifest
from kt_cache.cli import cli
from kt_cache.store import StoreReader

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def direct_forward(store: zarr.Group, teacher_id: str, row: int, view: int, data_root, manifest, target):
    """Forward the teacher on the stored view's pixels, outside the engine."""
    from kt_cache.images import decode_image
    from kt_cache.manifest import load_manifest
    from kt_cache.teachers import load_teacher, resolve_teacher
    from kt_cache.views import view_pixels

    loaded = load_manifest(manifest)
    plan = resolve_teacher(next(t for t in loaded.teachers if t.id == teacher_id), target, manifest.parent)
    box = store["samples/views"][row, view]
    image = decode_image(data_root / str(store["samples/id"][row]))
    pixels = view_pixels(image, box[:4], bool(box[4]), plan.input_size[1:], plan.interpolation).float()
    mean, std = torch.tensor(plan.mean).view(3, 1, 1) * 255, torch.tensor(plan.std).view(3, 1, 1) * 255
    return load_teacher(plan, "cpu").forward(((pixels - mean) / std)[None])


def test_packaged_efficientnet_on_real_photos(tmp_path, monkeypatch):
    monkeypatch.setenv("KTC_DATA_DIR", str(tmp_path / "data"))
    manifest = ROOT / "manifests" / "demo.yaml"
    result = CliRunner().invoke(cli, ["extract", "--manifest", str(manifest), "--out", str(tmp_path / "demo.zarr"),
                                      "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    store = zarr.open_group(str(tmp_path / "demo.zarr"), mode="r")
    ids = list(store["samples/id"][:])
    chelsea = ids.index("chelsea.png")
    assert int(store["teachers/effnet_lite0/logits_topk/index"][chelsea, 0, 0]) == 285      # Egyptian cat
    assert int(store["teachers/effnet_lite1/logits_topk/index"][chelsea, 0, 0]) == 285
    assert int(store["teachers/effnet_lite2/logits"][chelsea, 0].argmax()) == 285
    from kt_cache.datasets import builtin_dir
    for teacher in ("effnet_lite0", "effnet_lite2"):                       # 224 px top-k, 260 px full logits
        direct = direct_forward(store, teacher, chelsea, 0, builtin_dir("skimage"), manifest, None)["logits"][0]
        if teacher == "effnet_lite2":
            stored = store["teachers/effnet_lite2/logits"][chelsea, 0].astype(np.float32)
            np.testing.assert_allclose(stored, direct.numpy(), rtol=1e-3, atol=2e-2)    # fp16 storage
        else:
            values = store["teachers/effnet_lite0/logits_topk/values"][chelsea, 0].astype(np.float32)
            np.testing.assert_allclose(values, direct.sort(descending=True).values[:20].numpy(), rtol=1e-3, atol=2e-2)
    assert store["teachers/effnet_lite0/featmap"].shape == (len(ids), 4, 4, 4, 1280)


def test_open_clip_teacher_beside_timm_teacher(tmp_path):
    make_image_folder(tmp_path / "images", per_class=2)
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher(), clip_teacher()])
    result = CliRunner().invoke(cli, ["extract", "--manifest", str(manifest), "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    store = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    clip = store["teachers/clip32"]
    assert clip["features"].shape == (6, 3, 16) and clip["logits"].shape == (6, 3, 3)
    assert clip["featmap"].shape == (6, 3, 2, 2, 32)
    assert clip.attrs["ktc_teacher"]["role"] == "descriptive"
    assert clip.attrs["ktc_teacher"]["class_names"] == "dataset"          # zero-shot over the target classes
    assert StoreReader(str(tmp_path / "out.zarr")).teacher_attrs("clip32")["class_names"] == list(CLASSES)
    direct = direct_forward(store, "clip32", 4, 1, tmp_path / "images", manifest, CLASSES)
    np.testing.assert_allclose(clip["logits"][4, 1].astype(np.float32), direct["logits"][0].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(clip["features"][4, 1].astype(np.float32), direct["features"][0].numpy(), rtol=2e-3, atol=2e-3)
