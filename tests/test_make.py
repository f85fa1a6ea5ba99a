"""`make test` is what CI runs (.ci/run) and installs the Ray extra, so tests/test_ray.py never silently skips."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers import REPO


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_test_installs_the_ray_extra_and_ci_runs_make_test(tmp_path):
    dry = subprocess.run(["make", "-n", "test", f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "-r requirements-ray.txt" in dry.stdout and "pytest -q tests" in dry.stdout, dry.stdout
    assert "-r requirements-trackers.txt" in dry.stdout, dry.stdout
    commands = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "set ", "cd ", "export "))]
    assert commands == ["make test"]
