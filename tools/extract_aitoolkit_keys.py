"""Write the list of config keys that ai-toolkit reads (tests/data/aitoolkit/keys.txt).

Run by hand against a checkout of ostris/ai-toolkit when it changes; the test suite only reads the list, so CI never
needs that checkout. Each output line is ``section key default``: ``section`` is the key path in a process
(``train``, ``datasets[]``, ``sample.samples[]``, ``process`` for the process level, ``config`` for the level
above, ``top`` for the file's top level), ``default`` is ai-toolkit's default as Python source.

    python tools/extract_aitoolkit_keys.py /path/to/ai-toolkit > tests/data/aitoolkit/keys.txt
    python tools/extract_aitoolkit_keys.py --git /path/to/ai-toolkit.git > tests/data/aitoolkit/keys.txt
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

# ai-toolkit class in toolkit/config_modules.py -> where its keys sit in a training process.
CONFIG_CLASSES = {
    "SaveConfig": "save",
    "LoggingConfig": "logging",
    "SampleItem": "sample.samples[]",
    "SampleConfig": "sample",
    "NetworkConfig": "network",
    "TrainConfig": "train",
    "ModelConfig": "model",
    "EMAConfig": "train.ema_config",
    "DatasetConfig": "datasets[]",
}
# Files whose get_conf / config.get calls read process-level keys, and the job file that reads `config:` keys.
PROCESS_FILES = ("jobs/process/BaseProcess.py", "jobs/process/BaseTrainProcess.py",
                 "jobs/process/BaseSDTrainProcess.py", "extensions_built_in/sd_trainer/DiffusionTrainer.py")
ROOT_FILES = ("jobs/BaseJob.py", "jobs/ExtensionJob.py")
# Keys every process has although no get_conf call reads them (the job picks the process class by `type`; the web UI
# writes `device` on every process).
EXTRA_PROCESS_KEYS = (("type", "'sd_trainer'"), ("device", "'cuda'"))


def _reads(tree: ast.AST, receivers: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """(key, default source) of every ``<receiver>('key', default)`` call with a literal key, in source order;
    ``receivers`` are source texts such as ``kwargs.get`` or ``self.get_conf``."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and ast.unparse(node.func) in receivers
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            default = ast.unparse(node.args[1]) if len(node.args) > 1 else "None"
            yield node.args[0].value, default


def _first_seen(pairs: Iterator[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop repeated keys (ai-toolkit reads some twice), keeping the first default."""
    seen: dict[str, str] = {}
    for key, default in pairs:
        seen.setdefault(key, default)
    return sorted(seen.items(), key=lambda item: item[0])


def extract(read: Callable[[str], str]) -> list[str]:
    """Lines ``section key default`` for every key, given ``read(path)`` -> source text of an ai-toolkit file."""
    lines: list[str] = []
    modules = ast.parse(read("toolkit/config_modules.py"))
    classes = {node.name: node for node in modules.body if isinstance(node, ast.ClassDef)}
    for name, section in CONFIG_CLASSES.items():
        for key, default in _first_seen(_reads(classes[name], ("kwargs.get",))):
            lines.append(f"{section} {key} {default}")
    process_calls = ("self.get_conf", "self.config.get")
    process_reads = [pair for path in PROCESS_FILES for pair in _reads(ast.parse(read(path)), process_calls)]
    sections = {section.split(".")[0].rstrip("[]") for section in CONFIG_CLASSES.values()}
    for key, default in _first_seen(iter(process_reads + list(EXTRA_PROCESS_KEYS))):
        if "." not in key and key not in sections:
            lines.append(f"process {key} {default}")
    lines += [f"process {section} {{}}" for section in sorted(sections)]
    root_reads = [pair for path in ROOT_FILES for pair in _reads(ast.parse(read(path)), ("self.get_conf",))]
    lines += [f"config {key} {default}" for key, default in _first_seen(iter(root_reads + [("process", "[]")]))]
    lines += ["top config {}", "top job None", "top meta {}"]  # BaseJob reads these three by subscript
    return sorted(set(lines), key=lambda line: (line.split(" ")[0], line.split(" ")[1]))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="ai-toolkit checkout (or bare git directory with --git)")
    parser.add_argument("--git", action="store_true", help="read HEAD of a (bare) git repository")
    args = parser.parse_args(argv)
    if args.git:
        def read(path: str) -> str:
            return subprocess.run(["git", "-C", args.source, "show", f"HEAD:{path}"], check=True,
                                  capture_output=True, text=True).stdout
        commit = subprocess.run(["git", "-C", args.source, "rev-parse", "HEAD"], check=True, capture_output=True,
                                text=True).stdout.strip()
    else:
        def read(path: str) -> str:
            return (Path(args.source) / path).read_text(encoding="utf-8")
        commit = "(working tree)"
    print(f"# ai-toolkit {commit}: section key default (written by tools/extract_aitoolkit_keys.py)")
    print("\n".join(extract(read)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
