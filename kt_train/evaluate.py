"""``ktc eval``: a trained student on a labelled folder (top-1/top-5, per class, confusion matrix) and,
with ``--cache``, its agreement with the cached teachers' consensus on the store's images (view 0).

Training ends by calling the same ``evaluate`` and saving its result as ``eval.json``, so
``ktc eval --checkpoint DIR`` with the same inputs reproduces it. Unreadable images are skipped and
counted, never fatal (``kt_train.skipping``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kt_cache.errors import UsageError
from kt_train.skipping import Skipped, readable_batches

RUN_INFO = "run.json"


class FolderViews(torch.utils.data.Dataset):
    """Labelled images -> the centre view (view 0 of the store's policy) at the student's input size."""

    def __init__(self, root: Path, ids: tuple[str, ...], labels: np.ndarray, data_config: dict[str, Any], center: float):
        from kt_cache.manifest_types import ViewsSpec

        self.root, self.ids, self.labels = Path(root), ids, labels
        self.size = tuple(data_config["input_size"][1:])
        self.interpolation = data_config.get("interpolation", "bilinear")
        self.mean = torch.tensor(data_config["mean"]).view(3, 1, 1) * 255
        self.std = torch.tensor(data_config["std"]).view(3, 1, 1) * 255
        self.policy = ViewsSpec(count=1, center_crop=center)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from kt_cache.images import decode_image
        from kt_cache.views import sample_views, view_pixels

        image = decode_image(self.root / self.ids[i])
        box = sample_views(self.policy, i, (image.height, image.width))[0]
        pixels = view_pixels(image, box[:4], False, self.size, self.interpolation).float()
        return {"image": (pixels - self.mean) / self.std, "label": int(self.labels[i])}


@torch.inference_mode()
def predict(student: Any, dataset: torch.utils.data.Dataset, names: tuple[str, ...], skipped: Skipped, batch_size: int,
            device: str, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``[n, C]`` (fp32) and labels ``[n]`` of the readable images, in order; the rest go to ``skipped``."""
    student.eval()
    logits, labels = [], []
    for batch in readable_batches(dataset, names, skipped, batch_size, workers):
        logits.append(student(batch["image"].to(device)).logits.float().cpu())
        labels.append(batch["label"])
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def accuracy_metrics(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """top-1, top-5 (k = min(5, C)), per-class accuracy and the confusion matrix ``[C, C]`` (rows = truth)."""
    k = min(5, logits.shape[1])
    topk = np.argsort(-logits, axis=1)[:, :k]
    pred = topk[:, 0]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    per_class = {name: round(float(confusion[c, c] / confusion[c].sum()), 6)
                 for c, name in enumerate(classes) if confusion[c].sum()}
    return {"top1": round(float((pred == labels).mean()), 6), "top5": round(float((topk == labels[:, None]).any(1).mean()), 6),
            "n": int(labels.size), "per_class": per_class, "confusion": confusion.tolist()}


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = confusion_figure(confusion, classes)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confusion_figure(confusion: list[list[int]], classes: list[str]) -> Any:
    """Row-normalised colours with a colour bar, and the counts written in the cells (up to 25 classes). With
    more than 40 classes only those that occur (as truth or prediction) are drawn: 2 classes of ImageNet's 1000."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(confusion, dtype=float)
    if len(classes) > 40:
        used = np.flatnonzero(matrix.sum(0) + matrix.sum(1))
        matrix, classes = matrix[np.ix_(used, used)], [classes[i] for i in used]
    norm = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = min(12, 4 + 0.45 * len(classes))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class's images")
    if len(classes) <= 40:
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
    if len(classes) <= 25:          # the counts themselves, readable while cells are large enough
        for (row, col), count in np.ndenumerate(matrix.astype(int)):
            if count:
                ax.text(col, row, str(count), ha="center", va="center", fontsize=7,
                        color="white" if norm[row, col] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true",
           title=f"confusion on {int(matrix.sum())} images (counts; colour = row fraction)")
    fig.tight_layout()
    return fig


def labelled_listing(data: Path, classes: list[str]) -> Any:
    from kt_cache.datasets import list_dataset
    from kt_cache.manifest_types import DatasetSpec

    listing = list_dataset(DatasetSpec(root=Path(data), classes=tuple(classes)))
    if (listing.labels < 0).any():
        raise UsageError(f"--data {data}: {int((listing.labels < 0).sum())} images are not in a class sub-folder. "
                         "Evaluation needs labels. Fix: use a folder of class sub-folders named like the target classes.")
    return listing


def folder_metrics(student: Any, data: Path, run: dict[str, Any], batch_size: int, device: str, workers: int) -> dict:
    """Accuracy over the folder's readable images; ``skipped`` counts the others (``kt_train.skipping``)."""
    listing, skipped = labelled_listing(data, run["classes"]), Skipped()
    dataset = FolderViews(listing.root, listing.ids, listing.labels, student.data_config, run["center_crop"])
    logits, labels = predict(student, dataset, listing.ids, skipped, batch_size, device, workers)
    skipped.report(str(data))
    if not labels.size:             # nothing readable: no accuracy to state, only what was skipped
        return {"n": 0, **skipped.as_metrics()}
    return {**accuracy_metrics(logits, labels, run["classes"]), **skipped.as_metrics()}


def load_run_info(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / RUN_INFO
    if not path.is_file():
        raise UsageError(f"--checkpoint {checkpoint}: no {RUN_INFO} there, so it is not a `ktc train` output folder. "
                         "Fix: point at the --out folder of a training run.")
    return json.loads(path.read_text())


def evaluate(checkpoint: Path, data: Path | None = None, cache: str | None = None, batch_size: int = 64,
             device: str = "cpu", workers: int = 0, plots: bool = True, probe: bool = False) -> dict[str, Any]:
    """Metrics of the checkpoint's (first) student; see the module docstring. ``probe``: also a linear probe
    on its frozen features, fitted on ``cache`` (default: the store it was trained from), scored on ``data``."""
    from kt_train.methods import METHODS
    from kt_train.probe import probe_metrics
    from kt_train.students import load_student

    run = load_run_info(checkpoint)
    if probe and data is None:
        raise UsageError("--probe scores a linear probe on a labelled folder. Fix: pass --data FOLDER as well.")
    student = load_student(Path(checkpoint) / run["students"][0], device)
    metrics: dict[str, Any] = {"checkpoint": str(checkpoint)}
    note = getattr(METHODS.get(run.get("method", "")), "note", "")     # a method's caveat, e.g. kpu's top-1
    if note:
        metrics["note"] = note
    if probe:
        metrics["probe"] = probe_metrics(student, cache or run["cache"], Path(data), run, batch_size, device, workers)
    if data is not None:
        metrics.update(folder_metrics(student, Path(data), run, batch_size, device, workers))
        if plots and "confusion" in metrics:
            plot_confusion(metrics["confusion"], run["classes"], Path(checkpoint) / "confusion.png")
    if cache is not None:
        from kt_train.agreement import teacher_agreement

        metrics["teacher_agreement"] = teacher_agreement(student, cache, run, batch_size, device, workers)
    if data is None and cache is None:
        raise UsageError("nothing to evaluate on. Fix: pass --data FOLDER (labelled) and/or --cache STORE.")
    return metrics
