"""One GPU check of ktc (issue 15): extraction and training throughput against their floors, plus the CUDA-only
tests, in one command of at most 8 minutes on one GPU. Writes a JSON record and a markdown section.

Stages (each timed; a failing stage is recorded with its error and the others still run):

1. **images**: synthetic photo-like JPEGs (PIL, random colour fields + grain) in ImageNet-named class folders.
2. **cuda_tests**: the CUDA-only tests (``test_cuda_*``, skipped without CUDA) in a pytest subprocess.
3. **extract**: ``ktc extract`` (its library call) of 8 random-init timm teachers of real architectures at the
   input sizes ktc resolves for them, vs each teacher's pure forward under the same autocast (the floor);
   FLOPs per model (``torch.utils.flop_counter``), achieved TFLOP/s, fraction of the device's 16-bit peak,
   decode/resize cost, GPU utilisation from ``nvidia-smi``.
4. **train**: plain CE vs ``kd`` and ``uniform`` at 10 and 100 cached teachers, resnet50 student at 224 px in
   bf16: samples/s and the share of each step spent waiting for the loader.
5. **codec**: decoding a batch of ``tc:D/8`` compact feature maps on the device vs the plain store's fp16 cast
   (``benchmarks/gpu_codec.py``).

``--device cpu --tiny`` runs the same stages with tiny models on a CPU in seconds, so the device run cannot
fail on a typo. Nothing is ever estimated: on a CPU the record says device "cpu" and every figure that needs a
GPU (peak, fraction of peak, GPU utilisation, autocast) is null.

Usage:
    python benchmarks/gpu.py                          # on a GPU: benchmarks/results/gpu.json + docs/gpu.md
    python benchmarks/gpu.py --device cpu --tiny --out /tmp/gpu.json --doc /tmp/gpu.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402  (puts the repo and tests/ on sys.path, sets KTC_NO_PROGRESS)
from gpu_common import Stopwatch, device_info, run_cuda_tests  # noqa: E402
from gpu_codec import run_codec_stage  # noqa: E402
from gpu_extract import make_jpegs, run_extract_stage  # noqa: E402
from gpu_profile import make_profile  # noqa: E402
from gpu_report import write_section  # noqa: E402
from gpu_train import run_train_stage  # noqa: E402

STAGES = ("images", "cuda_tests", "extract", "train", "codec")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and images: the whole path in seconds on a CPU")
    parser.add_argument("--images", type=int, default=None, help="synthetic JPEGs (default 4096; --tiny 12)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per configuration (default 24)")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "gpu.json", help="the JSON record")
    parser.add_argument("--doc", type=Path, default=common.REPO / "docs" / "gpu.md",
                        help="the markdown page whose section to (re)write")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder, emptied first (default: next to --out)")
    return parser.parse_args(argv)


def check_device(device: str) -> None:
    """Refuse a CUDA run without CUDA up front, rather than after minutes of CPU work."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device here. Fix: run on a GPU, or use --device cpu --tiny.")


def save(record: dict[str, Any], path: Path) -> None:
    """Write the record now: after every stage, so a run cut short still leaves what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=float) + "\n", encoding="utf-8")


def run_stage(record: dict[str, Any], name: str, fn: Callable[[], Any], out: Path) -> None:
    """Run one stage into ``record[name]``; an exception becomes ``{"error", "traceback"}`` and the run goes on."""
    print(f"[gpu.py] {name} ...", flush=True)
    with Stopwatch() as t:
        try:
            record[name] = fn()
        except Exception as err:                      # recorded, printed, and the exit code says it failed
            traceback.print_exc()
            record[name] = {"error": f"{type(err).__name__}: {err}"[:500], "traceback": traceback.format_exc()[-4000:]}
    record["stage_s"][name] = t.s
    save(record, out)
    print(f"[gpu.py] {name} done in {t.s:.1f} s", flush=True)


def work_folder(args: argparse.Namespace) -> Path:
    work = args.work or args.out.parent / f"{args.out.stem}-work"
    shutil.rmtree(work, ignore_errors=True)             # a fresh build each run: no stale store is reused
    work.mkdir(parents=True)
    return work


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    check_device(args.device)
    torch.manual_seed(0)
    profile, work, start = make_profile(args.tiny, args.images, args.steps), work_folder(args), time.perf_counter()
    record: dict[str, Any] = {"schema": 1, "profile": profile.name, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "complete": False, "stage_s": {}}
    images = lambda: {"count": profile.images, "short_side": list(profile.image_side),  # noqa: E731
                      "path": str(make_jpegs(work / "images", profile.images, profile.image_side))}
    run_stage(record, "images", images, args.out)
    record["machine"] = device_info(args.device)       # after the forked image pool: CUDA starts here
    peak = record["machine"]["peak_tflops_16bit"]
    run_stage(record, "cuda_tests", lambda: run_cuda_tests(work), args.out)
    run_stage(record, "extract", lambda: run_extract_stage(work, args.device, profile, peak), args.out)
    run_stage(record, "train", lambda: run_train_stage(work, args.device, profile), args.out)
    run_stage(record, "codec", lambda: run_codec_stage(args.device, profile), args.out)
    record.update(complete=not any("error" in record[s] for s in STAGES), wall_s=time.perf_counter() - start,
                  finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    save(record, args.out)
    write_section(args.doc, record)
    print(f"[gpu.py] {'complete' if record['complete'] else 'INCOMPLETE'} in {record['wall_s']:.0f} s: "
          f"{args.out}, {args.doc}", flush=True)
    return record


if __name__ == "__main__":
    sys.exit(0 if main()["complete"] else 1)
