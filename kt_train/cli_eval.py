"""``ktc eval``."""

from __future__ import annotations

import json

import click


@click.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False), help="A `ktc train` --out folder.")
@click.option("--data", type=click.Path(file_okay=False), help="Labelled folder: class sub-folders named like the target classes.")
@click.option("--cache", help="Store: also report agreement with the cached teachers' consensus on its images.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="cpu", show_default=True)
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--probe", is_flag=True, help="Also fit a linear probe (logistic regression) on the frozen student's "
              "features over the training store's labelled rows (--cache overrides the store) and report its top-1 "
              "on --data: the measure for methods that train features (kpu).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
def evaluate(checkpoint: str, data: str | None, cache: str | None, batch_size: int, device: str, workers: int,
             probe: bool, as_json: bool) -> None:
    """Evaluate a trained student: top-1/top-5, per-class accuracy, confusion-matrix PNG, teacher agreement."""
    from pathlib import Path

    from kt_train.evaluate import evaluate as run_eval

    metrics = run_eval(Path(checkpoint), Path(data) if data else None, cache, batch_size, device, workers, probe=probe)
    if as_json:
        click.echo(json.dumps(metrics))
        return
    if "top1" in metrics:
        click.echo(f"top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  on {metrics['n']} images "
                   f"(confusion matrix: {Path(checkpoint) / 'confusion.png'})")
    elif data:
        click.echo(f"no readable image in {data}: {metrics['skipped']} skipped, no accuracy to report")
    if "probe" in metrics:
        p = metrics["probe"]
        click.echo(f"linear probe on the frozen features: top-1 {p['top1']} on {p['n']} images "
                   f"(fitted on {p['n_train']} labelled rows of {p['store']})")
    if "note" in metrics:
        click.echo(f"note: {metrics['note']}")
    if "teacher_agreement" in metrics:
        agree = metrics["teacher_agreement"]
        click.echo(f"agreement with the teachers' consensus: {agree.get('consensus')} on {agree.get('n')} store images")
