"""The Training, Storage and Memory sections of docs/benchmarks.md (see ``report_doc.write_doc``)."""

from __future__ import annotations

from report_format import MIB, ONLINE, PLAIN, by_key, by_store, fmt_x, fused_rows, mib, table, teacher_gflops, verdict


def training(tr: dict, me: dict) -> str:
    res, flops, parts = tr["results"], tr["gflops"], tr["parts"]
    kd10, kd100, online = res["ktc kd, 10 cached"], res["ktc kd, 100 cached"], res[ONLINE]
    online_vs, part_keys = online["vs_cached_kd10"], list(next(iter(parts.values())).keys())
    part_rows = [(n, *[f"{1000 * p[k]:.0f}" for k in part_keys], f"{1000 * sum(p.values()):.0f}") for n, p in parts.items()]
    text = f"""## Training

![training](img/bench_train.png)

{table(("loop", "step s", "samples/s", "vs plain CE", "gather + TeacherBatch ms", "method heads"), training_rows(tr))}

Batch {tr['batch_size']}, student resnet18 at {tr['img_size']} px, 1000 classes, AdamW (lr 1e-3, wd 0.05), grad-clip 1;
all loops start from the same weights and see the same 3 batches (from the trainer's own block-shuffled
loader). Teachers ({', '.join(tr['teachers'])}) at {tr['img_size']} px: together
{teacher_gflops(tr):.2f} GFLOPs per image forward, {teacher_gflops(tr) / flops['student resnet18']:.1f}× the student's
{flops['student resnet18']:.3f} (torch.utils.flop_counter).{optimizer_note(tr)}

Where a step's time goes (ms, median of 3 instrumented steps; same work as `train_step`, timed piece by piece):

{table(("loop", *part_keys, "total"), part_rows)}

- **The cache's own cost is small.** `kd` reads the same cached outputs any method does and adds no
  parameters: {fmt_x(kd10['vs_plain_ce'])} of plain CE at 10 teachers and {fmt_x(kd100['vs_plain_ce'])} at 100
  (targets 1.2× / 1.5×: **{verdict(kd10['vs_plain_ce'] <= 1.2)} / {verdict(kd100['vs_plain_ce'] <= 1.5)}**). Reading = gather from RAM + building the TeacherBatch:
  {1000 * kd10['gather_s']:.1f} ms at 10 teachers, {1000 * kd100['gather_s']:.1f} ms at 100 per batch of {tr['batch_size']}, i.e.
  ≈ {1000 * kd100['gather_s'] / 100:.2f} ms per teacher per batch, linear in teachers (see slow spots below).
- **Online KD = {fmt_x(online_vs)} the cached step** (target ≥ 5×: **{verdict(online_vs >= 5)}**): of its
  {online['step_s']:.2f} s per step, {online['teacher_forward_s']:.2f} s is the 10 teachers' forward. This ratio is
  1 + (teachers' forward / student step), so it scales with the teachers' size: only 2 of these 10 are
  base-sized, while roughly 40 % of manifests/imagenet-104.yaml's teachers are base size or larger (ViT-B,
  ConvNeXt-B, CLIP ViT-L/H, …), so at the design point the gap is wider. Loading them also took
  {online['teacher_load_s']:.1f} s and {online['teacher_param_bytes'] / MIB:.0f} MiB of parameters that the cached run never holds.
"""
    uni10, uni100 = res["ktc uniform, 10 cached"], res["ktc uniform, 100 cached"]
    return text + (uniform_miss(tr, me) if uni10["vs_plain_ce"] > 1.2 or uni100["vs_plain_ce"] > 1.5 else "")


def training_rows(tr: dict) -> list[tuple]:
    return [(name, f"{r['step_s']:.3f}", f"{r['samples_per_s']:.0f}", fmt_x(r["vs_plain_ce"]),
             f"{1000 * r['gather_s']:.1f}" if "gather_s" in r else "—",
             mib(r["head_param_bytes"]) if r.get("head_param_bytes") else "—") for name, r in tr["results"].items()]


def optimizer_note(tr: dict) -> str:
    """How the loops built AdamW: older results had fused rows beside a default-AdamW baseline."""
    if fused_rows(tr):
        return " Fused-AdamW rows are compared with a plain CE loop\nthat also uses `AdamW(fused=True)`."
    fused = tr.get("adamw_fused")
    if not fused:
        return ""
    kind = "`AdamW(fused=True)`" if all(fused.values()) else "torch's default AdamW where it cannot fuse"
    return (" Every loop, the plain CE baseline included, builds its optimizer\nas `kt_train.loop.make_optimizer` "
            f"does: {kind}.")


def uniform_miss(tr: dict, me: dict) -> str:
    res, parts, adam = tr["results"], tr["parts"], tr["adamw_probe"]
    uni10, uni100 = res["ktc uniform, 10 cached"], res["ktc uniform, 100 cached"]
    p100, pce = parts["ktc uniform, 100 cached"], parts[PLAIN]
    student = by_key(me)[("ce", 1)]["student_param_bytes"]
    return f"""- **UNIFORM misses: {fmt_x(uni10['vs_plain_ce'])} at 10 teachers, {fmt_x(uni100['vs_plain_ce'])} at 100.** The cost is the
  method's own per-teacher heads, not the cache: UNIFORM gives every teacher an MLP encoder (d_t → D → D) and
  decoder (D → D → d_t) at width D = 512, i.e. {uni10['head_param_bytes'] / MIB:.0f} MiB of trained parameters at 10 teachers
  ({uni10['head_param_bytes'] / 4 / 1e6:.1f} M, vs the student's {student / 4 / 1e6:.1f} M) and {uni100['head_param_bytes'] / MIB:.0f} MiB
  ({uni100['head_param_bytes'] / 4 / 1e6:.0f} M) at 100. Per step at 100 teachers the heads' forward takes
  {1000 * p100['method forward']:.0f} ms, their backward adds {1000 * (p100['backward'] - pce['backward']):.0f} ms and AdamW over them
  {1000 * (p100['clip + AdamW'] - pce['clip + AdamW']):.0f} ms, against the student's whole step of {1000 * sum(pce.values()):.0f} ms; the read
  path is {1000 * p100['read: gather + TeacherBatch']:.0f} ms. Online UNIFORM would pay the same heads plus the teachers.
{uniform_fixes(tr) if fused_rows(tr) else uniform_remaining(adam)}"""


def uniform_fixes(tr: dict) -> str:
    """Older results: fused AdamW measured as a proposed fix, against the default-AdamW baseline."""
    adam, res = tr["adamw_probe"], tr["results"]
    fused100, ce = res.get("ktc uniform, 100 cached, fused AdamW"), res[PLAIN]["step_s"]
    return f"""  What would close it: (1) AdamW with `fused=True` in `kt_train.loop.make_optimizer` (on CPU torch's
  default is the per-tensor for-loop implementation): measured here on the student + heads of 100 teachers
  ({adam['tensors']} tensors, {adam['parameters'] / 1e6:.0f} M parameters), one step takes {adam['default']:.2f} s by default,
  {adam['foreach']:.2f} s with `foreach=True`, {adam['fused']:.2f} s with `fused=True`; in the loop above it brings UNIFORM at 100 to
  {fmt_x(fused100['step_s'] / ce) if fused100 else '—'} of the default plain CE step
  ({fmt_x(fused100['vs_plain_ce']) if fused100 else '—'} of a fused plain CE step); (2) smaller heads (the `hidden`
  option, or shared encoder trunks); (3) an accelerator, where the heads' matmuls over a batch are tiny
  next to a student at 224 px (not measurable here: no GPU in this session).
"""


def uniform_remaining(adam: dict) -> str:
    return f"""  AdamW already runs fused (`kt_train.loop.make_optimizer`; on the student + heads of 100 teachers,
  {adam['tensors']} tensors and {adam['parameters'] / 1e6:.0f} M parameters, one step takes {adam['fused']:.2f} s fused vs
  {adam['default']:.2f} s with torch's default and {adam['foreach']:.2f} s with `foreach=True`). What would close the rest:
  (1) smaller heads (the `hidden` option, or shared encoder trunks); (2) an accelerator, where the heads'
  matmuls over a batch are tiny next to a student at 224 px (not measurable here: no GPU in this session).
"""


def storage(st: dict) -> str:
    lite = {r["layout"]: r for r in st["bytes"] if r["C_t"] == 1000}
    c10 = {r["layout"]: r for r in st["bytes"] if r["C_t"] == 10}
    full = lite["full fp16"]
    return f"""## Storage

![storage](img/bench_storage.png)

Bytes per sample-view-teacher as stored (zstd level 1 chunks on disk, metadata excluded), with every
array a logit layout needs: full `logits`, or `logits_topk/values` + `/index`, plus `logits_lse` and
`label_logit`. Raw fp32 = C_t × 4 bytes. {st['sample_views']} sample-views (12 photos × {st['views']} views).

{table(("teacher", "C_t", "layout", "stored B", "uncompressed B", "raw fp32 B", "of raw", "per array (stored B)"), byte_rows(st))}

- For an ImageNet teacher (1000 classes, real weights) top-k costs 4 bytes per kept logit (fp16 value + uint16
  index) + 8 bytes (LSE + true-class logit, fp32): top-20 = {lite['top-20']['stored_bytes']:.0f} B =
  **{100 * lite['top-20']['fraction']:.1f} %** of raw fp32, top-5 {100 * lite['top-5']['fraction']:.1f} %, top-1
  {100 * lite['top-1']['fraction']:.1f} %; full fp16 logits are {100 * full['fraction']:.1f} % (zstd gains
  little on fp16 logits). Every top-k ≤ 20 is far inside the 25 % target; which k keeps accuracy within
  0.5 point is the digits benchmark's measurement.
- Features (D = {full['features_raw_fp32'] // 4}): {full['features_bytes']:.0f} B stored vs
  {full['features_raw_fp32']} B raw fp32 ({100 * full['features_bytes'] / full['features_raw_fp32']:.0f} %;
  EfficientNet's post-ReLU6 features have many zeros).
- Where top-k stops paying: with 10 classes (the digits scale) the 8 bytes of LSE + true-class logit
  dominate: top-1 is {100 * c10['top-1']['fraction']:.0f} %, top-5 {100 * c10['top-5']['fraction']:.0f} % and full fp16
  {100 * c10['full fp16']['fraction']:.0f} % of raw fp32. Top-1 + LSE + true-class logit (12 B) exceed 25 % of raw fp32
  below 12 classes, so no layout that keeps the LSE meets the target there; the absolute sizes
  ({c10['top-1']['stored_bytes']:.0f}–{c10['full fp16']['stored_bytes']:.0f} B per sample-view) are negligible anyway.

{storage_reads(st)}"""


def byte_rows(st: dict) -> list[tuple]:
    rows = []
    for r in st["bytes"]:
        parts = ", ".join(f"{k.replace('logits_topk/', 'topk/')} {v:.1f}" for k, v in r["parts"].items())
        rows.append((r["teacher"], r["C_t"], r["layout"], f"{r['stored_bytes']:.1f}", r["logical_bytes"],
                     r["raw_fp32_bytes"], f"{100 * r['fraction']:.1f} %", parts))
    return rows


def read_rows(st: dict) -> list[tuple]:
    naive = st["naive_random_rows"]
    rows = [(r["store"], r["teachers"], f"{1000 * r['load_s']:.0f}", f"{r['ram_table_bytes'] / 1e6:.2f}",
             f"{r['gather_rows_per_s']:,.0f}", f"{r['gather_MBps']:,.0f}", f"{r['to_teacher_batch_ms']:.1f} ({r['batch']})")
            for r in st["reads"]]
    rows.append(("same featmaps, naive: one zarr read per random (row, view)", 1, "—", "—",
                 f"{naive['rows_per_s']:,.0f}", f"{naive['MBps']:.1f}", "—"))
    return rows


def storage_reads(st: dict) -> str:
    reads, naive = by_store(st), st["naive_random_rows"]
    one, r10, r100 = (reads["2048 images, features + top-20 (RAM)"], reads["train benchmark, 10 teachers"],
                      reads["train benchmark, 100 teachers"])
    block = reads["2048 images, featmaps via BlockCache"]
    return f"""**Reads** (`kt_train.data.CachedTeachers`; gather = `gather` over batches of up to 256 rows in the trainer's
block-shuffled order, 3 epochs; load = building CachedTeachers, i.e. whole-array reads into RAM):

{table(("store", "teachers", "load ms", "RAM MB", "gather rows/s", "gather MB/s", "to_teacher_batch ms (rows)"), read_rows(st))}

- A row is one sample-view with the outputs of all the store's teachers. Features + top-k in RAM:
  gathering is a numpy fancy-index per teacher and array — {one['gather_rows_per_s'] / 1e6:.1f} M rows/s for one
  teacher, {r10['gather_rows_per_s'] * 10 / 1e6:.1f} M and {r100['gather_rows_per_s'] * 100 / 1e6:.1f} M teacher-rows/s at 10 and 100 teachers (that store has 48
  images, so its batches are 48 rows and per-call overhead shows); loading costs
  ≈ {r100['load_ms_per_teacher']:.0f} ms per teacher at this size (metadata and array checks dominate).
  Turning gathered rows into the `TeacherBatch` (scatter of top-k into the 1000-class space, per teacher)
  costs more than the gather: {r100['to_teacher_batch_ms']:.0f} ms for
  {r100['batch']} rows at 100 teachers.
- Featmaps larger than the RAM budget go through the BlockCache: {block['gather_rows_per_s']:,.0f} rows/s
  ({block['gather_MBps']:.0f} MB/s of decoded maps), **{block['gather_rows_per_s'] / naive['rows_per_s']:.0f}×** the naive one-zarr-read-per-row
  path ({naive['rows_per_s']:,.0f} rows/s), with {sum(block['block_reads'].values())} block reads of {block['block_rows']} rows in 3 epochs of
  {block['blocks_per_epoch']} blocks: every block read exactly once per epoch.
"""


def memory(st: dict, me: dict) -> str:
    mem, n = by_key(me), memory_numbers(me)
    u1, u100, per_row = mem[("uniform", 1)], mem[("uniform", 100)], me["table_bytes_per_teacher_sample_view"]
    rows = [(r["method"], r["teachers"], mib(r["peak_rss"]), f"{(r['peak_rss'] - mem[('ce', 1)]['peak_rss']) / MIB:+.0f} MiB",
             f"{r['head_param_bytes'] / MIB:.1f} MiB", mib(r["heads_training_state"]), f"{r['saved_method'] / MIB:.1f} MiB",
             f"{r['table_bytes'] / MIB:.2f} MiB", mib(r["residual"])) for r in me["results"]]
    uni_tables = u100["table_bytes"] - u1["table_bytes"]
    return f"""## Memory

![memory](img/bench_memory.png)

{table(("method", "teachers", "peak RSS", "vs ce", "head params", "heads training state", "method activations", "RAM tables", "residual"), rows)}

Fresh process per row (twice; the lower peak is kept); `build_run` + 3 `train_step`s on the trainer's loader (workers 0, batch 16,
resnet18 at 64 px). Heads' training state = parameters + gradients + AdamW's two moments (+ buffers),
measured from the live tensors (4× the parameter bytes); method activations = bytes autograd keeps for
the method's backward (saved-tensor hooks, parameters excluded); residual = peak − both.

- **kd (no heads): {100 * me['targets'][0]['value']:+.1f} %** from 1 to 100 teachers ({n['kd_growth'] / MIB:+.0f} MiB,
  ≈ {n['kd_growth'] / MIB / 99 * 1024:.0f} KiB per teacher) — **{verdict(me['targets'][0]['pass'])}** against a flat-within-5 % reading
  (peak RSS of identical runs varies by 10–20 MiB). Where it goes: opening the store, i.e. parsing its
  {st['metadata'][1]['root_json_bytes'] / 1e6:.1f} MB root document, {n['kd_open'] / MIB:+.0f} MiB (slow spot 6); the rest of building the run
  {n['kd_build'] / MIB:+.0f} MiB (per-teacher array handles, the `done` and table reads, label maps; the tables themselves
  {n['kd_tables'] / MIB:.1f} MiB); the training steps {n['kd_steps'] / MIB:+.0f} MiB (per-teacher [B, 1000] logit tensors of the
  TeacherBatch and the loss). None of it grows with the dataset except the tables.
- **uniform: {100 * me['targets'][1]['value']:+.1f} %** ({n['uni_growth'] / MIB:+.0f} MiB, ≈ {n['uni_growth'] / MIB / 99:.1f} MiB per teacher) after removing its
  {mib(u100['heads_training_state'])} of heads' state and {u100['saved_method'] / MIB:.0f} MiB of activations —
  **{verdict(me['targets'][1]['pass'])}**. Of that, {uni_tables / MIB:.0f} MiB is the larger RAM table (UNIFORM also loads
  features), {n['build_extra'] / MIB:.0f} MiB appears while building the run ({(u100['rss_open_store'] - u1['rss_open_store']) / MIB:.0f} MiB of it the root document, the
  rest modules, z-score buffers, init temporaries), the rest ({(n['uni_growth'] - n['build_extra'] - uni_tables) / MIB:.0f} MiB) during the steps: transient gradient and
  optimizer temporaries of the heads and allocator high-water (kd, reading the same store without heads,
  adds {n['kd_steps'] / MIB:.0f} MiB during its steps). It scales with the heads, not with reading the store; with the
  heads counted in full, peak RSS grows from {mib(u1['peak_rss'])} to {mib(u100['peak_rss'])}.
- **At scale the RAM tables are the real limit.** They hold {per_row:.0f} B per teacher per sample-view here
  (features fp16 + top-20 + LSE); for ImageNet-1k (1.28 M images × 4 views) that is
  {per_row * 1.28e6 * 4 / 2**30:.1f} GiB per teacher, {per_row * 1.28e6 * 4 * 100 / 2**30:.0f} GiB for 100 teachers. When these results were measured
  `CachedTeachers` loaded features and top-k into RAM whatever `--ram-budget-gb` said; it now streams what
  exceeds the budget (slow spot 2, and the streaming section at the end of this page).
"""


def memory_numbers(me: dict) -> dict[str, float]:
    """Growth from 1 to 100 teachers, split by phase (bytes)."""
    mem = by_key(me)
    u1, u100, k1, k100 = mem[("uniform", 1)], mem[("uniform", 100)], mem[("kd", 1)], mem[("kd", 100)]
    kd_open = k100["rss_open_store"] - k1["rss_open_store"]
    kd_after_build = k100["rss_after_build"] - k1["rss_after_build"]
    build_extra = ((u100["rss_after_build"] - u1["rss_after_build"]) - (u100["head_param_bytes"] - u1["head_param_bytes"])
                   - (u100["head_buffer_bytes"] - u1["head_buffer_bytes"]) - (u100["table_bytes"] - u1["table_bytes"]))
    return {"kd_open": kd_open, "kd_tables": k100["table_bytes"] - k1["table_bytes"], "kd_build": kd_after_build - kd_open,
            "kd_steps": (k100["peak_rss"] - k1["peak_rss"]) - kd_after_build, "kd_growth": k100["residual"] - k1["residual"],
            "uni_growth": u100["residual"] - u1["residual"], "build_extra": build_extra}
