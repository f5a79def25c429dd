"""The teachers manifest of the zoo ("a lab's own checkpoints") and one timed ``ktc extract`` run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from digits.data import CLASSES, IMAGE_SIZE
from digits.ktc import run_ktc
from digits.teachers import CENTER_CROP, MEAN, STD, VIEW_RATIO, VIEW_SCALE, ZOO, ZooTeacher

VIEWS = 4
UNIT_ROWS = 256
FEATMAP_GRID = 2


def teacher_entry(spec: ZooTeacher, folder: str = "teachers", featmap: bool = True) -> dict[str, Any]:
    """One ``teachers:`` item: a local safetensors checkpoint with its own classes and preprocessing."""
    entry: dict[str, Any] = {
        "id": spec.name, "source": "timm", "model": spec.arch, "role": spec.role,
        "checkpoint": f"{folder}/{spec.name}.safetensors",
        "model_args": {"num_classes": len(spec.classes), **dict(spec.model_args)},
        "preprocess": {"input_size": [3, IMAGE_SIZE, IMAGE_SIZE], "mean": list(MEAN), "std": list(STD),
                       "interpolation": "bilinear"},
    }
    if spec.role == "predictive" and featmap:
        entry |= {"classes": list(spec.classes), "outputs": ["features", "logits", "featmap"],
                  "featmap": {"grid": FEATMAP_GRID}}
    elif spec.role == "predictive":
        entry |= {"classes": list(spec.classes), "outputs": ["features", "logits"]}
    else:
        entry["outputs"] = ["features"]
    return entry


def write_manifest(out: Path, entries: list[dict[str, Any]] | None = None, store: str = "store.zarr",
                   name: str = "manifest.yaml", views: dict[str, Any] | None = None) -> Path:
    """``out/NAME`` over ``out/data/train`` with ``entries`` (default: every zoo teacher); paths relative to ``out``;
    ``views`` replaces keys of the zoo's view policy (e.g. ``{"count": 1, "center_crop": 1.0}``)."""
    manifest = {
        "dataset": {"root": "data/train", "classes": list(CLASSES)},
        "store": store,
        "views": {"count": VIEWS, "seed": 0, "scale": list(VIEW_SCALE), "ratio": list(VIEW_RATIO), "flip": False,
                  "center_crop": CENTER_CROP} | (views or {}),
        "storage": {"unit_rows": UNIT_ROWS},
        "defaults": {"batch_size": 256, "dtype": "float16"},
        "teachers": entries if entries is not None else [teacher_entry(spec) for spec in ZOO],
    }
    path = out / name
    path.write_text(yaml.safe_dump(manifest, sort_keys=False, default_flow_style=None))
    return path


def parse_report(stdout: str, names: set[str]) -> dict[str, Any]:
    """Images, seconds and images/s of ``ktc extract``'s summary, plus its per-teacher table rows."""
    head = re.search(r"(\d+) images processed in ([\d.]+) s \(([\d.]+) images/s", stdout)
    if head is None and "nothing to do" in stdout:   # a complete store left as it is (fresh=False)
        return {"images": 0, "seconds": 0.0, "images_per_s": 0.0, "teachers": {}}
    if head is None:
        raise ValueError(f"no summary line in ktc extract output:\n{stdout[-2000:]}")
    teachers = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[0] in names:
            teachers[parts[0]] = {"status": parts[1], "load_s": float(parts[2]), "forward_s": float(parts[3]),
                                  "views": int(parts[4]), "views_per_s": float(parts[5])}
    return {"images": int(head[1]), "seconds": float(head[2]), "images_per_s": float(head[3]), "teachers": teachers}


def extract(out: Path, entries: list[dict[str, Any]] | None = None, name: str = "store",
            fresh: bool = True, views: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out/NAME.yaml`` and extract ``out/NAME.zarr`` (afresh, or resumed with ``fresh=False``: a
    complete store is then left as it is); returns the parsed report + wall time."""
    manifest = write_manifest(out, entries, f"{name}.zarr", "manifest.yaml" if name == "store" else f"{name}.yaml",
                              views)
    store = out / f"{name}.zarr"
    if store.exists() and fresh:
        shutil.rmtree(store)
    run = run_ktc(["extract", "--manifest", str(manifest), "--out", str(store), "--no-progress"],
                  out / "logs" / f"extract-{name}.log".replace("extract-store", "extract"))
    names = {entry["id"] for entry in entries} if entries is not None else {spec.name for spec in ZOO}
    return parse_report(run.stdout, names) | {"wall_s": run.wall_s, "cpu_s": run.cpu_s, "store": str(store),
                                              "store_bytes": folder_bytes(store)}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
