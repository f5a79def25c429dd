"""End-to-end extraction through the ``ktc`` CLI with random-init timm teachers of two input sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from extract_helpers import CLASSES, cnn_teacher, make_image_folder, store_files, vit_teacher, write_manifest
from kt_cache.cli import cli
from kt_cache.store import StoreReader


@pytest.fixture()
def project(tmp_path):
    make_image_folder(tmp_path / "images", per_class=4)
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher(), vit_teacher()])
    return tmp_path, manifest


def run_cli(*args: str):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def extract(manifest, *extra):
    result = run_cli("extract", "--manifest", manifest, "--workers", "0", "--no-progress", *extra)
    assert result.exit_code == 0, result.output
    return result


def test_store_layout_and_view0_matches_direct_forward(project):
    tmp_path, manifest = project
    result = extract(manifest)
    assert "cnn32" in result.output and "views/s" in result.output
    root = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    ids = root["samples/id"][:]
    assert len(ids) == 12 and all(not i.startswith("/") and ".." not in i for i in ids)
    assert sorted(ids) != list(ids), "rows follow a seeded permutation, not the sorted class order"
    assert root["samples/ok"][:].all()
    assert root["samples/views"].shape == (12, 3, 5)
    cnn = root["teachers/cnn32"]
    assert cnn["logits_topk/values"].shape == (12, 3, 2) and cnn["logits_topk/index"].dtype == np.uint16
    assert cnn["featmap"].shape[:4] == (12, 3, 2, 2) and cnn["features"].dtype == np.float16
    assert cnn["done"][:].all() and root["teachers/vit48/done"][:].all()
    assert root["teachers/vit48/logits"].shape == (12, 3, 3)
    check_view0_matches_forward(tmp_path, root, "vit48", row=5)
    check_view0_matches_forward(tmp_path, root, "cnn32", row=2)


def check_view0_matches_forward(tmp_path, root, teacher_id, row):
    from kt_cache.images import decode_image
    from kt_cache.manifest import load_manifest
    from kt_cache.teachers import load_teacher, resolve_teacher
    from kt_cache.views import view_pixels

    manifest = load_manifest(tmp_path / "teachers.yaml")
    spec = next(t for t in manifest.teachers if t.id == teacher_id)
    plan = resolve_teacher(spec, CLASSES, tmp_path)
    teacher = load_teacher(plan, "cpu")
    image = decode_image(tmp_path / "images" / str(root["samples/id"][row]))
    box = root["samples/views"][row, 0]
    pixels = view_pixels(image, box[:4], bool(box[4]), plan.input_size[1:], plan.interpolation).float()
    mean, std = torch.tensor(plan.mean).view(3, 1, 1) * 255, torch.tensor(plan.std).view(3, 1, 1) * 255
    direct = teacher.forward(((pixels - mean) / std)[None])
    group = root[f"teachers/{teacher_id}"]
    stored_feat = group["features"][row, 0].astype(np.float32)
    np.testing.assert_allclose(stored_feat, direct["features"][0].numpy(), rtol=2e-3, atol=2e-3)
    if "logits" in group:
        np.testing.assert_allclose(group["logits"][row, 0].astype(np.float32), direct["logits"][0].numpy(),
                                   rtol=2e-3, atol=2e-3)
    else:
        top = group["logits_topk/index"][row, 0]
        assert int(top[0]) == int(direct["logits"][0].argmax())
        lse = float(torch.logsumexp(direct["logits"][0], 0))
        assert abs(float(group["logits_lse"][row, 0]) - lse) < 1e-4


def test_label_logit_and_lse_consistent_with_full_logits(project):
    tmp_path, manifest = project
    extract(manifest)
    root = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    vit = root["teachers/vit48"]
    logits = vit["logits"][:].astype(np.float32)
    labels = root["samples/label"][:]
    expected = np.take_along_axis(logits, labels[:, None, None].repeat(3, 1), axis=2)[..., 0]
    np.testing.assert_allclose(vit["label_logit"][:], expected, rtol=2e-3, atol=2e-3)
    assert [CLASSES[i] for i in labels] == [i.split("/")[0] for i in root["samples/id"][:]]


def test_opens_with_xarray_and_consolidated_metadata(project):
    xr = pytest.importorskip("xarray")
    tmp_path, manifest = project
    extract(manifest)
    ds = xr.open_zarr(str(tmp_path / "out.zarr" / "teachers" / "cnn32"), consolidated=True)   # the teacher's own
    assert ds["features"].dims == ("sample", "view", "feature")
    assert ds["featmap"].dims == ("sample", "view", "grid_y", "grid_x", "channel")
    root = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert root.attrs["ktc"]["teachers"] == ["cnn32", "vit48"] and root.metadata.consolidated_metadata is None
    teacher = root["teachers/cnn32"]
    assert {"done", "features", "logits_topk/values"} <= set(teacher.metadata.consolidated_metadata.flattened_metadata)
    objects = json.loads((tmp_path / "out.zarr" / "ktc-objects.json").read_text())["objects"]
    assert "teachers/cnn32/done/c/0" in objects and all(len(o["sha256"]) == 64 for o in objects.values())


def test_teacher_attrs_record_provenance_stats_and_timing(project):
    tmp_path, manifest = project
    extract(manifest)
    attrs = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["teachers/cnn32"].attrs["ktc_teacher"]
    assert attrs["preprocess"]["input_size"] == [3, 32, 32] and attrs["role"] == "predictive"
    assert attrs["timing"]["images"] == 12 * 3 and attrs["timing"]["forward_s"] > 0
    assert attrs["feature_stats"] == {"array": "stats/features", "count": 12 * 3} and attrs["complete"]
    assert attrs["class_names"] == "dataset" and "torch" in attrs["library_versions"]   # the target list, stored once
    assert (attrs["source"], attrs["model"], attrs["pretrained"]) == ("timm", "resnet10t", "none")
    assert attrs["weights"] == "random" and attrs["weights_sha256"] is None       # nothing was loaded
    assert attrs["seconds"] > 0
    root = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    stored = root["teachers/cnn32/features"][:].astype(np.float64).reshape(-1, attrs["feature_dim"])
    stats = StoreReader(str(tmp_path / "out.zarr")).feature_stats("cnn32")
    assert stats["mean"].shape == (attrs["feature_dim"],) and stats["count"] == 12 * 3
    np.testing.assert_allclose(stats["mean"], stored.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["std"], stored.std(0), rtol=1e-3, atol=1e-5)
    assert max(stats["std"]) > 0
    assert StoreReader(str(tmp_path / "out.zarr")).teacher_attrs("cnn32")["class_names"] == list(CLASSES)
    meta = root.attrs["ktc"]
    assert (meta["format"], meta["version"]) == ("ktc", 3)
    assert meta["views"] == {"count": 3, "seed": 0, "scale": [0.35, 1.0], "ratio": [0.75, 4 / 3], "flip": True,
                             "center_crop": 0.875}
    assert meta["dataset"]["classes"] == list(CLASSES) and len(meta["dataset"]["fingerprint"]) == 64


def test_teacher_attrs_record_pretrained_tag_and_sha256_of_the_loaded_checkpoint(tmp_path):
    import hashlib

    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("resnet10t", num_classes=3).state_dict(), tmp_path / "lab.safetensors")
    make_image_folder(tmp_path / "images", per_class=1)
    teacher = cnn_teacher(pretrained="c3_in1k", checkpoint="lab.safetensors")
    extract(write_manifest(tmp_path / "teachers.yaml", [teacher]))
    attrs = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["teachers/cnn32"].attrs["ktc_teacher"]
    assert (attrs["source"], attrs["model"], attrs["pretrained"]) == ("timm", "resnet10t", "c3_in1k")
    assert attrs["weights"].endswith("lab.safetensors")
    assert attrs["weights_sha256"] == hashlib.sha256((tmp_path / "lab.safetensors").read_bytes()).hexdigest()


def test_dataloader_workers_give_a_bit_identical_store(tmp_path):
    """Decoding in 2 DataLoader worker processes writes exactly the bytes of the in-process path."""
    make_image_folder(tmp_path / "images", per_class=2)
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher(), vit_teacher()])
    extract(manifest, "--out", tmp_path / "w0.zarr")
    result = run_cli("extract", "--manifest", manifest, "--workers", "2", "--no-progress",
                     "--out", tmp_path / "w2.zarr")
    assert result.exit_code == 0, result.output
    serial, parallel = store_files(tmp_path / "w0.zarr"), store_files(tmp_path / "w2.zarr")
    assert "teachers/vit48/featmap/c/0/0/0/0/0" in serial and "samples/views/c/0/0/0" in serial
    assert parallel.keys() == serial.keys()
    assert [k for k in serial if serial[k] != parallel[k]] == []


def test_each_image_is_decoded_once_per_pass_and_resized_once_per_resolution(tmp_path, monkeypatch):
    """Three teachers at two input resolutions in one wave: one decode per image, one resize per
    (resolution, interpolation); with one teacher per wave (tiny budget), one decode per image per wave."""
    from collections import Counter

    import kt_cache.decode as decode
    import kt_cache.image_source as image_source

    decoded, resized, read = Counter(), Counter(), Counter()
    real_decode, real_resize, real_read = decode.decode_image, decode.views_to_pixels, image_source.read_image_bytes

    def counting_decode(path, data=None):
        decoded[str(path)] += 1
        return real_decode(path, data)

    def counting_read(path):                 # one read per image per pass: decode and digest share it
        read[str(path)] += 1
        return real_read(path)

    def counting_resize(image, views, size, interpolation="bilinear"):
        resized[(*size, interpolation)] += 1
        return real_resize(image, views, size, interpolation)

    monkeypatch.setattr(decode, "decode_image", counting_decode)
    monkeypatch.setattr(decode, "views_to_pixels", counting_resize)
    monkeypatch.setattr(image_source, "read_image_bytes", counting_read)
    make_image_folder(tmp_path / "images", per_class=2)
    teachers = [cnn_teacher(), vit_teacher(), cnn_teacher(id="cnn32b")]
    manifest = write_manifest(tmp_path / "teachers.yaml", teachers)
    extract(manifest, "--out", tmp_path / "one_pass.zarr")
    assert len(decoded) == 6 and set(decoded.values()) == {1}, decoded
    assert read == decoded, read
    assert resized == {(32, 32, "bilinear"): 6, (48, 48, "bicubic"): 6}, resized
    root = zarr.open_group(str(tmp_path / "one_pass.zarr"), mode="r")
    assert all(root[f"teachers/{t['id']}/done"][:].all() for t in teachers)
    decoded.clear()
    resized.clear()
    extract(manifest, "--out", tmp_path / "three_passes.zarr", "--max-teacher-memory", "1KB")
    assert len(decoded) == 6 and set(decoded.values()) == {3}, decoded          # 3 waves, 3 passes
    assert resized == {(32, 32, "bilinear"): 12, (48, 48, "bicubic"): 6}, resized


def test_add_teacher_runs_only_the_new_one(tmp_path):
    make_image_folder(tmp_path / "images", per_class=2)
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher()])
    extract(manifest)
    before = (tmp_path / "out.zarr" / "teachers" / "cnn32" / "features" / "c" / "0" / "0" / "0").read_bytes()
    write_manifest(manifest, [cnn_teacher(), vit_teacher()])
    result = extract(manifest)
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[2:4]}
    assert rows["cnn32"][1] == "resumed" and rows["cnn32"][4] == "0"      # no views run for the old teacher
    assert rows["vit48"][1] == "created" and int(rows["vit48"][4]) == 6 * 3
    after = (tmp_path / "out.zarr" / "teachers" / "cnn32" / "features" / "c" / "0" / "0" / "0").read_bytes()
    assert before == after
    root = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert root.attrs["ktc"]["teachers"] == ["cnn32", "vit48"]
    assert root["teachers/vit48"].metadata.consolidated_metadata is not None


def test_changed_teacher_is_refused_unless_overwritten(tmp_path):
    make_image_folder(tmp_path / "images", per_class=2)
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher()])
    extract(manifest)
    write_manifest(manifest, [cnn_teacher(logits={"topk": 3})])
    result = run_cli("extract", "--manifest", manifest, "--workers", "0", "--no-progress")
    assert result.exit_code == 2
    assert "cnn32" in result.output and "--overwrite cnn32" in result.output and "Traceback" not in result.output
    extract(manifest, "--overwrite", "cnn32")
    assert zarr.open_group(str(tmp_path / "out.zarr"))["teachers/cnn32/logits_topk/values"].shape[-1] == 3


def test_resume_against_another_dataset_is_refused(tmp_path):
    make_image_folder(tmp_path / "images", per_class=2)
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher()])
    extract(manifest)
    make_image_folder(tmp_path / "images", per_class=3, seed=1)       # one more image per class
    result = run_cli("extract", "--manifest", manifest, "--workers", "0", "--no-progress")
    assert result.exit_code == 2 and "dataset fingerprint" in result.output and "--out" in result.output


def test_output_that_is_a_file_is_refused(project):
    tmp_path, manifest = project
    (tmp_path / "file.zarr").write_text("not a store")
    result = run_cli("extract", "--manifest", manifest, "--out", tmp_path / "file.zarr")
    assert result.exit_code == 2 and "is a file" in result.output


def test_dry_run_prints_plan_and_writes_nothing(project):
    tmp_path, manifest = project
    result = run_cli("extract", "--manifest", manifest, "--dry-run")
    assert result.exit_code == 0, result.output
    for text in ("cnn32", "vit48", "waves", "logits_topk/values", "[12, 3, 2]", "estimated store size", "3 per image"):
        assert text in result.output
    assert not (tmp_path / "out.zarr").exists()


def test_waves_under_memory_budget_and_only(project):
    tmp_path, manifest = project
    result = run_cli("extract", "--manifest", manifest, "--dry-run", "--max-teacher-memory", "1KB")
    assert "waves     2" in result.output
    extract(manifest, "--max-teacher-memory", "1KB", "--only", "vit48", "--limit", "5")
    root = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert [name for name, _ in root["teachers"].groups()] == ["vit48"] and root["samples/id"].shape == (5,)


def test_info_json_and_text(project):
    tmp_path, manifest = project
    extract(manifest)
    result = run_cli("info", tmp_path / "out.zarr", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["n_samples"] == 12 and info["n_views"] == 3 and len(info["dataset"]["fingerprint"]) == 64
    cnn = next(t for t in info["teachers"] if t["id"] == "cnn32")
    assert cnn["complete"] and cnn["arrays"]["features"]["shape"][:2] == [12, 3] and cnn["bytes"] > 0
    text = run_cli("info", tmp_path / "out.zarr").output
    assert "cnn32" in text and "complete" in text and "12" in text


def test_info_on_a_missing_store_is_a_clear_error(tmp_path):
    result = run_cli("info", tmp_path / "nothing.zarr")
    assert result.exit_code == 1 and "nothing.zarr" in result.output and "Traceback" not in result.output


def test_sha256_of_weights_known_only_after_loading_is_recorded(tmp_path, monkeypatch):
    """Hub weights are hashed when loaded (the file is only known then); finalize records that hash."""
    import kt_cache.teachers as teachers

    real_load = teachers.load_teacher

    def load_like_hub(plan, device):
        teacher = real_load(plan, device)
        teacher.weights_sha256 = "ab" * 32
        return teacher

    monkeypatch.setattr(teachers, "load_teacher", load_like_hub)
    make_image_folder(tmp_path / "images", per_class=1)
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher()])
    extract(manifest)
    attrs = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["teachers/cnn32"].attrs["ktc_teacher"]
    assert attrs["weights"] == "random" and attrs["weights_sha256"] == "ab" * 32
    assert "resumed" in extract(manifest).output          # a recorded hub hash does not look like a change


def test_changed_weights_file_at_the_same_path_is_refused(tmp_path):
    import timm
    from safetensors.torch import save_file

    def save_weights(seed):
        torch.manual_seed(seed)
        save_file(timm.create_model("resnet10t", num_classes=3).state_dict(), tmp_path / "w.safetensors")

    make_image_folder(tmp_path / "images", per_class=1)
    save_weights(0)
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher(checkpoint="w.safetensors")])
    extract(manifest)
    save_weights(1)
    result = run_cli("extract", "--manifest", manifest, "--workers", "0", "--no-progress")
    assert result.exit_code == 2 and "weights sha256" in result.output and "--overwrite cnn32" in result.output


def test_extract_and_info_report_the_same_size(tmp_path):
    from extract_helpers import extract

    make_image_folder(tmp_path / "images", per_class=2)
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher()])
    first, again = extract(manifest), extract(manifest)
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "out.zarr")]).output.splitlines()[0]
    on_disk = info.split("ktc store v3, ")[1].split(" on disk")[0]
    assert f"size      {on_disk} on disk (as `ktc info` reports it)" in again.output
    assert "size      " in first.output and "nothing to do" in again.output
