"""Entry points beside run.py that use the trainer: benchmarks, the tiny-model and demo-data builders, the launch check.

Run each as `python -m tools.<name>`; nothing under toolkit/, extensions/ or jobs/ imports from here."""

import sys as _sys
from pathlib import Path as _Path

_ARGV = _sys.orig_argv
if "-m" in _ARGV[:-1] and _ARGV[_ARGV.index("-m") + 1].startswith("tools."):  # outside .venv: re-run inside it
    from toolkit.venv import use_repo_venv as _use_repo_venv

    _use_repo_venv(_Path(__file__).absolute().parents[1])
