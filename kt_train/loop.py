"""The training loop: AdamW + cosine schedule with warm-up, AMP on GPU, gradient clipping,
checkpoints every epoch, ``metrics.jsonl``, tqdm progress, plots and a final evaluation."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kt_cache.errors import KtError
from kt_train.checkpoint import load_checkpoint, save_checkpoint
from kt_train.config import TrainConfig, save_config
from kt_train.distributed import DistInfo, Trainable, barrier, init_distributed, mean_over_ranks, shutdown, wrap
from kt_train.metrics import MetricsLog, peak_rss_mib, write_plots
from kt_train.setup import Run, build_run, physical_memory_bytes


# Devices whose fused AdamW kernel this torch (2.14) has and this code is tested on; others keep the default.
FUSED_DEVICES = ("cpu", "cuda")


def fusable(params: list[torch.Tensor]) -> bool:
    """Whether AdamW(fused=True) takes every parameter. Worth it: torch's default on CPU is the per-tensor
    loop, 2-3x slower than the fused kernel over many method heads (docs/benchmarks.md)."""
    return bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)


ADAMW_STATE = 4     # float32 copies per trainable parameter: the value, its gradient, AdamW's two moments


def model_memory(run: Run) -> dict[str, int]:
    """Trainable parameters of the students and of the method (heads, adapters), and the bytes they take with
    their gradients and AdamW moments: the run's memory beside the teacher arrays, whatever the budget."""
    student = sum(p.numel() for s in run.students for p in s.parameters() if p.requires_grad)
    method = sum(p.numel() for p in run.method.parameters() if p.requires_grad)
    return {"student_params": student, "method_params": method,
            "model_state_bytes": ADAMW_STATE * 4 * (student + method)}


def describe_model_memory(model: dict[str, int], machine_bytes: int | None, method: str) -> str:
    """The ``memory: model ...`` line; a warning when the state needs more than half of the device's memory."""
    gib = float(1 << 30)
    line = (f"memory: model {model['student_params'] / 1e6:.1f} M (student) + {model['method_params'] / 1e6:.1f} M "
            f"({method}) trainable parameters, {model['model_state_bytes'] / gib:.2f} GiB with gradients and AdamW "
            "moments")
    if machine_bytes and model["model_state_bytes"] > machine_bytes / 2:
        line += (f". Warning: that is more than half of this device's {machine_bytes / gib:.1f} GiB, and the run may "
                 "be killed for memory. Fix: narrower method heads (uniform/avg: e.g. --opt hidden=64; docs/methods.md), "
                 "fewer teachers, or a device with more memory")
    return line


def check_model_fits(model: dict[str, int], machine_bytes: int | None, method: str) -> None:
    """Refuse a run whose parameters, gradients and AdamW moments alone exceed the device's memory: it would be
    killed at its first optimizer step, after minutes of loading, instead of told now."""
    if machine_bytes and model["model_state_bytes"] > machine_bytes:
        gib = float(1 << 30)
        raise KtError(f"ktc train --method {method}: the student and method hold "
                      f"{(model['student_params'] + model['method_params']) / 1e6:.1f} M trainable parameters, "
                      f"{model['model_state_bytes'] / gib:.1f} GiB with gradients and AdamW moments, more than this "
                      f"device's {machine_bytes / gib:.1f} GiB of memory. Fix: narrower method heads (uniform/avg: "
                      "--opt hidden=64; docs/methods.md), fewer teachers (--teachers), or a device with more memory.")


def device_memory_bytes(device: torch.device) -> int | None:
    """Memory one process's model state may take: its GPU's, or on the CPU the machine's RAM shared by the
    ranks torchrun started on it (``LOCAL_WORLD_SIZE``: each holds a copy of the model state)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        ram = physical_memory_bytes()
    except (AttributeError, ValueError, OSError):   # no sysconf (Windows): no check
        return None
    return ram // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def make_optimizer(run: Run, steps: int) -> tuple[Any, Any, Any]:
    from timm.scheduler import CosineLRScheduler

    params = [p for s in run.students for p in s.parameters() if p.requires_grad]
    params += [p for p in run.method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run.config.lr, weight_decay=run.config.weight_decay,
                                  **({"fused": True} if fusable(params) else {}))
    warmup = int(run.config.warmup_epochs * len(run.loader))
    # t_initial >= 2: timm warns that a 1-step cosine is constant; step 0's lr is the same either way
    scheduler = CosineLRScheduler(optimizer, t_initial=max(2, steps), warmup_t=warmup, warmup_lr_init=run.config.lr * 0.01,
                                  lr_min=run.config.lr * 0.01, t_in_epochs=False)
    scaler = torch.amp.GradScaler(enabled=run.device.type == "cuda" and run.config.amp)
    return optimizer, scheduler, scaler


def train_step(run: Run, model: Any, batch: dict[str, torch.Tensor], optimizer: Any, scaler: Any) -> dict[str, float]:
    """One optimizer step of ``model`` (the ``Trainable``, DDP-wrapped under torchrun); every loss part as floats."""
    images = batch["image"].to(run.device, non_blocking=True)
    teachers = run.cached.for_batch(batch, run.device)
    if not run.use_labels:
        teachers.audit_labels, teachers.labels = teachers.labels, None
    if run.initial is not None:
        with torch.no_grad():
            teachers.reference_logits = run.initial(images).logits.float()
    parts = model(images, teachers, run.device.type == "cuda" and run.config.amp)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(parts["loss"]).backward()
    if run.config.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], run.config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return {k: float(v.detach()) for k, v in parts.items()}


def log_interval(log_every: int, total: int) -> int:
    """Steps between logged records: ``log_every``, or more often in a short run so its curves keep ~100 points."""
    return max(1, min(log_every, total // 100))


def train_epoch(run: Run, model: Any, epoch: int, step: int, total: int, opt: tuple, log: MetricsLog,
                info: DistInfo, show: bool) -> int:
    from tqdm import tqdm

    optimizer, scheduler, scaler = opt
    model.train()
    run.loader.set_epoch(epoch)
    run.cached.plan_epoch(run.loader.sampler.windows(), run.loader.block_views())   # read the next window ahead
    tick, seen = time.perf_counter(), 0
    bar = tqdm(run.loader, desc=f"epoch {epoch + 1}/{run.config.epochs}", unit="batch",
               disable=not (show and info.is_main) or os.environ.get("KTC_NO_PROGRESS") == "1", leave=False)
    for batch in bar:
        parts = train_step(run, model, batch, optimizer, scaler)
        step += 1
        seen += int(batch["image"].shape[0]) * info.world
        scheduler.step_update(step)
        if step % log_interval(run.config.log_every, total) == 0 or step == 1 or step >= total:
            parts = mean_over_ranks(parts, info)
            rate = seen / max(1e-9, time.perf_counter() - tick)
            log.write({"kind": "step", "step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                       "samples_per_s": round(rate, 2), **parts})
            bar.set_postfix(loss=f"{parts['loss']:.4f}", samples_s=f"{rate:.1f}")
            tick, seen = time.perf_counter(), 0
        if step >= total:
            break
    return step


def train(config: TrainConfig, show_progress: bool = True,
          notify: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train, checkpoint every epoch, evaluate; returns the final metrics (also in ``eval.json``).

    ``notify`` receives the method's start-of-run notices (``Method.run_notes``) as ``"note: ..."`` lines, once
    (rank 0), before the first step; ``ktc train`` passes ``click.echo``."""
    info = init_distributed(config.device)
    out = Path(config.out)
    try:
        run = build_run(config, info.rank, info.world, info.local_rank)
        for note in run.notes if notify is not None and info.is_main else ():
            notify(f"note: {note}")
        model_state = model_memory(run)
        device_bytes = device_memory_bytes(run.device)
        check_model_fits(model_state, device_bytes, config.method)
        if notify is not None and info.is_main:
            notify(run.cached.describe_memory(config.batch_size))
            notify(describe_model_memory(model_state, device_bytes, config.method))
        model = wrap(Trainable(run.students, run.method), info, run.device)
        per_epoch = len(run.loader)
        total = min(config.epochs * per_epoch, config.max_steps or config.epochs * per_epoch)
        opt = make_optimizer(run, total)
        epoch, step = load_checkpoint(out, run, *opt) if config.resume else (0, 0)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(config, out)
            if not config.resume and (out / "metrics.jsonl").exists():
                os.remove(out / "metrics.jsonl")
        log = MetricsLog(out, enabled=info.is_main)
        log.write({"kind": "memory", **run.cached.memory_plan(config.batch_size), **model_state})
        while epoch < config.epochs and step < total:
            start = time.perf_counter()
            step = train_epoch(run, model, epoch, step, total, opt, log, info, show_progress)
            if info.is_main:
                save_checkpoint(out, run, *opt, epoch, step)
            barrier(info)
            log.write({"kind": "epoch", "epoch": epoch, "step": step, "seconds": round(time.perf_counter() - start, 3),
                       "peak_rss_mib": peak_rss_mib(), **run.cached.read_counts()})
            epoch += 1
        run.cached.close()         # the evaluation reads the teachers within the budget again, not beside these
        return finish(run, out) if info.is_main else {}
    finally:
        shutdown(info)


def finish(run: Run, out: Path) -> dict[str, Any]:
    """Plots and the final evaluation (the same call `ktc eval` makes)."""
    from kt_train.evaluate import evaluate

    write_plots(out)
    from_root = run.use_labels and run.info.get("data_kind", "folder") == "folder"   # shards: --val, or the store only
    data = run.config.val or (run.info["data_root"] if from_root else None)
    metrics = evaluate(out, data=data, cache=run.config.cache, batch_size=run.config.batch_size,
                       device=str(run.device), workers=0)
    if run.use_labels and not from_root and not run.config.val:
        metrics["data_note"] = ("the images are in tar shards, so there is no labelled folder to score top-1 on: "
                                "pass --val FOLDER (a folder of class folders), or run "
                                "`ktc eval --checkpoint OUT --data FOLDER`.")
    (out / "eval.json").write_text(json.dumps(metrics, indent=1))
    return metrics
