"""Run folder I/O: students and method heads as safetensors, optimizer state for ``--resume``, run info.

Layout of ``--out DIR``: ``student.safetensors`` + ``student.json`` (or ``student0…`` for several),
``method.safetensors``, ``optimizer.safetensors`` + ``optimizer.json`` (optimizer tensors; param groups,
scheduler and grad-scaler state as JSON: no pickle; runs of older versions wrote ``optimizer.pt``, which
still loads with ``weights_only=True``),
``state.json`` (last finished epoch and step, and the sha256 of every checkpoint file it belongs to),
``run.json`` (what ``ktc eval`` needs), ``config.yaml``.

A checkpoint is committed like a journal, so a kill at any moment leaves either the previous checkpoint
or the new one, never a mix: every file is first written into ``.checkpoint-next/``, then that folder's
``state.json`` (written last, atomically) marks it complete; only then are the files renamed into place,
``state.json`` last. ``--resume`` first finishes an interrupted commit (a complete staging folder is
rolled forward, an incomplete one discarded), then checks every file against the hashes in ``state.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from kt_cache.errors import UsageError

STATE = "state.json"
STAGING = ".checkpoint-next"
rename = os.replace   # one name for every rename of a commit (tests kill the commit at each one)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    rename(tmp, path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(out: Path, run: Any, optimizer: Any, scheduler: Any, scaler: Any, epoch: int, step: int) -> None:
    """Everything needed to evaluate the students and to resume after ``epoch``, committed atomically."""
    recover_checkpoint(out)
    stage = out / STAGING
    stage.mkdir(parents=True)
    write_files(stage, run, optimizer, scheduler, scaler)
    files = {p.name: file_sha256(p) for p in sorted(stage.iterdir())}
    atomic_write_text(stage / STATE, json.dumps({"epoch": epoch, "step": step, "files": files}))
    commit_staging(out)


def write_files(stage: Path, run: Any, optimizer: Any, scheduler: Any, scaler: Any) -> None:
    from safetensors.torch import save_file

    from kt_train.students import save_student

    for student, name in zip(run.students, run.info["students"]):
        save_student(student, stage / name)
    heads = {k: v.detach().contiguous().cpu() for k, v in run.method.state_dict().items()}
    save_file(heads, str(stage / "method.safetensors"), metadata={"method": run.config.method})
    save_training_state(stage, optimizer.state_dict(), scheduler.state_dict(), scaler.state_dict())
    (stage / "run.json").write_text(json.dumps(run.info, indent=1))


def save_training_state(stage: Path, optimizer: dict[str, Any], scheduler: dict[str, Any], scaler: dict[str, Any]) -> None:
    """Optimizer tensors (``state.<param>.<name>``) to safetensors; everything else, plain numbers, to JSON."""
    from safetensors.torch import save_file

    tensors, plain = {}, {}
    for param, entries in optimizer["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{param}.{name}"] = value.detach().contiguous().cpu()
            else:
                plain.setdefault(str(param), {})[name] = value
    save_file(tensors, str(stage / "optimizer.safetensors"))
    doc = {"param_groups": optimizer["param_groups"], "state": plain, "scheduler": scheduler, "scaler": scaler}
    (stage / "optimizer.json").write_text(json.dumps(doc))


def load_training_state(out: Path) -> dict[str, Any]:
    """{"optimizer", "scheduler", "scaler"} state dicts, from safetensors + JSON (or an older run's optimizer.pt)."""
    from safetensors.torch import load_file

    if not (out / "optimizer.safetensors").is_file():
        return torch.load(out / "optimizer.pt", map_location="cpu", weights_only=True)
    doc = json.loads((out / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {int(param): dict(entries) for param, entries in doc["state"].items()}
    for key, tensor in load_file(str(out / "optimizer.safetensors")).items():
        _, param, name = key.split(".", 2)
        state.setdefault(int(param), {})[name] = tensor
    optimizer = {"state": dict(sorted(state.items())), "param_groups": doc["param_groups"]}
    return {"optimizer": optimizer, "scheduler": doc["scheduler"], "scaler": doc["scaler"]}


def commit_staging(out: Path) -> None:
    """Move a complete staging folder's files into ``out`` (``state.json`` last) and remove the folder.
    Files already moved by an interrupted earlier call are absent from the folder and are skipped."""
    stage = out / STAGING
    for name in json.loads((stage / STATE).read_text())["files"]:
        if (stage / name).exists():
            rename(stage / name, out / name)
    rename(stage / STATE, out / STATE)
    shutil.rmtree(stage)


def recover_checkpoint(out: Path) -> None:
    """Finish or discard a commit that a kill interrupted: a staging folder with its ``state.json`` is
    complete (roll forward); one without it was still being written (the previous checkpoint is intact)."""
    stage = out / STAGING
    if (stage / STATE).is_file():
        commit_staging(out)
    elif stage.exists():
        shutil.rmtree(stage)


def check_checkpoint_files(out: Path, state: dict[str, Any]) -> None:
    """Every file ``state.json`` lists must be there with its recorded sha256 (older runs list none)."""
    for name, want in state.get("files", {}).items():
        path = out / name
        got = file_sha256(path) if path.is_file() else "missing"
        if got != want:
            raise UsageError(f"--resume: {path} does not belong to the checkpoint in {out / STATE} (epoch "
                             f"{state.get('epoch')}): sha256 expected {want[:16]}…, got {got[:16]}…. It was changed "
                             "or replaced after that checkpoint was written, so resuming would mix weights. Fix: "
                             "restore the file from the same run, or drop --resume to start a new run.")


def load_checkpoint(out: Path, run: Any, optimizer: Any, scheduler: Any, scaler: Any) -> tuple[int, int]:
    """Restore a run folder written by ``save_checkpoint``; returns (next epoch, step)."""
    from safetensors.torch import load_file, load_model

    recover_checkpoint(out)
    if not (out / STATE).is_file():
        raise UsageError(f"--resume: {out} holds no finished epoch ({STATE} missing). "
                         "Fix: drop --resume to start a new run, or point --out at the folder of the run to continue.")
    state = json.loads((out / STATE).read_text())
    check_checkpoint_files(out, state)
    for student, name in zip(run.students, run.info["students"]):
        load_model(student, str(out / name), strict=True)
    heads = load_file(str(out / "method.safetensors"))
    layout = run.method.legacy_params()
    run.method.load_state_dict(heads)          # per-teacher heads of older runs are stacked by a pre-hook
    saved = load_training_state(out)
    if layout and any(p.old in heads for p in layout):
        saved["optimizer"] = legacy_optimizer_state(saved["optimizer"], run.method, layout)
    optimizer.load_state_dict(with_current_kernel(saved["optimizer"], optimizer))
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    return int(state["epoch"]) + 1, int(state["step"])


def legacy_optimizer_state(state: dict[str, Any], method: Any, layout: list[Any]) -> dict[str, Any]:
    """AdamW state of a run saved with per-teacher heads, mapped onto the grouped heads.

    The optimizer's parameters are the students' then the method's (``kt_train.loop.make_optimizer``); the old
    method parameters are ``layout``'s non-buffer entries in order (``Method.legacy_params``). Each moment of a
    grouped parameter ``[T, ...]`` is its members' moments stacked (``heads.upgrade_state``, transposed like
    the weights); ``step`` is shared by all members (one optimizer step each), so the first member's is kept.
    """
    from kt_train.methods.heads import upgrade_state

    old = [p for p in layout if not p.buffer]
    new = [name for name, p in method.named_parameters() if p.requires_grad]
    group, = state["param_groups"]
    students = len(group["params"]) - len(old)
    entries = {p.old: state["state"].get(students + j, {}) for j, p in enumerate(old)}
    names = {k for e in entries.values() for k in e}
    moments = {k: upgrade_state({n: e[k] for n, e in entries.items() if k in e}, old) for k in names if k != "step"}
    first = {p.new: entries[p.old] for p in old if p.member == 0}
    mapped = {i: v for i, v in state["state"].items() if i < students}
    for i, name in enumerate(new):
        if first.get(name) and all(name in m for m in moments.values()):
            mapped[students + i] = {"step": first[name]["step"], **{k: m[name] for k, m in moments.items()}}
    return {"state": mapped, "param_groups": [dict(group, params=list(range(students + len(new))))]}


def with_current_kernel(state: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """``state`` with the running optimizer's fused/foreach choice: torch's load_state_dict would take the
    checkpoint's, so a run saved before AdamW was fused (or on another device) would resume unfused, or
    fused where the kernel is missing. The choice also places ``step`` (on the parameter's device if fused)."""
    for group, current in zip(state["param_groups"], optimizer.param_groups):
        group.update({k: current[k] for k in ("fused", "foreach") if k in current})
    return state
