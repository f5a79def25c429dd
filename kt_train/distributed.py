"""Data-parallel training under ``torchrun`` (DDP; gloo on CPU, nccl on GPU).

Every rank opens the same store and reads its own strided share of each epoch's samples; the students
and the method's heads are one ``Trainable`` module wrapped in ``DistributedDataParallel``. Only rank 0
writes metrics, checkpoints, plots and the final evaluation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun describes in the environment; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    cuda = device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


class Trainable(nn.Module):
    """Students + method heads as one module, so DDP synchronises every trained parameter."""

    def __init__(self, students: list[nn.Module], method: nn.Module):
        super().__init__()
        self.students = nn.ModuleList(students)
        self.method = method

    def forward(self, images: torch.Tensor, teachers: Any, autocast: bool) -> dict[str, torch.Tensor]:
        from kt_train.methods import StudentOutput

        with torch.autocast(images.device.type, enabled=autocast):
            raw = [s(images) for s in self.students]
        outputs = [StudentOutput(o.logits.float(), None if o.features is None else o.features.float(),
                                 None if o.featmap is None else o.featmap.float()) for o in raw]
        return self.method(outputs if len(outputs) > 1 else outputs[0], teachers)


def wrap(trainable: Trainable, info: DistInfo, device: torch.device) -> nn.Module:
    if info.world <= 1:
        return trainable
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(trainable, device_ids=ids, find_unused_parameters=True)


def mean_over_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average logged scalars over ranks (every rank must call this at the same steps)."""
    if info.world <= 1:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    return {k: float(v) / info.world for k, v in zip(keys, tensor.tolist())}


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
