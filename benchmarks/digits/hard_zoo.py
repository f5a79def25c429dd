"""A harder teacher zoo, of the kind UNIFORM targets: many partial, noisy, heterogeneous teachers.

20 predictive teachers, each trained here on its own subset of the 10 digits (2 to 10 classes, overlapping),
of four timm architectures, some on a fraction of the images and some with a share of their training
labels replaced by another of their classes; plus 3 descriptive teachers trained on other tasks (digit
parity, the number of closed loops, and image rotation, a self-supervised task unrelated to the digit).
The first ``MAIN`` predictive teachers (+ the descriptive ones) are the main zoo; all 20 feed the teacher-count
curve (the first 2, 5, 10, 20).

The table is written out rather than drawn at random so that each teacher's handicap can be read off.
"""

from __future__ import annotations

from digits.data import CLASSES
from digits.teachers import ZooTeacher

ARCHS = {
    "r": ("resnet10t", ()),
    "m": ("mobilenetv3_small_100", ()),
    "g": ("regnetx_002", ()),
    "c": ("convnext_atto", ()),
}
MAIN = 10
EPOCHS = 8

# (digits, architecture key, fraction of its images, label noise)
PREDICTIVE = (
    ("01234", "r", 1.0, 0.0),
    ("56789", "m", 1.0, 0.0),
    ("012", "g", 1.0, 0.0),
    ("3456", "c", 0.5, 0.0),
    ("6789", "r", 1.0, 0.3),
    ("0123456", "m", 0.15, 0.0),
    ("23456789", "g", 1.0, 0.4),
    ("0123456789", "c", 0.1, 0.0),
    ("13579", "r", 0.5, 0.2),
    ("02468", "m", 1.0, 0.0),
    ("058", "g", 1.0, 0.0),
    ("0123456789", "r", 1.0, 0.5),
    ("4567", "m", 0.3, 0.0),
    ("12", "c", 1.0, 0.0),
    ("789", "g", 0.5, 0.3),
    ("0369", "c", 1.0, 0.0),
    ("147", "r", 0.25, 0.0),
    ("2589", "m", 1.0, 0.4),
    ("0123456789", "g", 0.05, 0.0),
    ("34", "c", 1.0, 0.2),
)


def predictive_teacher(index: int, digits: str, arch: str, frac: float, noise: float) -> ZooTeacher:
    name, args = ARCHS[arch]
    return ZooTeacher(f"p{index:02d}", tuple(CLASSES[int(d)] for d in digits), "predictive", epochs=EPOCHS,
                      train_frac=frac, arch=name, model_args=args, noise=noise)


HARD_PREDICTIVE = tuple(predictive_teacher(i + 1, *row) for i, row in enumerate(PREDICTIVE))
HARD_DESCRIPTIVE = (
    ZooTeacher("d_parity", ("even", "odd"), "descriptive", epochs=3, task="parity", arch="resnet10t", model_args=()),
    ZooTeacher("d_loops", ("0", "1", "2"), "descriptive", epochs=3, task="loops", arch="mobilenetv3_small_100",
               model_args=()),
    ZooTeacher("d_rotation", ("0", "90", "180", "270"), "descriptive", epochs=3, task="rotation",
               arch="regnetx_002", model_args=()),
)
HARD_ZOO = HARD_PREDICTIVE[:MAIN] + HARD_DESCRIPTIVE + HARD_PREDICTIVE[MAIN:]   # the main zoo is trained first


def predictive_ids(count: int) -> list[str]:
    """The first ``count`` predictive teacher ids (the teacher-count curve's selections)."""
    return [spec.name for spec in HARD_PREDICTIVE[:count]]


def main_ids() -> list[str]:
    """The main zoo: the first ``MAIN`` predictive teachers and every descriptive one."""
    return predictive_ids(MAIN) + [spec.name for spec in HARD_DESCRIPTIVE]


def describe(spec: ZooTeacher) -> str:
    """One line of the zoo table: digits, architecture, data share, noise."""
    handicap = [f"{spec.train_frac:.0%} of its images" if spec.train_frac < 1 else "",
                f"{spec.noise:.0%} noisy labels" if spec.noise else ""]
    return f"{spec.arch}; {', '.join(h for h in handicap if h) or 'clean'}"
