"""Training step time: `ktc train` from a store vs a plain CE step vs online multi-teacher KD, side by side.

All loops train the same student (resnet18, 64 px, 1000 ImageNet classes, identical initial weights),
on the same pre-loaded batches (16 images + their store rows/views, taken from the trainer's own
block-shuffled loader), with the same optimizer (AdamW, lr 1e-3, wd 0.05, grad-clip 1):

- **plain CE**: student forward, cross-entropy, backward, clip, AdamW; no teacher anywhere.
- **ktc cached** (`kt_train.setup.build_run` + `kt_train.loop.train_step`, i.e. exactly what `ktc train`
  runs per batch): gather the teachers' rows from RAM, build the TeacherBatch (top-20 logits scattered
  into 1000 classes), method loss (`kd`, `uniform`), backward, clip, AdamW over student + method heads.
  10 teachers: a store extracted from 10 random-init timm architectures of manifests/imagenet-104.yaml;
  100 teachers: a synthetic store holding 10 byte-identical copies of each of those 10 groups.
- **online KD**: the same 10 teachers (`kt_cache.teachers.load_teacher`: same seeded weights as the
  store) held in memory and run on every batch (`no_grad`), then the same `kd` loss.

The configurations are interleaved step by step (round robin) so that load from other processes hits
them alike; the first `--warmup` rounds are not timed; the reported value is the median.

Usage: python benchmarks/bench_train.py [--steps 4] [--warmup 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TARGET_10, TARGET_100, TARGET_ONLINE = 1.2, 1.5, 5.0


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class CachedLoop:
    """One `ktc train` configuration: build_run + train_step, as kt_train.loop.train_epoch does."""

    def __init__(self, store: Path, method: str, name: str, options: dict | None = None) -> None:
        from kt_train.distributed import Trainable
        from kt_train.loop import make_optimizer
        from kt_train.setup import build_run

        config = common.train_config(store, method, common.WORK / "runs" / name, method_options=options or {})
        with common.Stopwatch() as t:
            self.run = build_run(config)
        self.build_s = t.s
        self.model = Trainable(self.run.students, self.run.method).train()
        self.opt = make_optimizer(self.run, 1000)
        self.step_n = 0
        self.head_bytes = param_bytes(self.run.method)
        self.table_bytes = sum(a.nbytes for t in self.run.cached.tables.values() for a in t.values())
        self.n_teachers = len(self.run.teacher_ids)
        self.gather_s: list[float] = []

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        from kt_train.loop import train_step

        optimizer, scheduler, scaler = self.opt
        train_step(self.run, self.model, batch, optimizer, scaler)
        self.step_n += 1
        scheduler.step_update(self.step_n)

    def time_gather(self, batch: dict[str, torch.Tensor]) -> None:
        with common.Stopwatch() as t:
            self.run.cached.for_batch(batch, self.run.device)
        self.gather_s.append(t.s)


def make_student(seed: int = 0) -> Any:
    from kt_train.students import build_student

    torch.manual_seed(seed)
    return build_student("resnet18", 1000, img_size=common.TRAIN_SIZE)


def clip_and_step(params: list[torch.nn.Parameter], optimizer: Any) -> None:
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


class PlainCE:
    """The baseline: the same student trained with cross-entropy only, no teacher anywhere."""

    def __init__(self) -> None:
        self.student = make_student().train()
        self.params = list(self.student.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-3, weight_decay=0.05)

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        logits = self.student(batch["image"]).logits
        loss = F.cross_entropy(logits.float(), batch["label"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_and_step(self.params, self.optimizer)


class OnlineKD:
    """Online multi-teacher KD: the teachers live in memory and run on every batch; same `kd` loss."""

    def __init__(self, store: Path, reference: CachedLoop) -> None:
        from kt_cache.extract import ExtractOptions, build_plan
        from kt_cache.teachers import load_teacher
        from kt_train.distributed import Trainable
        from kt_train.methods import MethodDims, build_method

        plan = build_plan(ExtractOptions(manifest=store.parent / "manifest.yaml", out=store))
        with common.Stopwatch() as t:
            self.teachers = [load_teacher(p, "cpu") for p in plan.plans]
        self.load_s = t.s
        self.teacher_param_bytes = sum(param_bytes(tt.model) for tt in self.teachers)
        cached = reference.run.cached
        self.ids = tuple(p.id for p in plan.plans)
        assert self.ids == tuple(cached.ids), (self.ids, cached.ids)
        self.label_maps = {t: torch.from_numpy(cached.label_maps[t]) for t in self.ids}
        self.student = make_student().train()
        dims = MethodDims(self.student.feature_dim, cached.num_classes, cached.teacher_infos())
        self.method = build_method("kd", {}, dims)
        self.model = Trainable([self.student], self.method).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-3, weight_decay=0.05)
        cfg = self.student.data_config
        self.s_mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1) * 255
        self.s_std = torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255
        self.norms = [(torch.tensor(tt.plan.mean).view(1, 3, 1, 1) * 255, torch.tensor(tt.plan.std).view(1, 3, 1, 1) * 255)
                      for tt in self.teachers]
        self.num_classes = cached.num_classes
        self.teacher_s: list[float] = []

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        from kt_train.methods.base import TeacherBatch, scatter_full_logits

        images = batch["image"]
        start = time.perf_counter()
        with torch.no_grad():
            pixels = images * self.s_std + self.s_mean           # back to 0..255, then each teacher's normalisation
            logits, covered = {}, {}
            for tid, tt, (mean, std) in zip(self.ids, self.teachers, self.norms):
                z = tt.forward((pixels - mean) / std)["logits"]
                logits[tid], covered[tid] = scatter_full_logits(z, self.label_maps[tid], self.num_classes)
        self.teacher_s.append(time.perf_counter() - start)
        valid = {t: torch.ones(images.shape[0], dtype=torch.bool) for t in self.ids}
        tb = TeacherBatch(ids=self.ids, roles={t: "predictive" for t in self.ids}, valid=valid, logits=logits,
                          covered=covered, labels=batch["label"])
        parts = self.model(images, tb, False)
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        clip_and_step(self.params, self.optimizer)


def collect_batches(run: Any, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` batches from the trainer's own loader (block-shuffled rows, random stored views)."""
    batches: list[dict[str, torch.Tensor]] = []
    epoch = 0
    while len(batches) < n:
        run.loader.set_epoch(epoch)
        for batch in run.loader:
            batches.append(batch)
            if len(batches) == n:
                break
        epoch += 1
    return batches


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--no-linear", action="store_true", help="skip the uniform head=linear variant at 100")
    args = parser.parse_args()
    torch.manual_seed(0)
    load_before = common.load_average()
    store10, store100 = common.train_store(10), common.train_store(100)

    print("building runs ...", flush=True)
    loops: dict[str, Callable] = {"plain CE (no teachers)": PlainCE()}
    cached: dict[str, CachedLoop] = {
        "ktc kd, 10 cached": CachedLoop(store10, "kd", "kd10"),
        "ktc uniform, 10 cached": CachedLoop(store10, "uniform", "uniform10"),
        "ktc kd, 100 cached": CachedLoop(store100, "kd", "kd100"),
        "ktc uniform, 100 cached": CachedLoop(store100, "uniform", "uniform100"),
    }
    if not args.no_linear:
        cached["ktc uniform head=linear, 100 cached"] = CachedLoop(store100, "uniform", "uniform100lin",
                                                                   {"head": "linear"})
    loops.update(cached)
    online = OnlineKD(store10, cached["ktc kd, 10 cached"])
    loops["online KD, 10 teachers in memory"] = online
    batches = collect_batches(cached["ktc kd, 10 cached"].run, 3)

    times: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(args.warmup + args.steps):
        batch = batches[r % len(batches)]
        for name, loop in loops.items():
            start = time.perf_counter()
            loop(batch)
            elapsed = time.perf_counter() - start
            if r >= args.warmup:
                times[name].append(elapsed)
        for loop in cached.values():
            loop.time_gather(batch)
        print(f"round {r + 1}/{args.warmup + args.steps}: " +
              ", ".join(f"{n.split(',')[0]}{'@' + n.split(', ')[1].split()[0] if ', ' in n else ''} {times[n][-1]:.2f}s"
                        for n in loops if times[n]), flush=True)

    med = {name: common.median(v) for name, v in times.items()}
    ce = med["plain CE (no teachers)"]
    rows, results = [], {}
    for name, value in med.items():
        loop = loops[name]
        entry = {"step_s": value, "steps_s": times[name], "vs_plain_ce": value / ce,
                 "samples_per_s": 16 / value}
        if isinstance(loop, CachedLoop):
            entry.update(head_param_bytes=loop.head_bytes, table_bytes=loop.table_bytes, n_teachers=loop.n_teachers,
                         gather_s=common.median(loop.gather_s), build_run_s=loop.build_s)
        if loop is online:
            entry.update(teacher_forward_s=common.median(online.teacher_s[args.warmup:]),
                         teacher_param_bytes=online.teacher_param_bytes, teacher_load_s=online.load_s)
        results[name] = entry
        rows.append((name, f"{value:.3f}", f"{16 / value:.1f}", f"{value / ce:.2f}x",
                     f"{entry.get('gather_s', float('nan')) * 1000:.1f}",
                     f"{entry.get('head_param_bytes', 0) / 2**20:.1f}"))
    common.print_table("step time (median, batch 16, resnet18 @ 64 px, CPU)", rows,
                       ("loop", "step s", "samples/s", "vs plain CE", "gather+TeacherBatch ms", "head params MiB"))

    online_vs = med["online KD, 10 teachers in memory"] / med["ktc kd, 10 cached"]
    targets = [
        ("ktc train (kd) at 10 cached teachers vs plain CE", med["ktc kd, 10 cached"] / ce, TARGET_10, "<="),
        ("ktc train (uniform) at 10 cached teachers vs plain CE", med["ktc uniform, 10 cached"] / ce, TARGET_10, "<="),
        ("ktc train (kd) at 100 cached teachers vs plain CE", med["ktc kd, 100 cached"] / ce, TARGET_100, "<="),
        ("ktc train (uniform) at 100 cached teachers vs plain CE", med["ktc uniform, 100 cached"] / ce, TARGET_100, "<="),
        ("online KD (10 teachers in memory) vs ktc cached kd, 10 teachers", online_vs, TARGET_ONLINE, ">="),
    ]
    if "ktc uniform head=linear, 100 cached" in med:
        targets.append(("ktc train (uniform, head=linear) at 100 cached vs plain CE",
                        med["ktc uniform head=linear, 100 cached"] / ce, TARGET_100, "<="))
    checks = []
    print("\n== targets")
    for what, value, target, op in targets:
        ok = value <= target if op == "<=" else value >= target
        checks.append({"what": what, "value": value, "target": f"{op} {target}x", "pass": ok})
        print(f"  {common.verdict(ok)}  {what}: {value:.2f}x (target {op} {target}x)")
    print(f"\nonline KD: teachers' forward {results['online KD, 10 teachers in memory']['teacher_forward_s']:.2f} s of "
          f"{med['online KD, 10 teachers in memory']:.2f} s per step; load average before {load_before}, "
          f"after {common.load_average()}")
    data = {"results": results, "targets": checks, "batch_size": 16, "student": "resnet18", "img_size": common.TRAIN_SIZE,
            "teachers": [m for m, _ in common.TRAIN_TEACHERS], "steps": args.steps, "warmup": args.warmup,
            "load_before": load_before, "load_after": common.load_average()}
    common.save_result("train", data)
    return data


if __name__ == "__main__":
    main()
