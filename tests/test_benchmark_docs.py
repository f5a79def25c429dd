"""docs/benchmarks.md is exactly what ``benchmarks/run_all.py --doc-only`` makes of the saved results.

The benchmarks themselves take minutes of CPU and are not run here; rendering the page and its plots from
``benchmarks/results/*.json`` takes seconds. Everything is written under ``tmp_path``, nothing in the repo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLOTS = ("bench_extract.png", "bench_train.png", "bench_storage.png", "bench_memory.png")


def test_benchmarks_page_is_what_the_saved_results_render(tmp_path):
    doc, img = tmp_path / "benchmarks.md", tmp_path / "img"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", MPLCONFIGDIR=str(tmp_path / "mpl"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--doc-only", "--doc", str(doc),
                           "--img", str(img)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    committed = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert doc.read_text(encoding="utf-8") == committed, (
        "docs/benchmarks.md differs from what benchmarks/results/*.json render: "
        "run `python benchmarks/run_all.py --doc-only` and commit the page")
    for name in PLOTS:
        assert (img / name).stat().st_size > 1000, name
        assert (img / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
