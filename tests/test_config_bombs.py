"""Hostile or broken config files end in bounded time with exit status 2 and a message naming the file (never a
traceback, never the machine's memory): alias bombs, self-referencing anchors, huge files, non-UTF-8 bytes."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run
from tests.helpers import REPO
from tests.launch import clean_env
from toolkit.config.loader import MAX_CONFIG_NODES, read_config_file
from toolkit.errors import ConfigError

BOUND_S = 60  # each case takes well under a second of parsing; the rest is the interpreter starting


def _billion_laughs(path: Path) -> None:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9**10 strings
    path.write_text("\n".join(lines) + "\njob: extension\nconfig:\n  name: bomb\n  process: *l9\n", encoding="utf-8")


def _self_reference(path: Path) -> None:
    path.write_text("job: extension\nconfig: &a\n  name: loop\n  process: [*a]\n", encoding="utf-8")


def _fifty_megabytes(path: Path) -> None:
    line = "# " + "x" * 1022 + "\n"
    with path.open("w", encoding="utf-8") as f:
        f.write("job: extension\n")
        for _ in range(50 * 1024):
            f.write(line)


def _not_utf8(path: Path) -> None:
    path.write_bytes(b"job: extension\nconfig:\n  name: caf\xe9\n")


CASES = {"billion_laughs": (_billion_laughs, "aliases expand the document beyond"),
         "self_reference": (_self_reference, "an alias refers to an anchor that contains it"),
         "fifty_megabytes": (_fifty_megabytes, "configs over 4 MiB are refused"),
         "not_utf8": (_not_utf8, "not UTF-8 text")}


def _limit_memory() -> None:  # today's loader would expand the bomb until the machine swaps: fail fast instead
    resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))


def test_billion_laughs_exits_2_quickly_naming_the_file(tmp_path):
    """A real process (today's loader would expand 3.5e9 strings: a memory cap makes that fail fast instead)."""
    make, expected = CASES["billion_laughs"]
    config = tmp_path / "billion_laughs.yaml"
    make(config)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), str(config)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=BOUND_S, preexec_fn=_limit_memory)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(config) in proc.stderr and expected in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < BOUND_S


@pytest.mark.parametrize("case", ["self_reference", "fifty_megabytes", "not_utf8"])
def test_hostile_config_exits_2_quickly_naming_the_file(case, tmp_path, capsys):
    make, expected = CASES[case]
    config = tmp_path / f"{case}.yaml"
    make(config)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=expected):
        read_config_file(config)
    assert time.monotonic() - start < 5  # the loader alone; run.main below also imports the trainer
    assert run.main([str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and expected in err, err[-3000:]
    assert "Traceback" not in err


def test_aliases_within_the_limit_still_load(tmp_path):
    """Anchors are a legitimate way to share values: a modest use loads; just past the limit does not."""
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {lr: 1.0e-4, steps: 10}\nuse: [*b, *b, *b]\n", encoding="utf-8")
    assert read_config_file(path)["use"][2] == {"lr": 1.0e-4, "steps": 10}
    path.write_text(f"a: &a [{', '.join(['1'] * 1000)}]\nb: [{', '.join(['*a'] * (MAX_CONFIG_NODES // 1000))}]\n",
                    encoding="utf-8")
    with pytest.raises(ConfigError, match="aliases expand"):
        read_config_file(path)


def test_deep_nesting_is_a_config_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(ConfigError, match="nests too deeply"):
        read_config_file(path)
