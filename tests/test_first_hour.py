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


# -- item 6: every pre-flight problem at once --------------------------------------------------------------------
def test_every_preflight_problem_is_reported_in_one_run(tmp_path, tiny_model_dir, demo_data_dir, no_model_load,
                                                        capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data_dir, data)
    (data / "control" / "pair_003.png").unlink()  # a target without its control
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder", encoding="utf-8")
    overrides = {"sample.prompts": [f"x --ctrl_img {data / 'nope.png'}"],  # a bad --ctrl_img
                 "training_folder": str(blocker / "out"),  # an output folder that cannot exist
                 "network.pretrained_lora": str(tmp_path / "missing.safetensors")}
    config = _config(tmp_path, tiny_model_dir, data, **overrides)
    assert run.main([str(config)]) == 2
    err = capsys.readouterr().err
    for expected in ("4 checks failed", "target/pair_003.png: no control image", "nope.png does not exist",
                     "training_folder: cannot write to", "missing.safetensors"):
        assert expected in err, expected
    assert "fix it and run again" in err  # the dataset's one problem, in the singular


def test_the_example_placeholders_report_the_folders_and_the_prompt_control(tmp_path, no_model_load, capsys):
    """config/examples/train_lora_flux_kontext_24gb.yaml as shipped: /path/to placeholders everywhere."""
    from tests.helpers import REPO

    config = REPO / "config" / "examples" / "train_lora_flux_kontext_24gb.yaml"
    text = config.read_text(encoding="utf-8").replace('training_folder: "output"',
                                                      f'training_folder: "{tmp_path / "output"}"')
    copy = tmp_path / "example.yaml"
    copy.write_text(text, encoding="utf-8")
    assert run.main([str(copy)]) == 2
    err = capsys.readouterr().err
    assert "folder does not exist" in err and "--ctrl_img" in err, err[-3000:]
    assert not (tmp_path / "output").exists()  # a failed start leaves no empty run folder


# -- item 8: training samples ------------------------------------------------------------------------------------
def test_training_samples_follow_the_control_shape_and_carry_their_parameters(tmp_path, tiny_model_dir,
                                                                              demo_data_dir):
    from PIL import Image

    from toolkit.render.pngmeta import read_png_params

    portrait = tmp_path / "portrait.png"
    Image.new("RGB", (96, 192), (200, 30, 30)).save(portrait)
    prompts = [f"[trigger] tall --ctrl_img {portrait}", f"[trigger] fixed --ctrl_img {portrait} --w 64 --h 64"]
    overrides = {"train.steps": 2, "save.save_every": 2, "sample.sample_every": 2, "sample.width": 64,
                 "sample.height": 64, "sample.prompts": prompts}
    assert run.main([str(_config(tmp_path, tiny_model_dir, demo_data_dir, **overrides))]) == 0
    samples = tmp_path / "out" / "tiny" / "samples"
    with Image.open(samples / "000000002_00.png") as tall, Image.open(samples / "000000002_01.png") as fixed:
        assert tall.height > tall.width and tall.size == (32, 80)  # 1:2 within 64x64 px, sides multiples of 16
        assert fixed.size == (64, 64)  # --w/--h win
    params = read_png_params(samples / "000000002_00.png")
    assert params["prompt"] == "inv3rt tall" and params["seed"] == 42 and params["training_step"] == 2
    assert params["lora"].endswith("tiny.safetensors") or params["lora"].endswith("tiny_000000002.safetensors") \
        or "step 2" in params["lora"]
    sheet = read_png_params(samples / "000000002_sheet.png")
    assert sheet["training_step"] == 2
    with Image.open(samples / "000000002_sheet.png") as img:  # a title row (control | tiny, step 2) above 2 rows
        assert img.height == 20 + 2 * (128 + 20)


# -- item 2: a Hub model id without network or token -------------------------------------------------------------
HUB_ID = "black-forest-labs/FLUX.1-Kontext-dev"


def test_an_uncached_hub_model_offline_is_one_line_and_exit_2(tmp_path, tiny_model_dir, demo_data_dir,
                                                               no_model_load, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    config = _config(tmp_path, tiny_model_dir, demo_data_dir, **{"model.name_or_path": HUB_ID})
    assert run.main([str(config)]) == 2
    err = capsys.readouterr().err
    assert f"model.name_or_path: {HUB_ID} is not in the local Hugging Face cache" in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "ERROR" in line]) == 1
    assert not (tmp_path / "out").exists()  # no empty run folder


def _fake_cache(root: Path, repo_id: str) -> Path:
    """The layout huggingface_hub's cache uses: refs/main names a snapshot folder that holds the files."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40, encoding="utf-8")
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}", encoding="utf-8")
    return root


def test_a_cached_hub_model_needs_no_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from toolkit.publish.model_source import hub_model_problem

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(_fake_cache(tmp_path / "cache", HUB_ID)))
    assert hub_model_problem(HUB_ID) is None


@pytest.fixture
def fake_hub(monkeypatch):
    """A local HTTP server standing in for the Hub: every request answers `status` with the Hub's error headers."""
    import http.server
    import threading

    from huggingface_hub import constants

    answer = {"status": 401, "code": "GatedRepo"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self):
            self.send_response(answer["status"])
            self.send_header("X-Error-Code", answer["code"])
            self.send_header("X-Error-Message", "Access to model is restricted.")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET = _reply

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        f"http://127.0.0.1:{server.server_port}" + "/{repo_id}/resolve/{revision}/{filename}")
    yield answer
    server.shutdown()


def test_a_gated_hub_model_without_token_says_accept_the_license_and_set_hf_token(tmp_path, fake_hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from toolkit.publish.model_source import hub_model_problem

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    problem = hub_model_problem(HUB_ID, timeout_s=5)
    assert problem is not None and "gated" in problem and "HF_TOKEN" in problem and "\n" not in problem


def test_an_unreachable_hub_is_named(tmp_path, fake_hub, monkeypatch):
    from huggingface_hub import constants

    from toolkit.publish.model_source import hub_model_problem

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    problem = hub_model_problem(HUB_ID, timeout_s=5)
    assert problem is not None and "cannot be reached" in problem and "local diffusers folder" in problem
