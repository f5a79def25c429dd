"""Small builders shared by the extraction tests: image folders and manifests in ``tmp_path``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

CLASSES = ("ant", "bee", "cat")


def make_image_folder(root: Path, per_class: int = 4, classes: tuple[str, ...] = CLASSES, seed: int = 0) -> Path:
    """Class sub-folders of small RGB JPEG/PNG images of varied sizes (deterministic)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
            pixels[..., c] = np.clip(pixels[..., c].astype(int) + 80, 0, 255).astype(np.uint8)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(root / name / f"img{i:03d}.{ext}")
    return root


def cnn_teacher(**extra) -> dict:
    teacher = {"id": "cnn32", "source": "timm", "model": "resnet10t", "pretrained": "none",
               "model_args": {"num_classes": 3}, "classes": list(CLASSES),
               "preprocess": {"input_size": [3, 32, 32], "interpolation": "bilinear"},
               "outputs": ["features", "logits", "featmap"], "logits": {"topk": 2}, "featmap": {"grid": 2}}
    teacher.update(extra)
    return teacher


def vit_teacher(**extra) -> dict:
    teacher = {"id": "vit48", "source": "timm", "model": "vit_tiny_patch16_224", "pretrained": "none",
               "model_args": {"img_size": 48, "num_classes": 3, "depth": 2}, "classes": list(CLASSES),
               "preprocess": {"input_size": [3, 48, 48], "interpolation": "bicubic"},
               "outputs": ["features", "logits", "featmap"], "featmap": {"grid": 3}}
    teacher.update(extra)
    return teacher


def write_manifest(path: Path, teachers: list[dict], images: str = "images", views: int = 3,
                   unit_rows: int = 4, store: str = "out.zarr") -> Path:
    manifest = {
        "dataset": {"root": images},
        "store": store,
        "views": {"count": views, "seed": 0},
        "storage": {"unit_rows": unit_rows, "chunk_bytes": 4096},
        "defaults": {"batch_size": 8},
        "teachers": teachers,
    }
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def store_files(store: Path) -> dict[str, bytes]:
    """Every data object of a store (metadata documents excluded: they hold timings)."""
    files = {}
    for file in sorted(store.rglob("*")):
        rel = file.relative_to(store).as_posix()
        if file.is_file() and file.name not in ("zarr.json", "ktc-objects.json"):
            files[rel] = file.read_bytes()
    return files


def clip_teacher(**extra) -> dict:
    """A random-init open_clip teacher shrunk to 32x32 inputs (zero-shot logits over the target classes)."""
    teacher = {"id": "clip32", "source": "open_clip", "model": "ViT-B-32", "pretrained": "none",
               "role": "descriptive", "outputs": ["features", "logits", "featmap"], "featmap": {"grid": 2},
               "model_args": {"embed_dim": 16,
                              "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                             "head_width": 16},
                              "text_cfg": {"width": 32, "heads": 2, "layers": 1}}}
    teacher.update(extra)
    return teacher


def extract(manifest: Path, *extra: str):
    """``ktc extract --manifest M --workers 0 --no-progress [extra]`` through click's CliRunner."""
    from click.testing import CliRunner

    from kt_cache.cli import cli

    return CliRunner().invoke(cli, ["extract", "--manifest", str(manifest), "--workers", "0", "--no-progress",
                                    *map(str, extra)])


def finished_project(base: Path, teachers: list[dict]) -> Path:
    """``base`` with ``images/``, ``teachers.yaml`` and the extracted ``out.zarr`` (4 images per class)."""
    make_image_folder(base / "images", per_class=4)
    write_manifest(base / "teachers.yaml", teachers)
    result = extract(base / "teachers.yaml")
    assert result.exit_code == 0, result.output
    return base


def write_shards(images: Path, out: Path, n_shards: int = 2, labels: bool = True, prefix: str = "train") -> list[Path]:
    """WebDataset tar shards of an image folder, in sorted order: ``<class>/<stem>.<ext>`` plus ``<stem>.cls``
    (the class folder's name) per image; ``out/train-000.tar`` …"""
    import io
    import tarfile

    files = sorted((p for p in images.rglob("*") if p.is_file()), key=lambda p: p.relative_to(images).as_posix())
    out.mkdir(parents=True, exist_ok=True)
    per_shard, shards = -(-len(files) // n_shards), []
    for number in range(n_shards):
        shards.append(out / f"{prefix}-{number:03d}.tar")
        with tarfile.open(shards[-1], "w", format=tarfile.USTAR_FORMAT) as tar:
            for file in files[number * per_shard:(number + 1) * per_shard]:
                rel = file.relative_to(images).as_posix()
                tar.add(file, arcname=rel)
                if labels:
                    text = file.parent.name.encode()
                    info = tarfile.TarInfo(rel.rsplit(".", 1)[0] + ".cls")
                    info.size = len(text)
                    tar.addfile(info, io.BytesIO(text))
    return shards


def edit_metadata(store: Path, node: str, change) -> None:
    """Apply ``change`` to every stored copy of a node's metadata, as an attacker would: its own ``zarr.json``
    (the root's for ``node=""``) and, for a node under a teacher, its copy in the teacher's consolidated metadata
    (store format v3)."""
    import json

    docs = [(store / node / "zarr.json", lambda d: d)]
    parts = node.split("/")
    if len(parts) > 2 and parts[0] == "teachers":
        name = "/".join(parts[2:])
        docs.append((store / "/".join(parts[:2]) / "zarr.json", lambda d: d["consolidated_metadata"]["metadata"][name]))
    for path, pick in docs:
        doc = json.loads(path.read_text())
        change(pick(doc))
        path.write_text(json.dumps(doc))
