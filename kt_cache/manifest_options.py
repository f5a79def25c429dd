"""Optional teacher keys of the manifest that change how outputs are stored or labelled: ``codec:``
(int8 codes at extraction, ``kt_cache.codecs``) and ``class_map:`` (teacher classes -> target classes)."""

from __future__ import annotations

from typing import Any

from kt_cache.manifest_checks import Loc, check_str


def check_codec(value: Any, loc: Loc, outputs: tuple[str, ...]) -> str | None:
    """``codec: int8``: features and featmap stored as int8 codes, quantised per unit at extraction."""
    if value is None:
        return None
    if value != "int8":
        loc.expected("int8 (the codec written at extraction; each unit is quantised with its own range)", value,
                     "write codec: int8, or store fp16 and re-encode later with `ktc compact --features pca:K,int8` "
                     "(PCA needs a fit over the whole store).")
    if not {"features", "featmap"} & set(outputs):
        loc.fail(f"codec: int8 applies to features and featmap, but outputs are {list(outputs)}.",
                 "add features or featmap to outputs, or remove codec:.")
    return "int8"


def check_class_map(value: Any, loc: Loc, outputs: tuple[str, ...]) -> tuple[tuple[str, str], ...] | str | None:
    """``class_map:``: a mapping ``teacher class: target class`` (kept as pairs), or the path of a CSV file
    with the columns ``teacher_class,target_class`` (kept as written; read when the teacher is planned)."""
    if value is None:
        return None
    if "logits" not in outputs:
        loc.fail(f"class_map: names the teacher's logits, but outputs are {list(outputs)}.",
                 "add logits to outputs, or remove class_map:.")
    if isinstance(value, str):
        return check_str(value, loc, "a mapping {teacher class: target class} or a CSV file path")
    if not isinstance(value, dict) or not value:
        loc.expected("a non-empty mapping {teacher class: target class}, or the path of a CSV file with columns "
                     "teacher_class,target_class", value, "write e.g. class_map: {n02123045: tabby cat}.")
    for key, target in value.items():
        check_str(key, loc, "teacher class names as keys (quote numeric names: \"0\")")
        check_str(target, loc.key(str(key)), "a target class name, WordNet id or synonym")
    return tuple((str(k), str(v)) for k, v in value.items())
