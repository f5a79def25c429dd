"""Linear probe of a trained student: logistic regression on its frozen pooled features (centre views).

``ktc eval`` scores the student's own classifier. KPU (like any feature-only method) never trains that
classifier, and its paper evaluates with a linear head on the learned features; the probe gives every
method that same second score, so feature quality can be compared across methods.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from digits.data import Split
from digits.teachers import center_views


@torch.inference_mode()
def student_features(run: Path, split: Split, batch: int = 256) -> np.ndarray:
    """Pooled features ``[N, D]`` of the run's (first) student on the centre view of every image."""
    from kt_train.evaluate import load_run_info
    from kt_train.students import load_student

    student = load_student(run / load_run_info(run)["students"][0], "cpu").eval()
    cfg = student.data_config
    pixels = center_views(split.images, int(cfg["input_size"][-1]), cfg.get("interpolation", "bilinear"))
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255
    chunks = [student((pixels[i:i + batch].float() - mean) / std).features for i in range(0, len(pixels), batch)]
    return torch.cat(chunks).float().numpy()


def linear_probe(run: Path, train: Split, val: Split, seed: int = 0) -> float:
    """Val accuracy of a logistic regression fitted on the train split's standardised student features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(student_features(run, train), train.labels.numpy())
    return float(probe.score(student_features(run, val), val.labels.numpy()))
