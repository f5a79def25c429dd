"""Run ``ktc`` sub-commands as subprocesses of the same Python (``python -m kt_cache``), timed and logged.

Each call reports wall seconds and the child's CPU seconds (user + system, from ``getrusage``). On a shared
machine the CPU seconds are the steadier measure of cost: wall time also counts waiting for the cores.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


class KtcFailed(RuntimeError):
    """A ``ktc`` command exited non-zero; the message holds the command and the end of its output."""


@dataclass(frozen=True)
class KtcRun:
    """What one ``ktc`` call printed and cost."""

    stdout: str
    wall_s: float
    cpu_s: float


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_ktc(args: list[str], log: Path) -> KtcRun:
    """Run ``ktc ARGS``; write its stdout+stderr to ``log``; return its stdout, wall and CPU seconds.

    Raises:
        KtcFailed: non-zero exit status.
    """
    command = [sys.executable, "-m", "kt_cache", *args]
    cpu, start = children_cpu(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - start, children_cpu() - cpu
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ ktc {' '.join(args)}\n# exit {done.returncode}, {seconds:.1f} s wall, {cpu:.1f} s CPU\n"
                   f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise KtcFailed(f"ktc {' '.join(args)} exited {done.returncode} (log: {log}):\n" + "\n".join(tail))
    return KtcRun(done.stdout, seconds, cpu)
