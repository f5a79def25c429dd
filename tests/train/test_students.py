"""Students: plain timm CNN/ViT students, the KPU sentinel + adapter student, checkpoints, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from kt_cache.errors import UsageError
from kt_train.adapter import interaction_indexes
from kt_train.students import SentinelSpec, Student, build_student, load_student, save_student, spatial_map

VIT = "vit_tiny_patch16_224"
VIT_ARGS = {"img_size": 32, "depth": 2}


def _save(model: torch.nn.Module, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny ViT (32 px, 2 blocks) with a 10-class head, as the sentinel's weights."""
    torch.manual_seed(0)
    model = timm.create_model(VIT, pretrained=False, num_classes=10, **VIT_ARGS)
    return _save(model, tmp_path_factory.mktemp("w") / "vit.safetensors")


@pytest.fixture()
def sentinel_student(vit_file: Path) -> Student:
    torch.manual_seed(1)
    spec = SentinelSpec(VIT, str(vit_file), dict(VIT_ARGS), {"conv_inplane": 16})   # small SPM: fast test
    return build_student(VIT, 5, sentinel=spec)


def _bare_trunk(vit_file: Path) -> torch.nn.Module:
    """The sentinel as timm builds it, with the file's weights (classifier dropped)."""
    bare = timm.create_model(VIT, pretrained=False, num_classes=0, **VIT_ARGS)
    state = {k: v for k, v in load_file(str(vit_file)).items() if not k.startswith("head.")}
    bare.load_state_dict(state, strict=True)
    return bare.eval()


def test_cnn_student_shapes() -> None:
    student = build_student("resnet10t", 7, img_size=64)
    out = student(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 7)
    assert out.features.shape == (2, student.feature_dim) and student.feature_dim == 512
    assert out.featmap.shape == (2, student.featmap_dim, 2, 2) and student.featmap_dim == 512
    cfg = student.data_config
    assert cfg["input_size"] == (3, 64, 64) and len(cfg["mean"]) == 3 and len(cfg["std"]) == 3
    assert cfg["interpolation"]
    assert len(student.trainable_parameters()) == len(list(student.parameters()))


def test_vit_student_shapes_and_patch_tokens() -> None:
    student = build_student(VIT, 4, model_args=dict(VIT_ARGS)).eval()
    x = torch.randn(2, 3, 32, 32)
    out = student(x)
    assert out.logits.shape == (2, 4)
    assert out.features.shape == (2, 192) == (2, student.feature_dim)
    assert out.featmap.shape == (2, 192, 2, 2) and student.featmap_dim == 192
    tokens = student.model.forward_features(x)[:, 1:]                     # drop CLS: [B, 4, 192]
    assert torch.equal(out.featmap[:, :, 1, 0], tokens[:, 2])              # row-major grid, channels first
    assert student.data_config["input_size"] == (3, 32, 32)


def test_nhwc_feature_map_is_permuted() -> None:
    model = torch.nn.Module()
    model.output_fmt = "NHWC"
    feats = torch.randn(2, 3, 5, 8)                                        # [B, H, W, D]
    assert spatial_map(model, feats, (96, 160)).shape == (2, 8, 3, 5)


def test_unknown_name_says_did_you_mean_and_fix() -> None:
    with pytest.raises(UsageError) as info:
        build_student("resnet10x", 3)
    assert 'Did you mean "resnet10t"' in str(info.value) and "Fix:" in str(info.value)


def test_sentinel_trunk_frozen_adapter_trains(sentinel_student: Student) -> None:
    student = sentinel_student.train()
    assert not student.trunk.training and student.adapter.training and student.head.training
    assert all(not p.requires_grad for p in student.trunk.parameters())
    trainable = {id(p) for p in student.trainable_parameters()}
    assert not trainable & {id(p) for p in student.trunk.parameters()}
    assert trainable == {id(p) for p in [*student.adapter.parameters(), *student.head.parameters()]}
    out = student(torch.randn(2, 3, 32, 32))
    (out.logits.pow(2).mean() + out.featmap.pow(2).mean()).backward()
    assert all(p.grad is None for p in student.trunk.parameters())
    gate = student.adapter.interactions[0].injector.gamma
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert student.adapter.spm.stem[0].weight.grad.abs().sum() > 0           # via the extractors
    assert student.head.weight.grad.abs().sum() > 0
    assert out.featmap.shape == (2, student.featmap_dim, 2, 2)             # stride-16 level of 32 px


def test_sentinel_output_equals_bare_trunk_at_init(sentinel_student: Student, vit_file: Path) -> None:
    bare = _bare_trunk(vit_file)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = bare.forward_head(bare.forward_features(x), pre_logits=True)
        got = sentinel_student(x).features
        assert torch.equal(got, want)
        sentinel_student.adapter.interactions[-1].injector.gamma.fill_(0.5)
        assert not torch.allclose(sentinel_student(x).features, want, atol=1e-3)


def test_sentinel_pyramid_levels(sentinel_student: Student) -> None:
    student = sentinel_student.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, maps = student.forward_pyramid(x)
        assert [m.shape[-2:] for m in maps] == [(8, 8), (4, 4), (2, 2), (1, 1)]      # strides 4/8/16/32
        assert all(m.shape[:2] == (2, 192) for m in maps)
        assert student.featmap_level == 2 and torch.equal(student(x).featmap, maps[2])


def test_save_load_round_trip(sentinel_student: Student, tmp_path: Path) -> None:
    with torch.no_grad():
        for block in sentinel_student.adapter.interactions:
            block.injector.gamma.uniform_(-1, 1)
    path = save_student(sentinel_student, tmp_path / "s.safetensors")
    side = json.loads((tmp_path / "s.json").read_text())
    assert side["name"] == VIT and side["sentinel"]["model_args"] == VIT_ARGS and side["num_classes"] == 5
    loaded = load_student(path)
    assert not loaded.trunk.training and all(not p.requires_grad for p in loaded.trunk.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = sentinel_student.eval()(x), loaded.eval()(x)
    for name in ("logits", "features", "featmap"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_save_load_round_trip_cnn(tmp_path: Path) -> None:
    student = build_student("resnet10t", 3, img_size=48)
    student(torch.randn(4, 3, 48, 48))                                     # move the BN running stats
    loaded = load_student(save_student(student, tmp_path / "cnn.safetensors"))
    assert loaded.data_config["input_size"] == (3, 48, 48)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(student.eval()(x).logits, loaded.eval()(x).logits)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_with_other_classifier_loads(tmp_path: Path, suffix: str) -> None:
    teacher = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    path = _save(teacher, tmp_path / f"r{suffix}")
    student = build_student("resnet10t", 3, checkpoint=str(path))
    assert torch.equal(student.model.conv1[0].weight, teacher.conv1[0].weight)
    assert student.model.fc.weight.shape == (3, 512)
    assert student(torch.randn(1, 3, 64, 64)).logits.shape == (1, 3)


def test_checkpoint_of_other_architecture_is_usage_error(vit_file: Path) -> None:
    with pytest.raises(UsageError) as info:
        build_student("resnet10t", 3, checkpoint=str(vit_file))
    text = str(info.value)
    assert "does not fit" in text and "missing" in text and "Fix:" in text


def test_sentinel_misuse_is_usage_error(vit_file: Path) -> None:
    with pytest.raises(UsageError, match="name must equal sentinel.model"):
        build_student("resnet10t", 3, sentinel=SentinelSpec(VIT, str(vit_file), dict(VIT_ARGS)))
    with pytest.raises(UsageError, match="VisionTransformer"):
        build_student("resnet10t", 3, sentinel=SentinelSpec("resnet10t"))
    with pytest.raises(UsageError, match="unknown keys"):
        build_student(VIT, 3, sentinel=SentinelSpec(VIT, None, dict(VIT_ARGS), {"conv_inplanes": 8}))
    with pytest.raises(UsageError, match="not an existing"):
        build_student(VIT, 3, sentinel=SentinelSpec(VIT, "/nonexistent/w.safetensors", dict(VIT_ARGS)))


def test_interaction_layout_matches_vit_adapter() -> None:
    assert interaction_indexes(12) == [(0, 2), (3, 5), (6, 8), (9, 11)]
    assert interaction_indexes(2) == [(0, 0), (1, 1)]
