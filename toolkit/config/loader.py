"""Load a job config (YAML or JSON) into the typed dataclasses of ``schema.py``, strictly.

Order of work in ``load_job_config``: find the file, parse it, replace ``${VAR}`` / ``${VAR:-default}``
from the environment, apply the name override, replace ``[name]``, convert every value to its declared type
(collecting all problems), replace ``[trigger]`` in sample prompts, then run the cross-field checks. Every
problem found is reported at once in one ``ConfigError``, one line per problem, each starting with its key path.
"""

import dataclasses
import difflib
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from toolkit.config.schema import JobConfig, config_help, validate_job
from toolkit.errors import ConfigError
from toolkit.redact import redact_mapping

__all__ = [
    "DEFAULT_CONFIG_DIR", "ConfigProblems", "config_help", "convert", "find_config_file", "job_to_dict",
    "load_job_config", "load_job_dict", "read_config_file", "write_resolved_config",
]

logger = logging.getLogger(__name__)

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")


class ConfigProblems(ConfigError):
    """A config with one or more problems; ``problems`` holds one ``key.path: message`` line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        super().__init__(f"{source}: {count} in the config:\n" + "\n".join(problems))


class _Invalid(Exception):
    """A raw value does not fit its declared type; the message completes ``key.path: ...``."""


# ---------------------------------------------------------------------------------------------- reading


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars where PyYAML's 1.1 rules surprise, and no duplicate keys.

    ``1e-4`` is read as a float (PyYAML reads a string) and only true/false are booleans (PyYAML also turns
    yes/no/on/off into booleans), so ``push_to_hub: yes`` is an error instead of a silent true.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """Build a mapping, failing on a key that appears twice (PyYAML would keep the last silently)."""
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_BOOL_TAG = "tag:yaml.org,2002:bool"
_StrictYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictYamlLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_StrictYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def find_config_file(name: str, config_dir: Path = DEFAULT_CONFIG_DIR) -> Path:
    """Resolve a config argument: the path as given, else ``config_dir/name``, then with .yaml, .yml, .json."""
    candidates = [Path(name), config_dir / name] + [config_dir / f"{name}{suffix}" for suffix in CONFIG_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = "\n".join(str(candidate) for candidate in candidates)
    raise ConfigError(f"config file {name!r} not found; tried:\n{tried}")


def read_config_file(path: Path) -> dict:
    """Parse a YAML (safe loader only) or JSON file whose top level must be a mapping."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the config file: {error}") from error
    data = _parse_json(text, path) if Path(path).suffix.lower() == ".json" else _parse_yaml(text, path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping (job:, config:, meta:), "
                          f"got {_kind(data)}")
    return data


def _parse_yaml(text: str, path: Path) -> Any:
    """YAML text -> data; syntax errors become ConfigError with the 1-based line and column."""
    try:
        return yaml.load(text, Loader=_StrictYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}invalid YAML: {error.problem or error.context}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from error


def _parse_json(text: str, path: Path) -> Any:
    """JSON text -> data; syntax errors and duplicate keys become ConfigError with the line."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ConfigError(f"{path}: duplicate key(s) {', '.join(map(repr, repeated))}")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: line {error.lineno}, column {error.colno}: invalid JSON: {error.msg}") from error


# --------------------------------------------------------------------------------------- substitution


def _join(path: str, key: Any) -> str:
    """Key path of ``key`` inside ``path``."""
    return f"{path}.{key}" if path else str(key)


def _map_strings(tree: Any, path: str, fn: Callable[[str, str], str]) -> Any:
    """Copy of ``tree`` with every string value ``s`` at key path ``p`` replaced by ``fn(s, p)``."""
    if isinstance(tree, dict):
        return {key: _map_strings(value, _join(path, key), fn) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_map_strings(item, f"{path}[{index}]", fn) for index, item in enumerate(tree)]
    return fn(tree, path) if isinstance(tree, str) else tree


def _substitute_env(tree: Any, environ: Mapping[str, str], problems: list[str]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` (default when unset or empty) in every string value."""

    def substitute(text: str, path: str) -> str:
        def one(match: re.Match) -> str:
            name, has_default, default = match.group(1), match.group(2), match.group(3)
            value = environ.get(name)
            if has_default and not value:
                return default
            if value is None:
                problems.append(f"{path}: environment variable {name} is not set "
                                f"(write ${{{name}:-default}} to give a default)")
                return match.group(0)
            return value

        return _ENV_REF.sub(one, text)

    return _map_strings(tree, "", substitute)


def _substitute_name(raw: dict, name_override: Optional[str]) -> dict:
    """Apply ``name_override`` to config.name, then replace ``[name]`` in every other string value."""
    root = raw.get("config")
    if not isinstance(root, dict):
        return raw
    if name_override is not None:
        root["name"] = name_override
    name = root.get("name")
    if not isinstance(name, str):
        return raw
    return _map_strings(raw, "", lambda text, path: text if path == "config.name" else text.replace("[name]", name))


def _inject_trigger(prompt: str, trigger_word: Optional[str]) -> str:
    """Replace ``[trigger]`` with the trigger word; when unset, drop it and merge the spaces around it."""
    if "[trigger]" not in prompt:
        return prompt
    if trigger_word is not None:
        return prompt.replace("[trigger]", trigger_word)
    return re.sub(r"[ \t]*\[trigger\][ \t]*", " ", prompt).strip()


# ----------------------------------------------------------------------------------------- conversion


def _kind(value: Any) -> str:
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
    raise _Invalid(f"expected true or false, got {_kind(value)}")


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
        raise _Invalid(f"expected a finite number, got {_kind(value)}")
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
    raise _Invalid(f"expected a whole number, got {_kind(value)}")


def _to_str(value: Any) -> str:
    """Strings only; a number where text is expected is almost always a mistake, so it must be quoted."""
    if isinstance(value, str):
        return value
    hint = "; quote it if it is meant as text" if isinstance(value, (int, float)) else ""
    raise _Invalid(f"expected a string, got {_kind(value)}{hint}")


def _to_literal(value: Any, choices: tuple) -> Any:
    """One of the ``choices``, with a did-you-mean for near misses."""
    if any(type(value) is type(choice) and value == choice for choice in choices):
        return value
    options = ", ".join(repr(choice) for choice in choices)
    close = difflib.get_close_matches(str(value).lower(), [str(choice) for choice in choices], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise _Invalid(f"got {_kind(value)}, expected one of {options}{hint}")


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
            raise _Invalid(f"expected a list, got {_kind(raw)}")
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
        problems.append(f"{_join(path, 'type')}: {error}")
    return None


def _to_dict(raw: Any, args: tuple, path: str, problems: list[str]) -> dict:
    """A mapping with string keys; values converted to the declared value type."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _Invalid(f"expected a mapping, got {_kind(raw)}")
    bad_keys = [key for key in raw if not isinstance(key, str)]
    if bad_keys:
        raise _Invalid(f"keys must be strings, got {', '.join(map(repr, bad_keys))}")
    return {key: convert(value, args[1], _join(path, key), problems) for key, value in raw.items()}


def _to_dataclass(raw: Any, cls: type, path: str, problems: list[str]) -> Any:
    """Build ``cls`` from a mapping: unknown keys and missing required keys are problems; null means {}."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise _Invalid(f"expected a mapping, got {_kind(raw)}")
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    problems.extend(_unknown_key(key, fields, _join(path, key)) for key in raw if key not in fields)
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, field in fields.items():
        field_path = _join(path, name)
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


# ---------------------------------------------------------------------------------------------- public


def load_job_config(path_or_name: Union[str, Path], name_override: Optional[str] = None,
                    environ: Mapping[str, str] = os.environ) -> JobConfig:
    """Find, parse, substitute, convert and validate a job config; raise ``ConfigProblems`` listing every problem.

    ``path_or_name`` is resolved by ``find_config_file``; ``name_override`` replaces config.name before
    ``[name]`` is substituted; ``${VAR}`` values come from ``environ``.
    """
    path = find_config_file(str(path_or_name))
    return load_job_dict(read_config_file(path), str(path), name_override=name_override, environ=environ)


def _default_process_type(raw: Any) -> Any:
    """`job: generate` (ai-toolkit's spelling of a generate job): its processes are generate processes unless they
    say otherwise."""
    if not isinstance(raw, dict) or raw.get("job") != "generate" or not isinstance(raw.get("config"), dict):
        return raw
    processes = raw["config"].get("process")
    if isinstance(processes, list):
        processes = [{"type": "generate", **p} if isinstance(p, dict) else p for p in processes]
        raw = {**raw, "config": {**raw["config"], "process": processes}}
    return raw


def load_job_dict(raw: dict, source: str, name_override: Optional[str] = None,
                  environ: Mapping[str, str] = os.environ) -> JobConfig:
    """``load_job_config`` for data already parsed (e.g. built from command-line flags); ``source`` names it."""
    problems: list[str] = []
    raw = _default_process_type(_substitute_name(_substitute_env(raw, environ, problems), name_override))
    job = convert(raw, JobConfig, "", problems)
    if not problems:
        for process in job.config.process:
            prompts = process.sample if hasattr(process, "sample") else process.generate
            prompts.prompts = [_inject_trigger(p, process.trigger_word) for p in prompts.prompts]
        problems.extend(validate_job(job))
    if problems:
        raise ConfigProblems(source, problems)
    logger.debug("loaded config %s (name %r)", source, job.config.name)
    return job


def job_to_dict(job: JobConfig, redact: bool = True) -> dict:
    """Plain nested dict of ``job`` (same shape as the YAML); secrets hidden unless ``redact`` is false."""
    data = dataclasses.asdict(job)
    return redact_mapping(data) if redact else data


def write_resolved_config(job: JobConfig, path: Path) -> None:
    """Write the resolved config as YAML, secrets redacted, atomically (temporary file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Resolved config (defaults filled in, ${VAR}/[name]/[trigger] substituted, secrets redacted).\n"
    text += yaml.safe_dump(job_to_dict(job, redact=True), sort_keys=False, allow_unicode=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    logger.debug("wrote resolved config to %s", path)
