"""Declared job parameters, so every kind refuses bad params at Submit with a message naming the field.

Params reach the gateway as a ``google.protobuf.Struct`` turned into a dict, and a Struct has only one
number type (a double): ``3`` arrives as ``3.0``. An integer parameter therefore accepts any float with
an integral value and refuses ``3.5``, NaN and infinities. Booleans are refused where numbers are asked
for, although Python treats ``True`` as ``1``, because a client that sends ``true`` for ``chunks`` has
made a mistake we should show rather than hide.

The spec also checks its own defaults when it is built, so a kind with an impossible default fails at
import time instead of on the first job that omits the parameter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jobstream.errors import InvalidArgument

JSON = Any

ParamType = type[int] | type[float] | type[str] | type[bool]

_TYPE_NAMES: dict[type, str] = {int: "int", float: "float", str: "string", bool: "bool"}
_EXPECTED: dict[type, str] = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_SHOW_MAX = 80


class _Refused(Exception):
    """A value does not fit its Param; turned into InvalidArgument by the caller, which knows the prefix."""


@dataclass(frozen=True)
class Param:
    """One named parameter of a job kind.

    A param that is not ``required`` and has no default is ``None`` when omitted, so kind code always
    finds every declared name in its validated params. ``min``/``max`` are inclusive and apply to
    numbers only; ``choices`` restricts the value to a fixed set.
    """

    name: str
    type: ParamType
    default: JSON = None
    required: bool = False
    min: float | None = None
    max: float | None = None
    choices: Sequence[JSON] | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.type not in _TYPE_NAMES:
            raise ValueError(f"param {self.name!r}: type must be int, float, str or bool, got {self.type!r}")
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"param name must be a non-empty string, got {self.name!r}")
        numeric = self.type in (int, float)
        if not numeric and (self.min is not None or self.max is not None):
            raise ValueError(f"param {self.name!r}: min/max apply to int and float params only")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"param {self.name!r}: min {self.min} is greater than max {self.max}")
        if self.choices is not None:
            if self.type is bool:
                raise ValueError(f"param {self.name!r}: choices make no sense for a bool param")
            object.__setattr__(self, "choices", tuple(self.choices))
            for choice in self.choices:
                self._check_default(choice, "choice")
        if self.required and self.default is not None:
            raise ValueError(f"param {self.name!r}: a required param cannot have a default")
        if self.default is not None:
            object.__setattr__(self, "default", self._check_default(self.default, "default"))

    def _check_default(self, value: JSON, what: str) -> JSON:
        try:
            return self.coerce(value)
        except _Refused:
            raise ValueError(
                f"param {self.name!r}: {what} {_show(value)} does not satisfy its own spec "
                f"(must be {self.expectation()})"
            ) from None

    def expectation(self) -> str:
        """What a valid value looks like, in the words used by error messages and help text."""
        text = _EXPECTED[self.type]
        fmt = _fmt_int if self.type is int else _fmt_float
        if self.min is not None and self.max is not None:
            text += f" between {fmt(self.min)} and {fmt(self.max)}"
        elif self.min is not None:
            text += f" of at least {fmt(self.min)}"
        elif self.max is not None:
            text += f" of at most {fmt(self.max)}"
        if self.choices is not None:
            text += ", one of " + ", ".join(_show(c) for c in self.choices)
        return text

    def coerce(self, value: JSON) -> JSON:
        """Returns the value in this param's Python type; raises _Refused when it does not fit."""
        if self.type is bool:
            if not isinstance(value, bool):
                raise _Refused
            return value
        if self.type is str:
            if not isinstance(value, str):
                raise _Refused
            result: JSON = value
        else:
            # bool is a subclass of int: refuse it explicitly (see the module docstring).
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _Refused
            if isinstance(value, float) and not math.isfinite(value):
                raise _Refused
            if self.type is int:
                if isinstance(value, float):
                    if not value.is_integer():
                        raise _Refused
                    value = int(value)
                result = value
            else:
                result = float(value)
            if self.min is not None and result < self.min:
                raise _Refused
            if self.max is not None and result > self.max:
                raise _Refused
        if self.choices is not None and result not in self.choices:
            raise _Refused
        return result

    def describe(self) -> dict[str, JSON]:
        return {
            "name": self.name,
            "type": _TYPE_NAMES[self.type],
            "required": self.required,
            "default": self.default,
            "min": self.min,
            "max": self.max,
            "choices": list(self.choices) if self.choices is not None else None,
            "doc": self.doc,
            "expects": self.expectation(),
        }


class ParamSpec:
    """The full set of params a kind accepts; anything else is refused by name."""

    def __init__(self, *params: Param) -> None:
        seen: set[str] = set()
        for param in params:
            if param.name in seen:
                raise ValueError(f"param {param.name!r} declared twice")
            seen.add(param.name)
        self.params: tuple[Param, ...] = params

    def __iter__(self) -> Iterator[Param]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def validate(self, raw: Mapping[str, Any] | None) -> dict[str, JSON]:
        """Returns every declared param (defaults filled, numbers in their declared type).

        A JSON ``null`` counts as omitted. Raises InvalidArgument at the first problem found (unknown
        keys first, then each declared param in declaration order), with ``field`` set to
        ``params.<name>``, or to ``params`` when several keys or the whole value are at fault.
        """
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise InvalidArgument(f"params: must be an object, got {_show(raw)}", field="params")
        known = {p.name for p in self.params}
        unknown = sorted(str(k) for k in raw if k not in known)
        if unknown:
            raise self._unknown(unknown)
        out: dict[str, JSON] = {}
        for param in self.params:
            if param.name not in raw or raw[param.name] is None:
                if param.required:
                    raise InvalidArgument(
                        f"params.{param.name}: required, must be {param.expectation()}",
                        field=f"params.{param.name}",
                    )
                out[param.name] = param.default
                continue
            value = raw[param.name]
            try:
                out[param.name] = param.coerce(value)
            except _Refused:
                raise InvalidArgument(
                    f"params.{param.name}: must be {param.expectation()}, got {_show(value)}",
                    field=f"params.{param.name}",
                ) from None
        return out

    def _unknown(self, unknown: list[str]) -> InvalidArgument:
        known = ", ".join(self.names) if self.params else "none, this kind takes no params"
        if len(unknown) == 1:
            return InvalidArgument(
                f"params.{unknown[0]}: unknown param; known params: {known}", field=f"params.{unknown[0]}"
            )
        listed = ", ".join(_show(k) for k in unknown)
        return InvalidArgument(f"params: unknown params {listed}; known params: {known}", field="params")

    def describe(self) -> list[dict[str, JSON]]:
        """One JSON object per param, in declaration order, for docs and CLI help."""
        return [p.describe() for p in self.params]


def _fmt_int(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(bound)


def _fmt_float(bound: float) -> str:
    return repr(bound)


def _show(value: Any) -> str:
    """Renders a client's value the way the client wrote it (JSON), cut short so messages stay readable."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > _SHOW_MAX:
        text = text[: _SHOW_MAX - 3] + "..."
    return text
