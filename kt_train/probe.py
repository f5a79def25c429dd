"""Linear probe: how good a student's *features* are, independent of its classifier head.

KPU (and FG's feature terms) train the student's representation, not its logits, so the head's top-1 says
little. ``ktc eval --probe`` freezes the student, takes its pooled features ``[n, D]`` on the training store's
labelled rows (view 0, the centre view), standardises them, fits a multinomial logistic regression (full
batch L-BFGS on cross-entropy + ``weight_decay`` · ‖W‖²) and reports its top-1 on ``--data``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kt_cache.errors import UsageError


@torch.inference_mode()
def features_of(student: Any, batches: Any, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features ``[n, D]`` (float32) and labels ``[n]`` of every batch."""
    student.eval()
    feats, labels = [], []
    for batch in batches:
        feats.append(student(batch["image"].to(device)).features.float().cpu())
        labels.append(torch.as_tensor(batch["label"]))
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(np.int64)


def fit_probe(x: np.ndarray, y: np.ndarray, num_classes: int, weight_decay: float = 1e-3,
              steps: int = 200) -> dict[str, torch.Tensor]:
    """Logistic regression on standardised ``x [n, D]`` with labels ``y [n]`` in ``0..num_classes-1``."""
    xt = torch.as_tensor(x, dtype=torch.float64)
    mean, std = xt.mean(0), xt.std(0, unbiased=False).clamp_min(1e-6)
    z, target = (xt - mean) / std, torch.as_tensor(y, dtype=torch.long)
    weight = torch.zeros(z.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, target) + weight_decay * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return {"mean": mean, "std": std, "weight": weight.detach(), "bias": bias.detach()}


def probe_predict(probe: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    z = (torch.as_tensor(x, dtype=torch.float64) - probe["mean"]) / probe["std"]
    return (z @ probe["weight"] + probe["bias"]).argmax(1).numpy()


def train_rows(student: Any, store: str, run: dict[str, Any], batch_size: int, device: str,
               workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of the store's labelled, readable rows (view 0)."""
    from kt_cache.store import StoreReader
    from kt_train.agreement import readable_rows, store_views
    from kt_train.skipping import Skipped

    dataset, skipped = store_views(StoreReader(store), student, run.get("data_root")), Skipped()
    dataset.ok = dataset.ok & (dataset.labels >= 0)
    x, y = features_of(student, readable_rows(dataset, skipped, batch_size, workers), device)
    if len(np.unique(y)) < 2:
        raise UsageError(f"--probe: the store {store} has labels for {len(np.unique(y))} class(es) among its readable "
                         "rows; a probe needs labelled rows of at least two classes. Fix: extract a labelled dataset "
                         "(class sub-folders or a CSV with labels).")
    return x, y


def probe_metrics(student: Any, store: str, data: Path, run: dict[str, Any], batch_size: int, device: str,
                  workers: int) -> dict[str, Any]:
    """``{"top1", "n", "n_train", "store"}``: the probe fitted on ``store`` and scored on the folder ``data``."""
    from kt_train.evaluate import FolderViews, labelled_listing
    from kt_train.skipping import Skipped, readable_batches

    x, y = train_rows(student, store, run, batch_size, device, workers)
    probe = fit_probe(x, y, len(run["classes"]))
    listing, skipped = labelled_listing(data, run["classes"]), Skipped()
    dataset = FolderViews(listing.root, listing.ids, listing.labels, student.data_config, run["center_crop"])
    vx, vy = features_of(student, readable_batches(dataset, listing.ids, skipped, batch_size, workers), device)
    top1 = float((probe_predict(probe, vx) == vy).mean()) if len(vy) else None
    return {"top1": None if top1 is None else round(top1, 6), "n": int(len(vy)), "n_train": int(len(y)), "store": store}
