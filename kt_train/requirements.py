"""Refuse, before any training, a store that lacks what the chosen method needs; say what to do instead."""

from __future__ import annotations

from typing import Any

from kt_cache.errors import UsageError
from kt_cache.store import StoreReader


def teacher_outputs(reader: StoreReader, teacher_ids: list[str]) -> dict[str, dict[str, Any]]:
    """id -> {"role", "outputs", "covered"} from the stored attrs (``covered``: target classes its logits name)."""
    from kt_cache.classes import coverage

    target = list(reader.class_names)
    found = {}
    for tid in teacher_ids:
        record = reader.teacher_record(tid)
        names = record.class_names
        covered = coverage(target, list(names) if names else None)[0] if target else 0
        found[tid] = {"role": record.role, "outputs": set(record.outputs),
                      "covered": covered, "covers_all": bool(target) and covered == len(target)}
    return found


def predictive_with_logits(found: dict[str, dict[str, Any]], full_cover: bool = False) -> list[str]:
    return [t for t, f in found.items() if f["role"] == "predictive" and "logits" in f["outputs"]
            and (f["covers_all"] or not full_cover)]


def fail(config: Any, what: str, fix: str) -> None:
    raise UsageError(f"--method {config.method} on {config.cache} (teachers: {', '.join(config.teachers)}): {what} Fix: {fix}")


def or_else(cls: Any, refusal: str) -> str:
    """``", or <another way out>"`` when the method declares one for this refusal (``Method.alternatives``)."""
    alternative = cls.alternatives.get(refusal)
    return f", or {alternative}" if alternative else ""


def check_requirements(config: Any, reader: StoreReader, teacher_ids: list[str], options: Any, use_labels: bool) -> None:
    """One readable refusal per missing ingredient (outputs, roles, labels), from what the method declares."""
    from kt_train.methods import METHODS

    cls, found = METHODS[config.method], teacher_outputs(reader, teacher_ids)
    if cls.labels_required(options) and not use_labels:
        why = "--labels ignore was given" if config.labels == "ignore" else "the store has no labelled samples"
        fail(config, f"this method needs the true labels, but {why}.",
             "use --labels use with a store made from a labelled dataset (class sub-folders or a csv label column)"
             + or_else(cls, "labels") + ".")
    # the class-level need, not requirements(options): UNIFORM with logit_vote=false needs no predictive teacher
    # but still reads the logits of those selected, so a teacher whose logits name no target class is a mistake
    if "predictive_logits" in cls.requires:
        check_blind_teachers(config, reader, found)
    check_outputs(config, cls, cls.requirements(options), found)


def check_blind_teachers(config: Any, reader: StoreReader, found: dict[str, dict[str, Any]]) -> None:
    """Refuse predictive teachers whose logits name none of the target classes."""
    blind = [t for t, f in found.items() if f["role"] == "predictive" and "logits" in f["outputs"] and f["covered"] == 0]
    if blind and reader.class_names:
        others = [t for t in found if t not in blind]
        fail(config, f"teacher(s) {', '.join(blind)} are predictive but their logits name none of the "
             f"{len(reader.class_names)} target classes (`ktc info {config.cache}` shows each teacher's coverage).",
             (f"leave them out with --teachers {','.join(others)}" if others else "select other teachers with --teachers")
             + ", or re-extract them with `role: descriptive` (features only) or `classes:` in the target label space.")


def check_outputs(config: Any, cls: Any, requires: frozenset[str], found: dict[str, dict[str, Any]]) -> None:
    """Refuse when no selected teacher has stored an output the method requires."""
    all_classes = "all_classes" in requires
    if "predictive_logits" in requires and not predictive_with_logits(found, all_classes):
        fail(config, "no selected teacher is predictive with stored logits"
             + (" over all target classes" if all_classes else "") + ".",
             "extract a predictive teacher with `outputs: [..., logits]`, select it with --teachers"
             + or_else(cls, "predictive_logits") + ".")
    if "features" in requires and not any("features" in f["outputs"] for f in found.values()):
        fail(config, "no selected teacher has stored features.",
             "extract teachers with `outputs: [features, ...]`" + or_else(cls, "features") + ".")
    if "featmap" in requires and not any("featmap" in f["outputs"] for f in found.values()):
        fail(config, "no selected teacher has stored spatial maps (featmap).",
             "extract teachers with `outputs: [features, featmap]` (and `featmap: {grid: G}`)" + or_else(cls, "featmap")
             + ", or choose another method.")
    if "features_or_featmap" in requires:
        check_feature_teachers(config, cls, found)


def check_feature_teachers(config: Any, cls: Any, found: dict[str, dict[str, Any]]) -> None:
    """Refuse selected teachers that stored neither features nor a spatial map (nothing to align to), by name."""
    bare = [t for t, f in found.items() if not f["outputs"] & {"features", "featmap"}]
    if bare:
        others = [t for t in found if t not in bare]
        fail(config, f"teacher(s) {', '.join(bare)} have stored neither features nor spatial maps (featmap).",
             (f"leave them out with --teachers {','.join(others)}" if others else
              "select other teachers with --teachers") + ", or extract them with `outputs: [features, featmap]`"
             + or_else(cls, "features_or_featmap") + ".")


def run_notes(config: Any, reader: StoreReader, teacher_ids: list[str], options: Any) -> list[str]:
    """The method's start-of-run notices (``Method.run_notes``) for the selected teachers' stored outputs."""
    from kt_train.methods import METHODS
    from kt_train.methods.base import RunFacts

    outputs = {t: frozenset(f["outputs"]) for t, f in teacher_outputs(reader, teacher_ids).items()}
    return METHODS[config.method].run_notes(options, RunFacts(outputs, config.student_checkpoint))
