"""SIGKILL that provably lands where it hurts, then an exact resume. Each kill waits for the run to pause at its
point (tests/resume_scripts/pause_at.py: mid-step, mid-save, mid-prune, mid-sampling), checks that the process died
by the signal and that no partial checkpoint is visible; the last run must end with the uninterrupted run's LoRA,
bit for bit."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.helpers import REPO, assert_same_tensors
from tests.launch import clean_env
from tests.test_resume import START_TIMEOUT_S, _assert_nothing_partial, _config, _run, pristine_run  # noqa: F401
from toolkit.state import train_state
from toolkit.state.train_state import find_latest_state, list_states

PAUSE_SCRIPT = REPO / "tests" / "resume_scripts" / "pause_at.py"


def _run_until_paused(config: Path, log: Path, point: str, marker: Path) -> subprocess.Popen:
    threads = str(torch.get_num_threads())  # the same float math as the in-process reference run
    handle = log.open("w", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(PAUSE_SCRIPT), str(config)], cwd=REPO, stdout=handle,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env=clean_env(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
                                          KONTEXT_TEST_PAUSE=point, KONTEXT_TEST_PAUSE_MARKER=str(marker)))
    deadline = time.monotonic() + START_TIMEOUT_S
    while not marker.exists():
        assert proc.poll() is None, f"ended (exit {proc.returncode}) before pausing at {point}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"never paused at {point}"
        time.sleep(0.05)
    return proc


# (pause point, what must be on disk at the kill): states are saved every step, 2 kept, a sample every 5 steps.
KILLS = [("step:3", None), ("save:2", ".*.tmp"), ("prune:1", ".*.old"), ("sample:1", None)]


def test_sigkill_mid_step_save_prune_and_sampling_then_resume_gives_the_same_lora(pristine_run, tmp_path,
                                                                                 tiny_model_dir, demo_data_dir):
    config = _config(tmp_path / "killed", tiny_model_dir, demo_data_dir)
    run_dir = tmp_path / "killed" / "out" / "tiny"
    root = train_state.state_root(run_dir)
    for round_, (point, leftover) in enumerate(KILLS):
        before = find_latest_state(run_dir)
        log = tmp_path / f"round{round_}.log"
        proc = _run_until_paused(config, log, point, tmp_path / f"paused{round_}")
        if leftover is not None:
            assert list(root.glob(leftover)), f"paused at {point} but no {leftover} in {root}"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        text = log.read_text(encoding="utf-8")
        assert before is None or f"resuming from {before}:" in text, text[-3000:]
        _assert_nothing_partial(run_dir)
        assert not (run_dir / "tiny.safetensors").exists()
    assert [s for s, _ in list_states(run_dir)] == [4, 5]  # step 5's state was complete before its sample

    log = tmp_path / "final.log"
    assert _run(config, log) == 0, log.read_text()
    assert f"resuming from {root / '000000005'}:" in log.read_text(encoding="utf-8")
    assert not any(root.glob(".*")), "leftovers of interrupted saves and prunes are cleaned up"
    assert_same_tensors(pristine_run / "tiny.safetensors", run_dir / "tiny.safetensors")
