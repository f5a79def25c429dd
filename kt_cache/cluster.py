"""Scale-out extraction on dask.distributed: the store's units become tasks.

dask is used as a task runner only (``client.map`` over (wave, unit) tasks; never GPU inference through
``dask.array``). Each task runs the same ``engine.run_wave`` as the single-process path, restricted to
its unit, and writes only that unit's whole shards plus its ``done`` flags, so tasks never share a
storage object. A worker keeps the teachers of the wave it last ran and reuses them for its next task
of that wave in the same run (the wave key holds a per-run token, so a long-lived ``--scheduler`` cluster
never reuses teachers loaded for an earlier run whose manifest may have changed); each task reports
whether it loaded, and the run prints how many loads there were per worker and wave. A worker that dies
mid-task has its task rerun elsewhere (rewriting whole shards is idempotent); a killed run is resumed from
the ``done`` flags like any other. Paths sent to workers are absolute: a joined cluster's workers need
not share the client's working directory.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections import Counter
from typing import Any

from kt_cache.store import format as fmt
from kt_cache.errors import UsageError

_WORKER_WAVE: dict[str, Any] = {}      # per worker process: the loaded wave {"key": ..., "teachers": [...]}


def parse_cluster(spec: str) -> int:
    """``local:N`` -> N worker processes."""
    kind, _, count = spec.partition(":")
    if kind != "local" or not count.isdigit() or int(count) < 1:
        raise UsageError(f"--cluster {spec!r}: expected local:N with N >= 1 worker processes (e.g. local:2). "
                         "To join a running cluster use --scheduler ADDRESS instead.")
    return int(count)


def make_client(cluster: str | None, scheduler: str | None, device: str) -> Any:
    """A dask Client: a new LocalCluster (one worker per GPU on CUDA, dask-cuda's when installed) or a join."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="20s")
        except OSError as err:
            raise UsageError(f"--scheduler {scheduler}: cannot connect ({err}). Fix: check the address printed by "
                             "`dask scheduler` (tcp://HOST:8786) and that this machine can reach it.") from err
    workers = parse_cluster(cluster or "local:1")
    if device.startswith("cuda"):
        try:
            from dask_cuda import LocalCUDACluster

            return Client(LocalCUDACluster(n_workers=workers, threads_per_worker=1))
        except ImportError:
            pass
    threads = max(1, (os.cpu_count() or 1) // workers)
    local = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                         env={"OMP_NUM_THREADS": str(threads)})
    return Client(local)


def worker_device(device: str) -> str:
    """On a LocalCluster without dask-cuda, worker i uses GPU i (mod the GPUs visible)."""
    if not device.startswith("cuda") or ":" in device or "CUDA_VISIBLE_DEVICES" in os.environ:
        return device
    import torch
    from dask.distributed import get_worker

    name = str(get_worker().name)
    return f"cuda:{int(name) % torch.cuda.device_count()}" if name.isdigit() else device


def run_unit_task(store: str, wave_key: str, wave: list[Any], unit: int, options: dict[str, Any]) -> dict[str, Any]:
    """One task: run the wave's teachers over one unit and write it. Returns timings and failures."""
    from types import SimpleNamespace

    import torch

    from kt_cache.engine import RunState, load_wave, run_wave

    opts = SimpleNamespace(**dict(options, device=worker_device(options["device"]), workers=0))
    root = fmt.open_group(store, mode="r+", consolidated=False)
    state = RunState()
    loaded = _WORKER_WAVE.get("key") != wave_key
    if loaded:
        for old in _WORKER_WAVE.pop("teachers", []):
            old.model.release()
        _WORKER_WAVE.pop("key", None)
        _WORKER_WAVE.update(key=wave_key, teachers=load_wave(root, wave, torch.device(opts.device), state))
    run_wave(root, wave, opts, state, units={unit}, teachers=_WORKER_WAVE["teachers"])
    weights = {wt.plan.id: wt.model.weights_sha256 for wt in _WORKER_WAVE["teachers"]
               if getattr(wt.model, "weights_sha256", None)}
    return {"timings": {k: dataclasses.asdict(v) for k, v in state.timings.items()},
            "failures": state.failures, "rows": state.rows, "weights_sha256": weights,
            "worker": worker_address(), "loaded": loaded}


def worker_address() -> str:
    from dask.distributed import get_worker

    try:
        return str(get_worker().address)
    except ValueError:              # called outside a worker (a direct call)
        return f"pid {os.getpid()}"


def run_on_cluster(plan: Any, root: Any, options: Any, state: Any, progress_factory: Any) -> None:
    """Submit every pending (wave, unit) as a task, gather timings and failures into ``state``."""
    from dask.distributed import as_completed

    from kt_cache.engine import TeacherTiming, pending_units

    client = make_client(options.cluster, options.scheduler, options.device)
    print(f"dask dashboard: {client.dashboard_link}  ({len(client.scheduler_info()['workers'])} workers)", flush=True)
    settings = {k: getattr(options, k) for k in ("device", "batch_size", "strict", "data_root")}
    data_root = str(settings["data_root"])
    settings["data_root"] = data_root if "://" in data_root else os.path.abspath(data_root)
    store, run = os.path.abspath(plan.out), uuid.uuid4().hex
    futures, waves = [], {}
    try:
        for number, wave in enumerate(plan.waves):
            key = f"{store}:{run}:{number}:{','.join(p.id for p in wave)}"
            units = sorted(set().union(*(pending_units(root, p.id) for p in wave)))
            submitted = [client.submit(run_unit_task, store, key, wave, unit, settings, pure=False, retries=3,
                                       priority=-number, key=f"ktc-{run[:8]}-wave{number}-unit{unit}") for unit in units]
            waves.update({future.key: number for future in submitted})
            futures += submitted
        loads: Counter = Counter()              # (worker, wave) -> teacher loads
        workers: set[str] = set()
        with progress_factory(len(futures)) as bar:
            for future in as_completed(futures):
                result = future.result()
                merge_result(result, state, TeacherTiming)
                workers.add(result["worker"])
                if result["loaded"]:
                    loads[result["worker"], waves[future.key]] += 1
                if bar is not None:
                    bar.update(1)
        if futures:
            print(f"cluster: {len(futures)} tasks on {len(workers)} workers; wave teachers loaded "
                  f"{sum(loads.values())} times ({max(loads.values(), default=0)} at most per worker and wave)",
                  flush=True)
    finally:
        if options.scheduler:                   # a joined cluster outlives the run: free its workers' teachers
            try:
                client.run(release_wave, run)
            except Exception:                   # best effort: a dead worker holds nothing
                pass
        client.close()


def release_wave(run: str) -> None:
    """On a worker: drop the teachers kept for run ``run`` (a later run loads its own)."""
    if run in str(_WORKER_WAVE.get("key", "")):
        for old in _WORKER_WAVE.pop("teachers", []):
            old.model.release()
        _WORKER_WAVE.clear()


def merge_result(result: dict[str, Any], state: Any, timing_cls: Any) -> None:
    for teacher_id, values in result["timings"].items():
        timing = state.timings.setdefault(teacher_id, timing_cls())
        timing.load_s += values["load_s"]
        timing.forward_s += values["forward_s"]
        timing.images += values["images"]
    state.failures.update(result["failures"])
    state.weights_sha256.update(result.get("weights_sha256", {}))
    state.rows += result["rows"]
