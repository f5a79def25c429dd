"""Outputs of merge, subset and pack appear whole or not at all: they are written under
``<out>.ktc-partial`` and renamed when finalized, a killed run's leftover is removed by the next run, and
verify's advice for a damaged copy names the command that rebuilds it."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from extract_helpers import cnn_teacher, finished_project
from kt_cache.cli import cli
from kt_cache.staging import staging_path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return finished_project(tmp_path_factory.mktemp("copies"), [cnn_teacher()]) / "out.zarr"


def commands(source: Path, out_dir: Path) -> dict[str, tuple[Path, list]]:
    zarr_out, zip_out = out_dir / "out.zarr", out_dir / "out.zip"
    return {"merge": (zarr_out, ["merge", source, source, "--rename", "cnn32=twin", "--out", zarr_out]),
            "subset": (zarr_out, ["subset", source, "--teachers", "cnn32", "--out", zarr_out]),
            "pack": (zip_out, ["pack", source, zip_out])}


@pytest.mark.parametrize("command", ["merge", "subset", "pack"])
def test_leftover_of_a_killed_run_is_removed_and_the_rerun_succeeds(source, tmp_path, command, fault_log):
    out, args = commands(source, tmp_path)[command]
    leftover = staging_path(out)
    if command == "pack":
        leftover.write_bytes(b"PK\x03\x04 half a zip")
    else:
        (leftover / "teachers").mkdir(parents=True)
        (leftover / "zarr.json").write_text("{}")
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert f"removing {leftover}" in result.output
    assert not leftover.exists() and run("verify", out).exit_code == 0
    fault_log(11, "kill", f"ktc {command} rerun over a killed run's partial output", f"ktc {command}", 0,
              "the partial output is removed, the rerun completes and verifies", bytes_lost=0)


def test_kill_9_during_merge_leaves_no_output_under_the_name(source, tmp_path, fault_log):
    out, args = commands(source, tmp_path)["merge"]
    code = "import sys; from kt_cache.cli import cli; sys.argv = ['ktc'] + sys.argv[1:]; cli()"
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=dict(os.environ, KTC_NO_PROGRESS="1"))
    deadline = time.time() + 60
    while not staging_path(out).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() or proc.returncode == 0, "a killed merge never leaves a store under --out"
    if proc.returncode != 0:
        rerun = run(*args)
        assert rerun.exit_code == 0, rerun.output
    assert run("verify", out).exit_code == 0
    fault_log(11, "kill", "kill -9 during ktc merge, then rerun", "ktc merge", -9,
              "nothing appears under --out until the merge is whole; the rerun completes", bytes_lost=0)


def flip_a_byte_of_member(packed: Path, prefix: str) -> None:
    """Damage the data of the first zip member under ``prefix`` (its CRC then fails on read)."""
    with zipfile.ZipFile(packed) as archive:
        info = next(i for i in archive.infolist() if i.filename.startswith(prefix))
    data = bytearray(packed.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 2] ^= 0xFF
    packed.write_bytes(bytes(data))


@pytest.mark.parametrize("command", ["merge", "subset", "pack"])
def test_verify_advice_names_the_command_that_built_the_copy(source, tmp_path, command, fault_log):
    out, args = commands(source, tmp_path)[command]
    assert run(*args).exit_code == 0
    if command == "pack":
        flip_a_byte_of_member(out, "teachers/cnn32/logits_topk/values/c/")
    else:
        victim = sorted(p for p in (out / "teachers").rglob("c/*/*") if p.is_file())[0]
        victim.write_bytes(victim.read_bytes()[:-3])
    result = run("verify", out)
    assert result.exit_code == 1, result.output
    advice = "ktc pack STORE OUT.zip" if command == "pack" else f"rerun `ktc {command} {source}"
    assert advice in result.output and "rerun `ktc extract`" not in result.output, result.output
    if command == "pack":
        train = run("train", "--cache", out, "--method", "kd", "--epochs", "1", "--out", tmp_path / "run")
        assert train.exit_code == 1 and "cannot be decoded" in train.output, train.output
    fault_log(11, "damage", f"damaged output of ktc {command}, then ktc verify", "ktc verify", 1,
              f"the advice is to rebuild with ktc {command}, not ktc extract")
