"""``ktc demo``."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the store and the student run.")
@click.option("--epochs", default=40, show_default=True, type=click.IntRange(min=1), help="Student epochs.")
@click.option("--student", default="resnet18", show_default=True, help="timm model name of the student.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo(out: Path, epochs: int, student: str, device: str, no_progress: bool) -> None:
    """Offline demo: real ImageNet teachers over embedded photos -> store -> UNIFORM student -> agreement."""
    from kt_train.demo import format_summary, run_demo

    click.echo(format_summary(run_demo(out, epochs=epochs, student=student, device=device,
                                       show_progress=not no_progress)))
