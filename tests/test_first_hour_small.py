"""The first hour of a new user (issue 22, item 9): the smaller traps, one test each."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import time

import pytest

import run
from tests.helpers import REPO
from tests.test_first_hour import _config

_PROBE = """
import runpy, sys
sys.argv = ["run.py", *sys.argv[1:]]
try:
    runpy.run_path("run.py", run_name="__main__")
except SystemExit:
    pass
sys.stderr.write("HEAVY:" + ",".join(m for m in ("torch", "diffusers", "transformers", "peft") if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help-config"], ["generate", "--help"], ["compare", "--help"], ["--help"]])
def test_help_prints_at_once_without_loading_torch(argv):
    best = float("inf")
    for _ in range(2):  # best of two: a shared CI machine may stall one start
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        best = min(best, time.perf_counter() - started)
    assert "usage" in done.stdout or "train" in done.stdout
    assert done.stderr.rsplit("HEAVY:", 1)[1] == ""
    assert best < 1.0, f"{' '.join(argv)} took {best:.2f} s"


def test_log_lines_are_not_glued_onto_the_progress_bar():
    from tqdm.auto import tqdm

    from toolkit.train.metrics import TqdmLogHandler

    stream = io.StringIO()
    handler = TqdmLogHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("t22.glue")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with tqdm(total=4, desc="train", file=stream) as bar:
            bar.update(1)
            logger.warning("a message")
            bar.update(1)
    finally:
        logger.removeHandler(handler)
    segments = re.split(r"[\r\n]", stream.getvalue())
    assert any(s.startswith("WARNING a message") for s in segments), stream.getvalue()


def test_the_bar_shows_this_steps_loss(tmp_path):
    import torch

    from toolkit.train.metrics import TrainingMonitor

    monitor = TrainingMonitor(tmp_path / "logs", total_steps=10, start_step=0, enabled=True)
    try:
        monitor.step_done(torch.tensor(0.25))
        assert "0.2500" in monitor.bar.postfix
    finally:
        monitor.close()


def test_lr_plan_is_written_once_per_run_folder(tmp_path, tiny_model_dir, demo_data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = {"train.steps": 2, "save.save_every": 2}
    assert run.main([str(_config(tmp_path, tiny_model_dir, demo_data_dir, **base))]) == 0
    assert run.main([str(_config(tmp_path, tiny_model_dir, demo_data_dir, **{**base, "train.steps": 3}))]) == 0
    events = EventAccumulator(str(tmp_path / "out" / "tiny" / "logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/lr_schedule")] == [1, 2]


def test_generate_width_alone_names_the_flags(capsys):
    with pytest.raises(SystemExit) as stopped:
        run.main(["generate", "--model", "m", "--ctrl-img", "c.png", "--prompt", "p", "--width", "256"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--width and --height together" in err and "config.process" not in err


def test_the_config_path_is_printed_once(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: extension\nconfig:\n  name: tiny\n  process:\n    - train: {steps: 2\n", encoding="utf-8")
    assert run.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("bad.yaml") == 1, err


def test_quantize_on_a_cpu_warns_that_it_is_slower(tmp_path, tiny_model_dir, demo_data_dir, no_model_load, capsys):
    config = _config(tmp_path, tiny_model_dir, demo_data_dir, **{"model.quantize": True})
    run.main([str(config)])  # stops at the model load (no_model_load): the warning comes before it
    assert "model.quantize on a CPU" in capsys.readouterr().err


def test_readme_says_what_relative_paths_are_relative_to():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "Relative paths in a config" in readme and "working directory" in readme
