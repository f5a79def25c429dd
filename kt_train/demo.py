"""``ktc demo``: the whole flow offline on a CPU — extract real ImageNet teachers (EfficientNet-Lite0/1/2
from PyPI) over the embedded photos with 4 views, train a small student from the store with UNIFORM
(no labels), and measure its agreement with the teachers. The same flow a user then runs on their data.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

DEMO_MANIFEST = "data/demo.yaml"


def demo_manifest() -> Path:
    """The demo manifest shipped inside kt_cache (also at manifests/demo.yaml in the repository)."""
    return Path(str(files("kt_cache").joinpath(DEMO_MANIFEST)))


def run_demo(out: Path, epochs: int = 40, student: str = "resnet18", img_size: int = 128, device: str = "auto",
             show_progress: bool = True) -> dict[str, Any]:
    """Extract, train, evaluate; returns what ``format_summary`` prints."""
    from kt_cache.extract import ExtractOptions, run_extract
    from kt_train.config import TrainConfig
    from kt_train.loop import train

    out = Path(out)
    store = out / "demo.zarr"
    report = run_extract(ExtractOptions(manifest=demo_manifest(), out=store, device=device, batch_size=12,
                                        workers=2, progress=show_progress))
    config = TrainConfig(cache=str(store), student=student, img_size=img_size, method="uniform", labels="ignore",
                         epochs=epochs, batch_size=12, lr=2e-3, warmup_epochs=2, workers=0, device=device,
                         out=str(out / "student"), log_every=5).check()
    metrics = train(config, show_progress=show_progress)
    return {"store": store, "run": Path(config.out), "extract": report, "metrics": metrics, "config": config}


def format_summary(result: dict[str, Any]) -> str:
    from kt_cache.cli_extract import format_report
    from kt_cache.info import folder_bytes
    from kt_train.metrics import read_metrics

    run, agree = result["run"], result["metrics"].get("teacher_agreement", {})
    steps = [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "step"]
    per_teacher = ", ".join(f"{k} {v:.2f}" for k, v in (agree.get("per_teacher") or {}).items())
    lines = ["ktc demo", "", "1. extract", format_report(result["extract"]),
             f"   store: {result['store']} ({folder_bytes(result['store']) / 1e6:.1f} MB)", "",
             f"2. train: {result['config'].student} student, uniform (no labels), {len(steps) and steps[-1]['step']} steps",
             f"   loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}" if steps else "   (no steps)",
             f"   plots: {run / 'loss.png'}, {run / 'diagnostics.png'}", "",
             "3. evaluate on the store's photos (view 0)",
             f"   agreement with the teachers' consensus: {agree.get('consensus')} over {agree.get('n')} photos",
             f"   per teacher: {per_teacher}", "",
             "Next: write a manifest for your own images (docs/quickstart.md), then",
             "   ktc extract --manifest my.yaml && ktc train --cache my.zarr --method uniform"]
    return "\n".join(lines)
