"""How two training configs (the hashed part, toolkit.state.train_state.training_config) differ."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, Union, get_args, get_origin, get_type_hints


def config_diff(old: Any, new: Any, path: str = "") -> list[str]:
    """`key.path: old -> new` for every value that differs (lists of different length are one line)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new), key=str)
                for line in config_diff(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [line for i, (a, b) in enumerate(zip(old, new)) for line in config_diff(a, b, f"{path}[{i}]")]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def only_more_steps(old: Mapping, new: Mapping) -> bool:
    """True when the one difference is a raised train.steps (continuing a run, finished or not, for longer)."""
    old_steps, new_steps = (old.get("train") or {}).get("steps"), (new.get("train") or {}).get("steps")
    if not isinstance(old_steps, int) or not isinstance(new_steps, int) or new_steps <= old_steps:
        return False
    return config_diff(old, {**new, "train": {**new["train"], "steps": old_steps}}) == []


def field_defaults(config: Any) -> Callable[[tuple], Any]:
    """default_of(path) for a config dataclass instance: the declared default of the field at `path` (a tuple of
    field names and list indices, as in the training config dict), or dataclasses.MISSING."""

    def default_of(path: tuple) -> Any:
        cls, parts = type(config), list(path)
        while parts:
            name = parts.pop(0)
            field = {f.name: f for f in dataclasses.fields(cls)}.get(name) if dataclasses.is_dataclass(cls) else None
            if field is None:
                return dataclasses.MISSING
            if not parts:
                return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            cls = _inner_dataclass(get_type_hints(cls)[name], parts)
        return dataclasses.MISSING

    return default_of


def _inner_dataclass(tp: Any, parts: list) -> Any:
    """The dataclass inside Optional[...] / list[...] (a list index in `parts` is consumed)."""
    members = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) is Union else [tp]
    tp = members[0] if len(members) == 1 else None
    if get_origin(tp) is list and parts and isinstance(parts[0], int):
        parts.pop(0)
        tp = get_args(tp)[0]
    return tp


def _plain(value: Any) -> Any:
    value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return json.loads(json.dumps(value, default=str))


def with_new_defaults(old: Any, new: Any, default_of: Callable[[tuple], Any], path: tuple = ()) -> Any:
    """`old` (a saved training config) with the keys it lacks filled from `new` where `new` holds the field's declared
    default: options added to the trainer after the state was saved then change nothing, while one set to another
    value still shows as a change."""
    if isinstance(old, dict) and isinstance(new, dict):
        filled = {key: with_new_defaults(value, new.get(key), default_of, (*path, key)) if key in new else value
                  for key, value in old.items()}
        for key in new.keys() - old.keys():
            default = default_of((*path, key))
            if default is not dataclasses.MISSING and _plain(default) == new[key]:
                filled[key] = new[key]
        return filled
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [with_new_defaults(a, b, default_of, (*path, i)) for i, (a, b) in enumerate(zip(old, new))]
    return old
