"""The first hour of a new user (issue 22): file modes, extending a finished run, starting outside the venv, and
the traps around the first sample round."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import run
from tests.helpers import merge, tiny_config_dict, write_config


def _config(folder: Path, model_dir: Path, data_dir: Path, name: str = "tiny", **overrides) -> Path:
    cfg = merge(tiny_config_dict(folder / "out", model_dir, data_dir, name=name), overrides)
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder / f"{name}.yaml", cfg)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_follow_the_umask():
    from toolkit.state.atomic import atomic_write_bytes

    old = os.umask(0o027)
    try:
        target = Path(os.environ.get("TMPDIR", "/tmp")) / f"t22-umask-{os.getpid()}"
        atomic_write_bytes(target, b"x")
        assert _mode(target) == 0o640
        target.unlink()
    finally:
        os.umask(old)


def test_every_output_file_is_0644_under_umask_022(tmp_path, tiny_model_dir, demo_data_dir, umask_022):
    config = _config(tmp_path, tiny_model_dir, demo_data_dir,
                     **{"train.steps": 2, "save.save_every": 1, "sample.sample_every": 2})
    assert run.main([str(config)]) == 0
    folder = tmp_path / "out" / "tiny"
    files = [p for p in folder.rglob("*") if p.is_file() and "logs" not in p.parts]
    kinds = {p.suffix for p in files}
    assert {".safetensors", ".png", ".yaml"} <= kinds, kinds
    wrong = {str(p.relative_to(folder)): oct(_mode(p)) for p in files if _mode(p) != 0o644}
    assert wrong == {}


def test_raising_steps_extends_a_finished_run_and_keeps_its_final_lora(tmp_path, tiny_model_dir, demo_data_dir,
                                                                       capsys):
    from safetensors.torch import load_file

    from toolkit.state.train_state import find_latest_state, read_info

    base = {"train.steps": 3, "save.save_every": 2, "save.max_step_saves_to_keep": 1}
    assert run.main([str(_config(tmp_path, tiny_model_dir, demo_data_dir, **base))]) == 0
    folder = tmp_path / "out" / "tiny"
    finished = (folder / "tiny.safetensors").read_bytes()
    capsys.readouterr()
    # Only train.steps changed, no train.resume_from: the run continues instead of being refused.
    assert run.main([str(_config(tmp_path, tiny_model_dir, demo_data_dir, **{**base, "train.steps": 6}))]) == 0
    assert read_info(find_latest_state(folder))["step"] == 6
    kept = folder / "tiny_000000003.safetensors"
    assert kept.read_bytes() == finished, "the finished 3-step LoRA must survive the extension (and rotation)"
    assert load_file(str(folder / "tiny.safetensors")).keys() == load_file(str(kept)).keys()
    assert (folder / "tiny.safetensors").read_bytes() != finished
    err = capsys.readouterr().err
    assert "kept as tiny_000000003.safetensors" in err
    assert "3 steps trained" in err  # this run trained steps 4-6, not 6


def test_other_changes_besides_steps_are_still_refused(tmp_path, tiny_model_dir, demo_data_dir, capsys):
    base = {"train.steps": 2, "save.save_every": 2}
    assert run.main([str(_config(tmp_path, tiny_model_dir, demo_data_dir, **base))]) == 0
    changed = {**base, "train.steps": 4, "train.lr": 2e-3}
    assert run.main([str(_config(tmp_path, tiny_model_dir, demo_data_dir, **changed))]) == 2
    assert "train.lr: 0.001 -> 0.002" in capsys.readouterr().err


def _clone_without_venv(tmp_path: Path) -> Path:
    """A checkout whose interpreter-facing files are real (run.py resolves its repo from its own path)."""
    import shutil

    from tests.helpers import REPO

    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(REPO / "run.py", clone / "run.py")
    for name in ("jobs", "toolkit", "extensions", "tools", "config"):
        (clone / name).symlink_to(REPO / name)
    return clone


def _system_python() -> str:
    """The interpreter the project's venv was made from: no project dependencies installed."""
    import subprocess
    import sys

    base = Path(sys.base_prefix) / "bin" / "python3"
    probe = subprocess.run([str(base), "-c", "import diffusers"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip(f"{base} has diffusers installed: nothing to test")
    return str(base)


def test_run_py_outside_the_venv_reruns_itself_inside_it(tmp_path):
    import subprocess
    import sys

    clone = _clone_without_venv(tmp_path)
    python = _system_python()
    (clone / ".venv").symlink_to(Path(sys.prefix))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "KONTEXT_VENV_REEXEC")}
    done = subprocess.run([python, "run.py", "--help-config"], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resume_from" in done.stdout
    tool = subprocess.run([python, "-m", "tools.demo_data", "--help"], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=120)
    assert tool.returncode == 0, tool.stderr[-2000:]


def test_run_py_without_any_venv_says_how_to_install(tmp_path):
    import subprocess

    clone = _clone_without_venv(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "KONTEXT_VENV_REEXEC")}
    done = subprocess.run([_system_python(), "run.py", "--help-config"], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "make setup" in done.stderr and "Traceback" not in done.stderr
