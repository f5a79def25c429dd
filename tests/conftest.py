"""Shared pytest fixtures. Teacher-adapter fixtures are prefixed ``teacher_``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def restore_environ() -> Iterator[None]:
    """Put ``os.environ`` back after every test: a dask nanny started in-process copies its worker settings
    (``OMP_NUM_THREADS=1`` …) into this process, and every later ``ktc`` subprocess would inherit them."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture()
def teacher_tiny_clip_args() -> dict:
    """model_args that shrink open_clip's ViT-B-32 to a 32x32-input, 1-layer CLIP (random init, ~1.6M params)."""
    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"width": 32, "heads": 2, "layers": 1},
    }


@pytest.fixture(scope="session")
def teacher_resnet10t_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init timm resnet10t (num_classes=10) state dict saved as safetensors."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    path = tmp_path_factory.mktemp("teacher_weights") / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture()
def teacher_offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The model hub is unreachable and every download cache is empty (deterministic on any machine)."""
    import huggingface_hub.constants
    import torch

    from kt_cache.teachers import checkpoints

    monkeypatch.setattr(checkpoints, "hub_reachable", lambda timeout_s=3.0: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    old_hub_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch_hub"))
    yield
    torch.hub.set_dir(old_hub_dir)


@pytest.fixture(scope="session")
def two_teacher_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finalized store shared read-only by several test files (copy it before changing it): 12 images of
    3 classes, 3 views, units of 4 rows; cnn32 (top-k logits, featmap) and vit48 (full logits)."""
    from click.testing import CliRunner

    from extract_helpers import cnn_teacher, make_image_folder, vit_teacher, write_manifest
    from kt_cache.cli import cli

    base = tmp_path_factory.mktemp("two_teachers")
    make_image_folder(base / "images", per_class=4)
    manifest = write_manifest(base / "teachers.yaml", [cnn_teacher(), vit_teacher()])
    result = CliRunner().invoke(cli, ["extract", "--manifest", str(manifest), "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    return base / "out.zarr"
