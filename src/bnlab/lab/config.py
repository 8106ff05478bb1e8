"""Experiment configs: one dataclass per experiment, overridden from the command line.

A config is a plain dataclass whose fields carry their defaults and a trailing comment that says
what they mean (nanoGPT's ``config/`` files, as dataclasses)::

    @dataclass
    class Fig1Config:
        lr: float = 0.5  # plain SGD learning rate, both nets
        steps: Optional[int] = None  # None: 50,000 on mnist, 6,000 on digits

:func:`apply_overrides` turns ``["--lr=0.1", "--steps=2000"]`` into a new config, converting each
value to its field's type (int, float, bool, str, Literal choices, Optional[...] with "none",
tuples as comma-separated lists) and rejecting unknown keys with the list of valid ones.
Fields whose default is None and whose comment says what None means are resolved by the
experiment's ``resolve()`` method before the run starts; ``config.json`` holds the resolved values.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import json
import math
import tokenize
import types
import typing
from typing import Any, Literal, Sequence, Union, get_args, get_origin

__all__ = [
    "ConfigError",
    "apply_overrides",
    "parse_overrides",
    "field_docs",
    "describe",
    "to_dict",
    "from_dict",
    "convert_value",
    "type_name",
]


class ConfigError(ValueError):
    """A bad override: an unknown key, a value of the wrong type, an out-of-range value."""


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}
_NONE = {"none", "null"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def type_name(tp: Any) -> str:
    """A short readable name: int, float, str, bool, 'digits'|'mnist', tuple[int, ...], int or
    none."""
    if _is_union(tp):
        args = [a for a in get_args(tp) if a is not type(None)]
        suffix = " or none" if len(args) < len(get_args(tp)) else ""
        return " or ".join(type_name(a) for a in args) + suffix
    if get_origin(tp) is Literal:
        return "|".join(repr(a) if isinstance(a, str) else str(a) for a in get_args(tp))
    if get_origin(tp) in (tuple, Sequence):
        args = get_args(tp)
        return f"tuple[{type_name(args[0])}, ...]" if args else "tuple"
    return getattr(tp, "__name__", str(tp))


def _convert_scalar(text: str, tp: Any) -> Any:
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"expected a bool (true/false/1/0/yes/no), got {text!r}")
    if tp is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            pass
        try:  # 5e4, 50000.0
            value = float(text)
        except ValueError:
            raise ValueError(f"expected an int, got {text!r}") from None
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"expected an int, got {text!r}")
        return int(value)
    if tp is float:
        try:
            return float(text.replace("_", ""))
        except ValueError:
            raise ValueError(f"expected a float, got {text!r}") from None
    if tp is str:
        return text
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise ValueError(f"expected one of {', '.join(map(str, choices))}; got {text!r}")
    raise TypeError(f"unsupported config type {tp!r}")


def convert_value(text: str, tp: Any) -> Any:
    """``text`` (from the command line) as a value of type ``tp``; ValueError if it is not one."""
    if _is_union(tp):
        args = get_args(tp)
        if type(None) in args and text.strip().lower() in _NONE:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert_value(text, arg)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError("; ".join(errors))
    if get_origin(tp) in (tuple, Sequence):
        args = get_args(tp)
        item = args[0] if args else str
        parts = [p.strip() for p in text.strip().strip("()[]").split(",") if p.strip()]
        if not parts:
            raise ValueError(f"expected a comma-separated list of {type_name(item)}, got {text!r}")
        return tuple(_convert_scalar(p, item) for p in parts)
    return _convert_scalar(text, tp)


def _check_value(value: Any, tp: Any) -> bool:
    """Whether a Python value (from JSON or code) fits ``tp``."""
    if _is_union(tp):
        return any(_check_value(value, a) for a in get_args(tp))
    if tp is type(None):
        return value is None
    if get_origin(tp) is Literal:
        return value in get_args(tp)
    if get_origin(tp) in (tuple, Sequence):
        args = get_args(tp)
        return isinstance(value, (tuple, list)) and all(_check_value(v, args[0]) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def field_docs(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of every field in the class body (and its dataclass bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        names = {f.name for f in dataclasses.fields(klass)}
        field_rows: dict[int, str] = {}  # source row -> the field declared there
        try:
            for token in tokenize.generate_tokens(io.StringIO(source).readline):
                if token.type == tokenize.NAME and token.start[1] == 4 and token.string in names:
                    field_rows.setdefault(token.start[0], token.string)
                elif token.type == tokenize.COMMENT and token.start[0] in field_rows:
                    docs[field_rows[token.start[0]]] = token.string.lstrip("#").strip()
        except tokenize.TokenError:
            continue
    return docs


def _names(config_cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls)]


def _unknown(key: str, config_cls: type, experiment: str) -> ConfigError:
    names = _names(config_cls)
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(
        f"unknown key {key!r} for experiment {experiment!r}{hint}; valid keys: " + ", ".join(names)
    )


def parse_overrides(config_cls: type, args: Sequence[str], experiment: str = "") -> dict[str, Any]:
    """``["--lr=0.1", "--data-dir", "x"]`` as ``{"lr": 0.1, "data_dir": "x"}``, type-checked.

    Keys may use dashes for underscores; ``--key value`` works too; ``--flag`` alone sets a bool
    field to True and ``--no-flag`` to False.
    """
    hints = _hints(config_cls)
    names = set(_names(config_cls))
    values: dict[str, Any] = {}
    args = list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"expected --key=value, got {arg!r}")
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if (
            key not in names
            and key.startswith("no_")
            and key[3:] in names
            and not eq
            and hints[key[3:]] is bool
        ):
            values[key[3:]] = False
            continue
        if key not in names:
            raise _unknown(key, config_cls, experiment)
        if not eq:
            if hints[key] is bool and (i >= len(args) or args[i].startswith("--")):
                values[key] = True
                continue
            if i >= len(args):
                raise ConfigError(f"--{key} needs a value ({type_name(hints[key])})")
            text = args[i]
            i += 1
        if key in values:
            raise ConfigError(f"--{key} given twice")
        try:
            values[key] = convert_value(text, hints[key])
        except ValueError as error:
            raise ConfigError(
                f"--{key}: {error} (the key {key!r} is {type_name(hints[key])})"
            ) from None
    return values


def apply_overrides(config: Any, args: Sequence[str] | dict[str, Any], experiment: str = "") -> Any:
    """A copy of ``config`` with the overrides (command-line strings or a dict of values)
    applied."""
    cls = type(config)
    if isinstance(args, dict):
        hints = _hints(cls)
        for key, value in args.items():
            if key not in hints or key not in set(_names(cls)):
                raise _unknown(key, cls, experiment)
            if not _check_value(value, hints[key]):
                raise ConfigError(f"{key}: {value!r} is not a {type_name(hints[key])}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    else:
        values = parse_overrides(cls, args, experiment)
    try:
        return dataclasses.replace(config, **values)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None


def to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready: tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(config_cls: type, data: dict[str, Any], experiment: str = "") -> Any:
    """The config saved in a run's ``config.json`` (keys checked, lists back to tuples)."""
    return apply_overrides(config_cls(), data, experiment)


def describe(config_cls: type) -> list[tuple[str, str, str, str]]:
    """(key, type, default, comment) for every field: what ``bnlab run NAME --help`` prints."""
    hints = _hints(config_cls)
    docs = field_docs(config_cls)
    rows = []
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
        rows.append((f.name, type_name(hints[f.name]), shown, docs.get(f.name, "")))
    return rows
