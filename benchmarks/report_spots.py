"""The "ktc slow spots and bugs found" section of docs/benchmarks.md (see ``report_doc.write_doc``).

The spots the first benchmark run found, in their original numbering (other sections refer to them by
number), each marked fixed, partly fixed or open in the code. Numbers come from the saved results.
"""

from __future__ import annotations

import json
from pathlib import Path

from report_format import by_store, fmt_x, fused_rows

FIXED, PARTLY, OPEN = "fixed", "partly fixed", "open"


def slow_spots(ex: dict, tr: dict, st: dict, me: dict) -> str:
    spots = [adamw(tr), ram_tables(st, me), teacher_batch(tr, st), class_names(ex), timm_builds(ex), metadata(st)]
    numbers = {state: [str(i + 1) for i, (s, _) in enumerate(spots) if s == state] for state in (FIXED, PARTLY, OPEN)}
    status = "; ".join(f"{state}: {', '.join(n)}" for state, n in numbers.items() if n)
    items = "\n".join(f"{i + 1}. {text}" for i, (_, text) in enumerate(spots))
    return f"""## ktc slow spots and bugs found

What the benchmarks showed in ktc itself, and where the code stands now ({status}).
The numbers are those of the saved results (`benchmarks/results/*.json`).

{items}

No correctness bug showed up: every store written here was read back by `StoreReader`/`CachedTeachers`
without error, and the BlockCache read each block exactly once per epoch.
"""


def adamw(tr: dict) -> tuple[str, str]:
    adam = tr["adamw_probe"]
    return FIXED, f"""**`kt_train/loop.py` `make_optimizer`: AdamW without `fused=True` — fixed.** It now builds
   `AdamW(fused=True)` whenever every parameter is a floating-point CPU or CUDA tensor (`fusable`; torch's
   default otherwise), and a resumed run keeps that kernel (`kt_train/checkpoint.py` `with_current_kernel`).
   On CPU torch's default AdamW is the per-tensor for-loop: with UNIFORM's heads at 100 teachers
   ({adam['tensors']} tensors, {adam['parameters'] / 1e6:.0f} M parameters with the student) one `optimizer.step()` takes
   {adam['default']:.2f} s by default, {adam['foreach']:.2f} s with `foreach=True` and {adam['fused']:.2f} s fused (measured on this
   machine, 1 thread).{baseline_note(tr)}"""


def baseline_note(tr: dict) -> str:
    """Whether the training ratios of these results compare like with like (both sides' AdamW)."""
    if fused_rows(tr):
        return ("\n   In these results the plain CE baseline still used torch's default AdamW (`plain CE, fused AdamW` is"
                "\n   the fused one); `benchmarks/bench_train.py` now builds every loop's AdamW as `make_optimizer` does,"
                "\n   so the next run's ratios compare like with like.")
    if tr.get("adamw_fused"):
        return "\n   The training benchmark builds every loop's AdamW that way, the plain CE baseline included."
    return ""


def ram_tables(st: dict, me: dict) -> tuple[str, str]:
    per_row = me["table_bytes_per_teacher_sample_view"]
    block = by_store(st)["2048 images, featmaps via BlockCache"]
    return FIXED, f"""**`kt_train/data.py` `CachedTeachers.__init__` / `_ram_paths`: features and top-k always went to RAM — fixed.**
   In these results `ram_budget_bytes` only applied to featmaps; for 100 teachers × ImageNet × 4 views those
   tables (features + top-k + LSE) would be ≈ {per_row * 1.28e6 * 4 * 100 / 2**30:.0f} GiB (measured {per_row:.0f} B per teacher-sample-view, scaled).
   Now `--ram-budget-gb` (default: a quarter of physical memory) bounds every cached array: the smallest are held,
   the rest go through the BlockCache path (measured {block['gather_rows_per_s']:,.0f} rows/s here for featmaps), with
   the next sampler window read ahead; "Training from a store larger than `--ram-budget-gb`" below has the numbers."""


def teacher_batch(tr: dict, st: dict) -> tuple[str, str]:
    saved = Path(__file__).resolve().parent / "results" / "teachers.json"
    if saved.exists():
        return teachers_as_tensors(json.loads(saved.read_text()), tr)
    res, probe = tr["results"], tr["small_op_probe"]
    kd10, kd100 = res["ktc kd, 10 cached"], res["ktc kd, 100 cached"]
    r100 = by_store(st)["train benchmark, 100 teachers"]
    return PARTLY, f"""**`kt_train/data.py` `CachedTeachers.to_teacher_batch` → `kt_train/methods/base.py` `scatter_topk_logits` /
   `scatter_full_logits`: one Python loop iteration and several small tensor ops per teacher per batch — partly
   fixed.** Fixed: `scatter_full_logits` (which `scatter_topk_logits` ends in) copies with `index_select` +
   `index_copy_` instead of a boolean-mask gather and an advanced-index assignment, bit-identical (the probe
   in these results: {probe['scatter_full_logits_ms_1t']:.2f} ms per teacher with 1 thread, {probe['scatter_full_logits_ms_2t']:.2f} ms with 2 on this loaded machine).
   Open: the loop over teachers itself. Reading costs {1000 * kd100['gather_s']:.0f} ms per batch of {tr['batch_size']} at 100 teachers
   ({1000 * kd10['gather_s']:.1f} ms at 10), linear in teachers; in the reader benchmark `to_teacher_batch` takes
   {r100['to_teacher_batch_ms']:.0f} ms for {r100['batch']} rows at 100 teachers. Stacking all top-k teachers into one `[T, B, k]` scatter
   would make it one op per batch (on GPU: one kernel per op instead of one per op and teacher)."""


def teachers_as_tensors(r: dict, tr: dict) -> tuple[str, str]:
    """Spot 3 after teachers as tensors, with the numbers of ``bench_teachers.py`` (and its run on the old code)."""
    res, old = r["results"], tr["results"]
    kd100, kd1000 = res.get("kd, 100 cached"), res.get("kd, 1000 cached")
    after = ", ".join(f"{1000 * e['gather_s']:.0f} ms at {e['n_teachers']}" for e in (kd100, kd1000) if e)
    return FIXED, f"""**`kt_train/data.py` `CachedTeachers.to_teacher_batch` → `scatter_topk_logits` / `scatter_full_logits`: one
   Python loop iteration and several small tensor ops per teacher per batch — fixed.** Teachers are tensors now
   (`kt_train/teacher_stacks.py`, `kt_train/cached.py`): teachers with equal array shapes form a group held as one
   `[N, V, T, ...]` array; a batch is one gather, one device copy and one top-k scatter per group (`stacked_logits`,
   bit-identical to the per-teacher scatter), and the methods read `Stacked` `[T, B, ...]` fields; UNIFORM/AVG/KPU
   run one batched head per group of equal dims (`kt_train/methods/heads.py`). Reading costs {after} teachers
   per batch of {r['batch_size']} (it was {1000 * old['ktc kd, 100 cached']['gather_s']:.0f} ms at 100 in the training results above);
   "Step time at 10, 100 and 1000 cached teachers" below has the step ratios before and after."""


def class_names(ex: dict) -> tuple[str, str]:
    oo = ex["one_off_parts"]
    cached = oo.get("imagenet_1k_names_s")
    cached_note = f" (the cached list itself: {1e6 * cached:.0f} µs)" if cached is not None else ""
    return FIXED, f"""**`kt_cache/classes.py` `imagenet_1k_names` / `resolve_class_names`: recomputed per teacher, with O(C²)
   duplicate checks — fixed.** `imagenet_1k_names` is `functools.lru_cache`d, so timm's `ImageNetInfo()`
   re-read ({1000 * oo['timm_imagenet_info_s']:.0f} ms) happens once per process instead of once per teacher and once for the
   dataset, and both duplicate checks count the names in one `Counter` pass (`repeated_names`) instead of
   the O(C²) `names.count` scan ({1000 * oo['count_scan_s']:.0f} ms a scan of the ImageNet-1k names, two per call).
   In these results `resolve_class_names('imagenet-1k')` takes {1000 * oo['resolve_class_names_s']:.2f} ms per teacher{cached_note}."""


def timm_builds(ex: dict) -> tuple[str, str]:
    oo, n = ex["one_off_parts"], len(ex["teachers"])
    if "plan_cached_s" in oo:
        plan = (f"Planning the {n} teachers took {oo['plan_s']:.2f} s from cold and {oo['plan_cached_s']:.2f} s again in the\n"
                "   same process (every architecture cached)")
    else:
        plan = (f"Planning the {n} teachers took {oo['plan_s']:.2f} s here, timed by `bench_extract.py` after its own\n"
                "   runs in the same process, i.e. with every architecture cached")
    return PARTLY, f"""**`kt_cache/teachers/timm_source.py`: every timm teacher is built twice — partly fixed.** `resolve` now
   takes its meta-device model and the probed output sizes from a cache keyed by architecture, tag and
   `model_args` (`_meta_model`), so teachers sharing an architecture (fine-tuned checkpoints of one model)
   and a manifest planned again in one process build and probe it once. Open: a real `ktc extract` over
   distinct architectures still builds each model twice, on the meta device in `resolve`, then for real in
   `load`. {plan}; loading them took {oo['load_s']:.2f} s. Both are part of the
   {ex['fixed_s']:.2f} s of one-off cost of this small extraction (ktc / pure forward {fmt_x(ex['targets'][0]['value'])}, marginal {fmt_x(ex['marginal_ratio'])})."""


def metadata(st: dict) -> tuple[str, str]:
    m10, m100 = st["metadata"]
    per_teacher = (m100["root_json_bytes"] - m10["root_json_bytes"]) / (m100["teachers"] - m10["teachers"])
    saved = json.loads((Path(__file__).parent / "results" / "metadata.json").read_text())
    rows = {(row["version"], row["teachers"]): row for row in saved["rows"]}
    n = max(row["teachers"] for row in saved["rows"])
    v1, v2, v3 = (rows[(version, n)] for version in ("v1", "v2", "v3"))
    return FIXED, f"""**Consolidated metadata grew ≈ {per_teacher / 1e3:.0f} kB per teacher — fixed** (`kt_cache/finalize.py`). The first
   run found `feature_stats` written as JSON float lists ({m10['feature_stats_json'] / 1e3:.0f} kB for {m10['model']}'s D = {m10['feature_dim']}) and
   every teacher's own copy of `class_names` ({m10['class_names_json'] / 1e3:.0f} kB for ImageNet-1k), all in the root `zarr.json`
   every reader parses: {m10['root_json_bytes'] / 1e6:.1f} MB at {m10['teachers']} teachers, {m100['root_json_bytes'] / 1e6:.1f} MB at {m100['teachers']}. Store format v2 moved the
   statistics into the array `stats/features` and refers to the dataset's class list; v3 keeps each teacher's
   nodes in its own `zarr.json` and lists the teachers in the root. At {n} teachers ("Metadata per teacher"
   below) the root is {v3['root_json_bytes'] / 1e6:.3f} MB in v3 ({v3['bytes_per_teacher']:.0f} bytes per teacher), against {v2['root_json_bytes'] / 1e6:.1f} MB in v2 and
   {v1['root_json_bytes'] / 1e6:.0f} MB in v1; opening the store and 10 of its teachers takes {v3['open_used_s']:.2f} s ({v2['open_used_s']:.2f} s, {v1['open_used_s']:.2f} s)."""
