"""Validate plain data (a parsed JSON/YAML recipe) against a dataclass, with errors that name the field.

`build(cls, data, where)` checks unknown and missing fields and every value against the field's annotation
(numbers, strings, booleans, Literal choices, lists, tuples, dicts with string keys, optional values, nested
dataclasses) and returns the constructed object. Numbers are never taken from strings, booleans never count
as numbers, and nothing is coerced except an int where a float is expected.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from actlab.errors import ConfigError


def build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; fields are {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing field {name!r}")
            continue
        values[name] = check(hints[name], data[name], f"{where}.{name}")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def check(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return check(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {_kind(value)} fits none of "
                          f"{' | '.join(_name(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_kind(value)}")
        item = args[0] if args else Any
        checked = [check(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(checked) if origin is tuple else checked
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_kind(value)}")
        key_type, item = (args or (str, Any))
        out = {}
        for k, v in value.items():
            if key_type is str and not isinstance(k, str):
                raise ConfigError(f"{where}: keys must be strings, got {k!r}")
            out[k] = check(item, v, f"{where}.{k}")
        return out
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_kind(value)}")
        if math.isnan(value):
            raise ConfigError(f"{where}: must be a number, got NaN")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_kind(value)}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {_kind(value)}")
        return value
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{where}: expected {_name(hint)}, got {_kind(value)}")


def _kind(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))
