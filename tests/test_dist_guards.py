"""Guards around the process group: a stalled rank ends the run after train.ddp_timeout_seconds, WORLD_SIZE must
match the group accelerate formed, and the launcher refuses more processes than GPUs instead of silently using
fewer."""

from __future__ import annotations

import stat
import sys
import time
from types import SimpleNamespace

import pytest

from tests.helpers import tiny_config_dict, write_config
from tests.launch import FAILURE_BOUND_S, SCRIPTS, accelerate_launch, ddp_config, explain, run_launcher
from toolkit.dist import Runtime
from toolkit.errors import UserError


def test_world_size_env_that_differs_from_the_process_group_is_an_error(monkeypatch):
    rt = object.__new__(Runtime)  # only the check: no process group is formed
    rt.accelerator = SimpleNamespace(num_processes=1)
    monkeypatch.delenv("KONTEXT_EXPECTED_WORLD_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="WORLD_SIZE=2 but accelerate formed a group of 1 processes"):
        rt._check_world_size()
    monkeypatch.setenv("WORLD_SIZE", "1")
    rt._check_world_size()


def test_launcher_refuses_more_processes_than_gpus(tmp_path, tiny_model_dir, demo_data_dir):
    """A machine with 1 GPU (the interpreter the launcher asks says so) and 2 processes asked: exit 2, nothing
    started, instead of quietly training with half the effective batch."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\nif [[ "$*" == *"cuda.device_count"* ]]; then echo 1; exit 0; fi\n'
                    f'exec {sys.executable} "$@"\n', encoding="utf-8")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir))
    proc = run_launcher(config, 2, "--dry-run", env={"PYTHON": str(fake)}, timeout=60)
    assert proc.returncode == 2, explain(proc)
    assert "2 processes asked but this machine has 1 GPU(s): pass NUM_PROCESSES 1" in proc.stderr
    assert "command:" not in proc.stdout


@pytest.mark.distributed
def test_a_stalled_rank_ends_every_rank_after_the_ddp_timeout(tmp_path, tiny_model_dir, demo_data_dir):
    """Rank 1 hangs (alive, never reaching the all-reduce) at step 2: rank 0's collective gives up after
    train.ddp_timeout_seconds, and the launcher ends the hung rank; without the key the default is 30 minutes."""
    config = ddp_config(tmp_path, tiny_model_dir, demo_data_dir, "stall",
                        **{"train.steps": 50, "sample.prompts": [], "train.ddp_timeout_seconds": 10})
    start = time.monotonic()
    proc = accelerate_launch(SCRIPTS / "run_with_probes.py", config, env={"KONTEXT_TEST_FAIL": "1:2:stall"},
                             timeout=FAILURE_BOUND_S)
    assert proc.returncode != 0, explain(proc)
    assert time.monotonic() - start < FAILURE_BOUND_S
    assert "test fault: rank 1 fails at step 2 (stall)" in proc.stderr, explain(proc)
    assert not (tmp_path / "out" / "stall" / "stall.safetensors").exists()
