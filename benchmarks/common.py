"""Shared helpers of the ktc benchmarks (bench_extract / bench_train / bench_storage / bench_memory).

Everything here builds inputs (image folders, manifests, stores) in a work folder (default
``/tmp/ktc-bench``, override with ``KTC_BENCH_WORK``) and reuses them between scripts when the same
configuration was already built, so ``run_all.py`` builds each store once. Results are written as JSON
to ``benchmarks/results/<name>.json``; ``run_all.py`` turns them into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from extract_helpers import make_image_folder  # noqa: E402

RESULTS = HERE / "results"
WORK = Path(os.environ.get("KTC_BENCH_WORK", "/tmp/ktc-bench"))
os.environ.setdefault("KTC_NO_PROGRESS", "1")

# Dataset folders are named after ImageNet classes and the target label space is imagenet-1k, so the
# teachers (1000 logits, top-k 20) and the student (1000 classes) have ImageNet-sized heads.
IMAGENET_FOLDERS = ("stingray", "cock", "hen")   # ImageNet-1k class names (as ktc spells them)


# ---------------------------------------------------------------------------------------------- timing
def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    import torch

    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "load_average": load_average()}


class Stopwatch:
    """``with Stopwatch() as t: ...``; ``t.s`` is the elapsed wall time in seconds."""

    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.s = time.perf_counter() - self.start


def save_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = dict(data, machine=machine(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    path.write_text(json.dumps(data, indent=1, default=float))
    return path


def print_and_save(result: dict[str, Any], lines: list[str], out: Path) -> dict[str, Any]:
    """A script's rendered section printed, its raw result written to ``out`` (JSON)."""
    print("\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_table(title: str, rows: list[tuple], header: tuple) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n== {title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


# ---------------------------------------------------------------------------------------------- inputs
def make_images(root: Path, per_class: int, min_side: int = 0, max_side: int = 0, seed: int = 0) -> Path:
    """``tests/extract_helpers.make_image_folder`` (3 ImageNet-named classes, JPEG + PNG), optionally
    upscaled to a shorter side in ``[min_side, max_side]`` so decoding costs what a photo costs."""
    from PIL import Image

    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    make_image_folder(root, per_class=per_class, classes=IMAGENET_FOLDERS, seed=seed)
    if max_side:
        rng = np.random.default_rng(seed + 1)
        for path in sorted(root.rglob("img*.*")):
            image = Image.open(path).convert("RGB")
            side = int(rng.integers(min_side, max_side + 1))
            scale = side / min(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            image.save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
    (root / ".complete").write_text("ok")
    return root


def timm_teacher(tid: str, model: str, size: int, *, topk: int | None = 20, outputs=("features", "logits"),
                 model_args: dict | None = None, grid: int | None = None, batch_size: int | None = None) -> dict:
    """A random-init timm teacher of a real architecture with 1000 ImageNet logits."""
    entry = {"id": tid, "source": "timm", "model": model, "pretrained": "none", "classes": "imagenet-1k",
             "model_args": {"num_classes": 1000, **(model_args or {})},
             "preprocess": {"input_size": [3, size, size]}, "outputs": list(outputs)}
    if topk:
        entry["logits"] = {"topk": topk}
    if grid:
        entry["featmap"] = {"grid": grid}
    if batch_size:
        entry["batch_size"] = batch_size
    return entry


def write_manifest(path: Path, images: Path, teachers: list[dict], views: int, unit_rows: int = 16384,
                   chunk_bytes: int | None = None, batch_size: int = 64, store: str = "store.zarr",
                   dataset: dict | None = None) -> Path:
    storage: dict[str, Any] = {"unit_rows": unit_rows}
    if chunk_bytes:
        storage["chunk_bytes"] = chunk_bytes
    manifest = {"dataset": dataset or {"root": str(images), "classes": "imagenet-1k"}, "store": store,
                "views": {"count": views, "seed": 0}, "storage": storage,
                "defaults": {"batch_size": batch_size, "dtype": "float16"}, "teachers": teachers}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def config_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_extract_inprocess(manifest: Path, out: Path, workers: int = 2, batch_size: int = 32) -> tuple[Any, float]:
    """``ktc extract`` as the library call the CLI makes; returns (report, wall seconds)."""
    from kt_cache.extract import ExtractOptions, run_extract

    options = ExtractOptions(manifest=manifest, out=out, device="cpu", workers=workers, batch_size=batch_size,
                             progress=False)
    start = time.perf_counter()
    report = run_extract(options)
    return report, time.perf_counter() - start


def cached_store(name: str, manifest_args: dict[str, Any], images: Path, workers: int = 2,
                 batch_size: int = 32) -> Path:
    """Extract (once; reused when the same configuration was built before) and return the store path."""
    key = config_key(name, manifest_args, str(images))
    folder = WORK / f"{name}-{key}"
    store = folder / "store.zarr"
    if (folder / ".complete").exists():
        return store
    shutil.rmtree(folder, ignore_errors=True)
    manifest = write_manifest(folder / "manifest.yaml", images, **manifest_args)
    t0 = time.perf_counter()
    run_extract_inprocess(manifest, store, workers=workers, batch_size=batch_size)
    print(f"[built {store} in {time.perf_counter() - t0:.1f} s]", flush=True)
    (folder / ".complete").write_text("ok")
    return store


def synthetic_store(source: Path, n_teachers: int, out: Path) -> Path:
    """A store with ``n_teachers`` teachers made by copying the real teacher groups of ``source`` under new ids
    (``s000``, ``s001``, ... cycling over the source teachers), then finalized like ``ktc extract`` does
    (consolidated metadata + ``ktc-objects.json``). The copies are byte-identical outputs of real teachers:
    what the trainer reads and the heads a method builds are those of ``n_teachers`` teachers."""
    from kt_cache.finalize import consolidate, write_object_manifest

    if (out.parent / f".complete-{out.name}").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    src_ids = sorted(p.name for p in (source / "teachers").iterdir() if p.is_dir())
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("teachers"))
    (out / "teachers").mkdir()
    shutil.copy2(source / "teachers" / "zarr.json", out / "teachers" / "zarr.json")
    for i in range(n_teachers):
        src = src_ids[i % len(src_ids)]
        dest = out / "teachers" / f"s{i:03d}"
        shutil.copytree(source / "teachers" / src, dest)
        doc = json.loads((dest / "zarr.json").read_text())
        attrs = doc["attributes"]["ktc_teacher"]
        attrs["copied_from"] = src
        attrs["entry"] = dict(attrs.get("entry") or {}, id=f"s{i:03d}")
        (dest / "zarr.json").write_text(json.dumps(doc, indent=2))
    root_doc = json.loads((out / "zarr.json").read_text())
    root_doc.pop("consolidated_metadata", None)
    (out / "zarr.json").write_text(json.dumps(root_doc, indent=2))
    consolidate(out)
    write_object_manifest(out)
    (out.parent / f".complete-{out.name}").write_text("ok")
    return out


def dir_bytes(path: Path, data_only: bool = True) -> int:
    """Bytes of the files under ``path`` (``data_only``: metadata documents excluded)."""
    total = 0
    for file in path.rglob("*"):
        if file.is_file() and not (data_only and file.name in ("zarr.json", "ktc-objects.json")):
            total += file.stat().st_size
    return total


# ---------------------------------------------------------------------------------------------- training
# The 10 teachers of the training benchmarks: architectures from manifests/imagenet-104.yaml (random init,
# no model hub here), 64 px inputs like the student, 1000 ImageNet logits (top-20 + LSE) and features.
# Sizes span that manifest from tiny to base (it is dominated by base/large models; these are smaller).
TRAIN_SIZE = 64
STUDENT, STUDENT_SIZE = "resnet18", TRAIN_SIZE   # the trained student; bench_teachers --student/--img-size change it
TRAIN_TEACHERS = [
    ("resnet50", {}), ("convnext_tiny", {}), ("vit_base_patch16_224", {"img_size": TRAIN_SIZE}),
    ("regnety_016", {}), ("mobilenetv3_large_100", {}), ("vit_small_patch16_224", {"img_size": TRAIN_SIZE}),
    ("deit_tiny_patch16_224", {"img_size": TRAIN_SIZE}), ("resnet34", {}), ("efficientnet_b2", {}),
    ("convnext_small", {}),
]
TRAIN_IMAGES_PER_CLASS = 16          # 48 images
TRAIN_VIEWS = 2


def train_images() -> Path:
    return make_images(WORK / "images-train", TRAIN_IMAGES_PER_CLASS, 160, 256, seed=1)


def train_teacher_entries() -> list[dict]:
    return [timm_teacher(f"t{i:02d}_{m}", m, TRAIN_SIZE, model_args=a) for i, (m, a) in enumerate(TRAIN_TEACHERS)]


def train_store(n_teachers: int) -> Path:
    """The 10-teacher store (real extraction); 1 = a subset of it; 100 = synthetic copies of its 10 groups."""
    args = {"teachers": train_teacher_entries(), "views": TRAIN_VIEWS, "unit_rows": 16384, "batch_size": 64}
    ten = cached_store("train10", args, train_images())
    if n_teachers == 10:
        return ten
    return synthetic_store(ten, n_teachers, ten.parent / f"synthetic{n_teachers}.zarr")


def train_config(store: Path, method: str, out: Path, **extra: Any):
    from kt_train.config import build_config

    values = {"cache": str(store), "student": STUDENT, "img_size": STUDENT_SIZE, "method": method,
              "batch_size": 16, "workers": 0, "device": "cpu", "out": str(out), "log_every": 1}
    values.update(extra)
    return build_config({}, values)
