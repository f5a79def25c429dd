"""Run ``ktc`` sub-commands as subprocesses of the same Python (``python -m kt_cache``), timed and logged."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


class KtcFailed(RuntimeError):
    """A ``ktc`` command exited non-zero; the message holds the command and the end of its output."""


def run_ktc(args: list[str], log: Path) -> tuple[str, float]:
    """Run ``ktc ARGS``; write its stdout+stderr to ``log``; return (stdout, wall seconds).

    Raises:
        KtcFailed: non-zero exit status.
    """
    command = [sys.executable, "-m", "kt_cache", *args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ ktc {' '.join(args)}\n# exit {done.returncode}, {seconds:.1f} s\n"
                   f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise KtcFailed(f"ktc {' '.join(args)} exited {done.returncode} (log: {log}):\n" + "\n".join(tail))
    return done.stdout, seconds
