"""A crowd of weak, partial teachers for the accuracy-vs-number-of-teachers sweep.

Each crowd teacher knows 5 of the 10 digits and sees a quarter of their training images (6 epochs of batch
32), so
no single one is good and none covers every class. Teachers come in complementary pairs (teacher 2j+1
knows exactly the digits teacher 2j does not), so every even-sized prefix of the crowd covers all ten
classes and the sweep measures the effect of *more* teachers, not of coverage.
"""

from __future__ import annotations

import numpy as np

from digits.data import CLASSES
from digits.teachers import ZooTeacher

CROWD_SIZE = 50
CROWD_EPOCHS = 6
CROWD_BATCH = 32
CROWD_TRAIN_FRAC = 0.25


def crowd(size: int = CROWD_SIZE, seed: int = 0) -> tuple[ZooTeacher, ...]:
    """``size`` (even) predictive teachers ``crowd_00`` … in complementary pairs of 5-class subsets."""
    if size % 2:
        raise ValueError(f"crowd size must be even (complementary pairs), got {size}")
    rng = np.random.default_rng([seed, 5])
    teachers = []
    for pair in range(size // 2):
        half = set(rng.permutation(len(CLASSES))[:5].tolist())
        for j, members in enumerate((half, set(range(len(CLASSES))) - half)):
            classes = tuple(CLASSES[c] for c in sorted(members))
            teachers.append(ZooTeacher(f"crowd_{2 * pair + j:02d}", classes, "predictive", epochs=CROWD_EPOCHS,
                                       train_frac=CROWD_TRAIN_FRAC, batch=CROWD_BATCH))
    return tuple(teachers)
