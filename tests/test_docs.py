"""Every command shown in README.md and docs/quickstart.md runs, as written (``tests/`` keeps docs true).

Fenced ``bash`` blocks are run line by line in a scratch folder; ``python`` blocks are executed there.
Install lines (``pip install …``) are what CI itself runs. Commands that need a GPU cluster (docs/scale.md)
and the benchmark reproductions that take minutes of CPU (docs/benchmarks.md, docs/results-digits.md) are
shown in ``console`` blocks and are not run here; tests/test_benchmark_docs.py checks that
docs/benchmarks.md is exactly what its script generates from the saved results.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def commands(path: Path) -> list[str]:
    lines = [line.split("  #")[0].strip() for block in blocks(path, "bash") for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith(("pip install", "#"))]


def run(command: str, cwd: Path) -> str:
    env = dict(os.environ, KTC_NO_PROGRESS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"`{command}` failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_every_shell_block_in_the_docs_is_covered_here():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if blocks(doc, "bash"):
            assert doc.name in ("README.md", "quickstart.md"), f"{doc.name} has ```bash blocks no test runs"


def test_readme_tour(tmp_path, monkeypatch):
    monkeypatch.setenv("KTC_DATA_DIR", str(tmp_path / "data-cache"))
    (tmp_path / "manifests").mkdir()
    shutil.copy(ROOT / "manifests" / "demo.yaml", tmp_path / "manifests" / "demo.yaml")
    outputs = [run(command, tmp_path) for command in commands(ROOT / "README.md")]
    assert "estimated store size" in outputs[0] and "effnet_lite2" in outputs[2]
    assert "effnet_lite0/featmap: tc:160 (4x4 cells x 1280 -> " in outputs[4] and "mean cosine" in outputs[4]
    assert outputs[5].startswith("OK") and "read it as zip://" in outputs[6]
    for code in blocks(ROOT / "README.md", "python"):
        monkeypatch.chdir(tmp_path)
        exec(compile(code, "README.md", "exec"), {})


def photo_folders(root: Path) -> None:
    """data/train and data/val: crops of two real photos, in ImageNet's layout (WordNet-id folders)."""
    from skimage import data

    rng = np.random.default_rng(0)
    for name, photo in (("n02124075", data.chelsea()), ("n03063599", data.coffee())):   # Egyptian cat, coffee mug
        image = Image.fromarray(photo)
        for split, count in (("train", 4), ("val", 2)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w, h = image.size
                side = int(min(w, h) * rng.uniform(0.6, 1.0))
                x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                image.crop((x, y, x + side, y + side)).save(root / split / name / f"{i:02d}.jpg")


def test_quickstart(tmp_path):
    doc = ROOT / "docs" / "quickstart.md"
    photo_folders(tmp_path / "data")
    manifest = next(b for b in blocks(doc, "yaml") if b.startswith("# my-teachers.yaml"))
    (tmp_path / "my-teachers.yaml").write_text(manifest)
    outputs = [run(command, tmp_path) for command in commands(doc)]
    assert "lite0" in outputs[1] and "complete" in outputs[2]
    assert "top-1" in outputs[-1] and "agreement with the teachers' consensus" in outputs[-1]
    assert (tmp_path / "runs" / "kd" / "confusion.png").is_file()
    assert json.loads((tmp_path / "runs" / "kd" / "eval.json").read_text())["n"] == 4       # --val data/val
