"""Config dataclass helpers shared by methods and the trainer: fields with help, typed option parsing."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import field
from typing import Any

from vpeft.errors import ConfigError


def option(default: Any, help: str, choices: tuple[str, ...] | None = None, **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field with help text and optional choices (shown by ``vpeft methods --options`` and ``--help``;
    command-line flags are generated from them)."""
    metadata = {"help": help, **({"choices": tuple(choices)} if choices else {})}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def convert_options(cls: type, owner: str, options: dict[str, Any]) -> dict[str, Any]:
    """Convert every option to the type its dataclass field declares; unknown names raise."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for '{owner}'; valid options: {names}")
    return {k: convert_value(owner, k, v, hints[k]) for k, v in options.items()}


def convert_value(owner: str, name: str, value: Any, hint: Any) -> Any:
    """Convert a value (often a command-line string) to a field's type hint."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        hint = non_none[0]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin in (list, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            inner = args[0] if args else str
            return [
                convert_value(owner, name, item.strip() if isinstance(item, str) else item, inner) for item in items
            ]
        if hint is bool:
            if isinstance(value, bool):
                return value
            lowered = str(value).lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(value)
            return lowered in ("true", "1", "yes", "on")
        if hint is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float):  # 2.0 is an integer; 1.7 is not
                if not value.is_integer():
                    raise ValueError(value)
                return int(value)
            return int(value) if isinstance(value, str) else value
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value) if isinstance(value, (str, int)) else value  # YAML 1.1 reads 3e-3 as a string
            if isinstance(number, float) and not math.isfinite(number):
                raise ArithmeticError(value)
            return number
        if hint is str and isinstance(value, bool):  # YAML 1.1 reads a bare on/off as a boolean
            return "on" if value else "off"
        if hint is str and not isinstance(value, str):
            raise ValueError(value)
        if origin is dict and not isinstance(value, dict):
            raise ValueError(value)
    except ArithmeticError:
        raise ConfigError(f"option '{name}' of '{owner}' must be a finite number, got {value!r}") from None
    except (ValueError, TypeError) as exc:
        kind = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"option '{name}' of '{owner}' expects {kind}, got {value!r}") from exc
    return value


def coerce_fields(obj: Any, owner: str) -> None:
    """Convert every field of a dataclass instance to its declared type in place (YAML and CLI strings)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            continue
        setattr(obj, f.name, convert_value(owner, f.name, getattr(obj, f.name), hint))
