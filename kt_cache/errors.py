"""Error hierarchy. Every message says what is wrong, where, expected vs got, and how to fix it.

``UsageError`` subclasses are user mistakes (the CLI exits 2); other ``KtError`` s are runtime failures
(exit 1). The CLI prints ``str(error)`` without a traceback for both.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KtError(Exception):
    """A failure ktc can explain; the CLI prints it without a traceback and exits ``exit_code``."""

    exit_code = 1


class UsageError(KtError, ValueError):
    """The user's input (manifest, arguments, files, store choice) is wrong; exit code 2."""

    exit_code = 2


class ManifestError(UsageError):
    """A manifest is malformed: unknown key, wrong type, bad value, duplicate teacher id."""


class DatasetError(UsageError):
    """The dataset cannot be listed: missing or empty folder, bad CSV row, unknown class."""


class TeacherError(UsageError):
    """A teacher cannot be resolved or loaded: unknown model, missing or mismatched checkpoint."""


class StoreMismatchError(UsageError):
    """An existing store does not match the request: other dataset, changed teacher, other views."""


class StoreError(KtError):
    """A store is unreadable, incomplete, of an unknown format version, or holds invalid data."""


class ImageDecodeError(KtError):
    """One image could not be decoded; recorded in ``samples/ok`` unless ``--strict``."""


class OutputOverflowError(KtError):
    """A teacher output does not fit the storage dtype (e.g. |x| > 65504 for float16)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean "x"?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f' Did you mean "{close[0]}"?' if close else ""
