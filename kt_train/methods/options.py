"""Typed, frozen option dataclasses for methods, built from plain dicts (YAML) with strict checking.

Every method declares ``@dataclass(frozen=True) class XOptions(MethodOptions)`` whose field annotations are
the schema: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``tuple[float, ...]`` and ``X | None``.
``XOptions.from_dict(d)`` rejects unknown keys (with a difflib "did you mean") and wrong types or values,
naming the method, the key, what was expected and what was given.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from kt_cache.errors import UsageError, did_you_mean


class MethodConfigError(UsageError):
    """A method name or option is wrong (unknown key, wrong type, value out of range); CLI exit code 2."""


def _check(method: str, key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float, list -> tuple) or raise MethodConfigError."""
    origin, args = get_origin(tp), get_args(tp)
    where = f"method {method!r} option {key!r}"
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(method, key, value, inner[0])
    if origin is Literal:
        if value not in args:
            hint = did_you_mean(str(value), [str(a) for a in args])
            raise MethodConfigError(f"{where}: got {value!r}, expected one of {list(args)}.{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise MethodConfigError(f"{where}: got {value!r}, expected a list of numbers")
        fixed = [a for a in args if a is not Ellipsis]
        if Ellipsis not in args and len(value) != len(fixed):
            raise MethodConfigError(f"{where}: got {len(value)} values, expected {len(fixed)}")
        return tuple(_check(method, key, v, fixed[0] if Ellipsis in args else fixed[i]) for i, v in enumerate(value))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (bool, int, str) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise MethodConfigError(f"{where}: got {value!r} ({type(value).__name__}), expected {getattr(tp, '__name__', tp)}")


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options. Subclasses add fields and may override ``validate``."""

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None, method: str = "") -> MethodOptions:
        options = dict(options or {})
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in names:
                raise MethodConfigError(
                    f"method {method!r}: unknown option {key!r}.{did_you_mean(key, names)} "
                    f"Valid options: {', '.join(names) or '(none)'}."
                )
        values = {k: _check(method, k, v, hints[k]) for k, v in options.items()}
        obj = cls(**values)
        obj.validate(method)
        return obj

    def validate(self, method: str = "") -> None:
        """Range checks beyond types; raise ``MethodConfigError``."""

    def _require(self, ok: bool, method: str, message: str) -> None:
        if not ok:
            raise MethodConfigError(f"method {method!r}: {message}")
