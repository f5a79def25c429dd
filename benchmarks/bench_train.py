"""Training step time: `ktc train` from a store vs a plain CE step vs online multi-teacher KD, side by side.

All loops train the same student (resnet18, 64 px, 1000 ImageNet classes, identical initial weights),
on the same pre-loaded batches (32 images + their store rows/views, taken from the trainer's own
block-shuffled loader), with the same optimizer (AdamW, lr 1e-3, wd 0.05, grad-clip 1), built the way
`kt_train.loop.make_optimizer` builds it (`fused=True` where every parameter allows it, i.e. on CPU and CUDA):

- **plain CE**: student forward, cross-entropy, backward, clip, AdamW; no teacher anywhere.
- **ktc cached** (`kt_train.setup.build_run` + `kt_train.loop.train_step`, i.e. exactly what `ktc train`
  runs per batch): gather the teachers' rows from RAM, build the TeacherBatch (top-20 logits scattered
  into 1000 classes), method loss (`kd`, `uniform`), backward, clip, AdamW over student + method heads.
  10 teachers: a store extracted from 10 random-init timm architectures of manifests/imagenet-104.yaml;
  100 teachers: a synthetic store holding 10 byte-identical copies of each of those 10 groups.
- **online KD**: the same 10 teachers (`kt_cache.teachers.load_teacher`: same seeded weights as the
  store) held in memory and run on every batch (`no_grad`), then the same `kd` loss.

The configurations are interleaved step by step (round robin, the order rotated every round) so that load
from other processes hits them alike; the first `--warmup` rounds are not timed. Step times are medians;
ratios are paired: the median over rounds of (this loop's step / the baseline's step in the same round).

Usage: python benchmarks/bench_train.py [--steps 8] [--warmup 1] [--threads 1]
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
BATCH = 32
LR, WEIGHT_DECAY = 1e-3, 0.05        # kt_train.config's defaults, which the cached loops run with


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class CachedLoop:
    """One `ktc train` configuration: build_run + train_step, as kt_train.loop.train_epoch does."""

    def __init__(self, store: Path, method: str, name: str, options: dict | None = None) -> None:
        from kt_train.distributed import Trainable
        from kt_train.loop import make_optimizer
        from kt_train.setup import build_run

        config = common.train_config(store, method, common.WORK / "runs" / name, method_options=options or {},
                                     batch_size=BATCH)
        with common.Stopwatch() as t:
            self.run = build_run(config)
        self.build_s = t.s
        self.model = Trainable(self.run.students, self.run.method).train()
        self.opt = make_optimizer(self.run, 1000)
        self.optimizer = self.opt[0]
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

    def breakdown(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One step cut into its parts (same work as train_step, timed piece by piece)."""
        from kt_train.methods import StudentOutput

        optimizer, marks = self.opt[0], [time.perf_counter()]
        teachers = self.run.cached.for_batch(batch, self.run.device)
        marks.append(time.perf_counter())
        raw = self.run.students[0](batch["image"])
        out = StudentOutput(raw.logits.float(), raw.features.float(), None if raw.featmap is None else raw.featmap.float())
        marks.append(time.perf_counter())
        parts = self.run.method(out, teachers)
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        marks.append(time.perf_counter())
        return dict(zip(PARTS, np.diff(marks)))

    def time_gather(self, batch: dict[str, torch.Tensor]) -> None:
        with common.Stopwatch() as t:
            self.run.cached.for_batch(batch, self.run.device)
        self.gather_s.append(t.s)


PARTS = ("read: gather + TeacherBatch", "student forward", "method forward", "backward", "clip + AdamW")


def make_student(seed: int = 0) -> Any:
    from kt_train.students import build_student

    torch.manual_seed(seed)
    return build_student(common.STUDENT, 1000, img_size=common.STUDENT_SIZE)


def adamw(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW as kt_train.loop.make_optimizer builds it (fused where ``fusable``), for the loops without a Run."""
    from kt_train.loop import fusable

    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, **({"fused": True} if fusable(params) else {}))


def clip_and_step(params: list[torch.nn.Parameter], optimizer: Any) -> None:
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


class PlainCE:
    """The baseline: the same student trained with cross-entropy only, no teacher anywhere."""

    def __init__(self) -> None:
        self.student = make_student().train()
        self.params = list(self.student.parameters())
        self.optimizer = adamw(self.params)

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        logits = self.student(batch["image"]).logits
        loss = F.cross_entropy(logits.float(), batch["label"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_and_step(self.params, self.optimizer)

    def breakdown(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        marks = [time.perf_counter()]
        logits = self.student(batch["image"]).logits
        marks.append(time.perf_counter())
        loss = F.cross_entropy(logits.float(), batch["label"])
        marks.append(time.perf_counter())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        clip_and_step(self.params, self.optimizer)
        marks.append(time.perf_counter())
        return dict(zip(PARTS, [0.0, *np.diff(marks)]))


def gflops_per_image(model: torch.nn.Module, size: int, forward: Callable | None = None) -> float:
    """Forward GFLOPs of one ``size`` px image (torch.utils.flop_counter; matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        (forward or model)(x)
    return counter.get_total_flops() / 1e9


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
        self.optimizer = adamw(self.params)
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


def optimizer_probe(loop: CachedLoop) -> dict[str, float]:
    """One AdamW step over the student + heads of ``loop`` (random gradients): default vs foreach vs fused."""
    params = [p for g in loop.opt[0].param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    seconds = {"tensors": len(params), "parameters": sum(p.numel() for p in params)}
    for name, kw in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, **kw)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        seconds[name] = common.median(times[1:])
        del optimizer
    for p in params:
        p.grad = None
    return seconds


def small_op_probe() -> dict[str, float]:
    """The cost of oversubscription: a student forward and a logit scatter with 1 vs 2 intra-op threads."""
    from kt_train.methods.base import scatter_full_logits

    student = make_student().eval()
    x = torch.randn(32, 3, common.TRAIN_SIZE, common.TRAIN_SIZE)
    z, label_map = torch.randn(16, 1000, dtype=torch.float64), torch.arange(1000)
    before, out = torch.get_num_threads(), {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            student(x)
            fwd = []
            for _ in range(3):
                start = time.perf_counter()
                student(x)
                fwd.append(time.perf_counter() - start)
        scatter = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(20):
                scatter_full_logits(z, label_map, 1000)
            scatter.append((time.perf_counter() - start) / 20)
        out[f"student_forward_s_{threads}t"] = common.median(fwd)
        out[f"scatter_full_logits_ms_{threads}t"] = 1000 * common.median(scatter)
    torch.set_num_threads(before)
    keep = label_map >= 0
    copy = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(20):
            o = z.new_full((16, 1000), float("-inf"), dtype=torch.float32)
            o.index_copy_(1, label_map[keep], z[:, keep].float())
        copy.append((time.perf_counter() - start) / 20)
    out["index_copy_ms_1t"] = 1000 * common.median(copy)
    return out


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
    parser.add_argument("--steps", type=int, default=8, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: stable on a shared, oversubscribed CPU; see docs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
    loops.update(cached)
    online = OnlineKD(store10, cached["ktc kd, 10 cached"])
    loops["online KD, 10 teachers in memory"] = online
    batches = collect_batches(cached["ktc kd, 10 cached"].run, 3)

    times: dict[str, list[float]] = {name: [] for name in loops}
    names = list(loops)
    for r in range(args.warmup + args.steps):
        batch = batches[r % len(batches)]
        order = names[r % len(names):] + names[:r % len(names)]        # rotate: no loop always follows another
        for name in order:
            loop = loops[name]
            start = time.perf_counter()
            loop(batch)
            elapsed = time.perf_counter() - start
            if r >= args.warmup:
                times[name].append(elapsed)
        for loop in cached.values():
            loop.time_gather(batch)
        if r >= args.warmup:
            print(f"round {r + 1}/{args.warmup + args.steps}: " + ", ".join(f"{times[n][-1]:.2f}" for n in loops) +
                  " s", flush=True)
        else:
            print(f"warm-up round {r + 1} done", flush=True)

    print("breakdown steps ...", flush=True)
    parts_of: dict[str, dict[str, float]] = {}
    for name in ("plain CE (no teachers)", "ktc kd, 10 cached", "ktc uniform, 10 cached", "ktc kd, 100 cached",
                 "ktc uniform, 100 cached"):
        runs = [loops[name].breakdown(batches[i % len(batches)]) for i in range(3)]
        parts_of[name] = {k: common.median([r[k] for r in runs]) for k in PARTS}
    common.print_table("step parts (median of 3, seconds)", [
        (n, *[f"{p[k]:.3f}" for k in PARTS]) for n, p in parts_of.items()], ("loop", *PARTS))
    flops = {"student resnet18": gflops_per_image(loops["plain CE (no teachers)"].student.model, common.TRAIN_SIZE)}
    for tid, tt in zip(online.ids, online.teachers):
        flops[tid] = gflops_per_image(tt.model, common.TRAIN_SIZE)
    teacher_sum = sum(v for k, v in flops.items() if not k.startswith("student"))
    print(f"forward GFLOPs per {common.TRAIN_SIZE}px image: student {flops['student resnet18']:.3f}, "
          f"10 teachers together {teacher_sum:.3f} ({teacher_sum / flops['student resnet18']:.1f}x the student)")

    print("probes ...", flush=True)
    adam = optimizer_probe(cached["ktc uniform, 100 cached"])
    print(f"AdamW step over student + uniform heads of 100 teachers ({adam['tensors']} tensors, "
          f"{adam['parameters'] / 1e6:.0f} M parameters): default {adam['default']:.3f} s, foreach {adam['foreach']:.3f} s, "
          f"fused {adam['fused']:.3f} s")
    probe = small_op_probe()
    print("threads: student forward (batch 32) {:.3f} s with 1 thread, {:.3f} s with 2; scatter_full_logits [16, 1000] "
          "{:.3f} ms vs {:.3f} ms (index_copy_ instead: {:.3f} ms, 1 thread)".format(
              probe["student_forward_s_1t"], probe["student_forward_s_2t"], probe["scatter_full_logits_ms_1t"],
              probe["scatter_full_logits_ms_2t"], probe["index_copy_ms_1t"]))

    med = {name: common.median(v) for name, v in times.items()}

    def paired(name: str, base: str) -> float:
        """Median over rounds of (this loop's step / the base loop's step in the same round)."""
        return common.median([a / b for a, b in zip(times[name], times[base])])

    rows, results = [], {}
    for name, value in med.items():
        loop = loops[name]
        ratio = paired(name, "plain CE (no teachers)")
        entry = {"step_s": value, "steps_s": times[name], "vs_plain_ce": ratio,
                 "samples_per_s": BATCH / value}
        if isinstance(loop, CachedLoop):
            entry.update(head_param_bytes=loop.head_bytes, table_bytes=loop.table_bytes, n_teachers=loop.n_teachers,
                         gather_s=common.median(loop.gather_s), build_run_s=loop.build_s)
        if loop is online:
            entry.update(teacher_forward_s=common.median(online.teacher_s[args.warmup:]),
                         teacher_param_bytes=online.teacher_param_bytes, teacher_load_s=online.load_s)
        results[name] = entry
        rows.append((name, f"{value:.3f}", f"{BATCH / value:.1f}", f"{ratio:.2f}x",
                     f"{entry.get('gather_s', float('nan')) * 1000:.1f}",
                     f"{entry.get('head_param_bytes', 0) / 2**20:.1f}"))
    common.print_table(f"step time (median, batch {BATCH}, resnet18 @ 64 px, CPU)", rows,
                       ("loop", "step s", "samples/s", "vs plain CE", "gather+TeacherBatch ms", "head params MiB"))

    online_vs = paired("online KD, 10 teachers in memory", "ktc kd, 10 cached")
    results["online KD, 10 teachers in memory"]["vs_cached_kd10"] = online_vs
    targets = [
        ("ktc train (kd) at 10 cached teachers vs plain CE", results["ktc kd, 10 cached"]["vs_plain_ce"], TARGET_10, "<="),
        ("ktc train (uniform) at 10 cached teachers vs plain CE", results["ktc uniform, 10 cached"]["vs_plain_ce"],
         TARGET_10, "<="),
        ("ktc train (kd) at 100 cached teachers vs plain CE", results["ktc kd, 100 cached"]["vs_plain_ce"], TARGET_100, "<="),
        ("ktc train (uniform) at 100 cached teachers vs plain CE", results["ktc uniform, 100 cached"]["vs_plain_ce"],
         TARGET_100, "<="),
        ("online KD (10 teachers in memory) vs ktc cached kd, 10 teachers", online_vs, TARGET_ONLINE, ">="),
    ]
    checks = []
    print("\n== targets")
    for what, value, target, op in targets:
        ok = value <= target if op == "<=" else value >= target
        checks.append({"what": what, "value": value, "target": f"{op} {target}x", "pass": ok})
        print(f"  {common.verdict(ok)}  {what}: {value:.2f}x (target {op} {target}x)")
    print(f"\nonline KD: teachers' forward {results['online KD, 10 teachers in memory']['teacher_forward_s']:.2f} s of "
          f"{med['online KD, 10 teachers in memory']:.2f} s per step; load average before {load_before}, "
          f"after {common.load_average()}")
    fused = {name: bool(loop.optimizer.defaults.get("fused")) for name, loop in loops.items()}
    print(f"AdamW fused in {sum(fused.values())} of {len(fused)} loops (as kt_train.loop.make_optimizer builds it)")
    data = {"results": results, "targets": checks, "parts": parts_of, "gflops": flops, "adamw_probe": adam,
            "adamw_fused": fused,
            "small_op_probe": probe, "batch_size": BATCH, "threads": args.threads, "student": "resnet18", "img_size": common.TRAIN_SIZE,
            "teachers": [m for m, _ in common.TRAIN_TEACHERS], "steps": args.steps, "warmup": args.warmup,
            "load_before": load_before, "load_after": common.load_average()}
    common.save_result("train", data)
    return data


if __name__ == "__main__":
    main()
