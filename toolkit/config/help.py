"""``python run.py --help-config``: every config field with its type, default, rules and help line, then what each
ai-toolkit key becomes here (mapped, no effect, unsupported)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from toolkit.config.aitoolkit_translate import ai_toolkit_help
from toolkit.config.schema import JobConfig

__all__ = ["config_help"]


def config_help() -> str:
    """Every config field with its type, default, rules and help line, grouped by section (``--help-config``)."""
    lines: list[str] = []
    _help_section(JobConfig, "", lines)
    lines.append(ai_toolkit_help())
    return "\n".join(lines).rstrip()


def _help_section(cls: type, path: str, lines: list[str]) -> None:
    """Append the help of section ``cls`` at key path ``path``, then of its sub-sections."""
    lines.append(f"{path or '(top level)'}  [{cls.__name__}: {(cls.__doc__ or '').strip()}]")
    hints = get_type_hints(cls)
    subsections = []
    for spec in dataclasses.fields(cls):
        tp = hints[spec.name]
        rules = [check.rule for check in spec.metadata.get("checks", ())]
        rules += [f"each {check.rule}" for check in spec.metadata.get("item_checks", ())]
        rule_text = f"  ({'; '.join(rules)})" if rules else ""
        lines.append(f"  {spec.name}: {_type_name(tp)} = {_default_text(spec)}{rule_text}")
        lines.append(f"      {spec.metadata.get('help', '')}")
        inner = get_args(tp)[0] if get_origin(tp) is list else tp
        members = [m for m in (get_args(inner) if get_origin(inner) is Union else (inner,))
                   if dataclasses.is_dataclass(m)]
        for member in members:
            inner_path = (f"{path}.{spec.name}" if path else spec.name) + ("[]" if inner is not tp else "")
            kind = next((f.default for f in dataclasses.fields(member) if f.name == "type"), member.__name__)
            subsections.append((member, inner_path + (f" (type: {kind})" if len(members) > 1 else "")))
    lines.append("")
    for inner, inner_path in subsections:
        _help_section(inner, inner_path, lines)


def _type_name(tp: Any) -> str:
    """Readable name of a declared type."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        return " | ".join("null" if arg is type(None) else _type_name(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in args)}]"
    if dataclasses.is_dataclass(tp):
        return tp.__name__
    return "any" if tp is Any else getattr(tp, "__name__", str(tp))


def _default_text(spec: dataclasses.Field) -> str:
    """The default as YAML/JSON text, ``required`` when there is none."""
    if spec.default is not dataclasses.MISSING:
        return json.dumps(spec.default)
    if spec.default_factory is dataclasses.MISSING:
        return "required"
    value = spec.default_factory()
    return "(section defaults)" if dataclasses.is_dataclass(value) else json.dumps(value)
