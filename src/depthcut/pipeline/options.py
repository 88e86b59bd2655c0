"""Typed command options: one dataclass field per option, with its help text, from which the
command line is built, so that each default is written once (as transformers' `HfArgumentParser`
and peft's configs do).

    @dataclass(kw_only=True)
    class Example:
        samples: int = option(64, help="number of calibration sequences")

gives `--samples N` (help "number of calibration sequences (default: 64)"); a notebook user writes
`Example(samples=16)`. Field metadata: `help`, and optionally `flag` (the option's name, default
`--field-name`), `positional`, `choices`, `group` (an argparse group title), `exclusive` (the name
of a mutually exclusive set within the group), `parse` (a str -> value function for list-valued
fields), `metavar`, `required` and `show_default`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Callable
from typing import Any

from depthcut.errors import OptionTypeError, OptionValueError

MISSING = dataclasses.MISSING


def option(default: Any = MISSING, *, help: str, flag: str | None = None, positional: bool = False,
           choices: tuple | None = None, group: str | None = None, exclusive: str | None = None,
           parse: Callable[[str], Any] | None = None, metavar: str | None = None, required: bool = False,
           show_default: bool = True):
    """A config field that is also a command-line option."""
    metadata = {"help": help, "flag": flag, "positional": positional, "choices": choices, "group": group,
                "exclusive": exclusive, "parse": parse, "metavar": metavar, "required": required,
                "show_default": show_default}
    return dataclasses.field(default=default, metadata=metadata)


def comma_list(text: str) -> tuple[str, ...]:
    """`a, b,c` -> ("a", "b", "c"); empty items dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def finite_float(text: str) -> float:
    """A float option's value: a finite number (`inf` or `nan` as a learning rate or a temperature
    would train a model of NaNs, or fail deep inside)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _value_type(hint) -> type | None:
    """int for `int` and `int | None`; None for anything the field's `parse` must handle."""
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(arguments) == 1:
        hint = arguments[0]
    return hint if hint in (int, float, str, bool) else None


def _help(field: dataclasses.Field) -> str:
    text = field.metadata["help"]
    default = field.default
    shown_already = "(default" in text
    if field.metadata["show_default"] and not shown_already and default not in (MISSING, None, ()) and default is not False:
        shown = ",".join(default) if isinstance(default, tuple) else default
        text += f" (default: {shown})"
    return text


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Add an argument for every option field of `config_class`, in field order, in their groups."""
    hints = typing.get_type_hints(config_class)
    groups: dict[str | None, Any] = {None: parser}
    exclusive: dict[tuple, Any] = {}
    for field in dataclasses.fields(config_class):
        meta = field.metadata
        if "help" not in meta:
            continue  # a field that only the Python API sets
        group_name = meta["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        target = groups[group_name]
        if meta["exclusive"]:
            key = (group_name, meta["exclusive"])
            if key not in exclusive:
                exclusive[key] = target.add_mutually_exclusive_group()
            target = exclusive[key]
        kwargs: dict[str, Any] = {"help": _help(field)}
        value_type = _value_type(hints[field.name])
        if value_type is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = meta["parse"] or (finite_float if value_type is float else value_type) or str
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
        if meta["positional"]:
            if typing.get_origin(hints[field.name]) is tuple:
                kwargs.update(nargs="+", type=str)  # several values: the field holds them as a tuple
            target.add_argument(field.name, **kwargs)
            continue
        if field.default is not MISSING:
            kwargs["default"] = field.default
        kwargs["required"] = meta["required"] or field.default is MISSING
        target.add_argument(meta["flag"] or "--" + field.name.replace("_", "-"), dest=field.name, **kwargs)


def config_from_args(config_class: type, args: argparse.Namespace):
    """The config that parsed command-line `args` describe."""
    names = {f.name for f in dataclasses.fields(config_class) if f.init}
    return config_class(**{name: value for name, value in vars(args).items() if name in names})


def _arms(hint) -> list:
    """The types a field may hold: the arms of `X | None`, or the hint itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return list(typing.get_args(hint))
    return [hint]


def _describe(hint) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "True or False", type(None): "None"}
    words = []
    for arm in _arms(hint):
        if typing.get_origin(arm) is tuple:
            words.append("a list of strings")
        else:
            words.append(names.get(arm, getattr(arm, "__name__", str(arm))))
    return " or ".join(words)


def _checked(value, hint, parse):
    """`value` as the field holds it (a path as a string, a list or a comma string as a tuple), or
    OptionTypeError's message (a str) where it is not of the field's type."""
    for arm in _arms(hint):
        if arm is type(None) and value is None:
            return value
        if arm is bool and isinstance(value, bool):
            return value
        if arm is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if arm is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if arm is str and isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        if typing.get_origin(arm) is tuple:
            if isinstance(value, str):
                return parse(value) if parse else (value,)
            if isinstance(value, (list, tuple)) and all(isinstance(item, (str, os.PathLike)) for item in value):
                return tuple(os.fspath(item) for item in value)
        if arm not in (type(None), bool, int, float, str) and typing.get_origin(arm) is not tuple:
            return value  # a type this check does not know: left to the code that reads it
    return TypeError


def check_fields(config) -> None:
    """Every option field of `config` holds a value of its declared type (a path is taken for a string, a
    list or a comma string for a list of strings, an integer for a number) and, where the field has
    choices, one of them: refused as the config is made, naming the field, not deep in the code."""
    hints = typing.get_type_hints(type(config))
    name = type(config).__name__
    for field in dataclasses.fields(config):
        value, hint = getattr(config, field.name), hints[field.name]
        checked = _checked(value, hint, field.metadata.get("parse"))
        if checked is TypeError:
            raise OptionTypeError(f"{name}: {field.name} expects {_describe(hint)}, got {value!r} "
                                  f"({type(value).__name__})")
        choices = field.metadata.get("choices")
        if choices and checked is not None and checked not in choices:
            raise OptionValueError(f"{name}: {field.name} must be one of {', '.join(map(str, choices))}, "
                                   f"got {checked!r}")
        if checked is not value:
            object.__setattr__(config, field.name, checked)


def make_config(config_class: type, config=None, fields: dict | None = None):
    """`config` (an instance of `config_class`) with `fields` replaced, or a new one from `fields`:
    the library functions take either `fn(config)` or `fn(model=..., out=..., ...)`. A field name it
    does not have is refused with the closest one."""
    fields = fields or {}
    known = [f.name for f in dataclasses.fields(config_class) if f.init]
    for key in fields:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise OptionTypeError(f"{config_class.__name__} has no setting {key!r}{hint}")
    if config is None:
        return config_class(**fields)
    if not isinstance(config, config_class):
        raise TypeError(f"expected a {config_class.__name__}, got {type(config).__name__}")
    return dataclasses.replace(config, **fields) if fields else config
