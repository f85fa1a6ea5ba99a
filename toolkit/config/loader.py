"""Load a job config (YAML or JSON) into the typed dataclasses of ``schema.py``, strictly.

Order of work in ``load_job_config``: find the file, parse it, replace ``${VAR}`` / ``${VAR:-default}``
from the environment, apply the name override, replace ``[name]``, rewrite ai-toolkit's keys (``aitoolkit.py``:
mapped, dropped with one log line, or refused), convert every value to its declared type
(collecting all problems), replace ``[trigger]`` in sample prompts, then run the cross-field checks. Every
problem found is reported at once in one ``ConfigError``, one line per problem, each starting with its key path.
"""

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import yaml

from toolkit.config.aitoolkit_translate import translate_job
from toolkit.config.checks import validate_job
from toolkit.config.convert import convert, describe_value, join_path
from toolkit.config.help import config_help
from toolkit.state.atomic import atomic_write_bytes
from toolkit.config.schema import JobConfig
from toolkit.errors import ConfigError
from toolkit.redact import redact_mapping

__all__ = [
    "DEFAULT_CONFIG_DIR", "ConfigProblems", "config_help", "convert", "find_config_file", "job_to_dict",
    "load_job_config", "load_job_dict", "read_config_file", "write_resolved_config",
]

logger = logging.getLogger(__name__)

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# Hostile or mistaken inputs must fail in bounded time and memory with exit status 2, not exhaust the machine: real
# configs are a few KB and a few hundred values. MAX_CONFIG_NODES counts values as every alias expands them (a
# "billion laughs" file is small but expands exponentially, and the ${VAR} pass copies every reference).
MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_CONFIG_NODES = 100_000
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")


class ConfigProblems(ConfigError):
    """A config with one or more problems; ``problems`` holds one ``key.path: message`` line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        super().__init__(f"{source}: {count} in the config:\n" + "\n".join(problems))


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

    def compose_document(self) -> yaml.Node:
        """The document's node graph, refused when an anchor refers to itself or aliases expand it too far."""
        node = super().compose_document()
        _check_expansion(node)
        return node


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_expansion(root: yaml.Node) -> None:
    """Size of the tree `root` becomes once every alias is copied (iterative, memoized: linear in the file), and no
    cycles (`a: &a [*a]`), which the constructor would build and every later pass would recurse into forever."""
    size: dict[int, int] = {}
    open_nodes: set[int] = set()  # nodes whose subtree is being walked: an alias to one of them is a cycle
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            open_nodes.discard(id(node))
            size[id(node)] = 1 + sum(size[id(child)] for child in _children(node))
            if size[id(node)] > MAX_CONFIG_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"aliases expand the document beyond {MAX_CONFIG_NODES:,} values (a \"billion "
                    "laughs\" file?); write the values out or use fewer nested aliases", node.start_mark)
            continue
        if id(node) in size:
            continue
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in _children(node):
            if id(child) in open_nodes:
                raise yaml.composer.ComposerError(
                    None, None, "an alias refers to an anchor that contains it (a cycle)", child.start_mark)
            if id(child) not in size:
                stack.append((child, False))


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
    """Parse a YAML (safe loader only) or JSON file whose top level must be a mapping; size, alias expansion and
    nesting are bounded (MAX_CONFIG_BYTES, MAX_CONFIG_NODES)."""
    try:
        if Path(path).stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: the config file is {Path(path).stat().st_size / 2**20:.1f} MiB; configs over "
                              f"{MAX_CONFIG_BYTES // 2**20} MiB are refused (is it the right file?)")
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); save the config as UTF-8") \
            from error
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file: {error}") from error
    try:
        data = _parse_json(text, path) if Path(path).suffix.lower() == ".json" else _parse_yaml(text, path)
    except RecursionError as error:  # thousands of nested [ or {: the parsers recurse per level
        raise ConfigError(f"{path}: the config nests too deeply to be a config") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping (job:, config:, meta:), "
                          f"got {describe_value(data)}")
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


def _map_strings(tree: Any, path: str, fn: Callable[[str, str], str]) -> Any:
    """Copy of ``tree`` with every string value ``s`` at key path ``p`` replaced by ``fn(s, p)``."""
    if isinstance(tree, dict):
        return {key: _map_strings(value, join_path(path, key), fn) for key, value in tree.items()}
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
    translated = translate_job(raw)
    raw, problems = translated.data, problems + translated.problems
    job = convert(raw, JobConfig, "", problems)
    if not problems:
        for process in job.config.process:
            prompts = getattr(process, "sample", None) or getattr(process, "generate", None)  # caption: none
            if prompts is not None:
                prompts.prompts = [_inject_trigger(p, process.trigger_word) for p in prompts.prompts]
        problems.extend(validate_job(job))
    if problems:
        raise ConfigProblems(source, problems)
    if translated.no_effect:
        logger.info("ai-toolkit keys with no effect here: %s (run.py --help-config says why)",
                    ", ".join(translated.no_effect))
    logger.debug("loaded config %s (name %r)", source, job.config.name)
    return job


def job_to_dict(job: JobConfig, redact: bool = True) -> dict:
    """Plain nested dict of ``job`` (same shape as the YAML); secrets hidden unless ``redact`` is false."""
    data = dataclasses.asdict(job)
    return redact_mapping(data) if redact else data


def write_resolved_config(job: JobConfig, path: Path) -> None:
    """Write the resolved config as YAML, secrets redacted, atomically (temporary file + os.replace)."""
    text = "# Resolved config (defaults filled in, ${VAR}/[name]/[trigger] substituted, secrets redacted).\n"
    text += yaml.safe_dump(job_to_dict(job, redact=True), sort_keys=False, allow_unicode=True)
    atomic_write_bytes(path, text.encode("utf-8"))
    logger.debug("wrote resolved config to %s", path)
