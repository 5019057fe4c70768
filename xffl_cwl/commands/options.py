"""Click options made from the settings tables of xffl_cwl.contract.options: one definition each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from xffl_cwl.contract.options import from_tool_values, tool_params
from xffl_cwl.contract.params import Param, ParamError
from xffl_cwl.errors import InputError

_CLICK_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str, "names": str, "pair": str}


def _option(p: Param) -> Callable:
    if p.kind == "bool":  # CWL's boolean binding: the flag when true, nothing when false
        return click.option(p.flag, p.name, is_flag=True, default=bool(p.default), help=p.help)
    kind = click.Choice(p.choices) if p.kind == "choice" else _CLICK_TYPES[p.kind]
    default = p.shown_default if p.kind in ("names", "pair") else p.default
    says_default = "{default}" in (p.doc or "")
    show = p.default is not None and not says_default
    return click.option(p.flag, p.name, type=kind, default=default, show_default=show, help=p.help)


def settings_options(cls: type) -> Callable:
    """Decorate a command with one option per setting of `cls` (TrainOptions, AggregateOptions, ...)."""

    def decorate(command: Callable) -> Callable:
        for p in reversed(tool_params(cls)):
            command = _option(p)(command)
        return command

    return decorate


def settings_from(cls: type, values: dict[str, Any]) -> Any:
    """The settings object from a command's keyword arguments, each value checked against its Param."""
    checked = {}
    for p in tool_params(cls):
        try:
            checked[p.name] = p.check(values[p.name])
        except ParamError as exc:
            raise InputError(f"{p.flag} {exc}") from None
    return from_tool_values(cls, checked)
