"""benchmarks/bench_metadata.py runs end to end on two teachers, and v2's metadata is the smaller."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_compares_v1_and_v2_metadata(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_metadata", ROOT / "benchmarks" / "bench_metadata.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--teachers", "2", "--work", str(tmp_path / "work"), "--doc", "--out", str(tmp_path / "m.json")])
    rows = {row["version"]: row for row in result["rows"]}
    assert rows["v1"]["teachers"] == rows["v2"]["teachers"] == 2
    assert rows["v2"]["attrs_bytes"] * 10 < rows["v1"]["attrs_bytes"]      # statistics and class list moved out
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == result["rows"]
    assert "| v2 | 2 |" in "\n".join(module.render(result))
    sys.modules.pop("common", None)
