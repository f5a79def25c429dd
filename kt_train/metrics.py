"""Run metrics: ``metrics.jsonl`` (one JSON object per logged step or epoch) and PNG plots from it."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends JSON lines to ``<out>/metrics.jsonl`` (rank 0 only writes)."""

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far (MiB; ``getrusage``), None where the platform has none. Data
    loader workers are processes of their own and not counted (they hold images, not teacher arrays)."""
    try:
        import resource
    except ImportError:          # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)   # bytes on macOS, KiB on Linux


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def step_series(records: list[dict[str, Any]], keys: list[str]) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for key in keys:
        points = [(r["step"], r[key]) for r in records if r.get("kind") == "step" and key in r]
        series[key] = ([p[0] for p in points], [p[1] for p in points])
    return series


def epoch_means(records: list[dict[str, Any]], prefix: str) -> dict[str, dict[int, float]]:
    """Per-epoch mean of every step key starting with ``prefix`` (e.g. ``teach_share/``)."""
    sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record.get("kind") != "step":
            continue
        for key, value in record.items():
            if key.startswith(prefix):
                sums[key][record["epoch"]].append(value)
    return {key: {e: sum(v) / len(v) for e, v in by_epoch.items()} for key, by_epoch in sums.items()}


def plot_lines(series: dict[str, tuple[list, list]], title: str, ylabel: str, path: Path, xlabel: str = "step") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, marker="o" if len(xs) < 20 else None)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# What each diagnostic means (docs/methods.md); fractions share one axis, norms and losses another.
DIAGNOSTICS = {
    "tie_frac": "uniform: fraction of feature dims whose sign vote tied",
    "vote_agreement": "uniform: mean share of the winning class vote",
    "pseudo_acc": "uniform/avg/kd: accuracy of the teachers' vote vs the labels",
    "no_teacher_frac": "bikd: rows no teacher was confident enough to teach",
    "transfer_frac": "fg: rows that distil from the teacher rather than retain",
    "x_norm": "uniform: mean norm of the student's projected features",
    "x_hat_norm": "uniform: mean norm of the voted feature target",
    "alt_target_ce": "uniform (Case B): loss under the zero-padded mean target",
}
FRACTIONS = ("tie_frac", "vote_agreement", "pseudo_acc", "no_teacher_frac", "transfer_frac")


def plot_diagnostics(series: dict[str, tuple[list, list]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = diagnostics_figure(series)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def diagnostics_figure(series: dict[str, tuple[list, list]]) -> Any:
    """Fractions (0..1) on the left panel, norms and other values on the right, each line named and explained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"fractions (0..1)": {k: v for k, v in series.items() if k in FRACTIONS or k.endswith("_frac")},
              "norms and other values": {k: v for k, v in series.items() if not (k in FRACTIONS or k.endswith("_frac"))}}
    groups = {title: g for title, g in groups.items() if g}
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    for ax, (title, group) in zip(axes[0], groups.items()):
        for name, (xs, ys) in group.items():
            ax.plot(xs, ys, label=f"{name}: {DIAGNOSTICS.get(name, 'method diagnostic')}",
                    marker="o" if len(xs) < 20 else None)
        ax.set(title=title, xlabel="step", ylim=(0, 1.02) if title.startswith("fractions") else None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("method diagnostics")
    fig.tight_layout()
    return fig


def write_plots(out_dir: Path) -> list[Path]:
    """``loss.png`` (total and every part); ``diagnostics.png`` (uniform: tie fraction, vote agreement…);
    ``teach_share.png`` (bikd: each participant's teaching share per epoch)."""
    out_dir = Path(out_dir)
    records = read_metrics(out_dir / "metrics.jsonl")
    steps = [r for r in records if r.get("kind") == "step"]
    if not steps:
        return []
    keys = sorted({k for r in steps for k in r})
    losses = [k for k in keys if k == "loss" or k.endswith("_loss")]
    written = [plot_lines(step_series(records, losses), "training losses", "loss", out_dir / "loss.png")]
    skip = set(losses) | {"step", "epoch", "lr", "kind", "samples_per_s", "time"}
    diagnostics = [k for k in keys if k not in skip and not k.startswith("teach_share/")]
    if diagnostics:
        written.append(plot_diagnostics(step_series(records, diagnostics), out_dir / "diagnostics.png"))
    shares = epoch_means(records, "teach_share/")
    if shares:
        series = {k.split("/", 1)[1]: (sorted(v), [v[e] for e in sorted(v)]) for k, v in shares.items()}
        written.append(plot_lines(series, "Bi-KD: teaching share per epoch", "share of samples",
                                  out_dir / "teach_share.png", xlabel="epoch"))
    return written
