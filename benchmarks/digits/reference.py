"""An uncached reference: the plain distillation loop that ``ktc extract`` + ``ktc train`` must match.

Teachers are loaded in memory and run online on the student's own pixels; nothing is read from a store. The
student, the method (loss code), the optimizer and the schedule are ktc's own objects, built the way
``ktc train`` builds them (``kt_train.students.build_student``, ``kt_train.methods.build_method``, AdamW +
timm's ``CosineLRScheduler`` with the same arguments as ``kt_train.loop.make_optimizer``, gradient clipping),
so any difference from a ``ktc`` run comes from what caching changes: the stored views, fp16 outputs, the
store's z-scoring statistics, the block-shuffled order, the read path.

Pixels per sample and epoch:

- ``full``: the whole 32x32 image, every epoch (the teachers' outputs on it are then the same every epoch, so
  they are computed once per image, in fp32, by the same forward; this is still "online", just not repeated);
- ``rrc``: a fresh random-resized crop every epoch (``scale``/``ratio`` of the store's views), teachers run on
  each batch.

Feature statistics for ``zscore`` are the per-dimension mean/std over one pass of the training pixels (the
store computes the same over its stored views).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from digits.data import CLASSES, Split
from digits.teachers import ZooTeacher, center_views, normalize, random_views


@dataclass(frozen=True)
class RefSettings:
    """The recipe of one reference run (the ``ktc train`` flags of the same name)."""

    method: str
    seed: int = 0
    epochs: int = 6
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    grad_clip: float = 1.0
    use_labels: bool = True
    pixels: str = "full"                          # full | rrc
    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333)
    student: str = "resnet10t"
    options: tuple[tuple[str, Any], ...] = ()


class OnlineTeachers:
    """The zoo's teachers as live networks: ``batch(pixels, labels)`` -> a ``TeacherBatch`` in fp32."""

    def __init__(self, folder: Path, specs: list[ZooTeacher]) -> None:
        from safetensors.torch import load_file

        self.specs, self.models = specs, {}
        for spec in specs:
            model = timm.create_model(spec.arch, num_classes=len(spec.classes), **dict(spec.model_args))
            model.load_state_dict(load_file(str(folder / f"{spec.name}.safetensors")))
            self.models[spec.name] = model.eval().requires_grad_(False)
        self.label_maps = {s.name: torch.tensor([CLASSES.index(c) for c in s.classes]) for s in specs
                           if s.role == "predictive"}
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.inference_mode()
    def outputs(self, pixels: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """uint8 ``[B, 3, H, W]`` -> id -> (features ``[B, d_t]``, logits ``[B, C_t]``), fp32."""
        x, out = normalize(pixels), {}
        for tid, model in self.models.items():
            feats = model.forward_features(x)
            out[tid] = (model.forward_head(feats, pre_logits=True).float(), model.forward_head(feats).float())
        return out

    def fit_stats(self, pixels: torch.Tensor, batch: int = 256) -> None:
        """Per-dimension mean / population std of each teacher's features over ``pixels``."""
        chunks = [self.outputs(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]
        for tid in self.models:
            feats = torch.cat([c[tid][0] for c in chunks])
            self.stats[tid] = (feats.mean(0), feats.std(0, unbiased=False))

    def infos(self) -> tuple[Any, ...]:
        from kt_train.methods import TeacherInfo

        return tuple(TeacherInfo(s.name, s.role, feature_dim=int(self.stats[s.name][0].numel()),
                                 has_logits=s.role == "predictive", feature_mean=self.stats[s.name][0],
                                 feature_std=self.stats[s.name][1]) for s in self.specs)

    def teacher_batch(self, outputs: dict[str, tuple[torch.Tensor, torch.Tensor]], labels: torch.Tensor | None) -> Any:
        """Outputs of one batch -> ``TeacherBatch`` (logits scattered into the 10 digits, -inf elsewhere)."""
        from kt_train.methods import TeacherBatch
        from kt_train.methods.base import scatter_full_logits

        B = next(iter(outputs.values()))[0].shape[0]
        logits, covered = {}, {}
        for tid, label_map in self.label_maps.items():
            logits[tid], covered[tid] = scatter_full_logits(outputs[tid][1], label_map, len(CLASSES))
        return TeacherBatch(ids=tuple(s.name for s in self.specs), roles={s.name: s.role for s in self.specs},
                            valid={tid: torch.ones(B, dtype=torch.bool) for tid in outputs},
                            features={tid: o[0] for tid, o in outputs.items()}, logits=logits, covered=covered,
                            labels=labels)


def epoch_pixels(split: Split, order: torch.Tensor, settings: RefSettings, rng: np.random.Generator) -> torch.Tensor:
    """The student's (= the teachers') uint8 pixels of ``order`` for one batch."""
    images = split.images[order]
    return images if settings.pixels == "full" else random_views(images, rng, settings.scale, settings.ratio)


def build(settings: RefSettings, teachers: OnlineTeachers | None) -> tuple[Any, Any, Any]:
    """Student, method and the ``Trainable`` that joins them, seeded as ``ktc train`` seeds them."""
    from kt_train.distributed import Trainable
    from kt_train.methods import MethodDims, build_method
    from kt_train.students import build_student

    torch.manual_seed(settings.seed)
    student = build_student(settings.student, len(CLASSES), img_size=32)
    infos = teachers.infos() if teachers is not None else ()
    method = build_method(settings.method, dict(settings.options), MethodDims(student.feature_dim, len(CLASSES), infos))
    return student, method, Trainable([student], method)


def optimizer_for(model: Any, settings: RefSettings, steps: int, steps_per_epoch: int) -> tuple[Any, Any]:
    """AdamW + cosine with warm-up, exactly ``kt_train.loop.make_optimizer``'s arguments."""
    from timm.scheduler import CosineLRScheduler

    from kt_train.loop import fusable

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay,
                                  **({"fused": True} if fusable(params) else {}))
    scheduler = CosineLRScheduler(optimizer, t_initial=max(2, steps), warmup_t=int(settings.warmup_epochs * steps_per_epoch),
                                  warmup_lr_init=settings.lr * 0.01, lr_min=settings.lr * 0.01, t_in_epochs=False)
    return optimizer, scheduler


def train_reference(settings: RefSettings, train: Split, teachers: OnlineTeachers | None) -> tuple[Any, list[dict]]:
    """Train one student; returns it and the per-step loss parts (every 10th step)."""
    student, method, model = build(settings, teachers)
    cache = teachers.outputs(train.images) if teachers is not None and settings.pixels == "full" else None
    per_epoch = len(train.labels) // settings.batch_size
    optimizer, scheduler = optimizer_for(model, settings, per_epoch * settings.epochs, per_epoch)
    rng, gen, log, step = np.random.default_rng(settings.seed), torch.Generator().manual_seed(settings.seed), [], 0
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(train.labels), generator=gen)
        for b in range(per_epoch):
            rows = order[b * settings.batch_size:(b + 1) * settings.batch_size]
            images, tb = batch_inputs(train, rows, settings, rng, teachers, cache)
            parts = train_step(model, optimizer, settings, student_input(images, student.data_config), tb)
            scheduler.step_update(step := step + 1)
            if step % 10 == 0:
                log.append({"step": step, **parts})
    return student.eval(), log


def batch_inputs(train: Split, rows: torch.Tensor, settings: RefSettings, rng: np.random.Generator,
                 teachers: OnlineTeachers | None, cache: dict | None) -> tuple[torch.Tensor, Any]:
    """uint8 pixels ``[B, 3, 32, 32]`` and the batch's ``TeacherBatch`` (an empty one for ce)."""
    from kt_train.methods import TeacherBatch

    pixels = epoch_pixels(train, rows, settings, rng)
    labels = train.labels[rows] if settings.use_labels else None
    if teachers is None:
        tb = TeacherBatch(ids=(), roles={}, valid={}, labels=labels)
    else:
        outputs = {t: (f[rows], z[rows]) for t, (f, z) in cache.items()} if cache is not None else teachers.outputs(pixels)
        tb = teachers.teacher_batch(outputs, labels)
    return pixels, tb


def student_input(pixels: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """uint8 pixels -> float, in the student's own normalisation (timm's data config, as ``ktc train``)."""
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(config["std"]).view(1, 3, 1, 1) * 255
    return (pixels.float() - mean) / std


def train_step(model: Any, optimizer: Any, settings: RefSettings, images: torch.Tensor, tb: Any) -> dict[str, float]:
    parts = model(images, tb, False)
    optimizer.zero_grad(set_to_none=True)
    parts["loss"].backward()
    if settings.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], settings.grad_clip)
    optimizer.step()
    return {k: float(v.detach()) for k, v in parts.items()}


@torch.inference_mode()
def val_top1(student: Any, val: Split, center: float) -> float:
    """Top-1 on the centre view (``center`` fraction of the side, as ``ktc eval`` cuts it)."""
    pixels = center_views(val.images, center=center)
    chunks = [student(student_input(pixels[i:i + 256], student.data_config)).logits for i in range(0, len(pixels), 256)]
    return float((torch.cat(chunks).argmax(1) == val.labels).float().mean())
