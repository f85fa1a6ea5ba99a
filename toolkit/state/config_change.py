"""How two training configs (the hashed part, toolkit.state.train_state.training_config) differ."""

from __future__ import annotations

from typing import Any, Mapping


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
