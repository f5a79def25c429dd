"""Outputs that appear whole or not at all: ``ktc merge``, ``subset`` and ``pack`` write into
``<out>.ktc-partial`` and rename it onto ``<out>`` when everything is written and finalized.

A failure removes the staging path; a kill -9 leaves it behind under a name no reader takes for a store,
and the next run of the command removes it first (it is ktc's own by name) and starts again.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_SUFFIX = ".ktc-partial"


def staging_path(out: Path) -> Path:
    return out.with_name(out.name + PARTIAL_SUFFIX)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextmanager
def staged_output(out: Path, command: str) -> Iterator[Path]:
    """Yield the staging path for ``out``; on success it becomes ``out`` in one rename."""
    staging = staging_path(out)
    if staging.exists() or staging.is_symlink():
        print(f"{command}: removing {staging}, the unfinished output of an earlier run that was stopped",
              file=sys.stderr)
        remove_path(staging)
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()            # an empty folder the user made for the output
        os.replace(staging, out)
    except BaseException:
        remove_path(staging)
        raise
