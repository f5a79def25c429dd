"""Typed checks of YAML values for ``kt_cache.manifest``: each fails with a ``ManifestError`` that names
``file:key.path``, what was expected, what was found and how to fix it."""

from __future__ import annotations

import math
import re
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from kt_cache.errors import ManifestError, did_you_mean

MAX_DEPTH = 32
Check = Callable[[Any, "Loc"], Any]


@dataclass(frozen=True)
class Loc:
    """Where a value sits: the file as given, the key path, and an optional note (the teacher's model)."""

    file: str
    path: str = ""
    note: str = ""

    def key(self, name: str) -> Loc:
        return Loc(self.file, f"{self.path}.{name}" if self.path else name, self.note)

    def index(self, i: int) -> Loc:
        return Loc(self.file, f"{self.path}[{i}]", self.note)

    def fail(self, what: str, fix: str) -> NoReturn:
        where = f"{self.file}:{self.path}" if self.path else self.file
        raise ManifestError(f"{where}{self.note}: {what} Fix: {fix}")

    def expected(self, expected: str, got: Any, fix: str) -> NoReturn:
        self.fail(f"expected {expected}, got {describe(got)}.", fix)


def describe(value: Any) -> str:
    """Name a YAML value's type and show it briefly, e.g. ``str 'four'``."""
    if value is None:
        return "null (an empty value)"
    kind = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping"}
    text = repr(value)
    return f"{kind.get(type(value), type(value).__name__)} {text[:60] + '...' if len(text) > 60 else text}"


def read_text(path: Path) -> str:
    """The file's UTF-8 text, or a ManifestError saying why it cannot be read."""
    if not path.exists():
        raise ManifestError(f"{path}: no such manifest file (looked for {Path(os.path.abspath(path))}). "
                            "Fix: check the --manifest path; examples are in manifests/.")
    if not path.is_file():
        raise ManifestError(f"{path}: is a folder, not a manifest file. Fix: pass the .yaml file itself.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: is not UTF-8 text ({exc.reason} at byte {exc.start}). "
                            "Fix: save the manifest as UTF-8 YAML.") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot be read ({exc.strerror}). Fix: check its permissions.") from None


class StrictBoolLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` where only true/false are booleans (YAML 1.2): PyYAML's YAML 1.1 also reads
    yes/no/on/off as booleans, so ``flip: yes`` or a class named ``no`` would silently change meaning."""


StrictBoolLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
StrictBoolLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                       list("tTfF"))


def parse_yaml(text: str, path: Path) -> Any:
    """``yaml.safe_load`` the text after checking for duplicate keys; syntax errors name the line."""
    try:
        node = yaml.compose(text, Loader=StrictBoolLoader)
        check_duplicate_keys(node, path)
        return yaml.load(text, Loader=StrictBoolLoader)   # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        lines = text.splitlines()
        mark = exc.problem_mark if exc.problem_mark and exc.problem_mark.line < len(lines) else None
        mark = mark or exc.context_mark or exc.problem_mark   # at the end of the file, where the construct began
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        shown = f" The line: {lines[mark.line].strip()!r}." if mark and mark.line < len(lines) else ""
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ManifestError(f"{where}: YAML syntax error: {problem}.{shown} Fix: correct the YAML there "
                            "(indentation, a missing ':' or closing bracket, unquoted special characters; "
                            "tags such as !!python/... are never allowed).") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML ({exc}). Fix: correct the YAML syntax.") from None


def check_duplicate_keys(root: yaml.Node | None, path: Path) -> None:
    """YAML keeps only the last of two equal keys; a manifest must not say a thing twice."""
    stack, seen_nodes = [root] if root is not None else [], set()
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                stack.append(value)
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue
                line = key.start_mark.line + 1
                if key.value in first:
                    raise ManifestError(
                        f"{path}:{line}: key {key.value!r} appears twice in one mapping (lines {first[key.value]} "
                        f"and {line}); YAML would silently keep only the last. Fix: remove or merge one of them.")
                first[key.value] = line


def check_mapping(value: Any, loc: Loc, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check a mapping's keys: all strings, all known (with a did-you-mean hint), required ones present."""
    if not isinstance(value, dict):
        loc.expected(f"a mapping with keys {', '.join(allowed)}", value,
                     "write it as 'key: value' lines or {key: value}.")
    for key in value:
        if not isinstance(key, str):
            loc.fail(f"the key {key!r} is not a string (YAML reads unquoted yes/no/on/off/true/false as "
                     "booleans and digits as numbers).", f"quote it, e.g. \"{key}\": ...")
        if key not in allowed:
            hint = did_you_mean(key, allowed)
            loc.key(key).fail(f"unknown key {key!r}.{hint} Valid keys here: {', '.join(allowed)}.",
                              "rename it to one of the valid keys or remove it.")
    for key in required:
        if value.get(key) is None:
            loc.key(key).fail(f"the required key {key!r} is missing or empty.",
                              f"add '{key}: ...' (see docs/manifest.md).")
    return value


def get_value(data: dict[str, Any], key: str, default: Any) -> Any:
    """``data[key]``, or ``default`` when the key is absent or null (null means "not given")."""
    value = data.get(key)
    return default if value is None else value


def sub_mapping(data: dict[str, Any], key: str, loc: Loc, allowed: tuple[str, ...]) -> dict[str, Any]:
    """An optional nested mapping; absent or null reads as empty."""
    value = data.get(key)
    return {} if value is None else check_mapping(value, loc.key(key), allowed)


def check_int(value: Any, loc: Loc, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (not a bool), at least ``minimum`` and at most ``maximum`` when given."""
    bound = "" if minimum is None else f" >= {minimum}"
    bound += "" if maximum is None else f"{' and' if bound else ''} <= {maximum}"
    too_big = maximum is not None and isinstance(value, int) and value > maximum
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum) or too_big:
        loc.expected(f"an integer{bound}", value, f"write a whole number{bound}, without quotes.")
    return value


def check_float(value: Any, loc: Loc, expected: str = "a number") -> float:
    """A number (int or float, not a bool), returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        loc.expected(expected, value, f"write {expected}, without quotes.")
    return float(value)


def check_bool(value: Any, loc: Loc) -> bool:
    if not isinstance(value, bool):
        loc.expected("true or false", value, "write true or false, without quotes.")
    return value


def check_str(value: Any, loc: Loc, what: str = "a non-empty string") -> str:
    if not isinstance(value, str) or not value.strip():
        loc.expected(what, value, f"write {what}; quote it if YAML would read it as a number or boolean.")
    return value


def check_choice(value: Any, loc: Loc, choices: tuple[str, ...]) -> str:
    """One of ``choices``, with a did-you-mean hint."""
    if not isinstance(value, str) or value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        loc.fail(f"expected one of {', '.join(choices)}, got {describe(value)}.{hint}",
                 f"use one of: {', '.join(choices)}.")
    return value


def check_floats(value: Any, loc: Loc, n: int, what: str) -> tuple[float, ...]:
    """A list of exactly ``n`` numbers."""
    if not isinstance(value, list) or len(value) != n:
        loc.expected(f"a list of {n} numbers ({what})", value, f"write [{', '.join(['x'] * n)}].")
    return tuple(check_float(v, loc.index(i)) for i, v in enumerate(value))


def check_range_pair(value: Any, loc: Loc, upper: float | None) -> tuple[float, float]:
    """``[lo, hi]`` with ``0 < lo <= hi`` (and ``hi <= upper`` when given)."""
    rule = f"0 < lo <= hi <= {upper:g}" if upper is not None else "0 < lo <= hi"
    lo, hi = check_floats(value, loc, 2, rule)
    if not (0 < lo <= hi and (upper is None or hi <= upper)):
        loc.expected(f"[lo, hi] with {rule}", value, f"give two numbers with {rule}, e.g. [0.35, 1.0].")
    return lo, hi


def check_plain(value: Any, loc: Loc, depth: int = 0) -> Any:
    """Plain data only (null, bool, int, float, str, lists and string-keyed mappings of those)."""
    if depth > MAX_DEPTH:
        loc.fail("the value nests too deeply (or refers to itself through a YAML alias).", "flatten it.")
    if isinstance(value, list):
        return [check_plain(v, loc.index(i), depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                loc.fail(f"the key {key!r} is not a string.", f"quote it: \"{key}\": ...")
        return {k: check_plain(v, loc.key(k), depth + 1) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    loc.expected("plain data (null, bool, number, string, list, mapping)", value, "write it as plain YAML data.")


def resolve_path(raw: str, base: Path) -> Path:
    """An absolute, normalised path: ``raw`` itself when absolute, else relative to ``base``."""
    path = Path(raw).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def check_input_size(value: Any, loc: Loc) -> tuple[int, int, int]:
    """``[3, H, W]`` with whole numbers."""
    ok = isinstance(value, list) and len(value) == 3 and all(type(v) is int for v in value)
    if not ok or value[0] != 3 or min(value) < 1:
        loc.expected("[3, H, W] with whole numbers H, W >= 1", value, "write e.g. input_size: [3, 224, 224].")
    return tuple(value)


def also(check: Check, ok: Callable[[Any], bool], expected: str, fix: str) -> Check:
    """A checker that runs ``check`` and then requires ``ok`` of its result."""
    def checker(value: Any, loc: Loc) -> Any:
        result = check(value, loc)
        if not ok(result):
            loc.expected(expected, value, fix)
        return result
    return checker
