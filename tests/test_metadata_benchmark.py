"""benchmarks/bench_metadata.py runs end to end on two teachers: v2's teacher metadata is smaller than v1's, and
v3's root holds none of it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_compares_v1_v2_and_v3_metadata(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_metadata", ROOT / "benchmarks" / "bench_metadata.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--teachers", "2", "--work", str(tmp_path / "work"), "--doc", "--out", str(tmp_path / "m.json")])
    rows = {row["version"]: row for row in result["rows"]}
    assert rows["v1"]["teachers"] == rows["v2"]["teachers"] == rows["v3"]["teachers"] == 2
    assert rows["v2"]["attrs_bytes"] * 10 < rows["v1"]["attrs_bytes"]      # statistics and class list moved out
    assert rows["v3"]["attrs_bytes"] == rows["v2"]["attrs_bytes"] and rows["v3"]["teacher_json_bytes"] > 4000
    assert rows["v3"]["root_json_bytes"] + 2 * 4000 < rows["v2"]["root_json_bytes"]   # the teachers' nodes left
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == result["rows"]
    page = "\n".join(module.render(result))
    assert "| v2 | 2 |" in page and "| v3 | 2 |" in page and "Target (root metadata <= 4 KB per teacher)" in page
    sys.modules.pop("common", None)
