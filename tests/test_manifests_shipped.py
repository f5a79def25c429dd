"""Every manifest shipped in manifests/ loads, and names models and weights that really exist (offline)."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from kt_cache.manifest import PKG_PATTERN, load_manifest
from kt_cache.manifest_types import Manifest

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
SHIPPED = sorted(MANIFESTS.glob("*.yaml"))


@pytest.fixture(scope="module")
def imagenet_104() -> Manifest:
    return load_manifest(MANIFESTS / "imagenet-104.yaml")


def test_the_expected_manifests_are_shipped() -> None:
    assert {p.name for p in SHIPPED} >= {"demo.yaml", "imagenet-104.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_manifest_loads(path: Path) -> None:
    manifest = load_manifest(path)
    assert manifest.teachers
    assert len({t.id for t in manifest.teachers}) == len(manifest.teachers)


def test_imagenet_104_has_104_varied_teachers(imagenet_104: Manifest) -> None:
    teachers = imagenet_104.teachers
    assert len(teachers) == 104 and len({t.id for t in teachers}) == 104
    assert {t.source for t in teachers} == {"timm", "open_clip"}
    assert {"predictive", "descriptive"} <= {t.role for t in teachers}
    assert Counter(t.source for t in teachers)["open_clip"] >= 20
    assert imagenet_104.dataset.classes == "imagenet-1k" and imagenet_104.views.count == 4
    root = imagenet_104.dataset.root
    assert root is not None and root.parts[-3:] == ("data", "imagenet", "train")
    predictive = [t for t in teachers if t.role == "predictive"]
    assert sum(t.logits_topk == 20 for t in predictive) > len(predictive) // 2


def test_imagenet_104_timm_models_exist(imagenet_104: Manifest) -> None:
    import timm

    pretrained, names = set(timm.list_pretrained()), set(timm.list_models())
    for t in imagenet_104.teachers:
        if t.source != "timm":
            continue
        full = f"{t.model}.{t.pretrained}" if t.pretrained else t.model
        assert full in pretrained if "." in full else full in names, f"{t.id}: {full} is not in timm {timm.__version__}"


def test_imagenet_104_open_clip_pairs_exist(imagenet_104: Manifest) -> None:
    import open_clip

    pairs = set(open_clip.list_pretrained())
    for t in imagenet_104.teachers:
        if t.source != "open_clip":
            continue
        assert (t.model, t.pretrained) in pairs, f"{t.id}: ({t.model}, {t.pretrained}) is not in open_clip"
        # QuickGELU must match how the weights were trained (open_clip only warns on a mismatch).
        model_gelu = (open_clip.get_model_config(t.model) or {}).get("quick_gelu", False)
        assert model_gelu == open_clip.get_pretrained_cfg(t.model, t.pretrained).get("quick_gelu", False), t.id


def test_demo_pkg_checkpoint_resolves_to_an_installed_file() -> None:
    demo = load_manifest(MANIFESTS / "demo.yaml")
    assert demo.dataset.builtin == "skimage" and demo.storage.unit_rows == 16 and demo.views.count == 4
    assert [t.id for t in demo.teachers] == ["effnet_lite0", "effnet_lite1", "effnet_lite2"]
    assert (MANIFESTS / "demo.yaml").resolve() == (MANIFESTS.parent / "kt_cache" / "data" / "demo.yaml").resolve()
    for t in demo.teachers:
        assert isinstance(t.checkpoint, str), t.id
        module, rel = PKG_PATTERN.match(t.checkpoint).groups()
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.submodule_search_locations, f"{module} is not installed"
        assert any((Path(loc) / rel).is_file() for loc in spec.submodule_search_locations), t.checkpoint


def test_the_example_in_docs_loads(tmp_path: Path) -> None:
    text = (MANIFESTS.parent / "docs" / "manifest.md").read_text(encoding="utf-8")
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "teachers.yaml"
    path.write_text(example, encoding="utf-8")
    manifest = load_manifest(path)
    assert [t.id for t in manifest.teachers] == ["convnext_tiny_in1k", "own_effnet", "lab_digits_lo", "clip_b16",
                                                 "vit_base_patch16_224.dino"]


def test_manifest_doc_states_the_demo_teacher_count() -> None:
    words = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
    count = len(load_manifest(MANIFESTS / "demo.yaml").teachers)
    doc = (MANIFESTS.parent / "docs" / "manifest.md").read_text(encoding="utf-8")
    assert f"`demo.yaml` (offline, CPU, {words[count]} real teachers)" in doc
