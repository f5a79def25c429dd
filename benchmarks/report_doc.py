"""The text of docs/benchmarks.md, from the four benchmarks' results (benchmarks/results/*.json).

``write_doc(ex, tr, st, me, durations)`` returns the page, one function per section, joined by blank lines:
intro, methodology, summary and extraction here; training, storage and memory in ``report_sections``; the
slow spots in ``report_spots``. Every number on the page comes from the results; ``run_all.py`` calls it.
"""

from __future__ import annotations

from report_format import ONLINE, by_store, first, fmt_x, mib, table, teacher_gflops, verdict
from report_sections import memory, storage, training
from report_spots import slow_spots


def write_doc(ex: dict, tr: dict, st: dict, me: dict, durations: dict[str, float]) -> str:
    sections = (intro(durations), methodology(ex, tr, st, me, durations), summary(ex, tr, st, me), extraction(ex),
                training(tr, me), storage(st), memory(st, me), slow_spots(ex, tr, st, me), REPRODUCING)
    return "\n".join(sections)


def intro(durations: dict[str, float]) -> str:
    took = {name: f"{durations.get(name, float('nan')):.0f} s" for name in ("extract", "train", "storage", "memory")}
    return f"""# Benchmarks

What `ktc` costs and saves, measured side by side in one run on this machine. Every number below comes
from `python benchmarks/run_all.py` (it runs the four scripts one after the other, then writes this page
and the plots); each script also runs alone and prints its own table and verdicts:

| script | measures | took |
|---|---|---|
| `benchmarks/bench_extract.py` | `ktc extract` wall vs the teachers' pure forward time vs the naive way | {took['extract']} |
| `benchmarks/bench_train.py` | step time of `ktc train` vs plain CE vs online multi-teacher KD | {took['train']} |
| `benchmarks/bench_storage.py` | bytes per sample-view-teacher; read throughput of the trainer's reader | {took['storage']} |
| `benchmarks/bench_memory.py` | trainer peak RSS vs number of cached teachers, heads separated | {took['memory']} |

Raw numbers: `benchmarks/results/*.json` (and the console logs `*.log`). Inputs are built under
`/tmp/ktc-bench` (`KTC_BENCH_WORK` overrides) and reused between scripts.
"""


def methodology(ex: dict, tr: dict, st: dict, me: dict, durations: dict[str, float]) -> str:
    m, probe = tr["machine"], tr["small_op_probe"]
    minutes = sum(durations.values()) / 60 if durations else float("nan")
    return f"""## Methodology

- **Machine.** {m['cpu_count']} CPU cores, no GPU, torch {m['torch']}, Python {m['python']}, {m['platform']}. The
  machine is shared: other engineers' jobs ran at the same time (load average at the start / end of each
  script: extract {first(ex['load_before'])} / {first(ex['load_after'])},
  train {first(tr['load_before'])} / {first(tr['load_after'])},
  storage {first(st['load_before'])} / {first(st['load_after'])},
  memory {first(me['load_before'])} / {first(me['load_after'])}; 1-minute averages on 2 cores).
- **One intra-op thread** (`torch.set_num_threads(1)`, every script's `--threads` default). With the
  default 2 threads on this oversubscribed 2-core machine, ops wait for descheduled OpenMP threads:
  measured in the training run, the student's forward on a batch of 32 took
  {probe['student_forward_s_1t']:.3f} s with 1 thread and {probe['student_forward_s_2t']:.3f} s with 2, a [16, 1000] logit
  scatter {probe['scatter_full_logits_ms_1t']:.2f} ms vs {probe['scatter_full_logits_ms_2t']:.2f} ms (earlier, under heavier load, 2 threads were
  3–6× slower than 1 on whole training steps). One thread gives stable, comparable numbers; ratios, not
  absolute speeds, are the result. DataLoader workers (extraction's decode) use the other core.
- **Side by side.** The ways being compared run in the same process on the same inputs, interleaved:
  training configurations round-robin step by step ({tr['warmup']} untimed warm-up round, then {tr['steps']} timed
  rounds, medians); extraction runs the three ways in {len(ex['ratios'])} rounds with alternating order
  (pure → ktc → naive, then naive → ktc → pure), ratio taken inside each round, median reported.
- **Teachers.** No model hub here, so teachers are random-init timm models of real architectures
  (their compute, parameter count and output shapes are those of the pretrained ones), each with 1000
  ImageNet logits stored as top-20 + LSE and its pooled features. The storage benchmark's logits come from
  real ImageNet weights (EfficientNet-Lite0, installed with ktc) on real photos (scikit-image's).
- **Images.** `tests/extract_helpers.make_image_folder` (3 classes named after ImageNet classes so the
  target label space is ImageNet-1k), upscaled to a photo-like 256–400 px shorter side for extraction
  (160–256 px for training), JPEG and PNG.
- **100 teachers.** Extracting 100 teachers on this CPU would take most of an hour, so the 100-teacher
  store is **synthetic**: the 10 real teacher groups of the training store, each copied 10× under new
  ids (`s000`…`s099`) and finalized like `ktc extract` does (consolidated metadata, `ktc-objects.json`).
  What the trainer reads (100 teachers' features, top-k, LSE) and what the methods build (100 sets of
  heads) are exactly those of 100 teachers; only the teachers' compute is not re-done. The 1-teacher store
  of the memory benchmark is made the same way.
- **Sizes** are small so that all four scripts finish in about {minutes:.0f} minutes from scratch (building the stores included)
  on this CPU: extraction {ex['n_images']} images × {ex['views']} views × 8 teachers at 96/112 px; training batch
  {tr['batch_size']}, student resnet18 at {tr['img_size']} px with 1000 classes, {len(tr['teachers'])} teachers at {tr['img_size']} px.
"""


def summary(ex: dict, tr: dict, st: dict, me: dict) -> str:
    rows = [*summary_extraction(ex), *summary_training(tr), *summary_storage(st), *summary_memory(me)]
    return f"""## Summary

{table(("area", "target", "measured", "verdict", "note"), rows)}

Verdicts marked — are comparisons the issue asks for without a numeric target. The storage targets need
the accuracy side from the digits benchmark (`benchmarks/digits/`, another engineer's): it decides which
top-k stays within 0.5 point; every top-k measured here, up to k = 20, is far below 25 % of raw fp32.
"""


def row(area: str, target: str, value: str, ok: bool | None, note: str = "") -> tuple:
    return area, target, value, "—" if ok is None else verdict(ok), note


def summary_extraction(ex: dict) -> list[tuple]:
    ratio = ex["targets"][0]["value"]
    return [row("extraction", "`ktc extract` wall ≤ 1.1× Σ pure forward (8 teachers)", fmt_x(ratio), ratio <= 1.1,
                f"marginal (one-off costs removed) {fmt_x(ex['marginal_ratio'])}"),
            row("extraction", "vs naive (one decode+forward pass per teacher)", f"naive = {fmt_x(ex['naive_vs_ktc'])} ktc",
                None, "CPU: compute-bound, decode hidden")]


def summary_training(tr: dict) -> list[tuple]:
    res, rows = tr["results"], []
    for label, target in (("kd, 10 cached", 1.2), ("uniform, 10 cached", 1.2), ("kd, 100 cached", 1.5),
                          ("uniform, 100 cached", 1.5)):
        r = res[f"ktc {label}"]
        rows.append(row("training", f"`ktc train` ({label}) step ≤ {target}× plain CE step", fmt_x(r["vs_plain_ce"]),
                        r["vs_plain_ce"] <= target,
                        "" if r["head_param_bytes"] == 0 else f"heads {mib(r['head_param_bytes'])} of params"))
    online_vs = res[ONLINE]["vs_cached_kd10"]
    rows.append(row("training", "cached ≥ 5× faster than online KD, 10 teachers", fmt_x(online_vs), online_vs >= 5,
                    f"teachers = {teacher_gflops(tr) / tr['gflops']['student resnet18']:.0f}× the student's forward FLOPs"))
    return rows


def summary_storage(st: dict) -> list[tuple]:
    reads, naive = by_store(st), st["naive_random_rows"]
    block = reads["2048 images, featmaps via BlockCache"]
    rows = [row("storage", f"{t['what'].replace('logit bytes, ', '')} ≤ 25 % (accuracy: digits benchmark)",
                f"{100 * t['value']:.1f} %", t["pass"]) for t in st["targets"]]
    rows.append(row("storage", "reader: CachedTeachers gather (10 teachers, RAM)",
                    f"{reads['train benchmark, 10 teachers']['gather_rows_per_s']:,.0f} rows/s", None))
    rows.append(row("storage", "reader: featmaps through the BlockCache", f"{block['gather_rows_per_s']:,.0f} rows/s", None,
                    f"{block['gather_rows_per_s'] / naive['rows_per_s']:.0f}× naive random-row reads"))
    return rows


def summary_memory(me: dict) -> list[tuple]:
    return [row("memory", f"{t['what'].split(':')[0]}: peak RSS flat 1 → 100 teachers apart from the heads",
                f"{100 * t['value']:+.1f} %", t["pass"],
                f"{mib(t['detail']['residual_1'])} → {mib(t['detail']['residual_100'])}") for t in me["targets"]]


def extraction(ex: dict) -> str:
    med, n_img = ex["median"], ex["n_images"]
    pure, ratio, marginal = med["pure"]["wall_s"], ex["targets"][0]["value"], ex["marginal_ratio"]
    one_key, all_keys = ex["decode_pass_one_key_s"], ex["decode_pass_all_keys_s"]
    text = f"""## Extraction

![extraction](img/bench_extract.png)

{table(("way", "wall s", "vs pure forward", "model load s", "forward s (own timer)"), extraction_rows(ex))}

{n_img} images × {ex['views']} views, 8 teachers ({', '.join(ex['teachers'])}) at {len(ex['resize_keys'])} resize keys
{', '.join(str(tuple(k)) for k in ex['resize_keys'])}; `ktc extract --workers {ex['workers']} --batch-size 32`, teacher
batch 64 views; medians of {len(ex['ratios'])} rounds (ktc / pure per round: {', '.join(f'{x:.2f}' for x in ex['ratios'])};
naive / ktc per round: {', '.join(f'{x:.2f}' for x in ex['naive_vs_ktc_rounds'])}).

- **ktc / pure forward = {fmt_x(ratio)}** (target ≤ 1.1×: **{verdict(ratio <= 1.1)}**). Without the
  one-off model loading {fmt_x(ex['targets'][1]['value'])}. The same extraction on 1 image (`--limit 1`: plan, store creation,
  model loading, finalize — everything that does not grow with the data) takes **{ex['fixed_s']:.2f} s**; the
  marginal ratio (wall − one-off costs) / pure forward is **{fmt_x(marginal)}**, the ratio a real dataset
  converges to. With these teachers the whole-run ratio reaches 1.1× from about
  {ex['images_for_target']:,.0f} images ({ex['pure_forward_per_image_s'] * 1000:.0f} ms of pure forward per image, all views and teachers).
{one_off(ex)}
- **Naive / ktc = {fmt_x(ex['naive_vs_ktc'])}.** On this CPU the teachers' compute dwarfs decoding: one
  single-process decode + view pass over the {n_img} images costs {one_key:.2f} s for one
  resize key (the naive way repeats it per teacher, 8×) and {all_keys:.2f} s for all
  {len(ex['resize_keys'])} keys (ktc, once) — {100 * 8 * one_key / pure:.0f} % of the forward time
  in total, and the 2 decode workers hide it behind the forward on the other core. The naive way's cost
  shows where the forward is cheap relative to decoding, i.e. on an accelerator: there the wall time
  tends to the decode time, {8 * one_key:.2f} s (naive) vs {all_keys:.2f} s (ktc)
  of single-core decoding per pass here, a {8 * one_key / all_keys:.1f}× gap. That is
  a projection from measured decode times, not a GPU measurement (no GPU was available to this run).
- The `ktc` command adds {ex['cli_startup_s']:.1f} s of interpreter and imports before any of this (not in the walls).
"""
    return text + (extraction_miss(ex) if ratio > 1.1 else "")


def extraction_rows(ex: dict) -> list[tuple]:
    med = ex["median"]
    pure, ktc, naive = med["pure"]["wall_s"], med["ktc"], med["naive"]
    return [("pure forward, Σ 8 teachers (the floor)", f"{pure:.2f}", "1.00×", "—", f"{pure:.2f}"),
            ("**ktc extract**", f"{ktc['wall_s']:.2f}", fmt_x(ex["targets"][0]["value"]), f"{ktc['load_s']:.2f}",
             f"{ktc['forward_s']:.2f}"),
            ("naive: one decode+forward pass per teacher", f"{naive['wall_s']:.2f}", fmt_x(naive["wall_s"] / pure),
             f"{naive['load_s']:.2f}", f"{naive['forward_s']:.2f}")]


def one_off(ex: dict) -> str:
    """Where the one-off seconds go. Results with ``plan_cached_s`` were timed with ktc's per-process caches
    emptied before each run (bench_extract.cold_caches); older ones predate the caches."""
    oo = ex["one_off_parts"]
    rest = f"""loading the 8 random-init teachers {oo['load_s']:.2f} s; the rest
  (store creation, finalize with per-teacher feature statistics and object hashes, the DataLoader's first batch)
  {ex['fixed_s'] - oo['plan_s'] - oo['load_s']:.2f} s."""
    if "plan_cached_s" not in oo:
        return f"""- Where the one-off seconds go (pieces timed alone): planning, i.e. resolving the 8 teachers offline on
  the meta device, {oo['plan_s']:.2f} s (each timm model is built there, then built again by `load`; every
  teacher re-derives `classes: imagenet-1k` and scans it twice for duplicates in O(C²),
  {1000 * oo['resolve_class_names_s']:.0f} ms a time); {rest}"""
    return f"""- Where the one-off seconds go (pieces timed alone): planning, i.e. resolving the 8 teachers offline on
  the meta device, {oo['plan_s']:.2f} s from cold (each timm model is built there, then built again by `load`:
  slow spot 5; {oo['plan_cached_s']:.2f} s when every architecture is already cached; the ImageNet-1k class list
  is cached too, {1000 * oo['resolve_class_names_s']:.2f} ms per teacher); {rest}"""


def extraction_miss(ex: dict) -> str:
    if "plan_cached_s" in ex["one_off_parts"]:
        close = """build each distinct timm model once: `resolve` builds it on the meta device and `load` again for
  real (slow spot 5; repeated architectures and the class list are already cached)."""
    else:
        close = """build each timm model once (resolve and load both build it), cache `imagenet_1k_names()` and make the
  duplicate check O(C) (`kt_cache/classes.py`), and skip the separate meta-device probe when the real model
  is built anyway."""
    return f"""- **Why the miss, and what closes it.** The gap is one-off cost, not per-image overhead: the marginal
  ratio is {fmt_x(ex['marginal_ratio'])}. At {ex['n_images']} images the {ex['fixed_s']:.1f} s of one-off work is {100 * ex['fixed_s'] / ex['median']['pure']['wall_s']:.0f} % of
  the forward time; at the design point (100k+ images) it is negligible. To pass at this size:
  {close}
"""


REPRODUCING = """## Reproducing

Minutes of CPU each, so not run by the test suite (`tests/test_docs.py` runs every `bash` block of the docs;
these are `console` blocks):

```console
python benchmarks/run_all.py            # all four, then this page and docs/img/bench_*.png
python benchmarks/bench_train.py --steps 6 --threads 2   # any one alone, with its own options
python benchmarks/run_all.py --doc-only # rewrite this page from benchmarks/results/*.json
python benchmarks/compact.py --doc      # ktc compact's codecs and students (its own run: ~15 min)
```
"""
