"""Which runs each table of ``benchmarks/digits_uniform.py`` needs (``Arm`` s; shared arms are the same object).

Tables, in the order they run (cheap and essential first):

- ``main``: ce / kd / avg / uniform (the paper's vote, and ``vote_norm=soft_coverage``) from ``store4`` (4 stored
  views, scale [0.6, 1]): UNIFORM vs AVG vs KD, label-free;
- ``parity``: ce / kd / avg / uniform from ``store1`` (one full-image view) vs the reference on full images;
- ``ablation``: UNIFORM on ``store4`` with one vote switched off (both off = AVG, both on = UNIFORM: ``main``);
- ``teachers`` / ``teachers20``: kd / avg / uniform / uniform+soft with the first 2, 5, 10 (= ``main``) / 20
  predictive teachers (``teachers20`` first trains and extracts the other 10);
- ``options``: further UNIFORM options (a stronger pseudo-class weight, a lighter ℓ_rec);
- ``defaults``: ce / kd / avg / uniform on ``store4`` with no options at all (ktc's defaults as they are);
- ``kpu``: KPU (global terms: the stores hold no featmaps) against ce / avg / uniform, every student also scored by
  a linear probe on its frozen features (KPU trains no classifier head), with KPU's feature std ratios;
- ``heads``: UNIFORM (defaults) with narrower MLP heads (``hidden``), the lever for its step time at 100+ teachers;
- ``sweep``: kd and uniform (defaults) with one training default changed at a time (``SWEEP``): does another
  lr, a warm-up or another batch size beat the shipped defaults (lr 1e-3, no warm-up, batch 64)?
- ``crops``: the reference on online random crops (the stored-views comparison for ``main``; the slowest).
"""

from __future__ import annotations

from digits.uniform_cells import Arm, count_teachers, main_teachers

METHODS = ("ce", "kd", "avg", "uniform")
COUNTS = (2, 5, 10, 20)
ABLATION = {"logit vote only": ("feature_vote=false",), "feature vote only": ("logit_vote=false",)}
OPTIONS = {"uniform, vote_norm=soft_coverage": ("vote_norm=soft_coverage",)}
MORE_OPTIONS = {
    "uniform, vote_norm=soft_coverage, alpha2=0.25": ("vote_norm=soft_coverage", "alpha2=0.25"),
    "uniform, vote_norm=soft_coverage, beta2=0.2": ("vote_norm=soft_coverage", "beta2=0.2"),
}
PAPER = ("vote_norm=count",)   # the paper's vote, spelled out so a later default does not change these rows


def labels(method: str) -> str:
    return "use" if method == "ce" else "ignore"


def arm(table: str, method: str, kind: str = "ktc", store: str = "store4.zarr", pixels: str = "full") -> Arm:
    return Arm(table, method, kind, method, main_teachers(method), store, pixels, labels(method),
               PAPER if method == "uniform" else ())


STORE1 = {m: arm("store1", m, store="store1.zarr") for m in METHODS}
STORE4 = {m: arm("store4", m) for m in METHODS}
REF_FULL = {m: arm("ref_full", m, "ref") for m in METHODS}
REF_CROPS = {m: arm("ref_rrc", m, "ref", pixels="rrc") for m in METHODS}
ABLATION_ARMS = {label: Arm("ablation", label, "ktc", "uniform", main_teachers("uniform"), opts=PAPER + opts)
                 for label, opts in ABLATION.items()}
# with soft coverage: only the logit vote elects ĉ (logit_vote=false never uses it: that row is the paper's)
SOFT_ABLATION_ARMS = {"logit vote only": Arm("ablation", "logit vote only, soft_coverage", "ktc", "uniform",
                                             main_teachers("uniform"), opts=("vote_norm=soft_coverage", "feature_vote=false"))}
OPTION_ARMS = {label: Arm("options", label, "ktc", "uniform", main_teachers("uniform"), opts=opts)
               for label, opts in {**OPTIONS, **MORE_OPTIONS}.items()}


# ktc's defaults as committed (no options: uniform's vote_norm is then auto); run with the code under test
DEFAULTS = {m: Arm("defaults", m, "ktc", m, main_teachers(m), labels=labels(m)) for m in METHODS}


SWEEP = {"lr 5e-4": ("--lr", "0.0005"), "lr 2e-3": ("--lr", "0.002"), "lr 4e-3": ("--lr", "0.004"),
         "warm-up 0.5 epoch": ("--warmup-epochs", "0.5"), "batch 128": ("--batch-size", "128")}
SWEEP_METHODS = ("kd", "uniform")
SWEEP_ARMS = {(m, label): Arm("sweep", f"{m} {label}", "ktc", m, main_teachers(m), labels=labels(m), extra=flags)
              for m in SWEEP_METHODS for label, flags in SWEEP.items()}


HEADS = {f"uniform, hidden={h}": (f"hidden={h}",) for h in (128, 64)}
HEAD_ARMS = {label: Arm("heads", label, "ktc", "uniform", main_teachers("uniform"), opts=opts)
             for label, opts in HEADS.items()}
KPU_METHODS = ("ce", "avg", "uniform", "kpu")
KPU_ARMS = {m: Arm("kpu", m, "ktc", m, main_teachers(m), labels=labels(m), probe=True) for m in KPU_METHODS}


def count_arm(method: str, count: int) -> Arm:
    """``method`` is kd, avg, uniform (the paper's vote) or uniform+soft (``vote_norm=soft_coverage``)."""
    if count == 10:
        return STORE4[method] if method in STORE4 else OPTION_ARMS["uniform, vote_norm=soft_coverage"]
    name, opts = ("uniform", OPTIONS["uniform, vote_norm=soft_coverage"]) if method == "uniform+soft" else \
        (method, PAPER if method == "uniform" else ())
    return Arm("teachers", f"{method} {count}", "ktc", name, count_teachers(name, count), opts=opts)


COUNT_METHODS = ("kd", "avg", "uniform", "uniform+soft")

TABLES = {
    "main": lambda: list(STORE4.values()) + [OPTION_ARMS[k] for k in OPTIONS],
    "parity": lambda: [*STORE1.values(), *REF_FULL.values()],
    "ablation": lambda: [*ABLATION_ARMS.values(), *SOFT_ABLATION_ARMS.values()],
    "teachers": lambda: [count_arm(m, n) for n in (2, 5) for m in COUNT_METHODS],
    "teachers20": lambda: [count_arm(m, 20) for m in COUNT_METHODS],   # needs the full zoo (prepare)
    "options": lambda: [OPTION_ARMS[k] for k in MORE_OPTIONS],
    "defaults": lambda: list(DEFAULTS.values()),
    "sweep": lambda: list(SWEEP_ARMS.values()),
    "kpu": lambda: list(KPU_ARMS.values()),
    "heads": lambda: list(HEAD_ARMS.values()),
    "crops": lambda: [REF_CROPS["ce"], REF_CROPS["uniform"], REF_CROPS["kd"], REF_CROPS["avg"]],
}


def arms_of(table: str) -> list[Arm]:
    return TABLES[table]()
