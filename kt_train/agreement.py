"""Agreement of a student with the cached teachers on the store's own images (view 0, the centre view).

The consensus of a row is the plurality of the predictive teachers' top-1 classes in the target label
space (ties: the lower class index); per-teacher agreement is reported beside it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kt_cache.store import StoreReader


def predictive_teachers(reader: StoreReader, wanted: list[str]) -> tuple[list[str], list[str]]:
    """The predictive teachers with logits among ``wanted`` (default: every teacher), and those of them left out
    because none of their logits is a target class (a run that used only their features or maps, e.g. ``kpu``):
    their votes name no class the student can predict."""
    from kt_train.labels import label_map_for

    ids = [t for t in wanted if t in reader.teacher_ids()] or reader.teacher_ids()
    voting, unmapped = [], []
    for tid in ids:
        record = reader.teacher_record(tid)
        if record.role != "predictive" or "logits" not in record.outputs:
            continue
        names = list(record.class_names) if record.class_names is not None else None
        mapped = (label_map_for(reader.class_names, names, record.num_classes) >= 0).any()
        (voting if mapped else unmapped).append(tid)
    return voting, unmapped


def votes(tb: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-teacher top-1 ``[B]`` (-1 where invalid) and the plurality consensus ``[B]`` (-1 if no vote)."""
    per_teacher = {}
    for tid, logits in tb.logits.items():
        top = logits.float().argmax(-1).cpu().numpy()
        per_teacher[tid] = np.where(tb.valid[tid].cpu().numpy(), top, -1)
    stacked = np.stack(list(per_teacher.values()), 1)
    num_classes = int(next(iter(tb.logits.values())).shape[-1])
    counts = np.zeros((stacked.shape[0], num_classes + 1), dtype=np.int64)
    np.add.at(counts, (np.arange(stacked.shape[0])[:, None].repeat(stacked.shape[1], 1), stacked + 1), 1)
    consensus = counts[:, 1:].argmax(1)
    return per_teacher, np.where(counts[:, 1:].sum(1) > 0, consensus, -1)


def store_views(reader: StoreReader, student: Any, data_root: str | None) -> Any:
    """The centre view (view 0) of every store row at the student's input size."""
    from kt_train.data import StudentViews

    cfg = student.data_config
    return StudentViews(reader, tuple(cfg["input_size"][1:]), cfg["mean"], cfg["std"], cfg.get("interpolation", "bilinear"),
                        data_root=data_root, views_mode="center")


def count_hits(student: Any, batches: Any, cached: Any, teachers: list[str], device: str) -> dict[str, list[int]]:
    """``{"consensus" | teacher id: [agreeing rows, rows with a vote]}`` over the batches."""
    hits = {t: [0, 0] for t in ["consensus", *teachers]}
    student.eval()
    for batch in batches:
        pred = student(batch["image"].to(device)).logits.float().argmax(-1).cpu().numpy()
        per_teacher, consensus = votes(cached.for_batch(batch, "cpu"))
        for name, target in [("consensus", consensus), *per_teacher.items()]:
            hits[name][0] += int(((pred == target) & (target >= 0)).sum())
            hits[name][1] += int((target >= 0).sum())
    return hits


def readable_rows(dataset: Any, skipped: Any, batch_size: int, workers: int) -> Any:
    """Batches of the rows whose image decodes (view 0); the rest are added to ``skipped``.

    Rows recorded unreadable at extraction are not even opened: their teacher outputs are NaN.
    """
    from kt_train.data import collate
    from kt_train.skipping import readable_batches

    rows = np.flatnonzero(dataset.ok)
    skipped.add([i.decode("utf-8") for i in dataset.ids[~dataset.ok]])
    names = [i.decode("utf-8") for i in dataset.ids[rows]]
    return readable_batches(torch.utils.data.Subset(dataset, rows.tolist()), names, skipped, batch_size, workers,
                            collate)


@torch.inference_mode()
def teacher_agreement(student: Any, cache: str, run: dict[str, Any], batch_size: int, device: str,
                      workers: int) -> dict[str, Any]:
    """``{"consensus": fraction, "per_teacher": {id: fraction}, "n": rows, "teachers": [...], "skipped": rows}``.

    Unreadable rows (recorded at extraction, or failing to decode now) are left out of ``n`` and counted. The
    teachers' logits are held or streamed within the training run's ``--ram-budget-gb`` (``run["ram_budget_bytes"]``;
    runs that did not record it: the default, a quarter of the machine's memory).
    """
    from kt_train.setup import ram_budget_bytes
    from kt_train.data import CachedTeachers
    from kt_train.skipping import Skipped

    reader = StoreReader(cache)
    teachers, unmapped = predictive_teachers(reader, run.get("teachers", []))
    left_out = {"unmapped_teachers": unmapped} if unmapped else {}
    if not teachers:
        note = "the store has no predictive teachers with logits" + (
            f" in the target classes ({', '.join(unmapped)} name none of them)" if unmapped else "")
        return {"n": 0, "teachers": [], "note": note, **left_out}
    budget = run.get("ram_budget_bytes") or ram_budget_bytes(None)
    cached = CachedTeachers(reader, teachers, needs={"logits"}, ram_budget_bytes=int(budget))
    dataset, skipped = store_views(reader, student, run.get("data_root")), Skipped()
    hits = count_hits(student, readable_rows(dataset, skipped, batch_size, workers), cached, teachers, device)
    fraction = {k: round(h / n, 6) if n else None for k, (h, n) in hits.items()}
    skipped.report(f"the store {cache}")
    return {"consensus": fraction.pop("consensus"), "per_teacher": fraction, "n": len(dataset) - len(skipped.names),
            "teachers": teachers, **left_out, **skipped.as_metrics()}
