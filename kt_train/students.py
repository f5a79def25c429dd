"""Students: a timm network with a classifier over the target classes, optionally a KPU sentinel + adapter.

Two kinds, one interface (``Student.forward(x) -> StudentOutput``):

* **Plain** (``sentinel=None``): any timm model, random init (``pretrained=False``) or local weights; the whole
  network trains. ``features`` = ``forward_head(pre_logits=True)``; ``featmap`` = the ``forward_features`` map
  (CNNs; NHWC outputs are permuted) or the patch tokens without prefix tokens on the patch grid (ViTs).
* **Sentinel** (KPU knowledge preservation, docs/methods.md): a *frozen* timm ``VisionTransformer`` trunk
  (the sentinel, its weights from ``SentinelSpec.checkpoint``) plus a trainable ViT-Adapter
  (``kt_train.adapter``, Chen et al., ICLR 2023) and a new linear classifier. ``features`` = the trunk's pooled
  output after the injections (CLS after the final norm); ``featmap`` = the adapter pyramid level whose stride is
  closest to the patch size (``adapter_args["featmap_level"]``: 0..3 for strides 4/8/16/32; ``forward_pyramid``
  gives all four). The gates start at zero: at initialisation ``features`` equal the bare sentinel's exactly.

``save_student``: safetensors weights + a JSON sidecar (``<stem>.json``) that ``load_student`` rebuilds from.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from torch import Tensor, nn

from kt_cache.errors import KtError, UsageError, did_you_mean
from kt_train.adapter import ViTAdapter, closest_level
from kt_train.methods.base import StudentOutput

FORMAT = "ktc-student"
FORMAT_VERSION = 1
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass(frozen=True)
class SentinelSpec:
    """The frozen ViT trunk of a KPU student and the adapter built around it.

    Attributes:
        model: timm ``VisionTransformer`` name (e.g. ``vit_base_patch14_dinov2``).
        checkpoint: local ``.safetensors`` / ``.pth`` weights of the sentinel; ``None`` = random init (tests).
        model_args: extra ``timm.create_model`` kwargs of the trunk (``img_size``, ``depth``, ...).
        adapter_args: ``ViTAdapter`` kwargs (``conv_inplane``, ``num_interactions``, ``deform_ratio``,
            ``cffn_ratio``) plus ``featmap_level`` (0..3) choosing the pyramid level returned as ``featmap``.
    """

    model: str
    checkpoint: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    adapter_args: dict[str, Any] = field(default_factory=dict)


class Student(nn.Module):
    """A student network returning ``StudentOutput``; build it with ``build_student``.

    Attributes:
        name, num_classes, img_size, model_args, checkpoint, sentinel: as given to ``build_student``.
        model: the timm network (plain students); trunk, adapter, head: frozen ViT, ``ViTAdapter``,
            ``nn.Linear(D, C)`` (sentinel students).
    """

    def __init__(self, name: str, num_classes: int, net: nn.Module, data_config: dict[str, Any], *,
                 img_size: int | tuple[int, int] | None = None, model_args: dict[str, Any] | None = None,
                 checkpoint: str | None = None, sentinel: SentinelSpec | None = None,
                 adapter: ViTAdapter | None = None, featmap_level: int = 2) -> None:
        super().__init__()
        self.name, self.num_classes, self.img_size = name, num_classes, img_size
        self.model_args, self.checkpoint, self.sentinel = dict(model_args or {}), checkpoint, sentinel
        self._data_config = dict(data_config)
        if sentinel is None:
            self.model = net
        else:
            self.trunk = net.requires_grad_(False).eval()
            self.adapter = adapter
            self.head = nn.Linear(getattr(net, "head_hidden_size", net.num_features), num_classes)
            self.featmap_level = featmap_level
        self._feature_dim, self._featmap_dim = self._probe()

    @property
    def feature_dim(self) -> int:
        """``D`` of ``StudentOutput.features [B, D]``."""
        return self._feature_dim

    @property
    def featmap_dim(self) -> int | None:
        """Channels of ``StudentOutput.featmap [B, D_map, H', W']``; ``None`` when the model has no spatial map."""
        return self._featmap_dim

    @property
    def data_config(self) -> dict[str, Any]:
        """timm data config: ``input_size (3, H, W)``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ..."""
        return dict(self._data_config)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Adapter + classifier for a sentinel student; every parameter otherwise."""
        if self.sentinel is not None:
            return [*self.adapter.parameters(), *self.head.parameters()]
        return list(self.model.parameters())

    def train(self, mode: bool = True) -> Student:
        """Set train/eval mode; a sentinel trunk always stays in eval mode (no dropout, frozen statistics)."""
        super().train(mode)
        if self.sentinel is not None:
            self.trunk.eval()
        return self

    def forward(self, x: Tensor) -> StudentOutput:
        """Image batch ``[B, 3, H, W]`` -> logits ``[B, C]``, features ``[B, D]``, featmap ``[B, D_map, H', W']``."""
        if self.sentinel is not None:
            return self._forward_sentinel(x, (self.featmap_level,))[0]
        return self.forward_pyramid(x)[0]

    def forward_pyramid(self, x: Tensor) -> tuple[StudentOutput, list[Tensor]]:
        """``forward`` plus every spatial map: the adapter's four levels (strides 4/8/16/32), else ``[featmap]``."""
        if self.sentinel is not None:
            return self._forward_sentinel(x, (0, 1, 2, 3))
        feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats, pre_logits=True)
        fmap = spatial_map(self.model, feats, (x.shape[-2], x.shape[-1]))
        out = StudentOutput(logits=self.model.forward_head(feats), features=pooled, featmap=fmap)
        return out, [] if fmap is None else [fmap]

    def _forward_sentinel(self, x: Tensor, levels: tuple[int, ...]) -> tuple[StudentOutput, list[Tensor]]:
        """The trunk's ``forward_features`` with the adapter between its blocks; builds the pyramid ``levels``."""
        t = self.trunk
        tokens = t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(x))))             # [B, P + N, D]
        grid = tuple(t.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1])))
        tokens, maps = self.adapter(tokens, x, t.blocks, t.num_prefix_tokens, grid, levels)
        pooled = t.forward_head(t.norm(tokens), pre_logits=True)                      # [B, D]
        fmap = maps[levels.index(self.featmap_level)]
        return StudentOutput(logits=self.head(pooled), features=pooled, featmap=fmap), maps

    def _probe(self) -> tuple[int, int | None]:
        """Run one blank image (eval mode, no grad) to read ``D`` and ``D_map``."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                out = self(torch.zeros(1, *self._data_config["input_size"]))
        finally:
            self.train(was_training)
        return int(out.features.shape[-1]), None if out.featmap is None else int(out.featmap.shape[1])

    def spec(self) -> dict[str, Any]:
        """The JSON-able description ``load_student`` rebuilds the network from."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "name": self.name, "num_classes": self.num_classes,
                "img_size": self.img_size, "model_args": self.model_args, "checkpoint": self.checkpoint,
                "sentinel": None if self.sentinel is None else asdict(self.sentinel)}


def spatial_map(model: nn.Module, feats: Tensor, img_hw: tuple[int, int]) -> Tensor | None:
    """timm ``forward_features`` output -> channels-first map ``[B, D, H', W']`` (``None`` if not spatial).

    ``[B, D, H', W']`` is returned as is, ``[B, H', W', D]`` (``output_fmt == "NHWC"``, e.g. Swin) permuted,
    tokens ``[B, P + N, D]`` lose their ``P = num_prefix_tokens`` prefix and are laid out on the patch grid.
    """
    if feats.ndim == 4:
        return feats.permute(0, 3, 1, 2) if getattr(model, "output_fmt", "NCHW") == "NHWC" else feats
    if feats.ndim != 3:
        return None
    tokens = feats[:, getattr(model, "num_prefix_tokens", 0):]
    grid = _token_grid(model, img_hw, tokens.shape[1])
    return None if grid is None else tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def _token_grid(model: nn.Module, img_hw: tuple[int, int], n: int) -> tuple[int, int] | None:
    """The ``(gh, gw)`` patch grid holding ``n`` tokens, from the patch embedding or a square guess."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None and hasattr(embed, "dynamic_feat_size"):
        grid = tuple(embed.dynamic_feat_size(img_hw))
        if grid[0] * grid[1] == n:
            return grid
    side = int(round(n ** 0.5))
    return (side, side) if side * side == n else None


def build_student(name: str, num_classes: int, *, checkpoint: str | None = None, sentinel: SentinelSpec | None = None,
                  img_size: int | tuple[int, int] | None = None, model_args: dict | None = None) -> Student:
    """Build a student from a timm model name.

    Args:
        name: timm architecture name (``resnet10t``, ``vit_small_patch16_224``, ...). With a sentinel it must be
            ``sentinel.model``: the student *is* the sentinel trunk plus the adapter.
        num_classes: ``C``, size of the new classifier over the target classes.
        checkpoint: local weights (``.safetensors``, or ``.pth``/``.pt``/``.bin``/``.ckpt`` read with
            ``weights_only=True``); only the classifier may be missing or of another shape. Plain students only
            (a sentinel's weights come from ``sentinel.checkpoint``).
        sentinel: KPU knowledge preservation: frozen ViT trunk + trainable adapter + new classifier.
        img_size: input size for models that take one (ViTs); for CNNs it only sets ``data_config``.
        model_args: extra ``timm.create_model`` kwargs (plain students; a sentinel uses ``sentinel.model_args``).

    Raises:
        UsageError: unknown model name, bad arguments, or a checkpoint that does not fit.
    """
    _check_name(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UsageError(f"student {name}: num_classes must be a positive int, got {num_classes!r}. "
                         "Fix: pass the number of target classes.")
    if sentinel is not None:
        return _build_sentinel(name, num_classes, sentinel, img_size, checkpoint, model_args)
    model = _create(name, num_classes, model_args, img_size)
    if checkpoint is not None:
        load_weights(model, checkpoint, f"student {name}")
    return Student(name, num_classes, model, _data_config(model, img_size), img_size=img_size,
                   model_args=model_args, checkpoint=checkpoint)


def _build_sentinel(name: str, num_classes: int, spec: SentinelSpec, img_size: Any, checkpoint: str | None,
                    model_args: dict | None) -> Student:
    """Frozen ``VisionTransformer`` trunk (+ its weights) and a fresh adapter sized to it."""
    from timm.models.vision_transformer import VisionTransformer

    if name != spec.model or checkpoint is not None or model_args:
        raise UsageError(
            f"student {name}: with a sentinel the student is the sentinel trunk {spec.model!r} plus an adapter, so "
            "name must equal sentinel.model and checkpoint/model_args must be unset (got checkpoint="
            f"{checkpoint!r}, model_args={model_args!r}). Fix: pass name={spec.model!r} and give the trunk's weights "
            "and kwargs as SentinelSpec.checkpoint / SentinelSpec.model_args.")
    trunk = _create(spec.model, 0, spec.model_args, img_size)
    if not isinstance(trunk, VisionTransformer):
        raise UsageError(f"sentinel {spec.model}: is a {type(trunk).__name__}, but the KPU adapter needs a timm "
                         "VisionTransformer trunk. Fix: use a ViT sentinel (e.g. vit_base_patch14_dinov2), or "
                         "train without a sentinel (KPU-noPre).")
    if spec.checkpoint is not None:
        load_weights(trunk, spec.checkpoint, f"sentinel {spec.model}")
    adapter_args = dict(spec.adapter_args)
    level = adapter_args.pop("featmap_level", closest_level(trunk.patch_embed.patch_size[0]))
    _check_kwargs(ViTAdapter, adapter_args, f"sentinel {spec.model}: adapter_args")
    if level not in range(4):
        raise UsageError(f"sentinel {spec.model}: adapter_args featmap_level must be 0..3 (strides 4/8/16/32), "
                         f"got {level!r}. Fix: pick a level or leave it out (closest to the patch size).")
    adapter = ViTAdapter(trunk.embed_dim, len(trunk.blocks), trunk.blocks[0].attn.num_heads, **adapter_args)
    return Student(name, num_classes, trunk, _data_config(trunk, img_size), img_size=img_size, sentinel=spec,
                   adapter=adapter, featmap_level=level)


def _check_name(name: str) -> None:
    """UsageError with a did-you-mean for names timm does not know (hub names need the network: refused)."""
    if isinstance(name, str) and not name.startswith(("hf-hub:", "hf_hub:")) and timm.is_model(name):
        return
    raise UsageError(
        f'unknown student model "{name}".{did_you_mean(str(name), timm.list_models())} Fix: use a timm '
        'architecture name (list them with `timm.list_models("*vit*")`); weights come from a local checkpoint '
        "file, never from the hub.")


def _check_kwargs(fn: Any, kwargs: dict[str, Any], what: str) -> None:
    """UsageError naming unknown keyword arguments of ``fn``."""
    params = inspect.signature(fn).parameters.values()
    known = [p.name for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY]
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        raise UsageError(f"{what}: unknown keys {unknown}.{did_you_mean(unknown[0], known)} Fix: use {known}.")


def _create(name: str, num_classes: int, model_args: dict | None, img_size: Any) -> nn.Module:
    """``timm.create_model(pretrained=False)``; ``img_size`` is dropped for models that take none (CNNs)."""
    kwargs = dict(model_args or {})
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        takes_no_size = isinstance(err, TypeError) and "img_size" in str(err) and img_size is not None
        if takes_no_size and "img_size" not in (model_args or {}):
            return _create(name, num_classes, model_args, None)
        raise UsageError(f"{name}: timm.create_model rejected model_args {model_args!r} / img_size {img_size!r} "
                         f"({type(err).__name__}: {str(err)[:200]}). Fix: pass kwargs the timm model accepts."
                         ) from err


def _data_config(model: nn.Module, img_size: int | tuple[int, int] | None) -> dict[str, Any]:
    """timm's data config with ``input_size`` set to the size the network was built for."""
    config = resolve_model_data_config(model)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if size is not None:
        config["input_size"] = (3, int(size[0]), int(size[1]))
    return config


def load_weights(model: nn.Module, path: str | Path, who: str) -> list[str]:
    """Load a local checkpoint into a timm model; only its classifier may be missing or of another shape.

    Returns:
        The model's classifier keys that were left at their initialisation.

    Raises:
        UsageError: the file is missing or unreadable, or any non-classifier key is missing, unexpected or of
            another shape (the message names them and the fix).
    """
    state = _read_state(Path(path), who)
    target = model.state_dict()
    is_head = _classifier_test(model)
    fits = {k: v for k, v in state.items() if k in target and target[k].shape == v.shape}
    missing = [k for k in target if k not in state and not is_head(k) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target and not is_head(k)]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in target.items()
              if k in state and k not in fits and not is_head(k)]
    if missing or unexpected or shapes:
        found = (("missing", missing), ("unexpected", unexpected), ("mismatched", shapes))
        parts = "; ".join(f"{what} {items[:4]}" for what, items in found if items)
        raise UsageError(
            f"{who}: checkpoint {path} does not fit model {type(model).__name__}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(shapes)} mismatched keys outside the classifier; {parts}. "
            "Fix: use the model name and model_args (depth, widths, img_size) the checkpoint was trained with, "
            "or a checkpoint of this architecture.")
    model.load_state_dict(fits, strict=False)
    return [k for k in target if k not in fits]


def _classifier_test(model: nn.Module) -> Any:
    """Predicate: is a state-dict key part of the model's classifier (``pretrained_cfg['classifier']``)?"""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    prefixes = {names} if isinstance(names, str) else set(names)
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    prefixes |= {n for n, m in model.named_modules() if clf is not None and m is clf and n}
    return lambda key: any(key == p or key.startswith(p + ".") for p in prefixes)


def _read_state(path: Path, who: str) -> dict[str, Tensor]:
    """Flat tensor dict from a safetensors / ``weights_only`` torch file (``kt_cache``'s safe reader)."""
    from kt_cache.teachers.checkpoints import read_state_dict

    if not path.is_file() or path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise UsageError(f"{who}: checkpoint {path} is not an existing {'/'.join(CHECKPOINT_SUFFIXES)} file. "
                         "Fix: pass the path of a local weights file.")
    try:
        state = read_state_dict(who, path)[0]
    except KtError as err:
        raise UsageError(str(err).replace(f"teacher {who}", who, 1)) from err
    return unwrap_student_state(state)


def unwrap_student_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A plain student saved by ``save_student`` (a ``Student`` whose timm network is ``.model``: every key
    ``model.<key>``) -> the network's own keys, so a run's ``student.safetensors`` can start another run
    (``--student-checkpoint``, e.g. FG's pretrained student); any other state is returned as is."""
    if state and all(k.startswith("model.") for k in state):
        return {k[len("model."):]: v for k, v in state.items()}
    return state


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar of a saved student: ``student.safetensors`` -> ``student.json``."""
    return Path(path).with_suffix(".json")


def save_student(student: Student, path: str | Path) -> Path:
    """Write ``student``'s weights to ``path`` (``.safetensors``) and its build spec to ``sidecar_path(path)``."""
    from safetensors.torch import save_model

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UsageError(f"save_student: {path} must end in .safetensors (its sidecar is <stem>.json). "
                         f"Fix: e.g. {path.with_suffix('.safetensors')}.")
    try:
        text = json.dumps(student.spec(), indent=2)
    except TypeError as err:
        raise UsageError(f"save_student: model_args / sentinel spec are not JSON-serialisable ({err}). Fix: build "
                         "the student with plain JSON values (numbers, strings, lists, dicts).") from err
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(student, str(path), metadata={"format": FORMAT})
    sidecar_path(path).write_text(text + "\n")
    return path


def load_student(path: str | Path, device: str | torch.device = "cpu") -> Student:
    """Rebuild a student saved by ``save_student`` and load its weights exactly (strict).

    The network is rebuilt without reading the original checkpoints (the saved weights hold everything,
    the frozen trunk included), so the files can move.
    """
    from safetensors.torch import load_model

    path = Path(path)
    spec = _read_sidecar(path)
    sentinel, img_size = None if spec["sentinel"] is None else SentinelSpec(**spec["sentinel"]), spec["img_size"]
    student = build_student(spec["name"], spec["num_classes"], sentinel=sentinel and replace(sentinel, checkpoint=None),
                            img_size=tuple(img_size) if isinstance(img_size, list) else img_size,
                            model_args=spec["model_args"] or None)
    student.checkpoint, student.sentinel = spec["checkpoint"], sentinel      # provenance only: not read again
    try:
        load_model(student, str(path), strict=True)
    except (RuntimeError, OSError) as err:
        raise UsageError(f"load_student: {path} does not match its sidecar {sidecar_path(path)} ({str(err)[:300]}). "
                         "Fix: keep the .safetensors and .json written together by save_student.") from err
    return student.to(device)


def _read_sidecar(path: Path) -> dict[str, Any]:
    """The sidecar JSON, checked for format and version."""
    side = sidecar_path(path)
    fix = "Fix: pass a .safetensors file written by save_student (of this version) with its .json beside it."
    if not path.is_file() or not side.is_file():
        raise UsageError(f"load_student: need both {path} and {side}. {fix}")
    try:
        spec = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"load_student: {side} is not valid JSON ({err}). {fix}") from err
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or spec.get("version") != FORMAT_VERSION:
        raise UsageError(f"load_student: {side} is not a {FORMAT} v{FORMAT_VERSION} sidecar. {fix}")
    return spec
