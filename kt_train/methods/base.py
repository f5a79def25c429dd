"""The one interface between the training loop and every knowledge-transfer method.

A training step hands a method two things:

* ``StudentOutput``: what the live student(s) produced for the batch (logits, pooled feature, spatial map);
* ``TeacherBatch``: the cached teacher outputs for the same rows (and view), already on the student's device.

and gets back a ``dict[str, Tensor]`` of named scalars (see ``Method.forward``).

How a cache reader fills ``TeacherBatch`` (the contract; ``docs/methods.md`` repeats it):

1. **Teacher order.** ``ids`` lists every teacher of the run in a fixed order (the order given to
   ``MethodDims.teachers``). Every per-teacher dict is keyed by these ids; a teacher that has no output of a
   kind (no logits, no spatial map) is simply absent from that dict.
2. **Validity.** ``valid[id]`` is a bool ``[B]``: the teacher has *all* its outputs for that row. Rows where
   it is False may hold anything (zeros, NaN); methods mask them out before any arithmetic.
3. **Logits live in the global target label space ``[C]`` as raw logits** (not log-probabilities): class ``c``
   holds the teacher's raw logit for target class ``c``; classes the teacher does not cover (and its
   own classes with ``label_map == -1``, which are dropped) hold ``-inf``. ``covered[id]`` is the static bool
   ``[C]`` of covered target classes. Raw logits (rather than log-probs) are needed because UNIFORM Case B
   averages *logits* within a label group before one softmax over the union (CFL concatenation); per-teacher
   log-probs would shift each group by a different log-partition. Use ``scatter_full_logits``.
4. **Top-k caches** (``logits_topk/{values,index}`` + ``logits_lse``): use ``scatter_topk_logits``. The k
   stored logits are placed exactly; every other covered class gets the tail value
   ``r = log(exp(lse) - sum_k exp(v_k)) - log(C_t - k)`` (the unseen mass spread evenly over the teacher's
   unseen classes), so ``log_softmax`` of the row is exact for every stored class and the row's logsumexp
   equals the stored LSE. Also fill ``label_logit`` and ``lse`` (``[B]``, fp32 as stored): methods that need
   the exact ``log p_y`` of the true label (Bi-KD, FG) use ``label_logit - lse`` in fp64 when both are
   present, otherwise ``z_y - logsumexp(z)`` of the row in fp64 (the same formula is used for live students,
   so equal logits tie exactly; a stored fp32 LSE can move an exact tie by ~1e-7). Bi-KD/FG use only
   teachers whose ``covered`` is all of ``[C]``.
   ``logit_mean`` / ``logit_std`` (fp32 ``[B]``, over all C_t logits, unbiased std) make logit
   standardization exact for top-k caches; when absent it is computed over the covered classes of the row.
5. **Features** ``[B, d_t]`` and **featmaps** ``[B, h, w, d_t]`` (channels last, as stored) in any float
   dtype; methods upcast to fp32.
6. ``labels``: int64 ``[B]``, ``-1`` where unknown, or ``None`` for unlabelled runs. ``audit_labels``: the stored
   labels of a run told to ignore them (``--labels ignore``); methods never train on them, they only score the
   teachers' target against them (``pseudo_acc``), so a label-free run still reports how good its target is.
7. ``reference_logits``: ``[B, C]`` raw logits of the *frozen initial student* (Fantastic Gains ``f_st``),
   either read from the cache (it is just another frozen network) or computed by the trainer with a frozen
   copy of the student under ``torch.no_grad()``. Only ``fg`` reads it.
8. **Teachers as tensors.** Any per-teacher field may be a ``stacks.Stacked`` instead of a dict: one tensor
   ``[T, B, ...]`` per group of teachers with equal shapes (``covered``: ``[T, C]``), ids in teacher order
   (``kt_train.cached.CachedTeachers`` fills every field so). It reads like the dict; methods call
   ``stacked(name, ids)``, which returns a group's tensor without a copy when ``ids`` are that group, so a
   batch of a thousand teachers costs one op per group, not one per teacher.

Nothing in a ``TeacherBatch`` needs (or should have) ``requires_grad``; methods never let gradients reach it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kt_train.methods.heads import LegacyParam, upgrade_state
from kt_train.methods.options import MethodOptions
from kt_train.methods.stacks import stack_of

ROLES = ("predictive", "descriptive", "sentinel")


@dataclass(frozen=True)
class TeacherInfo:
    """Static description of one teacher, known before training (from the store's attrs).

    Attributes:
        id: teacher id (the store group name).
        role: ``predictive`` (has target-space logits), ``descriptive`` (features only) or ``sentinel``
            (KPU's preserved model; treated like a descriptive teacher by logit methods).
        feature_dim: ``d_t`` of the pooled feature, ``None`` when not cached.
        featmap_dim: channels ``d_t`` of the spatial map, ``None`` when not cached.
        has_logits: the cache holds logits for this teacher.
        feature_mean: ``[d_t]`` per-dimension mean of the cached features (store attrs), for z-scoring.
        feature_std: ``[d_t]`` per-dimension std, same use.
    """

    id: str
    role: str = "predictive"
    feature_dim: int | None = None
    featmap_dim: int | None = None
    has_logits: bool = False
    feature_mean: Tensor | None = None
    feature_std: Tensor | None = None


@dataclass(frozen=True)
class MethodDims:
    """Sizes a method needs to build its heads: student feature dim ``D``, classes ``C``, the teachers."""

    student_dim: int
    num_classes: int
    teachers: tuple[TeacherInfo, ...] = ()

    def teacher(self, tid: str) -> TeacherInfo:
        for info in self.teachers:
            if info.id == tid:
                return info
        raise KeyError(f"teacher {tid!r} is not in MethodDims.teachers ({[t.id for t in self.teachers]})")


@dataclass
class StudentOutput:
    """One live student's outputs for a batch.

    Attributes:
        logits: ``[B, C]`` classifier logits over the global label space.
        features: ``[B, D]`` pooled pre-classifier feature (ViT: CLS after the final norm).
        featmap: ``[B, D, H, W]`` spatial map (KPU), channels first as produced by the network; or ``None``.
    """

    logits: Tensor
    features: Tensor | None = None
    featmap: Tensor | None = None


@dataclass
class TeacherBatch:
    """Cached teacher outputs for one batch; see the module docstring for how to fill every field.

    Shapes: ``B`` rows, ``C`` global classes. All tensors on the student's device.
    """

    ids: tuple[str, ...]
    roles: dict[str, str]
    valid: Mapping[str, Tensor]                                      # id -> bool [B]
    features: Mapping[str, Tensor] = field(default_factory=dict)     # id -> [B, d_t]
    logits: Mapping[str, Tensor] = field(default_factory=dict)       # id -> [B, C] raw, -inf where uncovered
    covered: Mapping[str, Tensor] = field(default_factory=dict)      # id -> bool [C]; same keys as logits
    featmaps: Mapping[str, Tensor] = field(default_factory=dict)     # id -> [B, h, w, d_t]
    label_logit: Mapping[str, Tensor] = field(default_factory=dict)  # id -> [B] raw logit of labels[b]
    lse: Mapping[str, Tensor] = field(default_factory=dict)          # id -> [B] logsumexp over all C_t logits
    logit_mean: Mapping[str, Tensor] = field(default_factory=dict)   # id -> [B] mean over all C_t logits
    logit_std: Mapping[str, Tensor] = field(default_factory=dict)    # id -> [B] unbiased std over all C_t
    labels: Tensor | None = None                                  # [B] int64, -1 unknown
    audit_labels: Tensor | None = None                            # [B] labels of a --labels ignore run: diagnostics only
    reference_logits: Tensor | None = None                        # [B, C] frozen initial student (FG)

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.valid.values())).shape[0]) if self.valid else 0

    def logit_ids(self) -> list[str]:
        """Teachers whose logits methods use: they have logits and are not descriptive/sentinel."""
        return [t for t in self.ids if t in self.logits and self.roles.get(t, "predictive") == "predictive"]

    def stacked(self, name: str, ids: Sequence[str]) -> Tensor:
        """Field ``name`` of the teachers ``ids`` as one tensor ``[T, B, ...]`` in ``ids`` order (``covered``:
        ``[T, C]``). No copy when the field is ``Stacked`` and ``ids`` are one of its groups; one
        ``index_select`` for part of a group; else the entries are stacked (a ValueError names a missing one)."""
        table = getattr(self, name)
        if not all(t in table and t in self.valid for t in ids):
            for tid in ids:
                self.require(name, tid)
        return stack_of(table, ids)

    def require(self, name: str, tid: str) -> Tensor:
        """``getattr(self, name)[tid]``, or a ValueError naming the teacher, the field and the fix."""
        table = getattr(self, name)
        if tid not in table or tid not in self.valid:
            raise ValueError(
                f"TeacherBatch.{name} has no entry for teacher {tid!r} (or valid[{tid!r}] is missing), but the "
                f"method was built with it in MethodDims.teachers. Fix: load {name} for every teacher given to "
                "build_method, or rebuild the method with the teachers the batch holds."
            )
        return table[tid]

    def check(self, num_classes: int) -> None:
        """Shape checks (no device sync); raises ValueError naming the teacher and field."""
        B = self.batch_size
        for name in ("features", "logits", "featmaps", "label_logit", "lse", "logit_mean", "logit_std"):
            for tid, t in getattr(self, name).items():
                if tid not in self.valid:
                    raise ValueError(f"TeacherBatch.{name}[{tid!r}] has no valid[{tid!r}] mask")
                if t.shape[0] != B:
                    raise ValueError(f"TeacherBatch.{name}[{tid!r}] has {t.shape[0]} rows, expected {B}")
        for tid, z in self.logits.items():
            if z.shape[-1] != num_classes or tid not in self.covered:
                raise ValueError(f"TeacherBatch.logits[{tid!r}]: expected [B, {num_classes}] and covered[{tid!r}]")


@dataclass(frozen=True)
class RunFacts:
    """What a run has, known before training, for ``Method.run_notes``.

    Attributes:
        outputs: selected teacher id -> the outputs it has stored (``features``, ``logits``, ``featmap`` ...).
        student_checkpoint: the initial student weights (``--student-checkpoint``), ``None`` = random init.
    """

    outputs: Mapping[str, frozenset[str]] = field(default_factory=dict)
    student_checkpoint: str | None = None


# What a method may declare: ``needs`` are TeacherBatch fields (ids, roles, valid always come; covered comes with
# logits), ``requires`` what the selected teachers must have stored (kt_train/requirements.py checks each).
BATCH_FIELDS = frozenset(f.name for f in fields(TeacherBatch)) - {"ids", "roles", "valid", "covered"}
# ``features_or_featmap`` is per teacher: every selected teacher must have one of the two (KPU).
REQUIREMENTS = frozenset({"predictive_logits", "all_classes", "features", "featmap", "features_or_featmap"})
REFUSALS = REQUIREMENTS - {"all_classes"} | {"labels"}     # the refusals whose fix may name an ``alternative``


class Method(nn.Module):
    """Base of every method: owned heads are sub-modules, so they are saved with the student.

    ``forward(student, teachers)`` returns a dict of 0-dim tensors:

    * ``"loss"``: the total to call ``backward()`` on (fp32, carries the graph);
    * ``"<part>_loss"``: unweighted loss components, **detached**, for logging only (never sum them);
    * any other key: a detached diagnostic (fractions, norms); per-teacher or per-participant diagnostics
      use ``"<name>/<id>"`` keys, e.g. ``"teach_share/student0"``.

    Class attributes: ``name`` (registry key), ``summary`` (one line for ``ktc train --help``), ``Options``
    (the frozen options dataclass), ``needs`` (the ``TeacherBatch`` fields it reads, so the reader can skip the
    rest), ``requires`` (what the selected teachers must have stored: ``predictive_logits``, ``all_classes``
    (those logits cover every target class), ``features``, ``featmap`` (some selected teacher has it),
    ``features_or_featmap`` (every selected teacher has one of them); ``requirements(options)`` may depend on
    options), ``live_students`` (trains several students at once: ``--students``, then ``forward`` takes a
    sequence of ``StudentOutput``), ``reference_student`` (needs a frozen copy of the initial student);
    ``labels_required(options)``; ``alternatives`` (requirement -> another way out this method offers, added
    to the refusal's fix), ``note`` (a caveat printed after ``ktc train`` and in ``ktc eval``'s metrics),
    ``run_notes(options, facts)`` (one-line notices printed when ``ktc train`` starts, from ``RunFacts``),
    ``sentinel_student`` (meant for a student on a frozen sentinel trunk, ``--sentinel``). The CLI's choices,
    help, requirement checks and the run's setup come from these (docs/methods.md, "Adding a method").
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    needs: ClassVar[frozenset[str]] = frozenset()
    requires: ClassVar[frozenset[str]] = frozenset()
    live_students: ClassVar[bool] = False
    reference_student: ClassVar[bool] = False
    alternatives: ClassVar[Mapping[str, str]] = {}      # e.g. {"labels": "--opt label_source=vote for ..."}
    note: ClassVar[str] = ""
    sentinel_student: ClassVar[bool] = False

    @classmethod
    def requirements(cls, options: MethodOptions) -> frozenset[str]:
        """What the selected teachers must have stored for this method with these options."""
        return cls.requires

    @classmethod
    def run_notes(cls, options: MethodOptions, facts: RunFacts) -> list[str]:
        """One-line notices for the start of ``ktc train``: what this run will do differently from what the user
        may expect, given what it has (e.g. KPU without spatial maps). Empty by default."""
        return []

    @classmethod
    def declaration_problems(cls) -> list[str]:
        """What is wrong with this class's self-description (empty when it can be registered)."""
        key = cls.name.strip().lower().replace("-", "").replace("_", "")    # how names are looked up
        problems = [] if cls.name and cls.name == key else [f"name {cls.name!r} must be lower case, no '-' or '_'"]
        if not cls.summary or "\n" in cls.summary:
            problems.append(f"summary {cls.summary!r} must be one non-empty line (shown by `ktc train --help`)")
        if not (isinstance(cls.Options, type) and issubclass(cls.Options, MethodOptions)):
            return problems + [f"Options {cls.Options!r} must be a MethodOptions dataclass"]
        declared = (("needs", BATCH_FIELDS), ("requires", REQUIREMENTS), ("alternatives", REFUSALS))
        for attr, known in declared:
            if set(getattr(cls, attr)) - known:
                problems.append(f"{attr} {sorted(getattr(cls, attr))}: expected names among {sorted(known)}")
        if cls.live_students and "num_students" not in {f.name for f in fields(cls.Options)}:
            problems.append("live_students methods need a num_students option (set from --students)")
        return problems

    @classmethod
    def labels_required(cls, options: MethodOptions) -> bool:
        """Whether the method needs the true labels with these options."""
        return False

    def __init__(self, options: MethodOptions, dims: MethodDims) -> None:
        super().__init__()
        self.options = options
        self.dims = dims
        self.num_students = 1
        self.register_load_state_dict_pre_hook(_upgrade_legacy_heads)

    def legacy_params(self) -> list[LegacyParam]:
        """Where each tensor of the per-teacher head layout (checkpoints written before grouped heads) lives
        now, in that layout's parameter order; ``[]`` for methods whose keys did not change."""
        return []

    def forward(self, student: StudentOutput | Sequence[StudentOutput], teachers: TeacherBatch) -> dict[str, Tensor]:
        raise NotImplementedError

    def single_student(self, student: StudentOutput | Sequence[StudentOutput]) -> StudentOutput:
        """The one live student, or a clear error when a sequence of several was passed."""
        if isinstance(student, StudentOutput):
            return student
        if len(student) != 1:
            raise ValueError(f"method {self.name!r} trains one student, got {len(student)} StudentOutputs")
        return student[0]


def _upgrade_legacy_heads(module: Method, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """``load_state_dict`` pre-hook: per-teacher head tensors of an old checkpoint -> the stacked keys."""
    layout = [replace(p, old=prefix + p.old, new=prefix + p.new) for p in module.legacy_params()]
    if layout and any(p.old in state for p in layout):
        upgraded = upgrade_state(state, layout)
        state.clear()
        state.update(upgraded)


def scatter_full_logits(z: Tensor, label_map: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Teacher logits ``[B, C_t]`` -> global raw logits ``[B, C]`` (-inf uncovered) and covered ``[C]``.

    Args:
        z: ``[B, C_t]`` cached logits over the teacher's own classes.
        label_map: ``[C_t]`` int64 target id of each teacher class, ``-1`` for classes outside the target space.
        num_classes: ``C``.
    """
    # Index ops rather than ``out[:, label_map[keep]] = z[:, keep]``: the boolean-mask gather along dim 1 and
    # the advanced-index assignment each cost about as much as the rest together, once per teacher per batch
    # (docs/benchmarks.md). Same values copied, so the result is bit-identical. label_map is injective
    # (class names are unique), so no target class is written twice.
    kept = torch.nonzero(label_map >= 0).squeeze(1)
    target = label_map.index_select(0, kept).long()          # index_copy_ takes int64 indices only
    out = z.new_full((z.shape[0], num_classes), float("-inf"), dtype=torch.float32)
    out.index_copy_(1, target, z.index_select(1, kept).float())
    covered = torch.zeros(num_classes, dtype=torch.bool, device=z.device).index_fill_(0, target, True)
    return out, covered


def scatter_topk_logits(
    values: Tensor, index: Tensor, lse: Tensor, label_map: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Top-k cache -> global raw logits ``[B, C]`` with the evenly spread tail, and covered ``[C]``.

    Args:
        values: ``[B, k]`` raw logits of the k largest teacher classes.
        index: ``[B, k]`` their teacher-class indices (any integer dtype).
        lse: ``[B]`` logsumexp over all ``C_t`` teacher logits.
        label_map: ``[C_t]`` int64 target ids, ``-1`` = dropped.
        num_classes: ``C``.
    """
    c_t, k = label_map.shape[0], values.shape[1]
    v = values.double()
    rest = torch.log(torch.clamp(-torch.expm1(torch.logsumexp(v, 1) - lse.double()), min=1e-300))
    tail = lse.double() + rest - math.log(max(c_t - k, 1))                      # [B]
    full = tail[:, None].expand(-1, c_t).clone() if c_t > k else v.new_empty(v.shape[0], c_t)
    full.scatter_(1, index.long(), v)
    return scatter_full_logits(full, label_map, num_classes)

