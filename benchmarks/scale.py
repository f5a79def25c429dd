"""Scale-out measurements on this machine: extraction with 1 process vs dask workers, training with 1 vs 2
torchrun ranks. Prints ratios measured side by side in one run and writes docs/scale-results.md.

Usage: python benchmarks/scale.py [--images 96] [--out /tmp/ktc-scale]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from extract_helpers import make_image_folder, write_manifest  # noqa: E402

TEACHERS = [  # random-init timm teachers at 112 px: the cost of real ones without a model hub
    {"id": f"t{i}", "source": "timm", "model": model, "pretrained": "none", "model_args": {"num_classes": 3},
     "classes": ["ant", "bee", "cat"], "preprocess": {"input_size": [3, 112, 112]},
     "outputs": ["features", "logits"], "logits": {"topk": 3}}
    for i, model in enumerate(["resnet18", "resnet26", "efficientnet_b0", "mobilenetv3_large_100"])
]


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - start, proc.stdout


def extraction(root: Path, manifest: Path) -> dict[str, float]:
    base = [sys.executable, "-m", "kt_cache", "extract", "--manifest", str(manifest), "--no-progress"]
    results = {}
    for name, extra in (("single process (2 decode workers)", ["--workers", "2"]),
                        ("dask local:1", ["--cluster", "local:1"]), ("dask local:2", ["--cluster", "local:2"])):
        out = root / f"{name.split()[0]}-{len(results)}.zarr"
        results[name], _ = timed([*base, "--out", str(out), *extra])
    return results


def training(store: Path, root: Path) -> dict[str, float]:
    args = ["train", "--cache", str(store), "--student", "resnet18", "--img-size", "112", "--method", "kd",
            "--epochs", "2", "--workers", "0", "--no-progress", "--log-every", "1"]
    one, _ = timed([sys.executable, "-m", "kt_cache", *args, "--batch-size", "32", "--out", str(root / "one")])
    two, _ = timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                    "kt_cache", *args, "--batch-size", "16", "--out", str(root / "two")])
    rate = {k: train_rate(root / k) for k in ("one", "two")}
    return {"1 process, batch 32: wall s": one, "torchrun 2 ranks, 16 each: wall s": two,
            "1 process: samples/s": rate["one"], "2 ranks: samples/s": rate["two"]}


def train_rate(out: Path) -> float:
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in steps if r.get("kind") == "step" and r["step"] > 2]
    return sum(rates) / max(1, len(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ktc-scale"))
    args = parser.parse_args()
    root = args.out
    subprocess.run(["rm", "-rf", str(root)], check=True)
    make_image_folder(root / "images", per_class=args.images // 3)
    manifest = write_manifest(root / "teachers.yaml", TEACHERS, views=2, unit_rows=16)
    ext = extraction(root, manifest)
    trn = training(next(root.glob("single-*.zarr")), root)
    base = ext["single process (2 decode workers)"]
    lines = [f"# Scale-out measurements ({os.cpu_count()} CPU cores, no GPU)", "",
             f"Extraction: {args.images} images x 2 views x 4 random-init timm teachers at 112 px "
             "(resnet18, resnet26, efficientnet_b0, mobilenetv3_large_100), units of 16 rows.", "",
             "| run | wall s | vs single process |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {base / v:.2f}x |" for k, v in ext.items()]
    lines += ["", "Training: resnet18 student at 112 px, kd, 2 epochs, same global batch 32.", "",
              "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in trn.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE.parent / "docs" / "scale-results.md").write_text(text)


if __name__ == "__main__":
    main()
