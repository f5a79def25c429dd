"""Map a teacher's own classes onto the store's target label space (by class name, WordNet id or synonym: kt_cache.classes.target_to_teacher).

A teacher may cover a subset of the target classes (its other target classes are "uncovered") and may
have extra classes outside the target space (they map to -1 and are dropped when logits are scattered
into the target space; their probability mass still counts in the stored ``logits_lse``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def label_map_for(target_classes: Sequence[str], teacher_class_names: Sequence[str] | None,
                  num_teacher_classes: int | None = None) -> np.ndarray:
    """Target index of every teacher class, or -1 for a class outside the target space.

    Args:
        target_classes: the ``C`` target class names (``StoreReader.class_names``), in label order.
        teacher_class_names: the ``C_t`` names of the teacher's logits (its ``attrs["class_names"]``), or
            ``None`` when the store recorded no names (then nothing can be mapped).
        num_teacher_classes: ``C_t``; needed only when ``teacher_class_names`` is ``None``.

    Returns:
        int64 ``[C_t]``: ``map[j]`` = index in ``target_classes`` of teacher class ``j``, or -1.
    """
    from kt_cache.classes import target_to_teacher

    if teacher_class_names is None:
        return np.full(int(num_teacher_classes or 0), -1, dtype=np.int64)
    found = np.full(len(teacher_class_names), -1, dtype=np.int64)
    for target, logit in enumerate(target_to_teacher([str(c) for c in target_classes], [str(n) for n in teacher_class_names])):
        if logit >= 0 and found[logit] < 0:     # the inverse of extraction's label_map (kt_cache.outputs)
            found[logit] = target
    return found


def covered_mask(label_map: np.ndarray, num_classes: int) -> np.ndarray:
    """Target classes the teacher has a logit for.

    Args:
        label_map: int64 ``[C_t]`` from ``label_map_for``.
        num_classes: ``C``, the size of the target label space.

    Returns:
        bool ``[C]``.
    """
    label_map = np.asarray(label_map, dtype=np.int64)
    if label_map.size and int(label_map.max()) >= num_classes:
        raise ValueError(f"covered_mask: label_map holds target index {int(label_map.max())}, but there are "
                         f"only {num_classes} target classes")
    covered = np.zeros(num_classes, dtype=bool)
    covered[label_map[label_map >= 0]] = True
    return covered
