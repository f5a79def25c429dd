"""Training checkpoints survive a kill at any moment: resume continues from the previous or the new
checkpoint, never from a mix, and the final student is bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from extract_helpers import cnn_teacher, make_image_folder, write_manifest
from kt_cache.cli import cli

COMMON = ["--student", "resnet10t", "--img-size", "32", "--batch-size", "4", "--workers", "0", "--no-progress",
          "--method", "kd", "--seed", "0"]
WEIGHTS = ("student.safetensors", "method.safetensors", "optimizer.safetensors")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt_store")
    make_image_folder(root / "images", per_class=4)
    manifest = write_manifest(root / "teachers.yaml", [cnn_teacher()])
    result = CliRunner().invoke(cli, ["extract", "--manifest", str(manifest), "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    return root / "out.zarr"


def train(store: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["train", "--cache", str(store), "--out", str(out), *COMMON, *extra])


def weights(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("student.safetensors", "method.safetensors")}


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory) -> dict[str, Path]:
    """After epoch 0 (to resume from) and after epoch 1 uninterrupted (the reference)."""
    base = tmp_path_factory.mktemp("ckpt_runs")
    for name, epochs in (("one", "1"), ("two", "2")):
        result = train(store, base / name, "--epochs", epochs)
        assert result.exit_code == 0, result.output
    return {"one": base / "one", "two": base / "two"}


def crash_on_replace(monkeypatch, after: int) -> None:
    """The checkpoint commit dies (like kill -9) at its ``after``-th rename."""
    from kt_train import checkpoint

    calls, real = [0], checkpoint.rename

    def rename(src, dst):
        if calls[0] == after:
            raise KeyboardInterrupt(f"killed at rename {after}")
        calls[0] += 1
        real(src, dst)

    monkeypatch.setattr(checkpoint, "rename", rename)


# a commit renames: staged state.json into place, then its 6 files (student .safetensors/.json, method
# heads, optimizer .safetensors/.json, run.json), then state.json: 8 renames per epoch; the kill lands in
# epoch 1's commit
RENAMES = 8


@pytest.mark.parametrize("after", range(RENAMES))
def test_kill_at_every_rename_of_a_checkpoint_resumes_to_the_same_student(after, store, runs, tmp_path, monkeypatch,
                                                                          fault_log):
    out = tmp_path / "run"
    crash_on_replace(monkeypatch, RENAMES + after)
    killed = train(store, out, "--epochs", "2")
    monkeypatch.undo()
    assert killed.exit_code == 1 and "Aborted" in killed.output   # click's answer to the interrupt
    state_on_disk = json.loads((out / "state.json").read_text())
    resumed = train(store, out, "--epochs", "2", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert weights(out) == weights(runs["two"])
    assert not (out / ".checkpoint-next").exists()
    fault_log(4, "kill", f"kill during checkpoint commit, at rename {after} (state.json on disk: epoch "
              f"{state_on_disk['epoch']})", "ktc train --resume", resumed.exit_code,
              "resume rolls the commit forward or back; final student bit-identical to an uninterrupted run")


def test_resume_refuses_a_checkpoint_file_that_does_not_match_state(store, runs, tmp_path, fault_log):
    out = Path(shutil.copytree(runs["two"], tmp_path / "run"))
    shutil.copy(runs["one"] / "student.safetensors", out / "student.safetensors")   # weights of another run
    result = train(store, out, "--epochs", "3", "--resume")
    assert result.exit_code == 2 and result.exception.__class__ is SystemExit
    assert "student.safetensors does not belong to the checkpoint" in result.output
    assert "Traceback" not in result.output and "drop --resume" in result.output
    fault_log(4, "damage", "a checkpoint file swapped for another run's", "ktc train --resume", result.exit_code,
              "refused: names the file, expected vs got sha256, the fix")


def ktc(*args: str) -> list[str]:
    return [sys.executable, "-m", "kt_cache", *args]


def saved_epoch(out: Path) -> int | None:
    """The epoch of the checkpoint on disk (None before the first; state.json is only ever renamed into place)."""
    try:
        return json.loads((out / "state.json").read_text())["epoch"]
    except (OSError, ValueError):
        return None


def mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def wait_until(condition, proc: subprocess.Popen, timeout: float = 300.0) -> float | None:
    """Seconds until ``condition()`` holds while ``proc`` runs (polled every 5 ms); None if it exited first."""
    start = time.perf_counter()
    while proc.poll() is None and time.perf_counter() - start < timeout:
        if condition():
            return time.perf_counter() - start
        time.sleep(0.005)
    return None


@pytest.mark.slow
def test_random_kill_minus_9_of_train_then_resume_is_bit_identical(store, tmp_path, fault_log):
    """kill -9 a real ``ktc train`` process at random moments (seeded), resume until done.

    Each kill lands at a random moment after that process has set its run up (it writes config.yaml just
    before its first epoch) and before its last checkpoint commit, as timed by the uninterrupted run: in an
    epoch or in a commit. A kill in the interpreter's start-up (seconds of imports) or in the final
    evaluation would test nothing of the checkpoint protocol.
    """
    epochs, planned_kills = "6", 4
    reference = tmp_path / "reference"
    args = ["train", "--cache", str(store), *COMMON, "--epochs", epochs]
    env = dict(os.environ, KTC_NO_PROGRESS="1", OMP_NUM_THREADS="1")

    def start(out: Path, *extra: str) -> subprocess.Popen:
        with open(tmp_path / "stderr.txt", "wb") as err:
            return subprocess.Popen(ktc(*args, "--out", str(out), *extra), env=env, stdout=subprocess.DEVNULL,
                                    stderr=err)

    def stderr_tail() -> str:
        return (tmp_path / "stderr.txt").read_text(errors="replace")[-2000:]

    proc = start(reference)
    set_up = wait_until(lambda: (reference / "config.yaml").exists(), proc)
    window = wait_until(lambda: saved_epoch(reference) == int(epochs) - 1, proc)   # config.yaml -> last commit
    assert proc.wait(timeout=300) == 0, stderr_tail()
    assert set_up is not None and window is not None, "the reference run ended before its last checkpoint"

    out, rng, kills, landed = tmp_path / "killed", random.Random(12), 0, []
    for attempt in range(planned_kills + 1):
        done = saved_epoch(out)
        extra = [] if done is None else ["--resume"]
        config_before = mtime(out / "config.yaml")
        proc = start(out, *extra)
        if attempt < planned_kills:   # uniformly over the epochs (and their commits) this run has left
            left = int(epochs) - (0 if done is None else done + 1)
            delay = rng.uniform(0.0, 1.0) * window * left / int(epochs)
            if wait_until(lambda: mtime(out / "config.yaml") != config_before, proc) is not None:
                time.sleep(delay)
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    kills += 1
                    proc.wait(timeout=300)
                    landed.append(f"{delay:.2f} s after set-up, checkpoint on disk: epoch {saved_epoch(out)}"
                                  + (", a commit staged" if (out / ".checkpoint-next").exists() else ""))
        proc.wait(timeout=300)
        assert proc.returncode in (0, -signal.SIGKILL), stderr_tail()
    assert saved_epoch(out) == int(epochs) - 1
    assert kills >= 1, "no kill landed: lengthen the run"
    assert weights(out) == weights(reference), landed
    fault_log(4, "kill", f"kill -9 of ktc train at {kills} random moments, resumed each time", "ktc train --resume",
              0, "final student and heads bit-identical to an uninterrupted run")
