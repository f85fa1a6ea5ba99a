"""Conversion of parsed YAML/JSON values to the typed config dataclasses, with every problem collected as
``key.path: message``: strict types (no silent str->number), literals, unions picked by ``type`` or value kind,
unknown keys with a did-you-mean, and the field rules of ``schema``'s metadata."""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable, Literal, Optional, Union, get_args, get_origin, get_type_hints

__all__ = ["convert", "describe_value", "join_path"]


class _Invalid(Exception):
    """A raw value does not fit its declared type; the message completes ``key.path: ...``."""


def join_path(path: str, key: Any) -> str:
    """Key path of ``key`` inside ``path``."""
    return f"{path}.{key}" if path else str(key)


def describe_value(value: Any) -> str:
    """A value and its YAML kind, for error messages."""
    if value is None:
        return "null"
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}
    return f"{value!r} ({kinds.get(type(value), type(value).__name__)})"


def _to_bool(value: Any) -> bool:
    """Only true/false (YAML booleans, or those words as strings, e.g. from ${VAR})."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _Invalid(f"expected true or false, got {describe_value(value)}")


def _to_float(value: Any) -> float:
    """Numbers and numeric strings (``1e-4`` and ``${VAR}`` values arrive as strings); finite only."""
    number: Optional[float] = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise _Invalid(f"expected a finite number, got {describe_value(value)}")
    return number


def _to_int(value: Any) -> int:
    """Whole numbers; floats only without a fractional part; never booleans."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, bool):
        try:
            number = _to_float(value)
        except _Invalid:
            number = None
        if number is not None and number.is_integer():
            return int(number)
    raise _Invalid(f"expected a whole number, got {describe_value(value)}")


def _to_str(value: Any) -> str:
    """Strings only; a number where text is expected is almost always a mistake, so it must be quoted."""
    if isinstance(value, str):
        return value
    hint = "; quote it if it is meant as text" if isinstance(value, (int, float)) else ""
    raise _Invalid(f"expected a string, got {describe_value(value)}{hint}")


def _to_literal(value: Any, choices: tuple) -> Any:
    """One of the ``choices``, with a did-you-mean for near misses."""
    if any(type(value) is type(choice) and value == choice for choice in choices):
        return value
    options = ", ".join(repr(choice) for choice in choices)
    close = difflib.get_close_matches(str(value).lower(), [str(choice) for choice in choices], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise _Invalid(f"got {describe_value(value)}, expected one of {options}{hint}")


_SCALARS: dict[Any, Callable[[Any], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def convert(raw: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Convert ``raw`` (parsed YAML/JSON) to type ``tp``; append ``path: message`` problems, return None on failure.

    Supports dataclasses (recursively, strict about keys), ``list[...]``, ``dict[str, ...]``, ``Optional``,
    ``Literal``, ``Any``, and bool/int/float/str.
    """
    try:
        return _convert(raw, tp, path, problems)
    except _Invalid as error:
        problems.append(f"{path}: {error}")
        return None


def _convert(raw: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Dispatch on the declared type; raise ``_Invalid`` for a mismatch at this level."""
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _to_dataclass(raw, tp, path, problems)
    if tp is Any:
        return raw
    if origin is Union:
        if raw is None and type(None) in args:
            return None
        members = [arg for arg in args if arg is not type(None)]
        if len(members) > 1 and all(dataclasses.is_dataclass(member) for member in members):
            member = _pick_member(raw, members, path, problems)
            return None if member is None else _convert(raw, member, path, problems)
        # `str | list[str]` (e.g. one control folder or several): a YAML list takes the list member, anything else
        # the other one. By kind, not by position: typing caches equal unions, so their order is not reliable.
        lists = [member for member in members if get_origin(member) is list]
        others = [member for member in members if get_origin(member) is not list]
        if lists and (isinstance(raw, list) or not others):
            return _convert(raw, lists[0], path, problems)
        return _convert(raw, (others or members)[0], path, problems)
    if origin is Literal:
        return _to_literal(raw, args)
    if origin is list:
        if not isinstance(raw, list):
            raise _Invalid(f"expected a list, got {describe_value(raw)}")
        return [convert(item, args[0], f"{path}[{index}]", problems) for index, item in enumerate(raw)]
    if origin is dict:
        return _to_dict(raw, args, path, problems)
    if tp in _SCALARS:
        return _SCALARS[tp](raw)
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _pick_member(raw: Any, members: list, path: str, problems: list[str]) -> Any:
    """The dataclass of a union whose ``type`` field allows ``raw["type"]`` (the first one when ``type`` is absent);
    None, with a problem at ``path.type``, when no member does."""
    if not isinstance(raw, dict) or "type" not in raw:
        return members[0]
    kinds = {choice: member for member in members for choice in get_args(get_type_hints(member)["type"])}
    kind = raw["type"]
    if isinstance(kind, str) and kind in kinds:
        return kinds[kind]
    try:
        _to_literal(kind, tuple(kinds))
    except _Invalid as error:
        problems.append(f"{join_path(path, 'type')}: {error}")
    return None


def _to_dict(raw: Any, args: tuple, path: str, problems: list[str]) -> dict:
    """A mapping with string keys; values converted to the declared value type."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _Invalid(f"expected a mapping, got {describe_value(raw)}")
    bad_keys = [key for key in raw if not isinstance(key, str)]
    if bad_keys:
        raise _Invalid(f"keys must be strings, got {', '.join(map(repr, bad_keys))}")
    return {key: convert(value, args[1], join_path(path, key), problems) for key, value in raw.items()}


def _to_dataclass(raw: Any, cls: type, path: str, problems: list[str]) -> Any:
    """Build ``cls`` from a mapping: unknown keys and missing required keys are problems; null means {}."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise _Invalid(f"expected a mapping, got {describe_value(raw)}")
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    problems.extend(_unknown_key(key, fields, join_path(path, key)) for key in raw if key not in fields)
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, field in fields.items():
        field_path = join_path(path, name)
        if name in raw:
            values[name] = _convert_field(raw[name], field, hints[name], field_path, problems)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            problems.append(f"{field_path}: missing required key ({field.metadata.get('help', '')})")
            values[name] = None
    return cls(**values)


def _convert_field(raw: Any, field: dataclasses.Field, tp: Any, path: str, problems: list[str]) -> Any:
    """Convert one field's value, then normalize it and run its checks (see the schema's metadata keys)."""
    meta = field.metadata
    coerce = meta.get("coerce")
    before = len(problems)
    value = convert(coerce(raw) if coerce else raw, tp, path, problems)
    if len(problems) > before or value is None:
        return value
    if meta.get("normalize"):
        value = meta["normalize"](value)
    problems.extend(f"{path}: {msg}" for check in meta.get("checks", ()) if (msg := check.problem(value)))
    for index, item in enumerate(value if meta.get("item_checks") else ()):
        problems.extend(f"{path}[{index}]: {msg}" for check in meta["item_checks"] if (msg := check.problem(item)))
    return value


def _unknown_key(key: Any, fields: dict[str, dataclasses.Field], path: str) -> str:
    """Problem line for an unknown key, with a did-you-mean or else the list of valid keys."""
    aliases = {alias: name for name, field in fields.items() for alias in field.metadata.get("aliases", ())}
    text = str(key).lower()
    if text in fields and text != key:
        return f"{path}: unknown key; did you mean {text!r}?"
    if text in aliases:
        return f"{path}: unknown key; did you mean {aliases[text]!r}?"
    close = difflib.get_close_matches(text, list(fields) + list(aliases), n=1, cutoff=0.6)
    if close:
        return f"{path}: unknown key; did you mean {aliases.get(close[0], close[0])!r}?"
    return f"{path}: unknown key; valid keys: {', '.join(fields)}"
