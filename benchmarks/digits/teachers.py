"""The teacher zoo: small timm CNNs trained here, on CPU, with plain cross-entropy, saved as safetensors.

Every teacher is ``resnet10t`` built with ``output_stride=16`` so that a 32x32 input leaves a 2x2 map
(the default stride 32 leaves 1x1, which makes a stored ``featmap`` meaningless). Training crops are drawn
exactly like the store's views (``kt_cache.views.rrc_box`` with the manifest's scale/ratio, no flip);
validation uses view 0, the centre crop that ``ktc eval`` uses.
"""

from __future__ import annotations

import dataclasses
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from digits.data import CLASSES, IMAGE_SIZE, Split

ARCH = "resnet10t"
MODEL_ARGS = {"output_stride": 16}
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
VIEW_SCALE = (0.5, 1.0)
VIEW_RATIO = (0.75, 1.3333)
CENTER_CROP = 0.875
LOOPS = (1, 0, 0, 0, 1, 0, 1, 0, 2, 1)   # closed loops of the digits 0..9 as usually written


@dataclass(frozen=True)
class ZooTeacher:
    """One teacher of the zoo and how it is trained.

    Attributes:
        name: teacher id in the manifest and the store.
        classes: names of its logits (target classes for ``task="digit"``; task names for ``"parity"``).
        role: ``predictive`` (its logits are stored) or ``descriptive`` (features only).
        epochs: training epochs over its own training subset.
        train_frac: fraction of its eligible training images it sees (a weaker teacher sees fewer).
        task: ``digit`` (predict its digit classes), ``parity`` (even / odd, a related task), ``loops``
            (closed loops in the digit: 0, 1 or 2) or ``rotation`` (which of 0/90/180/270 degrees the image was
            turned by: a self-supervised task unrelated to the digit).
        batch: training batch size.
        arch: timm model name; model_args: extra ``timm.create_model`` keyword arguments as ``(key, value)``
            pairs (a tuple keeps the dataclass frozen and hashable).
        noise: fraction of its training labels replaced by a different class of its own, drawn at random once.
    """

    name: str
    classes: tuple[str, ...]
    role: str
    epochs: int
    train_frac: float = 1.0
    task: str = "digit"
    batch: int = 64
    arch: str = ARCH
    model_args: tuple[tuple[str, object], ...] = tuple(MODEL_ARGS.items())
    noise: float = 0.0

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Digit labels -> this teacher's class index, -1 for images outside its classes (rotation: all 0,
        the rotation index is drawn per batch while training)."""
        if self.task == "parity":
            return labels % 2
        if self.task == "loops":
            return torch.tensor(LOOPS)[labels]
        if self.task == "rotation":
            return torch.zeros_like(labels)
        lookup = torch.full((len(CLASSES),), -1, dtype=torch.int64)
        for index, name in enumerate(self.classes):
            lookup[CLASSES.index(name)] = index
        return lookup[labels]


ZOO = (
    ZooTeacher("digits_lo", CLASSES[:5], "predictive", epochs=6),
    ZooTeacher("digits_hi", CLASSES[5:], "predictive", epochs=6),
    ZooTeacher("digits_all", CLASSES, "predictive", epochs=10, train_frac=0.2),     # weaker: 1/5 of the images
    ZooTeacher("digits_parity", ("even", "odd"), "descriptive", epochs=3, task="parity"),
)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float, normalised with the teachers' mean/std."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def random_views(images: torch.Tensor, rng: np.random.Generator, scale: tuple[float, float] = VIEW_SCALE,
                 ratio: tuple[float, float] = VIEW_RATIO) -> torch.Tensor:
    """A random-resized crop of each image, drawn like the store's views 1.. (no flip)."""
    from kt_cache.views import rrc_box

    size = [IMAGE_SIZE, IMAGE_SIZE]
    crops = []
    for image in images:
        top, left, h, w = rrc_box(rng, image.shape[-2], image.shape[-1], scale, ratio)
        crops.append(TF.resized_crop(image, top, left, h, w, size, antialias=True))
    return torch.stack(crops)


def center_views(images: torch.Tensor, size: int = IMAGE_SIZE, interpolation: str = "bilinear",
                 center: float = CENTER_CROP) -> torch.Tensor:
    """View 0 of each image (the centre crop ``ktc eval`` and the store's view 0 use), resized to ``size``."""
    from kt_cache.manifest_types import ViewsSpec
    from kt_cache.views import sample_views, view_pixels

    box = sample_views(ViewsSpec(count=1, center_crop=center), 0, tuple(images.shape[-2:]))[0]
    return torch.stack([view_pixels(img, box[:4], False, (size, size), interpolation) for img in images])


def teacher_subset(spec: ZooTeacher, split: Split, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's training images and targets: its own classes, then a seeded ``train_frac`` sample."""
    targets = spec.targets(split.labels)
    keep = torch.nonzero(targets >= 0).flatten().numpy()
    keep = np.sort(rng.permutation(keep)[: max(1, int(round(spec.train_frac * keep.size)))])
    targets = targets[keep].clone()
    if spec.noise > 0 and len(spec.classes) > 1:
        flip = torch.from_numpy(rng.random(len(keep)) < spec.noise)
        shift = torch.from_numpy(rng.integers(1, len(spec.classes), len(keep)))
        targets[flip] = (targets[flip] + shift[flip]) % len(spec.classes)   # always a different class
    return split.images[keep], targets


def teacher_rng(spec: ZooTeacher, seed: int) -> np.random.Generator:
    """The teacher's own generator (subset, order, crops), keyed by the seed and its name."""
    return np.random.default_rng([seed, zlib.crc32(spec.name.encode())])


def train_teacher(spec: ZooTeacher, images: torch.Tensor, targets: torch.Tensor, seed: int, lr: float = 2e-3,
                  batch: int = 64) -> torch.nn.Module:
    """Plain cross-entropy with AdamW and a cosine schedule on the teacher's training subset."""
    torch.manual_seed(seed)
    rng = teacher_rng(spec, seed)
    model = timm.create_model(spec.arch, num_classes=len(spec.classes), **dict(spec.model_args))
    steps = spec.epochs * -(-len(targets) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    for _ in range(spec.epochs):
        order = rng.permutation(len(targets))
        for start in range(0, len(order), batch):
            idx = torch.from_numpy(order[start:start + batch])
            pixels, y = random_views(images[idx], rng), targets[idx]
            if spec.task == "rotation":
                y = torch.from_numpy(rng.integers(0, 4, len(idx)))
                pixels = torch.stack([torch.rot90(p, int(k), (1, 2)) for p, k in zip(pixels, y)])
            loss = F.cross_entropy(model(normalize(pixels)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.inference_mode()
def teacher_accuracy(model: torch.nn.Module, spec: ZooTeacher, val: Split) -> tuple[float, int]:
    """Accuracy on the validation images of the teacher's own task (centre view); and their count.
    Rotation teachers are scored on the val images turned by 0/90/180/270 degrees in turn."""
    targets = spec.targets(val.labels)
    keep = targets >= 0
    pixels, targets = center_views(val.images[keep]), targets[keep]
    if spec.task == "rotation":
        targets = torch.arange(len(targets)) % 4
        pixels = torch.stack([torch.rot90(p, int(k), (1, 2)) for p, k in zip(pixels, targets)])
    logits = model(normalize(pixels))
    return float((logits.argmax(1) == targets).float().mean()), len(targets)


def build_zoo(folder: Path, train: Split, val: Split, seed: int = 0,
              specs: tuple[ZooTeacher, ...] = ZOO) -> list[dict]:
    """Train (or reuse, when ``zoo.json`` records the same recipe) every teacher; returns one record each.

    ``zoo.json`` is rewritten after each trained teacher and keeps other teachers' records, so an interrupted
    build resumes and several zoos can share one folder."""
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / "zoo.json"
    cached = {r["name"]: r for r in json.loads(index.read_text())} if index.is_file() else {}
    records = []
    for spec in specs:
        recipe = {**dataclasses.asdict(spec), "classes": list(spec.classes), "seed": seed,
                  "model_args": dict(spec.model_args), "n_train": len(train.labels)}
        old = cached.get(spec.name)
        if old and old["recipe"] == recipe and (folder / old["file"]).is_file():
            records.append(old)
            continue
        records.append(train_and_save(spec, folder, train, val, seed) | {"recipe": recipe})
        cached[spec.name] = records[-1]
        index.write_text(json.dumps(list(cached.values()), indent=1))
        print(f"  teacher {spec.name}: val acc {records[-1]['val_acc']:.4f} ({records[-1]['seconds']:.1f} s)")
    return records


def train_and_save(spec: ZooTeacher, folder: Path, train: Split, val: Split, seed: int) -> dict:
    from safetensors.torch import save_file

    images, targets = teacher_subset(spec, train, teacher_rng(spec, seed + 1))
    start, cpu = time.perf_counter(), time.process_time()
    model = train_teacher(spec, images, targets, seed, batch=spec.batch)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    accuracy, n_val = teacher_accuracy(model, spec, val)
    file = f"{spec.name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / file))
    return {"name": spec.name, "file": file, "classes": list(spec.classes), "role": spec.role, "task": spec.task,
            "epochs": spec.epochs, "n_train": len(targets), "n_val": n_val, "val_acc": accuracy, "seconds": seconds,
            "cpu_s": cpu}
