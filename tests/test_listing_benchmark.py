"""benchmarks/listing.py runs end to end (tiny tree) and docs/listing.md is what its saved results render."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("listing_bench", ROOT / "benchmarks" / "listing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_measures_listing_and_digest(tmp_path):
    script = load_script()
    result = script.main(["--files", "300", "--classes", "6", "--shards", "3", "--reads", "50",
                          "--work", str(tmp_path / "tree"),
                          "--out", str(tmp_path / "listing.json"), "--doc", str(tmp_path / "listing.md")])
    assert result["listing"]["files"] == 300 and result["listing"]["list_warm_s"] > 0
    assert 0 < result["digest"]["digest_fraction_of_decode"] < 1, "the digest costs less than the decode"
    assert "projected for 1.28 M files" in (tmp_path / "listing.md").read_text()
    shards = result["shards"]
    assert shards["samples"] == 300 and shards["list_cold_s"] > 0 and shards["read_shards_ms"] > 0


def test_listing_page_is_what_the_saved_results_render():
    script = load_script()
    saved = json.loads(script.RESULTS.read_text())
    assert script.DOC.read_text(encoding="utf-8") == script.render(saved)
