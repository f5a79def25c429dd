"""The plots of docs/benchmarks.md (docs/img/bench_*.png), drawn from the four benchmarks' results.

``plots(ex, tr, st, me, img)`` writes bench_extract.png, bench_train.png, bench_storage.png and
bench_memory.png into ``img``; each figure has its own function below. ``run_all.py`` calls it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIB = 2 ** 20


def plots(ex: dict, tr: dict, st: dict, me: dict, img: Path) -> list[str]:
    """Draw the four figures into ``img``; the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw, data in (("bench_extract.png", extract_figure, ex), ("bench_train.png", train_figure, tr),
                             ("bench_storage.png", storage_figure, st), ("bench_memory.png", memory_figure, me)):
        fig = draw(plt, data)
        fig.tight_layout()
        fig.savefig(img / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def extract_figure(plt: Any, ex: dict) -> Any:
    """Wall time of the three ways (pure forward, ktc extract, naive), split into load / forward / rest."""
    fig, ax = plt.subplots(figsize=(10, 2.8))
    med = ex["median"]
    pure = med["pure"]["wall_s"]
    ways = [("pure forward\n(sum of 8 teachers)", 0, pure, 0),
            ("ktc extract", med["ktc"]["load_s"], med["ktc"]["forward_s"],
             med["ktc"]["wall_s"] - med["ktc"]["load_s"] - med["ktc"]["forward_s"]),
            ("naive: 1 pass\nper teacher", med["naive"]["load_s"], med["naive"]["forward_s"],
             med["naive"]["wall_s"] - med["naive"]["load_s"] - med["naive"]["forward_s"])]
    for i, (label, load_s, fwd, other) in enumerate(ways):
        ax.barh(i, load_s, color="#bbbbbb", label="model loading" if i == 1 else None)
        ax.barh(i, fwd, left=load_s, color="#4c72b0", label="teacher forward" if i == 1 else None)
        ax.barh(i, other, left=load_s + fwd, color="#dd8452", label="everything else" if i == 1 else None)
        ax.text(load_s + fwd + other + 0.2, i, f"{load_s + fwd + other:.1f} s ({(load_s + fwd + other) / pure:.2f}x)",
                va="center", fontsize=9)
    ax.axvline(pure * 1.1, color="k", ls="--", lw=1, label="target 1.1x pure forward")
    ax.set_yticks(range(3), [w[0] for w in ways])
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median of rounds)")
    ax.set_xlim(0, max(w[1] + w[2] + w[3] for w in ways) * 1.3)
    ax.set_title(f"extraction: {ex['n_images']} images x {ex['views']} views x 8 teachers (CPU)", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def train_figure(plt: Any, tr: dict) -> Any:
    """Step time vs plain CE per loop (left) and where a step's time goes (right)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1.1, 1]})
    train_ratios(a1, tr["results"])
    train_parts(a2, tr["parts"])
    fig.suptitle(f"training step, batch {tr['batch_size']}, {tr['student']} @ {tr['img_size']} px, CPU", fontsize=10)
    return fig


def train_ratios(ax: Any, res: dict) -> None:
    names = [n for n in res if "fused" not in n]        # older results: separate fused-AdamW rows, not plotted
    values = [res[n]["vs_plain_ce"] for n in names]
    colors = ["#999999" if n.startswith("plain") else "#c44e52" if n.startswith("online") else "#4c72b0" for n in names]
    ax.barh(range(len(names)), values, color=colors)
    for i, v in enumerate(values):
        ax.text(v + 0.08, i, f"{v:.2f}x", va="center", fontsize=8, bbox={"facecolor": "white", "lw": 0, "pad": 1})
    ax.axvline(1.2, color="k", ls="--", lw=1)
    ax.axvline(1.5, color="k", ls=":", lw=1)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("step time / plain CE step (-- 1.2x target at 10, .. 1.5x at 100)")
    ax.set_xlim(0, max(values) * 1.2)


def train_parts(ax: Any, parts: dict) -> None:
    keys = list(next(iter(parts.values())).keys())
    bottom = [0.0] * len(parts)
    palette = ["#8172b2", "#4c72b0", "#55a868", "#dd8452", "#c44e52"]
    for key, color in zip(keys, palette):
        vals = [parts[n][key] for n in parts]
        ax.bar(range(len(parts)), vals, bottom=bottom, color=color, label=key)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(parts)), [n.replace("ktc ", "").replace(" cached", "").replace(" (no teachers)", "")
                                      for n in parts], fontsize=8, rotation=15)
    ax.set_ylabel("seconds per step")
    ax.legend(fontsize=7)
    ax.set_title("where a step's time goes", fontsize=9)


def storage_figure(plt: Any, st: dict) -> Any:
    """Bytes per sample-view-teacher by layout (left) and reader throughput (right)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.4))
    storage_bytes(a1, st)
    storage_reads(a2, st)
    return fig


def storage_bytes(ax: Any, st: dict) -> None:
    rows = [r for r in st["bytes"] if r["C_t"] == 1000]
    ax.bar(range(len(rows)), [r["stored_bytes"] for r in rows], color="#4c72b0")
    for i, r in enumerate(rows):
        ax.text(i, r["stored_bytes"] * 1.15, f"{100 * r['fraction']:.1f} %", ha="center", fontsize=8)
    ax.axhline(4000, color="k", lw=1, label="raw fp32 logits (4000 B)")
    ax.axhline(1000, color="k", ls="--", lw=1, label="25 % of raw")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [r["layout"] for r in rows])
    ax.set_ylabel("bytes per sample-view-teacher")
    ax.set_title("EfficientNet-Lite0, 1000 classes, real weights", fontsize=9)
    ax.legend(fontsize=8)


def storage_reads(ax: Any, st: dict) -> None:
    reads = st["reads"]
    labels = [r["store"] for r in reads] + ["2048 images, featmaps, naive random-row zarr reads"]
    rates = [r["gather_rows_per_s"] for r in reads] + [st["naive_random_rows"]["rows_per_s"]]
    ax.barh(range(len(rates)), rates, color=["#4c72b0"] * len(reads) + ["#c44e52"])
    for i, v in enumerate(rates):
        ax.text(v * 1.1, i, f"{v:,.0f}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rates)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(min(rates) / 3, max(rates) * 20)
    ax.set_xlabel("rows (sample-views) per second, CachedTeachers.gather")
    ax.set_title("reader throughput", fontsize=9)


def memory_figure(plt: Any, me: dict) -> Any:
    """Trainer peak RSS per method and teacher count, stacked: residual, heads' state, heads' activations."""
    fig, ax = plt.subplots(figsize=(8, 3.4))
    res = me["results"]
    groups = [r for r in res if r["method"] != "ce"]
    labels = [f"{r['method']}\n{r['teachers']} teacher{'s' if r['teachers'] > 1 else ''}" for r in groups]
    residual = [r["residual"] / MIB for r in groups]
    state = [r["heads_training_state"] / MIB for r in groups]
    acts = [r["saved_method"] / MIB for r in groups]
    ax.bar(range(len(groups)), residual, color="#4c72b0", label="residual (everything but the heads)")
    ax.bar(range(len(groups)), state, bottom=residual, color="#dd8452", label="heads: params + grads + AdamW moments")
    ax.bar(range(len(groups)), acts, bottom=[a + b for a, b in zip(residual, state)], color="#c44e52",
           label="heads: activations kept for backward")
    ax.axhline(res[0]["peak_rss"] / MIB, color="k", ls="--", lw=1, label="plain ce (no teacher data)")
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    ax.set_ylabel("peak RSS, MiB")
    ax.legend(fontsize=8)
    ax.set_title("trainer peak RSS vs cached teachers", fontsize=10)
    return fig
