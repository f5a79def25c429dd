"""``ktc demo`` (README's first command) end to end, with a shorter training so the test stays quick."""

from __future__ import annotations

from click.testing import CliRunner

from kt_cache.cli import cli


def test_demo_extracts_trains_and_reports_agreement(tmp_path, monkeypatch):
    monkeypatch.setenv("KTC_DATA_DIR", str(tmp_path / "data"))
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "demo"), "--epochs", "2",
                                      "--student", "resnet10t", "--no-progress"])
    assert result.exit_code == 0, result.output
    for text in ("effnet_lite0", "effnet_lite1", "effnet_lite2", "agreement with the teachers' consensus",
                 "over 12 photos"):
        assert text in result.output
    assert (tmp_path / "demo" / "demo.zarr" / "ktc-objects.json").is_file()
    assert (tmp_path / "demo" / "student" / "loss.png").is_file()
