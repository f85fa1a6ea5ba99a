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


def test_atomic_writes_follow_the_umask(tmp_path):
    from toolkit.state.atomic import atomic_write_bytes

    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "file", b"x")
        assert _mode(tmp_path / "file") == 0o640
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


# -- item 1: the first sample round ------------------------------------------------------------------------------
@pytest.fixture
def slow_sampling(monkeypatch):
    """A stand-in for a slow device: every sample image takes `delay` seconds more; `on_render(n)` runs before the
    n-th image (1-based), e.g. to send this process a stop signal."""
    import time

    from extensions.flux_kontext import FluxKontext

    original = FluxKontext._render
    calls = {"n": 0, "delay": 0.3, "on_render": None}

    def slow(self, request, control, stop=None):
        calls["n"] += 1
        if calls["on_render"]:
            calls["on_render"](calls["n"])
        time.sleep(calls["delay"])
        return original(self, request, control, *([stop] if stop is not None else []))

    monkeypatch.setattr(FluxKontext, "_render", slow)
    return calls


def _three_prompts(data_dir: Path) -> list[str]:
    control = data_dir / "sample_control" / "sample_000.png"
    return [f"[trigger] invert {i} --ctrl_img {control}" for i in range(3)]


def test_sigterm_during_the_first_samples_stops_between_images_without_saving(
        tmp_path, tiny_model_dir, demo_data_dir, slow_sampling, capsys):
    import signal

    from toolkit.state.train_state import list_states

    slow_sampling["on_render"] = lambda n: n == 2 and os.kill(os.getpid(), signal.SIGTERM)
    overrides = {"train.steps": 3, "train.skip_first_sample": False, "sample.prompts": _three_prompts(demo_data_dir)}
    assert run.main([str(_config(tmp_path, tiny_model_dir, demo_data_dir, **overrides))]) == 143
    assert slow_sampling["n"] == 2, "the third image must not be rendered after the signal"
    err = capsys.readouterr().err
    assert "samples of step 0: 1/3 done" in err and "left" in err
    assert "no step was trained, nothing saved" in err
    folder = tmp_path / "out" / "tiny"
    assert list_states(folder) == [] and not list(folder.glob("*.safetensors"))
    # Nothing was trained, so the corrected config is not blocked by the stopped one.
    slow_sampling["on_render"] = None
    fixed = {**overrides, "train.lr": 2e-3, "train.skip_first_sample": True}
    assert run.main([str(_config(tmp_path, tiny_model_dir, demo_data_dir, **fixed))]) == 0


def test_a_long_first_sample_round_says_how_to_skip_it(tmp_path, tiny_model_dir, demo_data_dir, slow_sampling,
                                                        monkeypatch, capsys):
    from jobs.process import sample_round

    monkeypatch.setattr(sample_round, "LONG_FIRST_ROUND_S", 0.5)  # 3 images x 0.3 s here; minutes on a real device
    overrides = {"train.steps": 1, "train.skip_first_sample": False, "sample.prompts": _three_prompts(demo_data_dir)}
    assert run.main([str(_config(tmp_path, tiny_model_dir, demo_data_dir, **overrides))]) == 0
    err = capsys.readouterr().err
    assert err.count("train.skip_first_sample: true") == 1
    assert "samples of step 0: 3/3 done" in err


def test_sampling_time_is_not_step_time(tmp_path):
    import time

    from toolkit.train.metrics import TrainingMonitor

    monitor = TrainingMonitor(tmp_path / "logs", total_steps=10, start_step=0, enabled=True)
    try:
        with monitor.paused():
            time.sleep(0.5)
        monitor.step_done()
        seconds, steps = monitor.window()
        assert steps == 1 and seconds < 0.2
        assert monitor.bar.format_dict["elapsed"] < 0.2  # the bar's rate and ETA are computed from this
    finally:
        monitor.close()


def test_a_changed_config_is_not_blocked_by_a_run_stopped_before_its_first_save(tmp_path, tiny_model_dir,
                                                                               demo_data_dir, monkeypatch, capsys):
    import signal

    from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess
    from toolkit.state.train_state import list_states

    original, calls = BaseSDTrainProcess.compute_loss, {"n": 0}

    def stop_in_step_2(self, run_, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, run_, batch)

    monkeypatch.setattr(BaseSDTrainProcess, "compute_loss", stop_in_step_2)
    base = {"train.steps": 6, "save.save_every": 100}
    assert run.main([str(_config(tmp_path, tiny_model_dir, demo_data_dir, **base))]) == 143
    folder = tmp_path / "out" / "tiny"
    assert [step for step, _ in list_states(folder)] == [2]
    monkeypatch.setattr(BaseSDTrainProcess, "compute_loss", original)
    capsys.readouterr()
    assert run.main([str(_config(tmp_path, tiny_model_dir, demo_data_dir, **{**base, "train.lr": 2e-3}))]) == 0
    assert "starting over in" in capsys.readouterr().err
    assert (folder.parent / "tiny_v2" / "tiny_v2.safetensors").is_file()
    assert [step for step, _ in list_states(folder)] == [2]  # the stopped run is kept as it was


def test_a_stop_ends_the_denoising_loop_of_the_image_being_rendered(tiny_model_dir, demo_data_dir):
    import torch

    from extensions.flux_kontext import FluxKontext
    from toolkit.config.schema import ModelConfig
    from toolkit.render.sampling import build_requests, load_controls

    model = FluxKontext.load(ModelConfig(name_or_path=str(tiny_model_dir), arch="flux_kontext", max_sequence_length=16),
                             torch.device("cpu"), torch.float32)
    (request,) = build_requests([f"x --ctrl_img {demo_data_dir / 'sample_control' / 'sample_000.png'}"], seed=0,
                                walk_seed=False, width=64, height=64, guidance_scale=1.0, steps=6)
    calls = []
    hook = model.pipe.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        model.sample([request], [load_controls(request)], stop=lambda: len(calls) >= 2)
    finally:
        hook.remove()
    assert len(calls) == 2, "denoising must end at the first step after the stop, not run all 6"
