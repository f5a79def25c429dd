"""``ktc extract``: options -> ``kt_cache.extract`` -> a printed plan or run summary."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from kt_cache.extract import ExtractOptions, parse_bytes
from kt_cache.info import shard_count


@click.command()
@click.option("--manifest", "-m", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Teachers manifest (YAML, data only); see docs/manifest.md.")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Store path; overrides the manifest's `store`.")
@click.option("--dry-run", is_flag=True, help="Resolve every teacher offline and print the plan; load no weights.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Images per decode batch (each with all its views); teachers split it by their own batch_size.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0), help="DataLoader decode workers.")
@click.option("--limit", type=click.IntRange(min=1), help="Use only N samples (the first N rows of the recorded order).")
@click.option("--only", multiple=True, metavar="ID", help="Run only these teacher ids (repeatable).")
@click.option("--overwrite", multiple=True, metavar="ID", help="Recompute these teachers even if stored (repeatable).")
@click.option("--max-teacher-memory", default="8GB", show_default=True,
              help="Parameter memory per wave; teachers beyond it run in later passes over the data.")
@click.option("--cluster", metavar="local:N", help="Run units as tasks on a new dask LocalCluster of N workers.")
@click.option("--scheduler", metavar="ADDRESS", help="Run units as tasks on a running dask cluster (tcp://HOST:8786).")
@click.option("--strict", is_flag=True, help="Fail at the first unreadable image instead of recording it.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--force-unlock", is_flag=True, help="Remove the store's lock (<store>.ktc-lock) left by a writer "
              "you know is gone, then run.")
def extract(manifest: Path, out: Path | None, dry_run: bool, device: str, batch_size: int, workers: int,
            limit: int | None, only: tuple[str, ...], overwrite: tuple[str, ...], max_teacher_memory: str,
            cluster: str | None, scheduler: str | None, strict: bool, no_progress: bool,
            force_unlock: bool) -> None:
    """Run the manifest's teachers once over the dataset and write one Zarr v3 store.

    Rerunning the same command resumes; a manifest with more teachers adds only the new ones.
    """
    from kt_cache.extract import build_plan, run_extract

    options = ExtractOptions(manifest=manifest, out=out, device=device, batch_size=batch_size, workers=workers,
                             limit=limit, only=only, overwrite=overwrite, strict=strict, dry_run=dry_run,
                             max_teacher_memory=parse_bytes(max_teacher_memory), progress=not no_progress,
                             cluster=cluster, scheduler=scheduler, force_unlock=force_unlock)
    if dry_run:
        click.echo(format_plan(build_plan(options)))
        return
    report = run_extract(options)
    click.echo(format_report(report))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def output_shapes(plan, n: int, views: int) -> list[tuple[str, tuple[int, ...], str, int]]:
    from kt_cache.store import teacher_array_specs

    return [(s.path, (n, *s.row_shape), s.dtype, n * s.row_bytes) for s in teacher_array_specs(plan, views)]


def format_plan(plan) -> str:
    """The dry-run plan: dataset, views, teachers with shapes, waves, estimated store size."""
    from kt_cache.hub import weights_warning

    views = plan.manifest.views
    lines = [f"store     {plan.out}",
             f"dataset   {plan.listing.description.get('kind')} {plan.listing.root}{shard_count(plan.listing.description)}: {plan.n_samples} images "
             f"({len(plan.listing.ids)} listed, {len(plan.listing.ignored)} non-image files ignored), "
             f"{len(plan.listing.class_names)} target classes",
             f"views     {views.count} per image (view 0 centre crop {views.center_crop}, seed {views.seed})",
             f"teachers  {len(plan.plans)}"]
    total, vectors = 0, {}
    for p in plan.plans:
        lines.append(f"  {p.id}  [{p.spec.source} {p.spec.model}, {p.spec.role}]  input {p.input_size[1]}x"
                     f"{p.input_size[2]} {p.interpolation}  weights {p.weights}  params {human_bytes(p.param_bytes)}")
        lines += coverage_lines(p, plan.listing.class_names)
        lines += [f"      {text}" for text in [weights_warning(p)] if text]
        for path, shape, dtype, nbytes in output_shapes(p, plan.n_samples, views.count):
            lines.append(f"      {path:<20} {str(list(shape)):<24} {dtype:<8} {human_bytes(nbytes)}")
            total += nbytes
            if path in ("features", "featmap"):
                vectors[f"{p.id}/{path}"] = (int(np.prod(shape[:-1], dtype=np.int64)), int(shape[-1]))
    lines.append(f"waves     {len(plan.waves)}")
    for i, wave in enumerate(plan.waves, 1):
        lines.append(f"  wave {i}: {', '.join(p.id for p in wave)} "
                     f"({human_bytes(sum(p.param_bytes for p in wave))} of parameters)")
    lines.append(f"estimated store size  {human_bytes(total)} before compression (zstd usually saves 5-30 %)")
    if vectors:
        from kt_cache.codecs import size_table

        sizes = " · ".join(f"{name} {human_bytes(n)}" for name, n in size_table(vectors).items())
        lines.append(f"features and featmaps under each codec of `ktc compact`: {sizes}")
    return "\n".join(lines)


def coverage_text(target: tuple[str, ...], teacher: tuple[str, ...] | None) -> str:
    """``covers 2/3 target classes (missing: cat)`` for a teacher's logits."""
    from kt_cache.classes import coverage

    covered, missing = coverage(target, teacher)
    shown = f" (missing: {', '.join(missing[:5])}{', …' if len(missing) > 5 else ''})" if missing else ""
    return f"covers {covered}/{len(target)} target classes{shown}"


def coverage_lines(plan, target: tuple[str, ...]) -> list[str]:
    """The dry-run's coverage line for a teacher with logits, and the warning for a predictive teacher
    whose logits name none of the target classes (its logits cannot vote; train refuses it)."""
    if not target or "logits" not in plan.spec.outputs or not plan.num_classes:
        return []
    lines = [f"      {coverage_text(target, plan.class_names)}"]
    if plan.spec.role == "predictive" and lines[0].strip().startswith("covers 0/"):
        lines.append(f"      warning: teacher {plan.id} is predictive but its logits name none of the "
                     f"{len(target)} target classes. Fix: give it `classes:` in the target label space (names, "
                     "WordNet ids or synonyms), set `role: descriptive`, or leave it out at training with --teachers.")
    return lines


def store_size_line(plan) -> str:
    """Bytes on disk, counted as ``ktc info`` counts them (``kt_cache.info.folder_bytes``), beside the dry-run's
    estimate before compression, so the two commands never disagree about what a store holds."""
    from kt_cache.info import folder_bytes

    on_disk = folder_bytes(Path(plan.out)) or 0
    views = plan.manifest.views.count
    estimate = sum(nbytes for p in plan.plans for *_, nbytes in output_shapes(p, plan.n_samples, views))
    return (f"size      {human_bytes(on_disk)} on disk (as `ktc info` reports it); the teachers' arrays are "
            f"{human_bytes(estimate)} before compression (the --dry-run estimate)")


def format_report(report) -> str:
    """Run summary: per-teacher timing table, failures, throughput."""
    if report.rows == 0 and set(report.statuses.values()) <= {"resumed"}:
        lines = [f"store {report.plan.out}: complete, nothing to do: every unit of its {len(report.statuses)} "
                 "teacher(s) in this manifest is done and its objects match ktc-objects.json"]
    else:
        lines = [f"store {report.plan.out}: {report.rows} images processed in {report.wall_s:.1f} s "
                 f"({report.rows / report.wall_s if report.wall_s else 0:.1f} images/s over all waves)"]
    lines.append(f"{'teacher':<28} {'status':<10} {'load s':>8} {'forward s':>10} {'views':>8} {'views/s':>9}")
    for teacher_id, status in report.statuses.items():
        t = report.timings.get(teacher_id, {})
        lines.append(f"{teacher_id:<28} {status:<10} {t.get('load_s', 0):>8.2f} {t.get('forward_s', 0):>10.2f} "
                     f"{t.get('images', 0):>8} {t.get('images_per_s', 0):>9.1f}")
    target = report.plan.listing.class_names
    lines += [f"{p.id}: {coverage_text(target, p.class_names)}" for p in report.plan.plans
              if target and "logits" in p.spec.outputs and p.num_classes]
    if report.failures:
        lines.append(f"{len(report.failures)} images could not be decoded (recorded as samples/ok = false; "
                     "their outputs are NaN):")
        lines += [f"  {sample}: {reason}" for sample, reason in list(report.failures.items())[:20]]
    lines.append(store_size_line(report.plan))
    return "\n".join(lines)
