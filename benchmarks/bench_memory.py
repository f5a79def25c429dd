"""Memory: the trainer's peak RSS vs the number of cached teachers (1, 10, 100), heads separated.

Each configuration runs in a fresh child process (twice; the lower peak is kept): it builds the run
exactly as `ktc train` does (`kt_train.setup.build_run`, DataLoader workers 0 so every byte is in that
process), runs 3 optimizer steps through `kt_train.loop.train_step` on the trainer's own loader, and
reports its peak RSS (`ru_maxrss`), the method's parameter bytes, the optimizer state it holds for
them (AdamW: 2 moments) and their gradients, and the bytes of the teacher tables held in RAM.

Stores: the training benchmark's 10-teacher store (real extraction), and synthetic 1- and 100-teacher
stores made of byte-identical copies of its teacher groups (see docs/benchmarks.md). Methods: `ce`
(no teacher data: the baseline), `kd` (no heads), `uniform` (per-teacher MLP encoder + decoder).

"Heads' training state" = parameters + gradients + AdamW's two moments = 4 x parameter bytes (fp32),
measured from the live tensors; "method activations" = the bytes autograd keeps for the method's
backward (counted with saved-tensor hooks on one batch, parameters excluded). Residual = peak RSS -
heads' training state - method activations; the target is a flat residual from 1 to 100 teachers.

Usage: python benchmarks/bench_memory.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FLAT_TOLERANCE = 0.05          # residual may grow by at most 5 % from 1 to 100 teachers


def saved_activation_bytes(run: Any, model: Any) -> dict[str, int]:
    """Bytes autograd keeps for backward (activations; parameters excluded), for the whole model and for
    the method alone (student outputs detached), on one training batch (no optimizer step)."""
    import torch

    from kt_train.methods import StudentOutput

    params = {p.data_ptr() for p in model.parameters()}

    def count(fn: Any) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    batch = next(iter(run.loader))
    teachers = run.cached.for_batch(batch, run.device)
    if not run.use_labels:
        teachers.labels = None
    total = count(lambda: model(batch["image"], teachers, False))
    raw = run.students[0](batch["image"])
    out = StudentOutput(raw.logits.detach().float().requires_grad_(),
                        None if raw.features is None else raw.features.detach().float().requires_grad_(), None)
    method_only = count(lambda: run.method(out, teachers))
    return {"saved_total": total, "saved_method": method_only}


def child(store: str, method: str, threads: int) -> None:
    import psutil
    import torch

    torch.set_num_threads(threads)
    from kt_train.distributed import Trainable
    from kt_train.loop import make_optimizer, train_step
    from kt_train.setup import build_run

    process = psutil.Process()
    rss_imports = process.memory_info().rss
    from kt_cache.store import StoreReader

    reader = StoreReader(store)                      # what opening the store (root document) costs alone
    reader.teacher_ids()
    rss_open = process.memory_info().rss - rss_imports
    del reader
    config = common.train_config(Path(store), method, common.WORK / "runs" / f"mem-{method}", batch_size=16)
    run = build_run(config)
    rss_built = process.memory_info().rss
    model = Trainable(run.students, run.method).train()
    optimizer, scheduler, scaler = make_optimizer(run, 100)
    saved = saved_activation_bytes(run, model)
    steps = 0
    while steps < 3:
        for batch in run.loader:
            train_step(run, model, batch, optimizer, scaler)
            steps += 1
            if steps == 3:
                break

    def tensor_bytes(tensors: Any) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

    head_params = list(run.method.parameters())
    head_ids = {id(p) for p in head_params}
    head_state = sum(tensor_bytes(s.values()) for p, s in optimizer.state.items() if id(p) in head_ids)
    result = {
        "store": store, "method": method, "teachers": len(run.teacher_ids),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_imports": rss_imports, "rss_after_build": rss_built, "rss_open_store": rss_open,
        "head_param_bytes": tensor_bytes(head_params),
        "head_buffer_bytes": tensor_bytes(run.method.buffers()),
        "head_grad_bytes": tensor_bytes(p.grad for p in head_params if p.grad is not None),
        "head_optimizer_state_bytes": head_state,
        "student_param_bytes": tensor_bytes(p for s in run.students for p in s.parameters()),
        "table_bytes": sum(a.nbytes for t in run.cached.tables.values() for a in t.values()),
        **saved,
    }
    result["heads_training_state"] = (result["head_param_bytes"] + result["head_buffer_bytes"] +
                                      result["head_grad_bytes"] + head_state)
    print("RESULT " + json.dumps(result))


def run_child(store: Path, method: str, threads: int, repeat: int = 2) -> dict[str, Any]:
    """The configuration in ``repeat`` fresh processes; the run with the lowest peak RSS is kept (peak RSS
    varies by ~10-20 MiB between identical runs: allocator and thread timing)."""
    runs = []
    for _ in range(repeat):
        done = subprocess.run([sys.executable, __file__, "--child", str(store), method, "--threads", str(threads)],
                              capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"child {store} {method} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        runs.append(json.loads(lines[-1][len("RESULT "):]))
    best = min(runs, key=lambda r: r["peak_rss"])
    best["peak_rss_runs"] = [r["peak_rss"] for r in runs]
    return best


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=2, metavar=("STORE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.threads)
        return {}
    load_before = common.load_average()
    stores = {n: common.train_store(n) for n in (1, 10, 100)}
    results = [run_child(stores[1], "ce", args.threads)]
    print(f"ce (no teacher data): peak RSS {results[0]['peak_rss'] / 2**20:.0f} MiB", flush=True)
    for method in ("kd", "uniform"):
        for n, store in stores.items():
            results.append(run_child(store, method, args.threads))
            r = results[-1]
            print(f"{method} {n:>3} teachers: peak RSS {r['peak_rss'] / 2**20:.0f} MiB, heads "
                  f"{r['head_param_bytes'] / 2**20:.1f} MiB params", flush=True)
    base = results[0]["peak_rss"]
    rows, targets = [], []
    for r in results:
        residual = r["peak_rss"] - r["heads_training_state"] - r["saved_method"]
        r["residual"] = residual
        rows.append((r["method"], r["teachers"], f"{r['peak_rss'] / 2**20:.0f}", f"{(r['peak_rss'] - base) / 2**20:+.0f}",
                     f"{r['head_param_bytes'] / 2**20:.1f}", f"{r['heads_training_state'] / 2**20:.1f}",
                     f"{r['saved_method'] / 2**20:.1f}", f"{r['table_bytes'] / 2**20:.2f}", f"{residual / 2**20:.0f}"))
    common.print_table("trainer peak RSS (MiB) vs cached teachers (batch 16, resnet18 @ 64 px, 3 steps)", rows,
                       ("method", "teachers", "peak RSS", "vs ce", "head params", "heads training state",
                        "method activations", "RAM tables", "residual"))
    print("heads training state = params + grads + AdamW moments (+ buffers); method activations = what autograd keeps "
          "for the method's backward;\nresidual = peak RSS - heads training state - method activations")
    print()
    for method in ("kd", "uniform"):
        one, hundred = (next(r for r in results if r["method"] == method and r["teachers"] == n) for n in (1, 100))
        growth = (hundred["residual"] - one["residual"]) / one["residual"]
        ok = growth <= FLAT_TOLERANCE
        targets.append({"what": f"{method}: residual peak RSS (heads' state and activations removed), 1 -> 100 teachers",
                        "value": growth, "target": f"<= +{FLAT_TOLERANCE:.0%}", "pass": ok,
                        "detail": {"residual_1": one["residual"], "residual_100": hundred["residual"]}})
        print(f"  {common.verdict(ok)}  {method}: residual {one['residual'] / 2**20:.0f} -> "
              f"{hundred['residual'] / 2**20:.0f} MiB from 1 to 100 teachers ({100 * growth:+.1f} %, "
              f"target flat within {FLAT_TOLERANCE:.0%}); raw peak {one['peak_rss'] / 2**20:.0f} -> "
              f"{hundred['peak_rss'] / 2**20:.0f} MiB")
    uniform10 = next(r for r in results if r["method"] == "uniform" and r["teachers"] == 10)
    sample_views = 3 * common.TRAIN_IMAGES_PER_CLASS * common.TRAIN_VIEWS
    per_teacher_row = uniform10["table_bytes"] / 10 / sample_views     # bytes per teacher per sample-view
    print(f"\nRAM tables: {per_teacher_row:.0f} B per teacher per sample-view (features + top-20 + LSE, as stored "
          f"dtypes); at ImageNet-1k scale (1.28 M images x 4 views) that is "
          f"{per_teacher_row * 1.28e6 * 4 / 2**30:.1f} GiB per teacher, {per_teacher_row * 1.28e6 * 4 * 100 / 2**30:.0f} "
          "GiB for 100 teachers")
    print(f"load average before {load_before}, after {common.load_average()}")
    data = {"results": results, "targets": targets, "table_bytes_per_teacher_sample_view": per_teacher_row,
            "load_before": load_before, "load_after": common.load_average()}
    common.save_result("memory", data)
    return data


if __name__ == "__main__":
    main()
