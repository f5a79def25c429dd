"""``ktc info STORE``."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts.")
def info(store: str, as_json: bool) -> None:
    """Describe a store: dataset, views, teachers, roles, outputs and shapes, completion, bytes on disk."""
    from kt_cache.info import format_summary, store_summary

    summary = store_summary(store)
    click.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))
