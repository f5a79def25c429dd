"""Device facts and measuring aids of ``benchmarks/gpu.py``: peaks, GPU-utilisation sampling, timing, the
CUDA-only tests.

Kept apart from the stages so each stage module stays small, and so that nothing here fakes a GPU figure:
every helper returns ``None`` where the machine cannot measure the thing (no CUDA, no nvidia-smi, unknown
device name), and the record keeps that ``null``.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from common import Stopwatch  # noqa: F401  (re-exported for gpu.py / gpu_extract.py)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Dense 16-bit tensor-core peaks (TFLOP/s, no sparsity) from the vendor data sheets. fp16 and bf16 peaks are
# equal on these parts, so the table serves extraction (fp16 autocast, ktc's own) and training (bf16) alike.
# Checked in order: more specific names first ("H100 PCIe" before "H100", "L40S" before "L4").
PEAK_TFLOPS_16BIT = (
    ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
)


def peak_tflops(device_name: str | None) -> float | None:
    """The dense 16-bit peak of a device by its name; ``None`` for the CPU or a name not in the table."""
    for key, peak in PEAK_TFLOPS_16BIT:
        if device_name and key in device_name:
            return peak
    return None


def device_info(device: str) -> dict[str, Any]:
    """What the record says about the machine: ``device`` is "cpu" unless a CUDA device really ran."""
    import torch

    info = {"device": "cpu", "device_name": None, "peak_tflops_16bit": None, "torch": torch.__version__,
            "torch_cuda_build": torch.version.cuda, "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        info.update(device="cuda", device_name=name, peak_tflops_16bit=peak_tflops(name),
                    gpu_memory_gib=round(torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30, 1))
    return info


def sync(device: str) -> None:
    """Wait for queued kernels, so a wall-clock interval covers the work launched inside it."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def fraction(value: float | None, peak: float | None) -> float | None:
    return None if value is None or not peak else value / peak


def mean(values: list[float] | None) -> float | None:
    return float(statistics.fmean(values)) if values else None


class GpuSampler:
    """Samples ``nvidia-smi`` utilisation in a thread while a stage runs.

    nvidia-smi's figure is the fraction of time a kernel was running, not of peak FLOPs: it tells idle gaps
    (decode-bound, sync-bound) apart from busy time, which TFLOP/s alone cannot. ``samples`` stays ``None``
    on a machine without nvidia-smi or when the run is on the CPU.
    """

    QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]

    def __init__(self, device: str, period_s: float = 0.5) -> None:
        self.enabled = device.startswith("cuda") and shutil.which("nvidia-smi") is not None
        self.period_s, self.samples = period_s, [] if self.enabled else None
        self.stop_event, self.thread = threading.Event(), None

    def read(self) -> float | None:
        try:
            out = subprocess.run(self.QUERY, capture_output=True, text=True, timeout=5).stdout.split()
            return float(out[0]) if out else None         # first GPU: the machine this benchmark sizes has one
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def loop(self) -> None:
        while not self.stop_event.wait(self.period_s):
            value = self.read()
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> "GpuSampler":
        if self.enabled:
            self.thread = threading.Thread(target=self.loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def summary(self) -> dict[str, Any]:
        return {"gpu_util_mean": mean(self.samples), "gpu_util_samples": None if self.samples is None else len(self.samples)}


@contextmanager
def autocast_dtype(device: str, dtype: Any) -> Iterator[None]:
    """Make ``torch.autocast("cuda")`` without a dtype mean ``dtype`` for a while.

    ``ktc train`` autocasts with the device default (fp16); the issue asks for the student in bf16, so the
    default is switched around the training stage and restored after it, leaving ktc's code untouched.
    """
    import torch

    if not device.startswith("cuda"):
        yield
        return
    before = torch.get_autocast_dtype("cuda")
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_dtype("cuda", before)


# ------------------------------------------------------------------------------------------- CUDA tests
CUDA_SKIP = re.compile(r"skipif\(\s*not torch\.cuda\.is_available\(\)")


def cuda_test_files(root: Path = REPO / "tests") -> list[str]:
    """Test files holding CUDA-only tests. The project has no ``cuda`` marker (``--strict-markers`` would
    refuse one): its CUDA tests are ``test_cuda_*`` functions skipped unless ``torch.cuda.is_available()``."""
    return sorted(str(p.relative_to(REPO)) for p in root.rglob("test_*.py") if CUDA_SKIP.search(p.read_text("utf-8")))


def junit_outcomes(path: Path) -> list[dict[str, str]]:
    """Per-test outcome (passed / failed / error / skipped) from pytest's JUnit XML."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        name = f"{case.get('classname')}::{case.get('name')}"
        tests.append({"name": name, "outcome": outcome.replace("failure", "failed")})
    return tests


def run_cuda_tests(work: Path, timeout_s: int = 300) -> dict[str, Any]:
    """Run the CUDA-only tests in a subprocess and record each outcome; on a CPU they are all skipped."""
    files, xml = cuda_test_files(), work / "cuda-tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", f"--junitxml={xml}", *files]
    env = dict(os.environ, KTC_NO_PROGRESS="1")
    with Stopwatch() as t:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    tests = junit_outcomes(xml) if xml.exists() else []
    counts = {key: sum(t["outcome"] == outcome for t in tests)
              for key, outcome in (("passed", "passed"), ("failed", "failed"), ("errors", "error"), ("skipped", "skipped"))}
    shown = ["python", *(c for c in command[1:] if not c.startswith("--junitxml"))]
    return {"command": " ".join(shown), "files": files, "returncode": proc.returncode,
            "status": suite_status(proc.returncode, counts), **counts,
            "tests": tests, "wall_s": t.s, "output_tail": (proc.stdout + proc.stderr)[-2000:]}


def suite_status(returncode: int, counts: dict[str, int]) -> str:
    """"pass" only when tests really ran and passed; all skipped (a CPU) is "skipped", never a pass."""
    if returncode not in (0, 5) or counts["failed"] or counts["errors"]:
        return "fail"
    return "pass" if counts["passed"] else "skipped"
