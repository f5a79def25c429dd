"""The ``ktc`` command line. Sub-commands load lazily, so ``ktc --help`` imports neither torch nor timm.

Errors a user can cause are ``kt_cache.errors.KtError`` s; they are printed as one paragraph without a
traceback, with exit code 2 for usage errors and 1 for runtime failures.
"""

from __future__ import annotations

import errno
import importlib
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import click

from kt_cache.errors import KtError

COMMANDS = {
    "extract": ("kt_cache.cli_extract", "extract", "Run teachers over a dataset into a Zarr v3 store."),
    "info": ("kt_cache.cli_info", "info", "Describe a store: teachers, outputs, completion, bytes."),
    "verify": ("kt_cache.cli_share", "verify", "Check a store against its object manifest and done flags."),
    "merge": ("kt_cache.cli_share", "merge", "Merge stores of one dataset into a new store (no re-encoding)."),
    "subset": ("kt_cache.cli_share", "subset", "Copy some teachers of a store into a new store."),
    "pack": ("kt_cache.cli_share", "pack", "Pack a store into one .zip that ktc and zarr read."),
    "compact": ("kt_cache.cli_share", "compact", "Re-encode features/featmaps with a lossy codec; error measured."),
    "upgrade": ("kt_cache.cli_share", "upgrade", "Convert an older store to this ktc's format in place (no re-encoding)."),
}


def all_commands() -> dict[str, tuple[str, str, str]]:
    """Own commands plus those other packages register under the ``ktc.commands`` entry-point group
    (kt_train's ``train`` and ``eval``), so kt_cache never imports kt_train."""
    from importlib.metadata import entry_points

    found = dict(COMMANDS)
    for point in entry_points(group="ktc.commands"):
        module, _, attr = point.value.partition(":")
        found.setdefault(point.name, (module, attr, HELP.get(point.name, "")))
    return found


HELP = {"demo": "Offline demo: real teachers -> store -> UNIFORM student -> agreement, in minutes on a CPU.",
        "train": "Train a student from a store with a transfer method (UNIFORM, KPU, Bi-KD, baselines).",
        "eval": "Evaluate a trained student: top-1/top-5, per-class accuracy, confusion matrix."}


class KtcGroup(click.Group):
    """A click group with lazily imported sub-commands and ktc's error policy."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(all_commands())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        commands = all_commands()
        if name not in commands:
            return None
        module, attr, _ = commands[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text) for name, (_, _, help_text) in all_commands().items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = BriefWarnings()    # once per text within this command
                return super().invoke(ctx)
        except KtError as err:
            raise failure(str(err), err.exit_code) from None
        except OSError as err:
            if err.errno not in DISK_FULL:
                raise
            raise failure(disk_full_message(ctx, err), 1) from None
        except zipfile.BadZipFile as err:
            raise failure(f"ktc {ctx.invoked_subcommand}: a packed store is damaged ({err}). Fix: run `ktc verify` "
                          "on it for the list; get an intact copy, or pack it again from an intact store.", 1) from None
        except Exception as err:
            if not is_network_error(err):
                raise
            raise failure(network_message(ctx, err), 1) from None


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
LIBRARIES = ("torch", "torchvision", "timm", "open_clip", "zarr", "numcodecs", "PIL", "dask", "distributed")


class BriefWarnings:
    """``warnings.showwarning`` for one command: a library's warning as one line on stderr, once per text,
    with no source path and no code line."""

    def __init__(self) -> None:
        self.shown: set[str] = set()

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        brief = brief_text(message)
        if brief not in self.shown:
            self.shown.add(brief)
            library = next((p for p in Path(filename).parts if p in LIBRARIES), category.__name__)
            print(f"warning ({library}): {brief}", file=file or sys.stderr)


def brief_text(message: Any) -> str:
    """The first two sentences of a warning, whitespace collapsed, at most 240 characters."""
    text = " ".join(str(message).split())
    sentences = re.split(r"(?<=[.!?])\s+", text)
    return " ".join(sentences[:2])[:240]


def failure(message: str, exit_code: int) -> click.ClickException:
    error = click.ClickException(message)
    error.exit_code = exit_code
    return error


def disk_full_message(ctx: click.Context, err: OSError) -> str:
    where = f" writing {err.filename}" if err.filename else ""
    return (f"ktc {ctx.invoked_subcommand}: the disk is full{where} ({err.strerror}). Nothing finished is lost: "
            "`ktc extract` resumes from its finished units, and merge, subset and pack remove their unfinished "
            "output. Fix: free space or write to a disk with room (`df -h` shows it), then rerun the same command.")


def is_network_error(err: Exception) -> bool:
    """aiohttp's client errors (an HTTP store that went away mid-run); aiohttp is imported only if in use."""
    aiohttp = sys.modules.get("aiohttp")
    return aiohttp is not None and isinstance(err, aiohttp.ClientError)


def network_message(ctx: click.Context, err: Exception) -> str:
    return (f"ktc {ctx.invoked_subcommand}: a remote store stopped answering ({type(err).__name__}: {err}). "
            "Fix: check that the server is running and reachable, then rerun the same command.")


@click.group(cls=KtcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ktc")
def cli() -> None:
    """ktc: knowledge transfer from many pretrained vision models through one shared teacher cache."""


def main() -> None:
    cli()
