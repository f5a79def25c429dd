"""timm teachers: resolve offline on the meta device, load weights from a checkpoint or the hub.

Outputs (docs/store-format.md): ``features`` = ``forward_head(forward_features(x), pre_logits=True)``,
``logits`` = ``forward_head(forward_features(x))``, ``featmap`` = ``forward_features(x)`` (map or patch
tokens) average-pooled to a g x g grid. timm is imported inside functions only.

Also holds the pieces both sources share (preprocess overrides, class-count check, ``TorchTeacher``).
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kt_cache.classes import imagenet_1k_names, resolve_class_names
from kt_cache.errors import TeacherError, did_you_mean
from kt_cache.manifest_types import INTERPOLATIONS, TeacherSpec
from kt_cache.teachers import checkpoints
from kt_cache.teachers.base import LoadedTeacher, TeacherPlan
from kt_cache.teachers.pooling import param_bytes, timm_featmap

RANDOM = "none"          # `pretrained: none` -> random init


@dataclass
class Dims:
    """Per-image output sizes found by a meta forward; None where the model has no such output."""

    features: int | None = None
    logits: int | None = None
    featmap: int | None = None


# ---------------------------------------------------------------------------------------------- shared


def merge_preprocess(spec: TeacherSpec, base: dict[str, Any]) -> dict[str, Any]:
    """Override the model's data config field by field with ``spec.preprocess``; validate the result.

    Args:
        base: ``input_size`` (3, H, W), ``mean``, ``std``, ``interpolation`` from the model's config.
    """
    out = dict(base)
    for key in ("input_size", "mean", "std", "interpolation"):
        value = getattr(spec.preprocess, key)
        if value is not None:
            out[key] = value
    size, mean, std = tuple(int(v) for v in out["input_size"]), _triple(out["mean"]), _triple(out["std"])
    interp = str(out["interpolation"])
    if len(size) != 3 or size[0] != 3 or min(size) <= 0:
        raise TeacherError(f"teacher {spec.id}: preprocess input_size {size} is not [3, H, W]. Fix: set "
                           "`preprocess: {input_size: [3, H, W]}`.")
    if interp not in INTERPOLATIONS:
        raise TeacherError(f"teacher {spec.id}: the model's interpolation {interp!r} is not one of "
                           f"{INTERPOLATIONS}. Fix: set `preprocess: {{interpolation: bicubic}}` (or another).")
    return {**out, "input_size": size, "mean": mean, "std": std, "interpolation": interp}


def _triple(values: Any) -> tuple[float, float, float]:
    seq = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    return (seq[0],) * 3 if len(seq) == 1 else (seq[0], seq[1], seq[2])


def check_class_count(spec: TeacherSpec, names: tuple[str, ...], count: int, what: str) -> None:
    """Raise when a class list's length differs from the number of logits.

    Args:
        what: the other side, with ``{n}`` for ``count``, e.g. "the model outputs {n} logits".
    """
    if len(names) != count:
        raise TeacherError(
            f"teacher {spec.id}: classes has {len(names)} names but {what.format(n=count)}. Fix: give exactly one "
            "name per logit, in logit order (or set model_args num_classes to the checkpoint's class count)."
        )


def build_error(spec: TeacherSpec, err: Exception) -> TeacherError:
    """A model that cannot be built from its name and model_args."""
    return TeacherError(
        f"teacher {spec.id}: {spec.source} could not build {spec.model!r} with model_args "
        f"{spec.model_args} ({type(err).__name__}: {str(err)[:300]}). Fix: check model_args against the model's "
        "constructor arguments (or install the package the error names, or choose another model)."
    )


def probe_error(spec: TeacherSpec, size: tuple[int, int, int], err: Exception) -> TeacherError:
    """A model that rejects its resolved input size."""
    return TeacherError(
        f"teacher {spec.id}: model {spec.model!r} does not run on a {size[0]}x{size[1]}x{size[2]} input "
        f"({type(err).__name__}: {err}). Fix: set `preprocess: {{input_size: [3, H, W]}}` to a size the model "
        "accepts, or change the model's own size (timm: model_args img_size; open_clip: vision_cfg image_size)."
    )


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of a model's first parameter (cpu for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def meta_build(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a model on the meta device (no memory, no init cost); fall back to the CPU for models whose
    constructor needs real tensors. Returns the model in eval mode."""
    try:
        with torch.device("meta"):
            model = make()
    except TeacherError:
        model = make()
    return model.eval()


class TorchTeacher(LoadedTeacher):
    """A network in eval mode, frozen, on one device."""

    def __init__(self, plan: TeacherPlan, model: torch.nn.Module, device: str | torch.device,
                 weights_sha256: str | None, state_dict_key: str = "") -> None:
        self.plan = plan
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.weights_sha256 = weights_sha256
        self.state_dict_key = state_dict_key   # "" or where the checkpoint's tensors were nested
        self.wanted = frozenset(plan.spec.outputs)

    def release(self) -> None:
        """Drop the network; empty the CUDA cache when it was on a GPU."""
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ resolve


def split_name(spec: TeacherSpec) -> tuple[str, str]:
    """Validate ``spec.model`` (+ ``spec.pretrained``) and return (architecture, tag or "")."""
    import timm
    from timm.models import split_model_name_tag

    if spec.model.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise TeacherError(
            f"teacher {spec.id}: timm model {spec.model!r} is a hub/folder reference, which needs the model hub "
            "for its config. Fix: use the timm architecture name (e.g. 'convnext_tiny') with `checkpoint:` "
            "pointing at the downloaded weights."
        )
    arch, tag = split_model_name_tag(spec.model)
    if not timm.is_model(arch):
        raise TeacherError(
            f"teacher {spec.id}: timm has no model {arch!r}.{did_you_mean(arch, timm.list_models())} "
            "Fix: use a name from `timm.list_models()` (the part after '.' is the pretrained tag)."
        )
    extra_tag = spec.pretrained if spec.pretrained not in (None, RANDOM) else ""
    if tag and extra_tag and tag != extra_tag:
        raise TeacherError(
            f"teacher {spec.id}: model {spec.model!r} names tag {tag!r} but pretrained is {extra_tag!r}. "
            "Fix: give the tag once, either in the model name or in `pretrained:`."
        )
    tag = tag or extra_tag
    known = [name.split(".", 1)[1] for name in timm.list_pretrained(f"{arch}.*")]
    if tag and tag not in known:
        raise TeacherError(
            f"teacher {spec.id}: timm model {arch!r} has no pretrained tag {tag!r}.{did_you_mean(tag, known)} "
            f"Known tags: {known[:8]}. Fix: use one of them, or `pretrained: none` with a `checkpoint:`."
        )
    return arch, tag


def _weights(spec: TeacherSpec, model: torch.nn.Module, base_dir: Path | None) -> str:
    """'random', the checkpoint's absolute path, or 'hub:<arch.tag>' (checked to be downloadable)."""
    if spec.checkpoint is not None:          # a checkpoint wins over any `pretrained:` value
        return str(checkpoints.resolve_checkpoint(spec.id, spec.checkpoint, base_dir))
    if spec.pretrained == RANDOM:
        return "random"
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
        raise TeacherError(
            f"teacher {spec.id}: timm model {spec.model!r} has no pretrained weights to download. "
            "Fix: set `checkpoint:` to a weights file, or `pretrained: none` for a random init."
        )
    wanted = spec.model_args.get("num_classes")
    if "logits" in spec.outputs and wanted is not None and wanted != cfg.get("num_classes"):
        raise TeacherError(
            f"teacher {spec.id}: hub weights of {spec.model!r} have {cfg.get('num_classes')} classes, but "
            f"model_args num_classes={wanted} would leave a randomly initialised classifier. Fix: remove "
            "num_classes, drop 'logits' from outputs, or set `checkpoint:` to weights with that head."
        )
    return f"hub:{cfg.get('architecture', spec.model)}.{cfg.get('tag', '')}".rstrip(".")


def build(spec: TeacherSpec, arch: str, tag: str, pretrained: bool = False) -> torch.nn.Module:
    """``timm.create_model`` with the spec's model_args (call under ``torch.device('meta')`` to probe)."""
    import timm

    name = f"{arch}.{tag}" if tag else arch
    try:
        return timm.create_model(name, pretrained=pretrained, **spec.model_args)
    except (TypeError, ValueError, AssertionError, KeyError, RuntimeError) as err:
        if pretrained:
            raise
        raise build_error(spec, err) from err


def _data_config(spec: TeacherSpec, model: torch.nn.Module) -> dict[str, Any]:
    """timm's data config (test size) with ``img_size`` from model_args, then ``spec.preprocess``."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model, use_test_size=True)
    img_size = spec.model_args.get("img_size")
    if img_size is not None:
        hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        cfg["input_size"] = (3, int(hw[0]), int(hw[1]))
    return merge_preprocess(spec, cfg)


def _probe(spec: TeacherSpec, model: torch.nn.Module, size: tuple[int, int, int]) -> Dims:
    """Meta forward of a ``[1, 3, H, W]`` input -> output sizes of the requested outputs."""
    x = torch.zeros(1, *size, device=model_device(model))
    try:
        with torch.no_grad():
            feats = model.forward_features(x)
            pre = model.forward_head(feats, pre_logits=True)
    except Exception as err:  # noqa: BLE001 - any failure means this input size does not work
        raise probe_error(spec, size, err) from err
    dims = Dims(features=int(pre.shape[-1]))
    if int(getattr(model, "num_classes", 1) or 0) > 0:
        dims.logits = int(model.forward_head(feats).shape[-1])
    if "featmap" in spec.outputs:
        try:
            dims.featmap = int(timm_featmap(feats, model, size[1:], spec.featmap_grid).shape[-1])
        except ValueError as err:
            raise TeacherError(f"teacher {spec.id}: no featmap for {spec.model!r}: {err}. Fix: remove "
                               "'featmap' from outputs for this teacher.") from err
    return dims


@dataclass
class _Probed:
    """A teacher's model built for resolving, and the output sizes found for it so far."""

    model: torch.nn.Module
    dims: dict[tuple, Dims]          # (input size, featmap wanted, featmap grid) -> sizes


# Meta models per (architecture, tag, model_args): the weights (checkpoint, hub, random) change neither the
# model nor its output sizes, so teachers sharing an architecture -- fine-tuned checkpoints of one model,
# or a manifest planned again in one process -- build and probe it once. Both are slow: the meta kernels run
# in Python, so a meta build + probe costs about what the real build does. Only meta models are kept (a
# CPU-built fallback would pin real memory); errors are not cached, so every teacher gets its own message.
_PROBED: OrderedDict[tuple, _Probed] = OrderedDict()
PROBE_CACHE_SIZE = 32


def _meta_model(spec: TeacherSpec, arch: str, tag: str) -> _Probed:
    """The spec's model in eval mode on the meta device (or on the CPU, see ``meta_build``), cached."""
    key = (arch, tag, json.dumps(spec.model_args, sort_keys=True, default=repr))
    if key in _PROBED:
        _PROBED.move_to_end(key)
        return _PROBED[key]
    probed = _Probed(meta_build(lambda: build(spec, arch, tag)), {})
    if model_device(probed.model).type == "meta":
        _PROBED[key] = probed
        if len(_PROBED) > PROBE_CACHE_SIZE:
            _PROBED.popitem(last=False)
    return probed


def _probed_dims(spec: TeacherSpec, probed: _Probed, size: tuple[int, int, int]) -> Dims:
    """``_probe``, once per model, input size and featmap grid; a copy, as Dims is mutable."""
    key = (size, "featmap" in spec.outputs, spec.featmap_grid)
    if key not in probed.dims:
        probed.dims[key] = _probe(spec, probed.model, size)
    return dataclasses.replace(probed.dims[key])


def _class_names(spec: TeacherSpec, count: int | None, base_dir: Path | None) -> tuple[str, ...] | None:
    """Names of the model's logits: ``spec.classes``, else ImageNet-1k for 1000 logits, else None."""
    if count is None:
        raise TeacherError(
            f"teacher {spec.id}: {spec.model!r} with model_args {spec.model_args} has no classifier "
            "(num_classes=0), so it has no logits. Fix: drop 'logits' from outputs, or set model_args "
            "num_classes with a checkpoint that has that head."
        )
    if spec.classes is None:
        return imagenet_1k_names() if count == 1000 else None
    names = resolve_class_names(spec.classes, where=f"teacher {spec.id}: classes", base=base_dir)
    check_class_count(spec, names, count, "the model outputs {n} logits")
    return names


def resolve(spec: TeacherSpec, target_classes: tuple[str, ...] | None, base_dir: Path | None = None) -> TeacherPlan:
    """Resolve a timm teacher offline (meta device, no weights). See ``kt_cache.teachers.resolve_teacher``."""
    arch, tag = split_name(spec)
    probed = _meta_model(spec, arch, tag)
    model = probed.model
    weights = _weights(spec, model, base_dir)
    pre = _data_config(spec, model)
    dims = _probed_dims(spec, probed, pre["input_size"])
    want = set(spec.outputs)
    names = _class_names(spec, dims.logits, base_dir) if "logits" in want else None
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    extra = {
        "timm_model": f"{arch}.{tag}" if tag else arch,
        "pretrained_tag": cfg.get("tag") if weights.startswith("hub:") else None,   # tag of the weights
        "pretrained_cfg_tag": cfg.get("tag") or tag or None,                         # tag of the data config
        "hf_hub_id": cfg.get("hf_hub_id"),
        "crop_pct": pre.get("crop_pct"),
        "featmap_source": "forward_features" if "featmap" in want else None,
        "checkpoint_ref": str(spec.checkpoint) if spec.checkpoint is not None else None,
        "remap": bool(spec.remap),
    }
    return TeacherPlan(
        spec=spec, input_size=pre["input_size"], interpolation=pre["interpolation"], mean=pre["mean"],
        std=pre["std"], feature_dim=dims.features if "features" in want else None,
        num_classes=dims.logits if "logits" in want else None,
        featmap_dim=dims.featmap if "featmap" in want else None, class_names=names,
        param_bytes=param_bytes(model), weights=weights, extra=extra,
    )


# --------------------------------------------------------------------------------------------------- load


class TimmTeacher(TorchTeacher):
    """A loaded timm network; ``forward`` runs ``forward_features`` once for all outputs."""

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised ``[B, 3, H, W]`` -> ``{"features": [B, D], "logits": [B, C_t], "featmap": [B, g, g, d]}``
        (requested outputs only, fp32)."""
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            feats = self.model.forward_features(pixels)
            if "features" in self.wanted:
                out["features"] = self.model.forward_head(feats, pre_logits=True).float()
            if "logits" in self.wanted:
                out["logits"] = self.model.forward_head(feats).float()
            if "featmap" in self.wanted:
                hw = (pixels.shape[-2], pixels.shape[-1])
                out["featmap"] = timm_featmap(feats, self.model, hw, self.plan.spec.featmap_grid).float()
        return out


def load(plan: TeacherPlan, device: str | torch.device) -> TimmTeacher:
    """Build the network, load its weights (strict) and move it to ``device``."""
    spec = plan.spec
    arch, _, tag = plan.extra["timm_model"].partition(".")
    if plan.weights.startswith("hub:"):
        with checkpoints.hub_guard(spec.id, plan.extra["timm_model"]):
            model = build(spec, arch, tag, pretrained=True)
        return TimmTeacher(plan, model, device, _hub_sha256(model))
    model = build(spec, arch, tag)
    if plan.weights == "random":
        return TimmTeacher(plan, model, device, None)
    path = Path(plan.weights)
    state, key = checkpoints.read_state_dict(spec.id, path)
    if spec.remap:
        state = checkpoints.remap_by_order(spec.id, path, state, model)
    checkpoints.load_strict(spec.id, path, model, state, spec.model, remap_hint=not spec.remap)
    return TimmTeacher(plan, model, device, checkpoints.file_sha256(path), key)


def _hub_sha256(model: torch.nn.Module) -> str | None:
    """sha256 of the cached hub file the weights came from, when it can be found."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    repo = cfg.get("hf_hub_id")
    if not repo:
        return None
    names = tuple(n for n in (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin") if n)
    found = checkpoints.hub_cached_file(repo, names)
    return checkpoints.file_sha256(found) if found else None
