"""Forward time of the methods that pick a teacher per sample (``bikd``, ``fg``) at 10 and 100 cached teachers.

A synthetic ``TeacherBatch`` (B = 64 rows, C = 1000 classes, every teacher covering every class, cached
``label_logit`` / ``lse``) and one live student; the median over repeats of one method forward (no backward), one
CPU thread. To compare with another version of ktc, run the same script with that checkout first on the path::

    python benchmarks/bench_method_forward.py
    PYTHONPATH=/path/to/older/checkout python benchmarks/bench_method_forward.py
"""

from __future__ import annotations

import statistics
import time

import torch


def teacher_batch(n_teachers: int, rows: int, classes: int) -> object:
    from kt_train.methods.base import TeacherBatch

    ids = [f"t{i}" for i in range(n_teachers)]
    logits = {t: torch.randn(rows, classes) for t in ids}
    return TeacherBatch(ids=tuple(ids), roles={t: "predictive" for t in ids},
                        valid={t: torch.ones(rows, dtype=torch.bool) for t in ids}, logits=logits,
                        covered={t: torch.ones(classes, dtype=torch.bool) for t in ids},
                        label_logit={t: logits[t][:, 0] for t in ids},
                        lse={t: torch.logsumexp(logits[t], -1) for t in ids},
                        labels=torch.zeros(rows, dtype=torch.long), reference_logits=torch.randn(rows, classes))


def forward_ms(method: str, n_teachers: int, rows: int = 64, classes: int = 1000, repeats: int = 20) -> float:
    from kt_train.methods import METHODS
    from kt_train.methods.base import MethodDims, StudentOutput, TeacherInfo

    tb = teacher_batch(n_teachers, rows, classes)
    infos = tuple(TeacherInfo(id=t, role="predictive", feature_dim=None, featmap_dim=None, has_logits=True)
                  for t in tb.ids)
    cls = METHODS[method]
    module = cls(cls.Options(), MethodDims(num_classes=classes, student_dim=8, teachers=infos))
    student = StudentOutput(logits=torch.randn(rows, classes, requires_grad=True), features=torch.randn(rows, 8))
    times = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        module(student, tb)
        if i >= 3:                                   # three warm-up calls
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    for method in ("bikd", "fg"):
        for n in (10, 100):
            print(f"{method:<5} {n:>4} teachers: {forward_ms(method, n):7.2f} ms per forward (median)")


if __name__ == "__main__":
    main()
