"""A setting of a tool, described once: its type, default, bounds, choices and documentation.

Settings are dataclass fields declared with `setting(...)`; `params(cls)` reads them back as
`Param`s, which the federation.yml parser, the click options, the generator and the CWL test use.
"""

from __future__ import annotations

import math
import reprlib
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Literal

# What a value looks like on the command line and in CWL, whatever its Python type.
Kind = Literal["int", "float", "str", "choice", "names", "pair", "bool"]

CWL_INT_MAX = 2**31 - 1  # CWL's `int` is 32-bit signed
_META = "xffl-param"


class ParamError(ValueError):
    """A value a setting cannot take; the message says what it must be (the caller says where)."""


@dataclass(frozen=True)
class Param:
    """One setting. `name` is the dataclass field, the CWL input id and the federation.yml key."""

    name: str
    kind: Kind
    default: Any
    label: str
    doc: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is a value (the tool then decides, e.g. one epoch)
    always: bool = False  # the generator writes it into every step, even at its default
    default_text: str | None = None  # how the default reads in help texts, when str() reads badly

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def shown_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if isinstance(self.default, tuple):
            return ",".join(str(v) for v in self.default)
        return str(self.default)

    @property
    def help(self) -> str:
        """The documentation people read: in `--help`, in the CWL tool's `doc`, in the README."""
        return self.doc.format(default=self.shown_default) if self.doc else self.label

    def bounds_text(self) -> str:
        low = "" if self.minimum is None else ("(" if self.min_exclusive else "[") + f"{self.minimum:g}"
        high = "" if self.maximum is None else f"{self.maximum:g}" + (")" if self.max_exclusive else "]")
        return f"{low or '(-inf'}, {high or 'inf)'}"

    def check(self, value: Any) -> Any:
        """The value as the setting holds it, or ParamError saying what it must be."""
        if value is None:
            if self.optional:
                return None
            raise ParamError("must be set")
        if self.kind == "choice":
            if value not in self.choices:
                raise ParamError(f"must be one of {', '.join(self.choices)}, got {shown(value)}")
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ParamError(f"must be true or false, got {shown(value)}")
            return value
        if self.kind == "str":
            if not isinstance(value, str) or not value:
                raise ParamError(f"must be a non-empty string, got {shown(value)}")
            if any(ord(c) < 32 or ord(c) == 127 or c in "\u0085\u2028\u2029" for c in value):
                raise ParamError(f"must not hold control characters (a newline, a NUL, ...), got {shown(value)}")
            return value
        if self.kind == "names":
            return _names(value)
        if self.kind == "pair":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",")]
            if not isinstance(value, list | tuple) or len(value) != 2:
                raise ParamError(
                    f"must be two comma-separated numbers like 0.9,0.99 (in YAML also [0.9, 0.99]), got {shown(value)}"
                )
            return tuple(self._number(_to_float(v)) for v in value)
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ParamError(f"must be an integer, got {shown(value)}")
            if abs(value) > CWL_INT_MAX:
                raise ParamError(f"must fit in CWL's 32-bit int (at most {CWL_INT_MAX}), got {shown(value, 30)}")
            return int(self._number(value))
        return float(self._number(value))

    def _number(self, value: Any) -> float | int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamError(f"must be a number, got {shown(value)}")
        if isinstance(value, int) and abs(value) > 2**53:
            raise ParamError(f"is out of range, got {shown(value)}")
        if not math.isfinite(value):
            raise ParamError(f"must be a finite number, got {shown(value)}")
        low, high = self.minimum, self.maximum
        if low == 0 and self.min_exclusive and high is None:
            if value <= 0:
                raise ParamError(f"must be positive, got {value}")
            return value
        if high is None and low is not None and not self.min_exclusive:
            if value < low:
                raise ParamError(f"must be at least {low:g}, got {value}")
            return value
        too_low = low is not None and (value <= low if self.min_exclusive else value < low)
        too_high = high is not None and (value >= high if self.max_exclusive else value > high)
        if too_low or too_high:
            raise ParamError(f"must be in {self.bounds_text()}, got {value}")
        return value


_REPR = reprlib.Repr()  # Python 3.11 takes the limits as attributes, not arguments
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 50, 50, 40


def shown(value: Any, limit: int = 60) -> str:
    """A value for an error message, never longer than `limit`, and never built whole first: a YAML
    alias bomb (a few lines that expand to billions of items) is shown by its first few."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _to_float(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ParamError(f"must be two comma-separated numbers like 0.9,0.99, got {shown(value)}") from None
    return value


def _names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [t.strip() for t in value.split(",") if t.strip()]
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(t, str) and t and all(c.isalnum() or c in "_." for c in t) for t in value)
    ):
        raise ParamError(
            "must name at least one module, e.g. q_proj,v_proj (in YAML also [q_proj, v_proj]), with letters, digits, _ and ."
        )
    return tuple(value)


def setting(
    default: Any,
    label: str,
    doc: str | None = None,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
    choices: tuple[str, ...] = (),
    always: bool = False,
    default_text: str | None = None,
) -> Any:
    """A dataclass field that is also a documented, bounded setting."""
    meta = Param(
        name="",
        kind="str",
        default=default,
        label=label,
        doc=doc,
        minimum=minimum,
        maximum=maximum,
        min_exclusive=min_exclusive,
        max_exclusive=max_exclusive,
        choices=choices,
        always=always,
        default_text=default_text,
    )
    return field(default=default, metadata={_META: meta})


def _kind(hint: Any, choices: tuple[str, ...]) -> tuple[Kind, bool, tuple[str, ...]]:
    """The Param kind of a type hint, whether None is allowed, and the choices of a choice."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        (hint,) = [a for a in args if a is not type(None)]
    if choices:
        return "choice", optional, choices
    if typing.get_origin(hint) is Literal:
        return "choice", optional, tuple(typing.get_args(hint))
    simple: dict[Any, Kind] = {bool: "bool", int: "int", float: "float", str: "str"}
    if hint in simple:
        return simple[hint], optional, ()
    if typing.get_origin(hint) is tuple:
        inner = typing.get_args(hint)
        return ("names" if inner[-1] is Ellipsis else "pair"), optional, ()
    raise TypeError(f"no Param kind for {hint!r}")


def params(cls: type) -> tuple[Param, ...]:
    """The settings of a dataclass, in declaration order (nested setting groups are not included)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        meta = f.metadata.get(_META)
        if meta is None:
            continue
        kind, optional, choices = _kind(hints[f.name], meta.choices)
        default = f.default if f.default is not MISSING else None
        out.append(replace(meta, name=f.name, kind=kind, optional=optional, choices=choices, default=default))
    return tuple(out)


def prefixed(param_: Param, prefix: str) -> Param:
    """A nested group's setting as the tools spell it: `lora.r` becomes `lora_r`."""
    return replace(param_, name=prefix + param_.name)
