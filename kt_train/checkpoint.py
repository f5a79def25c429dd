"""Run folder I/O: students and method heads as safetensors, optimizer state for ``--resume``, run info.

Layout of ``--out DIR``: ``student.safetensors`` + ``student.json`` (or ``student0…`` for several),
``method.safetensors``, ``optimizer.pt`` (tensors and numbers only: loads with ``weights_only=True``),
``state.json`` (last finished epoch and step), ``run.json`` (what ``ktc eval`` needs), ``config.yaml``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from kt_cache.errors import UsageError

STATE = "state.json"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(out: Path, run: Any, optimizer: Any, scheduler: Any, scaler: Any, epoch: int, step: int) -> None:
    """Everything needed to evaluate the students and to resume after ``epoch``."""
    from safetensors.torch import save_file

    from kt_train.students import save_student

    for student, name in zip(run.students, run.info["students"]):
        save_student(student, out / name)
    heads = {k: v.detach().contiguous().cpu() for k, v in run.method.state_dict().items()}
    save_file(heads, str(out / "method.safetensors"), metadata={"method": run.config.method})
    tmp = out / "optimizer.pt.partial"
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict()}, tmp)
    os.replace(tmp, out / "optimizer.pt")
    atomic_write_text(out / "run.json", json.dumps(run.info, indent=1))
    atomic_write_text(out / STATE, json.dumps({"epoch": epoch, "step": step}))


def load_checkpoint(out: Path, run: Any, optimizer: Any, scheduler: Any, scaler: Any) -> tuple[int, int]:
    """Restore a run folder written by ``save_checkpoint``; returns (next epoch, step)."""
    from safetensors.torch import load_file, load_model

    if not (out / STATE).is_file():
        raise UsageError(f"--resume: {out} holds no finished epoch ({STATE} missing). "
                         "Fix: drop --resume to start a new run, or point --out at the folder of the run to continue.")
    for student, name in zip(run.students, run.info["students"]):
        load_model(student, str(out / name), strict=True)
    run.method.load_state_dict(load_file(str(out / "method.safetensors")))
    saved = torch.load(out / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(with_current_kernel(saved["optimizer"], optimizer))
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    state = json.loads((out / STATE).read_text())
    return int(state["epoch"]) + 1, int(state["step"])


def with_current_kernel(state: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """``state`` with the running optimizer's fused/foreach choice: torch's load_state_dict would take the
    checkpoint's, so a run saved before AdamW was fused (or on another device) would resume unfused, or
    fused where the kernel is missing. The choice also places ``step`` (on the parameter's device if fused)."""
    for group, current in zip(state["param_groups"], optimizer.param_groups):
        group.update({k: current[k] for k in ("fused", "foreach") if k in current})
    return state
