"""docs/reliability.md is what ``benchmarks/reliability.py`` renders from its saved results, and those
results cover every integrity item with nothing lost.

The suite itself (tests/faults/) runs as part of the default test run; rerunning it through the script
takes minutes, so here only the page is checked against the saved records.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("reliability", ROOT / "benchmarks" / "reliability.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reliability_page_is_what_the_saved_results_render():
    script = load_script()
    result = json.loads(script.RESULTS.read_text())
    assert script.DOC.read_text(encoding="utf-8") == script.render(result), (
        "docs/reliability.md differs from benchmarks/results/reliability.json: "
        "run `python benchmarks/reliability.py --doc-only` (or without --doc-only to rerun the suite)")


def test_saved_fault_run_passed_covers_every_item_and_lost_nothing():
    script = load_script()
    result = json.loads(script.RESULTS.read_text())
    fig = script.figures(result["records"])
    assert result["returncode"] == 0 and result["pytest"].get("failed", 0) == 0, result["pytest"]
    assert fig["items_missing"] == [], f"integrity items without a recorded fault case: {fig['items_missing']}"
    assert fig["bytes_lost"] == 0
    assert fig["kills_survived"] >= 1


def test_render_counts_kills_bad_inputs_and_lost_bytes():
    script = load_script()
    records = [
        {"test": "t::a", "item": 4, "kind": "kill", "case": "kill -9 | save", "command": "ktc train", "exit_code": 0,
         "outcome": "resumed", "bytes_lost": 0},
        {"test": "t::b", "item": 3, "kind": "bad-input", "case": "label 2^40 rows", "command": "ktc train",
         "exit_code": 1, "outcome": "StoreError", "bytes_lost": 7},
    ]
    page = script.render({"records": records, "pytest": {"passed": 2}, "returncode": 0})
    assert "kills survived (kill -9 at a random or chosen moment, then rerun/resume): **1**" in page
    assert "bad inputs tried: **1**" in page and "bytes of finished work lost: **7**" in page
    assert "kill -9 \\| save" in page   # a pipe in a case does not break the table
    assert "not covered: 1, 2, 5," in page
