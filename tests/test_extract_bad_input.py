"""Bad input through ``ktc extract``: unreadable images are recorded, not fatal; usage errors exit 2."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from extract_helpers import cnn_teacher, make_image_folder, write_manifest
from kt_cache.cli import cli


def add_odd_images(folder):
    """One image per odd mode plus two unreadable files, all in class 'ant'."""
    rng = np.random.default_rng(3)
    rgb = (rng.random((30, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("L").save(folder / "grey.png")
    Image.fromarray(rgb).convert("RGBA").save(folder / "alpha.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rng.random((30, 40)) * 65535).astype(np.uint16)).save(folder / "deep16.png")
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "notes.jpg").write_text("this is not an image")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_unreadable_images_are_recorded_and_extraction_continues(tmp_path):
    make_image_folder(tmp_path / "images", per_class=2)
    add_odd_images(tmp_path / "images" / "ant")
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher()])
    result = invoke("extract", "--manifest", manifest, "--workers", "0", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "2 images could not be decoded" in result.output
    assert "ant/truncated.jpg" in result.output and "ant/notes.jpg" in result.output
    root = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    ids, ok = list(root["samples/id"][:]), root["samples/ok"][:]
    bad = {ids.index("ant/truncated.jpg"), ids.index("ant/notes.jpg")}
    assert {i for i in range(len(ids)) if not ok[i]} == bad
    features = root["teachers/cnn32/features"][:]
    assert np.isnan(features[sorted(bad)]).all(), "failed rows hold NaN, never fake outputs"
    good = [i for i in range(len(ids)) if i not in bad]
    assert np.isfinite(features[good]).all()
    for odd in ("ant/grey.png", "ant/alpha.png", "ant/cmyk.jpg", "ant/deep16.png"):
        assert ok[ids.index(odd)], odd
    assert root.attrs["ktc"]["n_failed_samples"] == 2
    again = invoke("extract", "--manifest", manifest, "--workers", "0", "--no-progress")   # decodes nothing
    assert again.exit_code == 0, again.output
    meta = zarr.open_group(str(tmp_path / "out.zarr"), mode="r").attrs["ktc"]
    assert meta["n_failed_samples"] == 2 and sorted(meta["failed_samples"]) == ["ant/notes.jpg", "ant/truncated.jpg"], \
        "a resumed run reports the store's failures, not only its own"


def test_strict_fails_fast_naming_the_file(tmp_path):
    make_image_folder(tmp_path / "images", per_class=1)
    add_odd_images(tmp_path / "images" / "ant")
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher()])
    result = invoke("extract", "--manifest", manifest, "--workers", "0", "--no-progress", "--strict")
    assert result.exit_code == 1
    assert ("truncated.jpg" in result.output or "notes.jpg" in result.output) and "Traceback" not in result.output


def test_empty_folder_is_a_usage_error(tmp_path):
    (tmp_path / "images").mkdir()
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher()])
    result = invoke("extract", "--manifest", manifest, "--dry-run")
    assert result.exit_code == 2 and "images" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("teacher", "needle"),
    [
        (cnn_teacher(model="resnet10tt"), "resnet10t"),                       # did-you-mean
        (cnn_teacher(checkpoint="weights/missing.safetensors"), "missing.safetensors"),
        (cnn_teacher(classes=["ant", "bee"]), "cnn32"),                         # 2 names, 3 logits
        (cnn_teacher(colour="red"), "colour"),                                  # unknown key
        (cnn_teacher(logits={"topk": "many"}), "topk"),                         # wrong type
    ],
)
def test_bad_teacher_entries_exit_2_before_any_model_runs(tmp_path, teacher, needle):
    make_image_folder(tmp_path / "images", per_class=1)
    manifest = write_manifest(tmp_path / "teachers.yaml", [teacher])
    result = invoke("extract", "--manifest", manifest, "--workers", "0", "--no-progress")
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Fix" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.zarr").exists()


def test_duplicate_teacher_id_exits_2(tmp_path):
    make_image_folder(tmp_path / "images", per_class=1)
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher(), cnn_teacher()])
    result = invoke("extract", "--manifest", manifest, "--dry-run")
    assert result.exit_code == 2 and "cnn32" in result.output


def test_checkpoint_that_does_not_fit_exits_2(tmp_path):
    import timm
    from safetensors.torch import save_file

    make_image_folder(tmp_path / "images", per_class=1)
    (tmp_path / "weights").mkdir()
    save_file(timm.create_model("resnet10t", num_classes=5).state_dict(), tmp_path / "weights" / "other.safetensors")
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher(checkpoint="weights/other.safetensors")])
    result = invoke("extract", "--manifest", manifest, "--workers", "0", "--no-progress")
    assert result.exit_code == 2 and "cnn32" in result.output and "other.safetensors" in result.output


def test_fp16_overflow_is_reported_not_stored_as_inf():
    import torch

    from kt_cache.errors import OutputOverflowError
    from kt_cache.outputs import to_numpy_for_store

    blocks = {"features": torch.tensor([[[1.0, 7e4]]])}
    with pytest.raises(OutputOverflowError, match=r"teacher 'big'.*dtype: float32"):
        to_numpy_for_store(blocks, "float16", "big", "uint16")
    stored = to_numpy_for_store(blocks, "float32", "big", "uint16")
    assert stored["features"].dtype == np.float32 and np.isfinite(stored["features"]).all()


def test_fp16_overflow_through_the_cli_names_teacher_array_and_fix(tmp_path):
    """A teacher whose logits exceed float16 (fc bias 1e6): `ktc extract` exits 1 naming the teacher, the
    array and `dtype: float32`; the store holds no inf and no unit is marked done; the named fix works."""
    import timm
    import torch
    from safetensors.torch import save_file

    model = timm.create_model("resnet10t", num_classes=3)
    with torch.no_grad():
        model.fc.bias.fill_(1e6)                                      # every logit ~1e6 > 65504
    save_file(model.state_dict(), tmp_path / "huge.safetensors")
    make_image_folder(tmp_path / "images", per_class=2)
    teacher = cnn_teacher(checkpoint="huge.safetensors", outputs=["features", "logits"])
    del teacher["logits"], teacher["featmap"]                         # full logits: array 'logits'
    manifest = write_manifest(tmp_path / "teachers.yaml", [teacher])
    result = invoke("extract", "--manifest", manifest, "--workers", "0", "--no-progress")
    assert result.exit_code == 1, result.output
    assert "teacher 'cnn32'" in result.output and "'logits'" in result.output and "float16" in result.output
    assert "dtype: float32" in result.output and "--overwrite cnn32" in result.output
    assert "Traceback" not in result.output
    store = tmp_path / "out.zarr"
    root = zarr.open_group(str(store), mode="r", use_consolidated=False)
    arrays = dict(root.members(max_depth=None))
    floats = [k for k, a in arrays.items() if isinstance(a, zarr.Array) and np.issubdtype(a.dtype, np.floating)]
    assert "teachers/cnn32/logits" in floats
    for name in floats:
        assert not np.isinf(arrays[name][:]).any(), f"{name} holds inf"
    assert not root["teachers/cnn32/done"][:].any(), "no unit claims the overflowing data"
    assert not [p for p in (store / "teachers" / "cnn32").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert not (store / "ktc-objects.json").exists(), "an interrupted store is never finalized"

    teacher["dtype"] = "float32"                                      # the fix the message names
    write_manifest(manifest, [teacher])
    fixed = invoke("extract", "--manifest", manifest, "--workers", "0", "--no-progress", "--overwrite", "cnn32")
    assert fixed.exit_code == 0, fixed.output
    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["teachers/cnn32"]
    logits = group["logits"][:]
    assert logits.dtype == np.float32 and group["done"][:].all()
    assert np.isfinite(logits).all() and logits.min() > 65504


def test_help_does_not_import_torch():
    code = "import sys; from kt_cache.cli import cli; cli(['--help'], standalone_mode=False); " \
           "print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False False")
