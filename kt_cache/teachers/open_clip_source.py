"""open_clip teachers: image embeddings, zero-shot logits over the dataset's classes, patch-token maps.

``features`` = ``encode_image(x)`` (not normalised), ``logits`` = ``exp(logit_scale) * cos(img, text)``
(+ ``logit_bias`` for SigLIP models) against one text embedding per TARGET class (prompt templates,
averaged, computed once at load), ``featmap`` = the vision trunk's spatial tokens / final map pooled to
g x g. ``model_args`` are merged into the model config, dicts (vision_cfg, text_cfg) key by key.
open_clip is imported inside functions only.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kt_cache.classes import resolve_class_names
from kt_cache.errors import TeacherError, did_you_mean
from kt_cache.manifest_types import TeacherSpec
from kt_cache.teachers import checkpoints
from kt_cache.teachers.base import TeacherPlan
from kt_cache.teachers.pooling import param_bytes, pool_map, timm_featmap, tokens_to_map
from kt_cache.teachers.timm_source import (
    RANDOM, TorchTeacher, build_error, check_class_count, merge_preprocess, meta_build, model_device, probe_error,
)

TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a origami {}.",
    "a photo of the large {}.", "art of the {}.", "a photo of the small {}.",
)
TEXT_BATCH = 256                       # prompts per text-encoder forward


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Hide open_clip's root-logger chatter ("No pretrained weights loaded ...") while building."""
    root = logging.getLogger()
    only_others = logging.Filter()
    only_others.filter = lambda record: "open_clip" not in record.pathname  # type: ignore[method-assign]
    root.addFilter(only_others)
    try:
        yield
    finally:
        root.removeFilter(only_others)


# ------------------------------------------------------------------------------------------------ resolve


def _check_name(spec: TeacherSpec) -> str:
    """The built-in open_clip config name for ``spec.model`` ('/' is read as '-', as open_clip does)."""
    import open_clip

    if spec.model.startswith(("hf-hub:", "local-dir:")):
        raise TeacherError(
            f"teacher {spec.id}: open_clip model {spec.model!r} is a hub/folder reference; only built-in configs "
            "resolve offline. Fix: use a name from `open_clip.list_models()` with `checkpoint:` set to the weights."
        )
    name = spec.model.replace("/", "-")
    if name not in open_clip.list_models():
        raise TeacherError(
            f"teacher {spec.id}: open_clip has no model {spec.model!r}.{did_you_mean(name, open_clip.list_models())} "
            "Fix: use a name from `open_clip.list_models()`."
        )
    return name


def _check_tag(spec: TeacherSpec, name: str) -> str | None:
    """The pretrained tag (validated), or None for a checkpoint / random init."""
    import open_clip

    tag = spec.pretrained if spec.pretrained not in (None, RANDOM) else None
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag is not None and not open_clip.get_pretrained_cfg(name, tag):
        raise TeacherError(
            f"teacher {spec.id}: open_clip model {name!r} has no pretrained tag {tag!r}.{did_you_mean(tag, tags)} "
            f"Known tags: {tags[:8]}. Fix: use one of them, or set `checkpoint:` to a weights file."
        )
    if tag is None and spec.checkpoint is None and spec.pretrained != RANDOM:
        raise TeacherError(
            f"teacher {spec.id}: open_clip model {name!r} needs `pretrained:` (one of {tags[:8]}) or `checkpoint:`. "
            "Fix: add one of them (`pretrained: none` gives a random init)."
        )
    return tag


def _model_kwargs(spec: TeacherSpec, name: str, tag: str | None) -> dict[str, Any]:
    """model_args merged into the built-in config (dict values key by key); QuickGELU when the tag needs it."""
    import open_clip

    base = open_clip.get_model_config(name) or {}
    kwargs = {
        k: {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        for k, v in spec.model_args.items()
    }
    tag_cfg = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    if tag_cfg.get("quick_gelu") and not base.get("quick_gelu") and "quick_gelu" not in kwargs:
        kwargs["quick_gelu"] = True
    return kwargs


def build(spec: TeacherSpec, name: str, tag: str | None, pretrained: bool = False) -> torch.nn.Module:
    """``open_clip.create_model`` (random init unless ``pretrained``) with the merged model_args."""
    import open_clip

    kwargs = _model_kwargs(spec, name, tag)
    device = torch.get_default_device()
    with _quiet_open_clip():
        try:
            return open_clip.create_model(name, pretrained=tag if pretrained else None, device=device, **kwargs)
        except (TypeError, ValueError, AssertionError, KeyError, RuntimeError) as err:
            if pretrained:
                raise
            raise build_error(spec, err) from err


def _preprocess(spec: TeacherSpec, model: torch.nn.Module, name: str, tag: str | None) -> dict[str, Any]:
    """The model's preprocess cfg (size from the built model), the tag's mean/std/interpolation, overrides."""
    import open_clip

    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    tag_cfg = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    cfg.update({k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg})
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    hw = (size, size) if isinstance(size, int) else tuple(size)
    base = {"input_size": (3, int(hw[0]), int(hw[1])), "mean": cfg.get("mean"), "std": cfg.get("std"),
            "interpolation": cfg.get("interpolation", "bicubic"), "resize_mode": cfg.get("resize_mode")}
    return merge_preprocess(spec, base)


def featmap_kind(visual: torch.nn.Module) -> str | None:
    """How spatial outputs are read from a vision tower: 'tokens', 'timm', 'layer4' or None (unsupported)."""
    kind = type(visual).__name__
    if kind == "VisionTransformer" and getattr(visual, "attn_pool", None) is None:
        return "tokens"
    if kind == "TimmModel" and hasattr(visual, "trunk"):
        return "timm"
    if kind == "ModifiedResNet":
        return "layer4"
    return None


def _probe(spec: TeacherSpec, model: torch.nn.Module, size: tuple[int, int, int]) -> tuple[int, int | None]:
    """Meta forward -> (embedding dim D, featmap channels d or None)."""
    x = torch.zeros(1, *size, device=model_device(model))
    want_map = "featmap" in spec.outputs
    if want_map and featmap_kind(model.visual) is None:
        raise TeacherError(
            f"teacher {spec.id}: featmap is not supported for the {type(model.visual).__name__} vision tower of "
            f"{spec.model!r} (no spatial tokens). Fix: remove 'featmap' from this teacher's outputs."
        )
    try:
        emb, fmap = encode(model, x, spec.featmap_grid if want_map else None)
    except Exception as err:  # noqa: BLE001 - any failure means this input size does not work
        raise probe_error(spec, size, err) from err
    return int(emb.shape[-1]), (int(fmap.shape[-1]) if fmap is not None else None)


def _prompt_names(spec: TeacherSpec, target: tuple[str, ...] | None, base_dir: Path | None) -> tuple[str, ...]:
    """Class names written into the prompts: ``spec.classes`` (one per target class) or the target names."""
    if target is None:
        raise TeacherError(
            f"teacher {spec.id}: open_clip logits are zero-shot scores over the dataset's classes, but the dataset "
            "has no class names. Fix: use a dataset with class sub-folders or `dataset: classes:`, or drop "
            "'logits' from this teacher's outputs."
        )
    if spec.classes is None:
        return target
    names = resolve_class_names(spec.classes, where=f"teacher {spec.id}: classes", base=base_dir)
    check_class_count(spec, names, len(target), "the dataset has {n} classes (the zero-shot logits score them)")
    return names


def resolve(spec: TeacherSpec, target_classes: tuple[str, ...] | None, base_dir: Path | None = None) -> TeacherPlan:
    """Resolve an open_clip teacher offline (meta device, no weights). See ``kt_cache.teachers.resolve_teacher``."""
    name = _check_name(spec)
    tag = _check_tag(spec, name)
    if spec.remap:
        raise TeacherError(f"teacher {spec.id}: `remap: true` is only supported for timm teachers. Fix: remove "
                           "it; open_clip checkpoints are converted by open_clip's own key mapping.")
    want = set(spec.outputs)
    prompts = _prompt_names(spec, target_classes, base_dir) if "logits" in want else None
    weights = "random" if tag is None else f"hub:{name}:{tag}"
    if spec.checkpoint is not None:
        weights = str(checkpoints.resolve_checkpoint(spec.id, spec.checkpoint, base_dir))
    model = meta_build(lambda: build(spec, name, tag))
    pre = _preprocess(spec, model, name, tag)
    dim, map_dim = _probe(spec, model, pre["input_size"])
    extra = {
        "open_clip_model": name, "pretrained_tag": tag, "resize_mode": pre.get("resize_mode"),
        "featmap_source": f"vision {featmap_kind(model.visual)}" if "featmap" in want else None,
        "prompt_templates": list(TEMPLATES) if prompts else None,
        "prompt_names": list(prompts) if prompts and prompts != target_classes else None,
        "checkpoint_ref": str(spec.checkpoint) if spec.checkpoint is not None else None,
    }
    return TeacherPlan(
        spec=spec, input_size=pre["input_size"], interpolation=pre["interpolation"], mean=pre["mean"],
        std=pre["std"], feature_dim=dim if "features" in want else None,
        num_classes=len(prompts) if prompts else None, featmap_dim=map_dim if "featmap" in want else None,
        class_names=target_classes if prompts else None, param_bytes=param_bytes(model), weights=weights, extra=extra,
    )


# --------------------------------------------------------------------------------------------------- load


def encode(model: torch.nn.Module, pixels: torch.Tensor, grid: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image embedding and, when ``grid`` is given, the spatial map.

    Args:
        pixels: normalised ``[B, 3, H, W]``.
        grid: g, or None for no map.

    Returns:
        ``([B, D], [B, g, g, d] or None)``; the embedding is ``model.encode_image(pixels)``.
    """
    visual = model.visual
    kind = featmap_kind(visual) if grid is not None else None
    if kind is None:
        return model.encode_image(pixels), None
    if kind == "timm":
        feats = visual.trunk.forward_features(pixels)
        emb = visual.head(visual.trunk.forward_head(feats))
        return emb, timm_featmap(feats, visual.trunk, tuple(pixels.shape[-2:]), grid)
    if kind == "layer4":
        seen: list[torch.Tensor] = []
        handle = visual.layer4.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            emb = model.encode_image(pixels)
        finally:
            handle.remove()
        return emb, pool_map(seen[-1], grid)
    visual.output_tokens = True
    try:
        emb, tokens = visual(pixels)
    finally:
        visual.output_tokens = False
    rows, cols = visual.grid_size
    extra = tokens.shape[1] - rows * cols       # pool_type 'none' keeps the class token
    return emb, pool_map(tokens_to_map(tokens, max(extra, 0), (rows, cols)), grid)


def text_embeddings(model: torch.nn.Module, tokenizer: Any, names: Sequence[str], device: torch.device) -> torch.Tensor:
    """One unit-norm text embedding per class: prompt templates encoded in batches, averaged, renormalised.

    Returns:
        ``[C, E]`` float32 on ``device``.
    """
    prompts = [t.format(n) for n in names for t in TEMPLATES]
    chunks = []
    with torch.no_grad():
        for start in range(0, len(prompts), TEXT_BATCH):
            tokens = tokenizer(prompts[start:start + TEXT_BATCH]).to(device)
            chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    per_class = torch.cat(chunks).reshape(len(names), len(TEMPLATES), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


class OpenClipTeacher(TorchTeacher):
    """A loaded open_clip model; text embeddings of the target classes are fixed at load time."""

    text: torch.Tensor | None = None    # [C_t, E] unit-norm

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised ``[B, 3, H, W]`` -> ``{"features": [B, D], "logits": [B, C_t], "featmap": [B, g, g, d]}``
        (requested outputs only, fp32)."""
        grid = self.plan.spec.featmap_grid if "featmap" in self.wanted else None
        with torch.no_grad():
            emb, fmap = encode(self.model, pixels, grid)
            emb = emb.float()
            out = {"features": emb} if "features" in self.wanted else {}
            if "logits" in self.wanted:
                out["logits"] = (self.scale * F.normalize(emb, dim=-1) @ self.text.T + self.bias).float()
            if fmap is not None:
                out["featmap"] = fmap.float()
        return out

    def prepare_text(self, names: Sequence[str], tokenizer: Any) -> None:
        """Encode the class prompts once; keep the logit scale / bias as plain floats."""
        self.text = text_embeddings(self.model, tokenizer, names, self.device)
        self.scale = float(self.model.logit_scale.exp().reshape(-1)[0])
        bias = getattr(self.model, "logit_bias", None)
        self.bias = float(bias.reshape(-1)[0]) if bias is not None else 0.0


def _load_checkpoint(spec: TeacherSpec, model: torch.nn.Module, path: Path) -> str:
    """Read a local checkpoint, apply open_clip's format conversions, load strictly. Returns the nested key."""
    from open_clip.factory import convert_state_dict, convert_to_custom_text_state_dict, resize_pos_embed
    from open_clip.factory import resize_text_pos_embed

    state, key = checkpoints.read_state_dict(spec.id, path)
    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for name in ("logit_scale", "logit_bias"):
        param = getattr(model, name, None)
        if name in state and param is not None and param.ndim != state[name].ndim:
            state[name] = state[name].reshape(param.shape)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    checkpoints.load_strict(spec.id, path, model, state, spec.model, remap_hint=False)
    return key


def load(plan: TeacherPlan, device: str | torch.device) -> OpenClipTeacher:
    """Build the model, load its weights (strict), move it to ``device`` and encode the class prompts."""
    import open_clip

    spec, name, tag = plan.spec, plan.extra["open_clip_model"], plan.extra["pretrained_tag"]
    sha, key = None, ""
    if plan.weights.startswith("hub:"):
        with checkpoints.hub_guard(spec.id, f"{name} ({tag})"):
            model = build(spec, name, tag, pretrained=True)
        sha = _hub_sha256(name, tag)
    else:
        model = build(spec, name, tag)
        if plan.weights != "random":
            key = _load_checkpoint(spec, model, Path(plan.weights))
            sha = checkpoints.file_sha256(Path(plan.weights))
    teacher = OpenClipTeacher(plan, model, device, sha, key)
    if "logits" in teacher.wanted:
        with checkpoints.hub_guard(spec.id, f"the tokenizer of {name}"):
            tokenizer = open_clip.get_tokenizer(name, context_length=getattr(model, "context_length", None))
        teacher.prepare_text(plan.extra.get("prompt_names") or plan.class_names, tokenizer)
    return teacher


def _hub_sha256(name: str, tag: str) -> str | None:
    """sha256 of the cached hub file the weights came from, when it can be found."""
    import open_clip

    hub = open_clip.get_pretrained_cfg(name, tag).get("hf_hub", "")
    repo, filename = posixpath.split(hub)       # "org/name/" -> default file names, as open_clip does
    if not repo:
        return None
    names = (filename,) if filename else ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    found = checkpoints.hub_cached_file(repo, names)
    return checkpoints.file_sha256(found) if found else None
