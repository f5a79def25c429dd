"""benchmarks/gpu.py runs end to end on a CPU (``--device cpu --tiny``), so its GPU run cannot fail on a typo.

The tiny run goes through every stage the device run does (images, the CUDA-only tests, ``ktc extract`` vs
the floor, the five training configurations) with tiny models; here we check the record it writes has
every figure, that measured figures are positive, and that GPU-only figures are null rather than made up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_common import peak_tflops, suite_status  # noqa: E402

EXTRACT_KEYS = ("images_per_s", "images_per_s_wall", "floor_images_per_s", "vs_floor", "gflops_per_image", "tflops",
                "floor_tflops", "wall_s")
TEACHER_KEYS = ("ktc_images_per_s", "floor_images_per_s", "vs_floor", "gflops_per_image", "ktc_tflops", "floor_tflops")
TRAIN_KEYS = ("samples_per_s", "compute_samples_per_s", "step_s_median", "vs_plain_ce")
GPU_ONLY = ("peak_fraction", "floor_peak_fraction", "gpu_util_mean", "gpu_util_samples", "autocast_dtype")


def positive(record: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        assert isinstance(record[key], (int, float)) and record[key] > 0, (key, record[key])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("gpu")
    out, doc = tmp / "gpu.json", tmp / "gpu.md"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny", "--out", str(out),
               "--doc", str(doc), "--work", str(tmp / "work")]
    proc = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, KTC_NO_PROGRESS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), doc


@pytest.mark.slow
def test_tiny_cpu_run_records_every_stage(tiny_run):
    record, _ = tiny_run
    assert record["complete"] and record["profile"] == "tiny"
    assert set(record["stage_s"]) == {"images", "cuda_tests", "extract", "train", "codec"}
    assert record["machine"]["device"] == "cpu" and record["machine"]["peak_tflops_16bit"] is None
    ex = record["extract"]
    positive(ex, EXTRACT_KEYS)
    assert ex["images"] == record["images"]["count"] and ex["failures"] == 0 and len(ex["teachers"]) == 2
    for teacher in ex["teachers"]:
        positive(teacher, TEACHER_KEYS)
    positive(ex["decode"], ("decode_ms", "resize_ms", "decode_bound_images_per_s"))


@pytest.mark.slow
def test_tiny_cpu_run_trains_five_configurations(tiny_run):
    train = tiny_run[0]["train"]
    names = [c["name"] for c in train["configs"]]
    assert names == ["plain CE", "kd, 2 cached", "uniform, 2 cached", "kd, 4 cached", "uniform, 4 cached"]
    assert [c["teachers"] for c in train["configs"]] == [0, 2, 2, 4, 4]
    for config in train["configs"]:
        positive(config, TRAIN_KEYS)
        assert 0 <= config["loader_wait_fraction"] < 1
    assert train["dtype"] == "float32"                        # no AMP on a CPU: not reported as bf16


@pytest.mark.slow
def test_tiny_cpu_run_times_the_compact_map_decode(tiny_run):
    codec = tiny_run[0]["codec"]
    assert codec["codec"] == "tc:4" and codec["code_bytes"] <= 4 * 4 < codec["fp16_bytes"]      # 2x2 cells, D = 32
    positive(codec, ("fit_s", "decode_ms", "fp16_cast_ms", "maps_per_s", "mflop_per_map"))
    assert 0.5 < codec["mean_cosine"] <= 1.0
    assert "### Compact feature maps: decoding in the read path" in tiny_run[1].read_text()


@pytest.mark.slow
def test_tiny_cpu_run_never_fakes_gpu_figures(tiny_run):
    record = tiny_run[0]
    ex = record["extract"]
    assert all(ex[key] is None for key in GPU_ONLY)
    assert all(t["ktc_peak_fraction"] is None and t["floor_peak_fraction"] is None for t in ex["teachers"])
    assert all(c["gpu_util_mean"] is None for c in record["train"]["configs"])
    tests = record["cuda_tests"]
    assert tests["status"] == "skipped" and tests["skipped"] >= 2 and tests["passed"] == 0, tests


@pytest.mark.slow
def test_tiny_cpu_run_writes_the_markdown_section(tiny_run):
    _, doc = tiny_run
    text = doc.read_text()
    assert text.count("<!-- benchmarks/gpu.py: begin -->") == 1 and "<!-- benchmarks/gpu.py: end -->" in text
    assert "Device **CPU** (`cpu`)" in text and "| uniform, 4 cached |" in text and "**skipped**" in text
    assert "```bash" not in text                              # tests/test_docs.py runs bash blocks


def test_peaks_are_looked_up_by_name_most_specific_first():
    assert peak_tflops("NVIDIA H200") == peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("NVIDIA L40S") == 362.0
    assert peak_tflops("Some Future GPU") is None and peak_tflops(None) is None


def test_all_skipped_is_never_a_pass():
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 2}
    assert suite_status(0, counts) == "skipped"
    assert suite_status(0, dict(counts, passed=2, skipped=0)) == "pass"
    assert suite_status(1, dict(counts, failed=1)) == "fail"
