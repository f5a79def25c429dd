"""Turn a teacher's fp32 outputs into the stored blocks of the store format (docs/store-format.md).

Full or top-k logits, ``logits_lse`` (exact log-probabilities of the stored classes), ``label_logit``
(the true class, for Bi-KD roles), features and pooled spatial maps, cast to the storage dtype with an
overflow check: a value that does not fit float16 is reported, never stored as inf.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kt_cache.errors import OutputOverflowError

FP16_MAX = float(np.finfo(np.float16).max)


def label_map(target_classes: tuple[str, ...] | list[str], teacher_classes: tuple[str, ...] | None) -> np.ndarray:
    """``map[c]`` = index of target class ``c`` among the teacher's logits, or -1 when not covered.

    Teachers without class names are assumed to use the target label space when sizes agree.
    """
    from kt_cache.classes import target_to_teacher

    if teacher_classes is None:
        return np.full(len(target_classes), -1, dtype=np.int64)
    return np.array(target_to_teacher(target_classes, teacher_classes), dtype=np.int64)


def logits_blocks(logits: torch.Tensor, labels: torch.Tensor, class_map: torch.Tensor, topk: int | None) -> dict[str, torch.Tensor]:
    """Stored logit arrays for one batch.

    Args:
        logits: ``[B, V, C_t]`` fp32.
        labels: ``[B]`` int64 target labels, -1 unknown.
        class_map: ``[C_target]`` int64 from ``label_map``.
        topk: keep the k largest logits, or None for full logits.
    """
    logits = logits.float()
    out = {"logits_lse": torch.logsumexp(logits, dim=-1)}
    teacher_label = torch.where(labels >= 0, class_map[labels.clamp(min=0)], torch.full_like(labels, -1))
    gathered = logits.gather(-1, teacher_label.clamp(min=0).view(-1, 1, 1).expand(-1, logits.shape[1], 1))[..., 0]
    out["label_logit"] = torch.where((teacher_label >= 0).view(-1, 1), gathered, torch.full_like(gathered, float("nan")))
    if topk is None:
        out["logits"] = logits
    else:
        values, index = logits.topk(min(topk, logits.shape[-1]), dim=-1)
        out["logits_topk/values"], out["logits_topk/index"] = values, index
    return out


def storage_blocks(outputs: dict[str, torch.Tensor], labels: torch.Tensor, class_map: torch.Tensor | None,
                   topk: int | None) -> dict[str, torch.Tensor]:
    """All stored arrays of a teacher for one batch, from ``LoadedTeacher.forward`` outputs ``[B, V, ...]``."""
    blocks = {name: outputs[name] for name in ("features", "featmap") if name in outputs}
    if "logits" in outputs:
        blocks.update(logits_blocks(outputs["logits"], labels, class_map, topk))
    return blocks


def to_numpy_for_store(blocks: dict[str, torch.Tensor], dtype: str, teacher_id: str, index_dtype: str) -> dict[str, np.ndarray]:
    """Cast to storage dtypes. float32 arrays (lse, label_logit) stay float32; indices use ``index_dtype``."""
    stored = {}
    for path, tensor in blocks.items():
        array = tensor.detach().cpu().numpy()
        if path == "logits_topk/index":
            stored[path] = array.astype(index_dtype)
        elif path in ("logits_lse", "label_logit"):
            stored[path] = array.astype(np.float32)
        else:
            check_fits(array, dtype, teacher_id, path)
            stored[path] = array.astype(dtype)
    return stored


def check_fits(array: np.ndarray, dtype: str, teacher_id: str, path: str) -> None:
    """Refuse non-finite model outputs and values beyond the float16 range."""
    if not np.isfinite(array).all():
        raise OutputOverflowError(
            f"teacher '{teacher_id}' produced non-finite values (NaN or inf) in '{path}' before storage. "
            "The model or its weights are broken for these inputs. Fix: check the checkpoint and preprocessing "
            "of this teacher (ktc extract --dry-run shows them).")
    peak = float(np.abs(array).max()) if array.size else 0.0
    if dtype == "float16" and peak > FP16_MAX:
        raise OutputOverflowError(
            f"teacher '{teacher_id}': '{path}' has values up to {peak:.6g}, beyond float16's range (±65504); "
            "storing them would give inf. Fix: set `dtype: float32` on this teacher in the manifest "
            f"(then rerun with --overwrite {teacher_id}).")


def fill_failed_rows(arrays: dict[str, np.ndarray], ok: np.ndarray, fills: dict[str, Any]) -> None:
    """Rows whose image failed to decode get the array's fill value (NaN for floats): never fake outputs."""
    if ok.all():
        return
    for path, array in arrays.items():
        array[~ok] = fills[path]
