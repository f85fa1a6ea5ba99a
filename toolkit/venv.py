"""Started outside the project's virtual environment (`python run.py ...` as the README writes it, from a shell whose
`python` is the system one): run again with <repo>/.venv/bin/python, as run_distributed_training.sh does.

Standard library only: this runs before any dependency can be imported."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

NEEDED = "diffusers"  # the heaviest dependency: present means requirements.txt is installed for this interpreter
GUARD = "KONTEXT_VENV_REEXEC"  # set on the re-run: a .venv that lacks the packages too must not loop


def venv_python(repo: Path) -> Path:
    return repo / ".venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def use_repo_venv(repo: Path) -> None:
    """Return when the dependencies are importable here; else re-run this command line (sys.orig_argv, so
    `python -m tools.x` works as well as `python run.py`) with the repo's .venv, or exit 2 saying how to install."""
    if importlib.util.find_spec(NEEDED) is not None:
        return
    python = venv_python(repo)
    if python.exists() and not os.environ.get(GUARD):
        os.environ[GUARD] = "1"
        sys.stderr.flush()
        os.execv(str(python), [str(python), *sys.orig_argv[1:]])
    where = f"nor for {python}" if python.exists() else f"and there is no {python}"
    sys.stderr.write(f"error: {NEEDED} is not installed for {sys.executable} {where}: run `make setup` in {repo} "
                     "(it creates .venv from requirements.txt), or `pip install -r requirements.txt`\n")
    raise SystemExit(2)
